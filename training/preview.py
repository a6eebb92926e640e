"""Previews while a trainer runs: a few Euler steps from a fixed noise at the current weights, as a small image.

A training node shows them in the node the way ComfyUI's samplers show theirs: the image goes to the
node's ``comfy.utils.ProgressBar`` as the ``("JPEG", PIL.Image, max_size)`` tuple that
``ProgressBar.update_absolute(value, total, preview)`` hands to the server's progress hook.

A preview must never change what is trained: it draws under ``torch.no_grad()`` with torch's global
CPU and CUDA RNG forked (``torch.random.fork_rng``), from its own seeded noise, and puts the modules'
train/eval flags back, so a run is bit-identical with previews on or off. Latents become RGB through
the latent format's ``latent_rgb_factors`` (ComfyUI's ``latent_preview.Latent2RGBPreviewer``, the
samplers' "latent2rgb" preview), never through the VAE: loading the VAE through model management
could evict the frozen base the trainer is using from the GPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

Render = Callable[[], torch.Tensor]  # trainer-specific: a LATENT x0 [B, C, h, w] drawn at the current weights
Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma[B]) -> x0 prediction
UPSCALE = 8  # latent pixel -> image pixels (nearest), as the VAE's spatial factor
LATENT_MULTIPLE = 8  # latent sides kept to multiples of 8: the UNets downsample the latent 3 times
EMPTY = (1, 64, 64, 3)  # the grid when no preview was drawn


@dataclass(frozen=True)
class Preview:
    """When and how a trainer draws its previews; ``show(step, image)`` is the node's (progress bar + grid)."""

    every: int  # 0 = off; a preview after optimizer steps every, 2*every, ...
    show: Callable[[int, torch.Tensor], None]  # (step, IMAGE [B,H,W,3] float32 cpu 0..1)
    latent_format: object  # base.model.latent_format (ComfyUI), used to turn latents into RGB
    steps: int = 4  # sampler steps per preview
    size: int = 256  # pixels of the longer side of the fixed noise (multiple of 8*8)
    seed: int = 0  # the fixed preview noise's seed (its own torch.Generator)
    modules: tuple[torch.nn.Module, ...] = field(default=(), compare=False)  # set to eval() while drawing

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"preview_every={self.every} must be 0 (off) or a number of steps.")
        if self.steps < 1:
            raise ValueError(f"preview steps={self.steps} must be at least 1.")
        if self.size < 64 or self.size % 64:
            raise ValueError(f"preview size={self.size} must be a multiple of 64 pixels (64, 128, 256, ...).")

    def due(self, step: int) -> bool:
        """True after optimizer step ``step`` (1-based) when a preview is due."""
        return self.every > 0 and step % self.every == 0

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """Latent (h, w) for an image of ``height`` x ``width`` pixels, longer side ``size``, aspect kept."""
        longest = self.size // UPSCALE
        scale = longest / max(height, width)

        def side(pixels: int) -> int:
            return max(LATENT_MULTIPLE, round(pixels * scale / LATENT_MULTIPLE) * LATENT_MULTIPLE)

        return side(height), side(width)

    def maybe(self, step: int, render: Render, modules: Iterable[torch.nn.Module] = ()) -> torch.Tensor | None:
        """If due: draw ``render()`` untouched-RNG under no_grad, turn it into an IMAGE, ``show`` it and return it.

        ``modules`` (and ``self.modules``) are put in eval mode while drawing; every submodule's
        train/eval flag is restored afterwards, whatever happens.
        """
        if not self.due(step):
            return None
        started = time.perf_counter()
        with torch.random.fork_rng(devices=_cuda_devices()), torch.no_grad(), \
                _eval_mode([*self.modules, *modules]):
            latent = render()
        image = to_image(latent, self.latent_format)
        log.debug("preview at step %d: %.3f s", step, time.perf_counter() - started)
        self.show(step, image)
        return image


def _cuda_devices() -> list[int]:
    """The CUDA devices whose RNG a fork must save (none unless CUDA is already in use: no lazy init)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    return []


@contextlib.contextmanager
def _eval_mode(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Put modules in eval mode for a block and restore every submodule's own ``training`` flag after."""
    flags = [(m, m.training) for root in modules for m in root.modules()]
    try:
        for root in modules:
            root.eval()
        yield
    finally:
        for module, training in flags:
            module.training = training


def fixed_noise(shape: Sequence[int], seed: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """The preview's noise: the same for every preview of a run, drawn from a private CPU generator."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def sigmas(model_sampling, steps: int) -> torch.Tensor:
    """The model's own "simple" schedule of ``steps`` steps (``comfy.samplers.calculate_sigmas``), ending at 0."""
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(model_sampling, "simple", steps)


def euler(denoise: Denoise, noise: torch.Tensor, sigmas: torch.Tensor, *, model_sampling=None) -> torch.Tensor:
    """Plain Euler (no churn) from pure noise; returns the final x0 latent.

    ``denoise(x, sigma[B])`` is an x0 prediction (ComfyUI's ``BaseModel.apply_model`` output). The start
    is ``noise * sigmas[0]``; given ``model_sampling``, it is scaled by ``model_sampling.noise_scaling``
    as ComfyUI's KSampler does (max denoise at sigma_max) and the end by ``inverse_noise_scaling``.
    The steps are k-diffusion's ``sample_euler``: ``x += (x - x0) / sigma * (sigma_next - sigma)``.
    """
    sigmas = sigmas.to(device=noise.device)
    if model_sampling is None:
        x = noise * sigmas[0]
    else:
        max_sigma = float(model_sampling.sigma_max)
        full = math.isclose(max_sigma, float(sigmas[0]), rel_tol=1e-05) or float(sigmas[0]) > max_sigma
        x = model_sampling.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), full)
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i] * ones)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    if model_sampling is not None:
        x = model_sampling.inverse_noise_scaling(sigmas[-1], x)
    return x


def to_image(latent: torch.Tensor, latent_format) -> torch.Tensor:
    """latent [B, C, h, w] -> IMAGE [B, 8h, 8w, 3] float32 on the CPU in 0..1, as ComfyUI's latent2rgb preview.

    Each item goes through ``latent_preview.Latent2RGBPreviewer`` with the format's factors (the exact
    pixels a sampler's preview shows), then is upscaled x8 nearest. A format without RGB factors
    gets its first three channels (repeated if fewer), mapped -1..1 -> 0..1.
    """
    latent = latent.detach().float().cpu()
    factors = getattr(latent_format, "latent_rgb_factors", None)
    if factors is None:
        rgb = latent[:, [i % latent.shape[1] for i in range(3)]]
        images = ((rgb + 1.0) / 2.0).clamp(0, 1).movedim(1, -1)
    else:
        import numpy as np
        from latent_preview import Latent2RGBPreviewer

        previewer = Latent2RGBPreviewer(factors, getattr(latent_format, "latent_rgb_factors_bias", None),
                                        getattr(latent_format, "latent_rgb_factors_reshape", None))
        pictures = [previewer.decode_latent_to_preview(latent[i:i + 1]) for i in range(latent.shape[0])]
        images = torch.from_numpy(np.stack([np.asarray(p, dtype=np.uint8) for p in pictures])).float() / 255.0
    return images.repeat_interleave(UPSCALE, dim=1).repeat_interleave(UPSCALE, dim=2).contiguous()


def progress_preview(image: torch.Tensor, max_size: int = 512) -> tuple:
    """The first item of an IMAGE as ``("JPEG", PIL.Image, max_size)``: what ``ProgressBar.update_absolute`` takes.

    ComfyUI 0.3.75's server (``send_image`` / ``send_image_with_metadata``) unpacks exactly this tuple:
    format name, PIL image, longest side (it shrinks larger images to fit).
    """
    from PIL import Image

    pixels = (image[0].detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    return ("JPEG", Image.fromarray(pixels), max_size)


def grid(images: list[torch.Tensor]) -> torch.Tensor:
    """The previews side by side as one IMAGE [1, H, W*n, 3] (shorter ones padded black); 64x64 black if none."""
    items = [img[i] for img in images for i in range(img.shape[0])]
    if not items:
        return torch.zeros(EMPTY)
    height = max(item.shape[0] for item in items)
    padded = [torch.nn.functional.pad(item, (0, 0, 0, 0, 0, height - item.shape[0])) for item in items]
    return torch.cat(padded, dim=1).unsqueeze(0).float().cpu()


class Shown:
    """A node's ``show``: sends each preview to its ProgressBar (at the step's value) and keeps it for the grid.

    ``pbar`` is a ``comfy.utils.ProgressBar`` (anything with ``update_absolute(value, total, preview)``).
    """

    def __init__(self, pbar, total: int, max_size: int = 512) -> None:
        self.pbar, self.total, self.max_size = pbar, total, max_size
        self.images: list[torch.Tensor] = []
        self.steps: list[int] = []

    def __call__(self, step: int, image: torch.Tensor) -> None:
        self.images.append(image)
        self.steps.append(step)
        self.pbar.update_absolute(step, self.total, progress_preview(image, self.max_size))

    def grid(self) -> torch.Tensor:
        return grid(self.images)


def after_step(on_step: Callable[[int, int, float], None] | None, preview: Preview | None, render: Render,
               modules: Iterable[torch.nn.Module] = ()) -> Callable[[int, int, float], None] | None:
    """A trainer's step hook: ``on_step`` first (so Cancel comes first), then the preview when one is due."""
    if preview is None or preview.every == 0:
        return on_step
    modules = tuple(modules)

    def hook(step: int, total: int, loss: float) -> None:
        if on_step is not None:
            on_step(step, total, loss)
        preview.maybe(step, render, modules=modules)

    return hook
