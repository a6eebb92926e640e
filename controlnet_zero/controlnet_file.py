"""The ControlNet file: the layout's tensors (``layouts``: ldm and Flux XLabs = the module's own state dict, SD3 =
diffusers' names), no prefix, atomic, settings in metadata."""

from __future__ import annotations

from pathlib import Path

import torch

from ..storage import safetensors_file as weights_file

FORMAT = "frozentune.controlnet_zero/1"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The stock ControlNetLoader switches on global average pooling for these stems (its "shuffle" models).
_POOLING_STEMS = ("_shuffle", "_shuffle_fp16")


def check_stem(path: Path) -> None:
    """Refuse a file name the stock loader would read as a shuffle ControlNet and run differently."""
    stem = Path(path).stem
    if stem.endswith(_POOLING_STEMS):
        raise ValueError(f"File name {Path(path).name!r} ends in {'/'.join(_POOLING_STEMS)}: the stock Load "
                         "ControlNet Model node would average the control over the whole image for it "
                         "(its rule for shuffle ControlNets). Choose another name, e.g. "
                         f"{stem.rsplit('_shuffle', 1)[0] + '_shuffled'!r}.")


def tensors(control_model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every weight of the ControlNet under the names its layout's file uses (``layouts``), on the CPU in ``dtype``."""
    from . import layouts

    named = layouts.file_tensors(control_model)
    return {k: v.detach().to("cpu", dtype) for k, v in named.items()}


def save(path: Path, control_model: torch.nn.Module, metadata: dict[str, str], dtype: str = "fp32") -> Path:
    """Write the ControlNet where the stock ControlNetLoader reads it (``models/controlnet/...``)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is unknown: use one of {', '.join(DTYPES)}.")
    check_stem(path)
    meta = dict(metadata)
    meta["controlnet_zero.dtype"] = dtype
    return weights_file.save(Path(path), tensors(control_model, DTYPES[dtype]), meta, format=FORMAT)
