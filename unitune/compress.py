"""Compress full or attention-mode weight deltas into a LoRA of a chosen rank (truncated SVD).

A full SD1.5 delta is as large as the UNet; its best rank-r approximation in the Frobenius norm is
the truncated SVD, stored as ComfyUI LoRA factors (``lora_up`` = U·S, ``lora_down`` = Vᵀ). Bias
deltas (``.diff_b``) and 1-D weight deltas (norm layers) are small and kept exact.
"""

from __future__ import annotations

import math

import torch

DIFF = ".diff"


def delta_to_lora(tensors: dict[str, torch.Tensor], rank: int) -> tuple[dict[str, torch.Tensor], float]:
    """``(lora tensors, relative error)``; the error is ‖Δ − Δ_r‖ / ‖Δ‖ over every compressed delta."""
    if rank < 1:
        raise ValueError(f"lora_rank={rank} must be at least 1.")
    out: dict[str, torch.Tensor] = {}
    error, total = 0.0, 0.0
    for key, delta in tensors.items():
        if not key.endswith(DIFF) or delta.ndim < 2:
            out[key] = delta
            continue
        module = key[: -len(DIFF)]
        matrix = delta.float().reshape(delta.shape[0], -1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        r = min(rank, s.numel())
        up, down = u[:, :r] * s[:r], vh[:r]
        error += (matrix - up @ down).square().sum().item()
        total += matrix.square().sum().item()
        if delta.ndim == 4:  # conv: ComfyUI reads conv-shaped factors
            up, down = up.reshape(delta.shape[0], r, 1, 1), down.reshape(r, *delta.shape[1:])
        out[f"{module}.lora_up.weight"] = up.to(delta.dtype).contiguous()
        out[f"{module}.lora_down.weight"] = down.to(delta.dtype).contiguous()
        out[f"{module}.alpha"] = torch.tensor(float(r))
    if total == 0.0:
        raise ValueError("there is no weight delta to compress: this result was trained in lora mode already "
                         "(save it as trained) or changed nothing.")
    return out, math.sqrt(error / total)
