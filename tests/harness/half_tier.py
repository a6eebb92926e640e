"""The half-precision tier's models: a tiny checkpoint's UNet alone, stored in a given dtype.

bf16 and fp16 compute natively in that dtype (``precision.native_compute``); fp8 is storage only and
computes in ComfyUI's manual-cast dtype (fp32 on the CPU). The text encoders and the VAE do not depend
on the UNet's dtype (ComfyUI casts the conditioning to it), so the node tests keep their fp32 CLIP and
VAE and load only the UNet again: the SDXL-family checkpoint's full-size CLIP takes ~15 s and ~4 GiB
to load on the CPU.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from .precision import DTYPE_NAMES, FP8, HALF, native_compute

DTYPES = ("fp32", "bf16", "fp16", "fp8")


def dtype_params(long: tuple[str, ...] = ()) -> list:
    """``DTYPES`` for ``pytest.mark.parametrize``, the ones in ``long`` marked ``long`` (make test-long / test-all).

    For a dtype that repeats a path another case of the same test covers in ``make test`` (fp16 runs bf16's
    native half path; fp8 storage computes in fp32 through ComfyUI's manual cast).
    """
    assert set(long) <= set(DTYPES) - {"fp32"}, long
    return [pytest.param(d, marks=pytest.mark.long) if d in long else d for d in DTYPES]
_CACHE: dict[tuple[str, str], object] = {}


def load_unet(path: Path, dtype: str):
    """The MODEL of a checkpoint (no CLIP, no VAE) with its UNet weights stored in ``dtype``."""
    import comfy.sd

    dt = DTYPE_NAMES[dtype]
    ctx = native_compute() if dt in HALF else contextlib.nullcontext()
    with ctx:
        model = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False,
                                                      model_options={} if dt == torch.float32 else {"dtype": dt})[0]
    assert model.model.get_dtype() == dt, (model.model.get_dtype(), dt)
    if dt == FP8:
        assert model.model.manual_cast_dtype is not None, "fp8 weights need a compute dtype"
    else:
        assert model.model.manual_cast_dtype is None, f"the {dtype} UNet would not compute in {dtype}"
    return model


def unet(path: Path, dtype: str):
    """``load_unet``, once per (checkpoint, dtype) until ``forget()``."""
    key = (str(path), dtype)
    if key not in _CACHE:
        _CACHE[key] = load_unet(path, dtype)
    return _CACHE[key]


def forget() -> None:
    """Drop the cached models (call it from a module's teardown, so none is left for interpreter exit)."""
    _CACHE.clear()
