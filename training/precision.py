"""The precision policy, in one place.

- What trains is fp32 master weights (``master_parameter``); the optimizer updates those.
- Frozen weights stay in the dtype the model was loaded in and are never copied: a trainer runs a
  ``frozen_twin`` of the base whose tensors alias the base's memory, with every ComfyUI op set to cast
  its weight to the input's dtype at use (``cast_on_use``), so fp16, bf16 and fp8 storage all work and
  no mixed-dtype op reaches the kernels.
- Compute runs in one dtype under autocast (``compute_dtype``): ``auto`` is bf16 where the device
  supports it, else fp16 with a GradScaler on CUDA, and fp32 on the CPU; ``bf16``/``fp16`` on the CPU
  only when asked. Residuals and gradients flow in the compute dtype, never in a lower storage dtype.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from .checkpointing import protect_inplace_blocks

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def compute_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The dtype a trainer computes in for ``setting`` on ``device``."""
    if setting not in PRECISIONS:
        raise ValueError(f"precision {setting!r} is unknown: use one of {', '.join(PRECISIONS)}.")
    if setting == "fp32" or (setting == "auto" and device.type != "cuda"):
        return torch.float32
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if setting == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to ``dtype`` on ``device`` (a no-op context for fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """Loss scaling for fp16 compute (fp16 gradients underflow without it); disabled otherwise."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def _alias(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(
        t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def frozen_twin(module: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of ``module`` whose weights alias the originals' memory, frozen.

    The aliases are ordinary tensors (autograd can save them for the backward pass even when the
    originals are inference tensors, as ComfyUI's loaders make them) and cost no memory; the twin's
    modules can be patched (checkpointing, LoRA weight functions, master weights) without touching
    the base model. Never write to its weights in place. Blocks that add into their residual stream in place
    (ComfyUI's Flux blocks) get their norms' inputs copied, so autograd can train through them
    (``checkpointing.protect_inplace_blocks``).
    """
    memo = {}
    with torch.inference_mode(False):
        for t in list(module.parameters()) + list(module.buffers()):
            alias = _alias(t)
            memo[id(t)] = torch.nn.Parameter(alias, requires_grad=False) if isinstance(t, torch.nn.Parameter) \
                else alias
        twin = copy.deepcopy(module, memo)
    twin.requires_grad_(False)
    for m in twin.modules():  # the base's weight patches are already in its live weights
        if hasattr(m, "weight_function"):
            m.weight_function = []
            m.bias_function = []
    protect_inplace_blocks(twin)
    return twin


def cast_on_use(module: torch.nn.Module) -> None:
    """Make every ComfyUI op in ``module`` cast its weight to the input's dtype and device at use.

    This is ComfyUI's own manual-cast path (``comfy.ops.cast_bias_weight``): the stored weight keeps
    its dtype, a per-call cast feeds the kernel, and gradients reach fp32 master weights through it.
    """
    for m in module.modules():
        if hasattr(m, "comfy_cast_weights"):
            m.comfy_cast_weights = True


def master_parameter(module: torch.nn.Module, name: str) -> torch.nn.Parameter:
    """Replace ``module``'s parameter ``name`` by a trainable fp32 copy (in the twin only) and return it."""
    with torch.inference_mode(False):
        old = module._parameters[name]
        new = torch.nn.Parameter(old.detach().to(torch.float32).clone(), requires_grad=True)
    module._parameters[name] = new
    return new


def set_compute_dtype(base_model, dtype: torch.dtype) -> None:
    """Make a twin of a ``comfy.model_base.BaseModel`` feed its UNet inputs in ``dtype``."""
    base_model.manual_cast_dtype = dtype
    base_model.diffusion_model.dtype = dtype
