"""The half-precision tier: tiny models loaded in bf16/fp16 with ComfyUI computing natively in that dtype.

On the CPU ComfyUI never computes in half precision: ``unet_manual_cast`` casts bf16/fp16 weights
up to fp32 at every op. A GPU user's ComfyUI computes natively in fp16 (or bf16), so this module
makes the CPU behave like that GPU: ``native_compute()`` lets ``unet_manual_cast`` answer "no cast"
for half-precision weights, and ``load_checkpoint`` loads a tiny checkpoint's UNet in a dtype
(fp8 storage included, which still casts for compute, as on most GPUs).

Use it in node tests as::

    with native_compute():
        model, clip, vae = load_checkpoint(path, torch.bfloat16)
        assert model.model.manual_cast_dtype is None   # computes in bf16, no cast to fp32

The model's ``manual_cast_dtype`` is fixed when it is loaded, so loading inside the context is what
matters; sampling and training afterwards need not be inside it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

HALF = (torch.bfloat16, torch.float16)
FP8 = torch.float8_e4m3fn
DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": FP8}


def native_compute():
    """While active, ComfyUI loads half-precision UNets to compute natively in their dtype."""
    return computing_in(HALF, None)


@contextlib.contextmanager
def computing_in(weight_dtypes: tuple[torch.dtype, ...], compute: torch.dtype | None):
    """While active, ComfyUI loads models whose weights are stored in ``weight_dtypes`` to compute in ``compute``
    (None: natively in the stored dtype), as on a GPU, instead of the CPU's fp32 manual cast."""
    import comfy.model_management as mm

    stock = mm.unet_manual_cast

    def unet_manual_cast(weight_dtype, inference_device, supported_dtypes=(torch.float16, torch.bfloat16,
                                                                           torch.float32)):
        if weight_dtype in weight_dtypes:
            return compute
        return stock(weight_dtype, inference_device, list(supported_dtypes))

    mm.unet_manual_cast = unet_manual_cast
    try:
        yield
    finally:
        mm.unet_manual_cast = stock


def load_checkpoint(path: Path, dtype: torch.dtype | str, native: bool = True):
    """``(MODEL, CLIP, VAE)`` of a checkpoint with its UNet weights stored in ``dtype``.

    ``native`` (half precision only): compute in that dtype as a GPU would, not in fp32.
    """
    import comfy.sd
    import folder_paths

    dtype = DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    options = {} if dtype == torch.float32 else {"dtype": dtype}
    ctx = native_compute() if native and dtype in HALF else contextlib.nullcontext()
    with ctx:
        out = comfy.sd.load_checkpoint_guess_config(
            str(path), output_vae=True, output_clip=True,
            embedding_directory=folder_paths.get_folder_paths("embeddings"), model_options=options)
    model, clip, vae = out[:3]
    if dtype in HALF and native:
        assert model.model.manual_cast_dtype is None, "the half-precision UNet would still compute in fp32"
    assert model.model.get_dtype() == dtype, (model.model.get_dtype(), dtype)
    return model, clip, vae
