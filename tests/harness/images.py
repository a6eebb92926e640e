"""Test images with structure (a random image would teach a tiny model nothing to reconstruct)."""

from __future__ import annotations

import torch


def subject_image(size: int = 64) -> torch.Tensor:
    """A ComfyUI IMAGE ``[1, size, size, 3]``: a red disk on a blue-green gradient."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.stack([0.2 + 0.0 * x, 0.3 + 0.5 * x, 0.8 - 0.5 * y], dim=-1)
    disk = ((x - 0.4) ** 2 + (y - 0.55) ** 2) < 0.06
    img[disk] = torch.tensor([0.9, 0.1, 0.1])
    return img[None]
