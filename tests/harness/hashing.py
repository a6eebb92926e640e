"""A bit-exact hash of a UNet's weights, for the tests' "never mutate the input MODEL" checks."""

from __future__ import annotations

import hashlib

import torch


def weight_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
