"""Trainable LoRA factors that ride on ComfyUI's ``weight_function`` hook, and their file keys.

A LoRA here is ``W + (alpha / rank) * up @ down`` with ``up`` zero-initialized, so training starts
exactly at the base model. The keys written are ComfyUI's generic LoRA format
(``diffusion_model.<module>.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha``), which
``comfy.lora.load_lora`` and the stock LoraLoader read.
"""

from __future__ import annotations

import math

import torch


class LoraWeight(torch.nn.Module):
    """A weight function ``w -> w + scale * up @ down`` for one Linear or 1x1/kxk Conv weight."""

    def __init__(self, weight_shape: torch.Size, rank: int, alpha: float | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        out_dim, in_dim = weight_shape[0], math.prod(weight_shape[1:])
        rank = min(rank, out_dim, in_dim)
        self.weight_shape = tuple(weight_shape)
        self.rank = rank
        self.alpha = float(alpha if alpha is not None else rank)
        down = torch.randn(rank, in_dim, generator=generator) / math.sqrt(in_dim)
        self.down = torch.nn.Parameter(down)
        self.up = torch.nn.Parameter(torch.zeros(out_dim, rank))

    def delta(self) -> torch.Tensor:
        return (self.alpha / self.rank) * (self.up @ self.down).reshape(self.weight_shape)

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.delta().to(w.dtype)

    def file_tensors(self, key: str) -> dict[str, torch.Tensor]:
        """The tensors of this LoRA under ``key`` (a module path such as ``diffusion_model.x.attn2.to_q``)."""
        up, down = self.up.detach(), self.down.detach()
        if len(self.weight_shape) == 4:  # conv weights: ComfyUI reads conv-shaped LoRA factors
            up = up.reshape(self.weight_shape[0], self.rank, 1, 1)
            down = down.reshape(self.rank, *self.weight_shape[1:])
        return {f"{key}.lora_up.weight": up.contiguous().clone(),
                f"{key}.lora_down.weight": down.contiguous().clone(),
                f"{key}.alpha": torch.tensor(self.alpha)}
