"""UniTune edit helpers: SDEdit late start, blend-back of original detail, masks.

Pure tensor functions on ComfyUI's layouts: images ``[B, H, W, C]`` in [0, 1], masks ``[B, H, W]``
(or ``[H, W]``), sigma schedules ``[steps + 1]``.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# Blurred per-pixel difference (in [0, 1] pixel units) below which a pixel counts as unchanged,
# and above which it counts as fully edited; in between the weight falls off smoothly.
UNCHANGED_BELOW, CHANGED_ABOVE = 0.04, 0.2


def check_start(start: float) -> None:
    if not (math.isfinite(start) and 0.0 <= start <= 1.0):
        raise ValueError(f"start={start} must be between 0 and 1: 1 samples from pure noise, 0.6 starts from the "
                         "original noised to 60% of the schedule, 0 returns the original.")


def late_start(sigmas: torch.Tensor, start: float) -> torch.Tensor:
    """The tail of a schedule that begins ``start`` of the way from its end (SDEdit).

    Same as stock ``SplitSigmas`` at step ``round((1 - start) * steps)``: the first part is skipped, the
    original latent is noised to the first remaining sigma and sampled from there.
    """
    check_start(start)
    steps = sigmas.shape[-1] - 1
    skip = round((1.0 - start) * steps)
    return sigmas[skip:]


def repeat_batch(latent: torch.Tensor, batch: int) -> torch.Tensor:
    """``batch`` copies of a one-image latent along dim 0, whatever its rank.

    Image models' latents are ``[B, C, H, W]``; Qwen-Image's Wan-2.1 latents are ``[B, C, T, H, W]``.
    """
    return latent.repeat(batch, *([1] * (latent.ndim - 1)))


def latent_mask(mask: torch.Tensor | None, latent: torch.Tensor) -> torch.Tensor | None:
    """A pixel mask ``[B, H, W]`` shaped for ComfyUI's ``denoise_mask`` of ``latent``.

    ComfyUI resizes a mask to a 5-D latent ``[B, C, T, H, W]`` by folding every leading dim into T, so a
    batch of masks (one per variation) would be averaged into one; given ``[B, 1, 1, H, W]`` it keeps them
    apart. 4-D latents take the ComfyUI MASK as it is.
    """
    if mask is None or latent.ndim != 5:
        return mask
    return mask[:, None, None]


def decoded_images(decoded: torch.Tensor) -> torch.Tensor:
    """A VAE's decode as images ``[B, H, W, C]``: video VAEs (Wan-2.1, Qwen-Image's) give ``[B, T, H, W, C]``,
    flattened as the stock VAEDecode node does (one frame per image here)."""
    return decoded.reshape(-1, *decoded.shape[-3:]) if decoded.ndim == 5 else decoded


def check_blend(blend: float, blend_unchanged: float) -> None:
    for name, value in (("blend", blend), ("blend_unchanged", blend_unchanged)):
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"{name}={value} must be between 0 and 1.")


def fit_mask(mask: torch.Tensor | None, height: int, width: int, batch: int | None = None) -> torch.Tensor | None:
    """A mask ``[B, H, W]`` at the image size; a mask of another size is resized with a logged note.

    With ``batch`` (the number of variations), the mask batch must be 1 (one mask for all) or ``batch``
    (one each): anything else would only fail deep inside the sampler.
    """
    if mask is None:
        return None
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"mask has shape {tuple(mask.shape)}: expected [H, W] or [B, H, W] (a ComfyUI MASK).")
    if batch is not None and mask.shape[0] not in (1, batch):
        raise ValueError(f"mask is a batch of {mask.shape[0]} masks but batch is {batch}: give 1 mask (used for "
                         f"every variation) or {batch} (one per variation).")
    if tuple(mask.shape[-2:]) != (height, width):
        log.info("UniTune Edit: mask is %dx%d, image is %dx%d; resizing the mask to the image",
                 mask.shape[-1], mask.shape[-2], width, height)
        mask = F.interpolate(mask[:, None].float(), size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    return mask.float().clamp(0.0, 1.0)


def _smoothstep(lo: float, hi: float, x: torch.Tensor) -> torch.Tensor:
    t = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def unchanged_weight(edited: torch.Tensor, original: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Per pixel, how unchanged the edit left the image: 1 where it matches the original, 0 where edited.

    The absolute difference is averaged over channels and box-blurred (so single noisy pixels do not
    punch holes), then mapped through a smooth step between ``UNCHANGED_BELOW`` and ``CHANGED_ABOVE``.
    Returns ``[B, H, W, 1]``.
    """
    diff = (edited - original).abs().mean(dim=-1, keepdim=True).movedim(-1, 1)
    size = 2 * radius + 1
    blurred = F.avg_pool2d(F.pad(diff, (radius,) * 4, mode="replicate"), size, stride=1)
    return 1.0 - _smoothstep(UNCHANGED_BELOW, CHANGED_ABOVE, blurred.movedim(1, -1))


def blend_back(edited: torch.Tensor, original: torch.Tensor, blend: float, blend_unchanged: float,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Bring original detail back into an edited image ``[B, H, W, C]``.

    ``blend`` interpolates globally toward the original (1 = the original exactly); ``blend_unchanged``
    additionally restores the original where the edit did not change the image (difference-driven soft
    mask). With ``mask`` ``[B, H, W]`` (1 = edit), pixels where it is 0 are the original exactly.
    """
    check_blend(blend, blend_unchanged)
    original = original.to(edited)
    if original.shape[0] != edited.shape[0]:
        original = original.expand(edited.shape[0], *original.shape[1:])
    weight = torch.full_like(edited[..., :1], blend)
    if blend_unchanged > 0.0:
        weight = weight + (1.0 - blend) * blend_unchanged * unchanged_weight(edited, original)
    # lerp is exact at the ends: weight 1 gives the original bit for bit.
    out = torch.lerp(edited, original, weight.clamp(0.0, 1.0).expand_as(edited))
    if mask is not None:
        keep = (1.0 - mask.to(edited))[..., None]
        if keep.shape[0] != out.shape[0]:
            keep = keep.expand(out.shape[0], *keep.shape[1:])
        out = torch.lerp(out, original, keep.expand_as(out))
    return out
