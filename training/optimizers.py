"""The optimizers a trainer may pick, built over fp32 master weights."""

from __future__ import annotations

import torch

OPTIMIZERS = ("adafactor", "adamw")


def make(name: str, params, learning_rate: float, weight_decay: float = 1e-2) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``params``."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=learning_rate, scale_parameter=False, relative_step=False, warmup_init=False)
    raise ValueError(f"optimizer {name!r} is unknown: use one of {', '.join(OPTIMIZERS)}.")
