"""The ControlNet file: the module's own state dict (ComfyUI's ldm layout, no prefix), atomic, settings in metadata."""

from __future__ import annotations

from pathlib import Path

import torch

from ..unitune import weights_file

FORMAT = "frozentune.controlnet_zero/1"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def tensors(control_model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every weight of the ControlNet under its module name, on the CPU in ``dtype``."""
    return {k: v.detach().to("cpu", dtype) for k, v in control_model.state_dict().items()}


def save(path: Path, control_model: torch.nn.Module, metadata: dict[str, str], dtype: str = "fp32") -> Path:
    """Write the ControlNet where the stock ControlNetLoader reads it (``models/controlnet/...``)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is unknown: use one of {', '.join(DTYPES)}.")
    meta = dict(metadata)
    meta["controlnet_zero.dtype"] = dtype
    return weights_file.save(Path(path), tensors(control_model, DTYPES[dtype]), meta, format=FORMAT)
