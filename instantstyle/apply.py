"""InstantStyle end to end: CLIP-vision features -> (minus content text) -> image tokens -> patched model clone.

Only the selected layers get an attn2 replace; every other layer keeps ComfyUI's stock attention path.
The input MODEL and its patch objects are never changed: the result is a ``clone()`` whose patch dicts
are new (``set_model_attn2_replace`` copies them) and whose new patches wrap whatever replace was there.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from . import blocks, projection
from .adapter_file import IPAdapter
from .attention import IPAttention
from .subtraction import check_subtraction, subtract_content

log = logging.getLogger(__name__)
COMBINE_MODES = ("average", "concat")


@dataclass(frozen=True)
class StyleSettings:
    weight: float = 1.0
    preset: str = "style"
    custom_blocks: str = ""
    combine: str = "average"  # several style images: average their embeddings, or concatenate their tokens
    subtract: float = 0.0
    start: float = 0.0
    end: float = 1.0

    def check(self) -> None:
        if not -1.0 <= self.weight <= 5.0:
            raise ValueError(f"weight {self.weight} is outside -1..5.")
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"combine {self.combine!r} must be one of {', '.join(COMBINE_MODES)}.")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"start {self.start} / end {self.end} must satisfy 0 <= start < end <= 1 "
                             "(fractions of the sampling schedule).")


def image_features(clip_vision, images: torch.Tensor, plus: bool) -> torch.Tensor:
    """CLIP-vision features an adapter eats: ``image_embeds`` [N, E], or penultimate tokens [N, P, H] for Plus."""
    out = clip_vision.encode_image(images, crop=True)
    return (out["penultimate_hidden_states"] if plus else out["image_embeds"]).float()


def zero_image_features(clip_vision, plus: bool, like: torch.Tensor) -> torch.Tensor:
    """Unconditional features as the reference makes them: zero embeds (plain), or the penultimate tokens
    of an all-zero *normalised* pixel tensor (Plus; diffusers' ``encode_image``), not of a black image."""
    if not plus:
        return torch.zeros_like(like[:1])
    import comfy.model_management

    comfy.model_management.load_model_gpu(clip_vision.patcher)
    size = clip_vision.image_size
    pixels = torch.zeros(1, 3, size, size, device=clip_vision.load_device)
    out = clip_vision.model(pixel_values=pixels, intermediate_output=-2)
    return out[1].to(like.device).float()


def style_tokens(adapter: IPAdapter, features: torch.Tensor, combine: str) -> torch.Tensor:
    """[1, T, C] tokens for one or several images: mean of the features, or their tokens side by side."""
    if combine == "average" and features.shape[0] > 1:
        features = features.mean(dim=0, keepdim=True)
    tokens = projection.project(adapter, features)
    return tokens.reshape(1, -1, tokens.shape[-1])


def build_tokens(adapter: IPAdapter, cond_features: torch.Tensor, uncond_features: torch.Tensor,
                 settings: StyleSettings, content_pooled: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) image tokens; the content subtraction changes the cond side only."""
    if content_pooled is not None and settings.subtract != 0:
        check_subtraction(adapter.projection, adapter.embed_width, content_pooled.shape[-1], adapter.name)
        cond_features = subtract_content(cond_features, content_pooled, settings.subtract)
    cond = style_tokens(adapter, cond_features, settings.combine)
    uncond = style_tokens(adapter, uncond_features, "average")
    return cond, uncond


def encode_tokens(adapter: IPAdapter, clip_vision, images: torch.Tensor, settings: StyleSettings,
                  negative_images: torch.Tensor | None = None,
                  content_pooled: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) image tokens from the style image(s), the optional negative image(s) and content text."""
    if content_pooled is not None and settings.subtract != 0:  # fail before the (slow) image encoding
        check_subtraction(adapter.projection, adapter.embed_width, content_pooled.shape[-1], adapter.name)
    plus = adapter.projection == "plus"
    features = image_features(clip_vision, images, plus)
    if negative_images is not None:
        uncond = image_features(clip_vision, negative_images, plus).mean(dim=0, keepdim=True)
    else:
        uncond = zero_image_features(clip_vision, plus, features)
    return build_tokens(adapter, features, uncond, settings, content_pooled)


def check_fit(adapter: IPAdapter, layers: list[blocks.AttnLayer]) -> None:
    family = blocks.model_family(layers)
    if adapter.cross_dim != layers[0].context_dim or adapter.family != family:
        raise ValueError(f"the IP-Adapter is {adapter.family} ({adapter.cross_dim}-d context) but MODEL is {family} "
                         f"({layers[0].context_dim}-d): load an IP-Adapter made for this model family.")
    if len(adapter.layers) != len(layers):
        raise ValueError(f"{adapter.name} has {len(adapter.layers)} cross-attention layers but MODEL has "
                         f"{len(layers)}: it was made for another UNet layout (e.g. SDXL base vs a distilled "
                         "SDXL such as KOALA or SSD-1B).")
    for layer in layers:
        k, _ = adapter.layers[layer.index]
        if tuple(k.shape) != (layer.inner_dim, layer.context_dim):
            raise ValueError(f"{adapter.name} layer {2 * layer.index + 1} is {tuple(k.shape)} but MODEL layer "
                             f"{layer.key} needs ({layer.inner_dim}, {layer.context_dim}).")


def sigma_range(model, start: float, end: float) -> tuple[float, float]:
    """(sigma_start, sigma_end) of a schedule fraction, from the model's own sampling (gated by sigma)."""
    ms = model.get_model_object("model_sampling")
    sigma_start = math.inf if start <= 0 else float(ms.percent_to_sigma(start))
    sigma_end = 0.0 if end >= 1 else float(ms.percent_to_sigma(end))
    return sigma_start, sigma_end


def select_layers(model, adapter: IPAdapter, settings: StyleSettings) -> list[blocks.AttnLayer]:
    """The layers the preset patches, after checking the adapter fits the model (cheap: run it first)."""
    settings.check()
    layers = blocks.attention_layers(model.model.diffusion_model)
    if not layers:
        raise ValueError("MODEL has no cross-attention layers: InstantStyle needs an SD1.5 or SDXL-family UNet.")
    check_fit(adapter, layers)
    chosen = blocks.select(layers, settings.preset, settings.custom_blocks)
    log.info("InstantStyle: %s, preset %r -> %d of %d cross-attention layers (%s)", adapter.name, settings.preset,
             len(chosen), len(layers), ", ".join(dict.fromkeys(f"{c.key[0]} {c.key[1]}" for c in chosen)))
    return chosen


def patch_model(model, adapter: IPAdapter, chosen: list[blocks.AttnLayer], cond: torch.Tensor,
                uncond: torch.Tensor, settings: StyleSettings, mask: torch.Tensor | None = None):
    """A clone of ``model`` with the IP attention added in the ``chosen`` layers only."""
    sigma_start, sigma_end = sigma_range(model, settings.start, settings.end)
    if mask is not None:
        mask = mask.reshape(-1, mask.shape[-2], mask.shape[-1]).float().clamp(0, 1)
    existing = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    clone = model.clone()
    for layer in chosen:
        k_w, v_w = adapter.layers[layer.index]
        prev = existing.get(layer.key, existing.get(layer.block))
        patch = IPAttention(to_k_ip=k_w, to_v_ip=v_w, cond=cond, uncond=uncond, weight=float(settings.weight),
                            sigma_start=sigma_start, sigma_end=sigma_end, mask=mask, prev=prev, key=layer.key)
        clone.set_model_attn2_replace(patch, *layer.key)
    return clone
