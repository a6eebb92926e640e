"""LayerNorms that keep their output for the backward pass instead of their input.

A LayerNorm without affine weights needs only its output ``y`` and the per-row ``1/std`` for its input's gradient:
``dx = rstd * (g - mean(g) - y * mean(g * y))`` (the "memory efficient" LayerNorm of NVIDIA Apex and Megatron).
Where the next op saves ``y`` anyway (a modulation ``y * (1 + scale)`` whose scale trains saves it for the scale's
gradient), keeping ``y`` costs nothing, while keeping the input costs a residual-stream-sized tensor; in ComfyUI's
Flux blocks, which add into their stream in place after the norm read it, it also costs the copy that input would
need (``checkpointing.protect_inplace_blocks``). The forward is the module's own (same values and dtype, autocast
included); the gradient is autograd's own LayerNorm kernel run on the normalized rows, the same maths but not bit
for bit autograd's result (the rows are rounded to the output dtype, the gradient scaled by ``rstd`` first).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


class _KeepOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, norm_forward, eps: float) -> torch.Tensor:
        shape = (x.shape[-1],)
        if torch.is_autocast_enabled(x.device.type):  # the autocast policy's output (fp32 on CUDA), and its rstd
            y = norm_forward(x)
            rstd = torch.native_layer_norm(x.to(y.dtype), shape, None, None, eps)[2]
        else:  # what the module computes (F.layer_norm without weights), in one pass
            y, _, rstd = torch.native_layer_norm(x, shape, None, None, eps)
        ctx.save_for_backward(y, rstd)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        # autograd's LayerNorm kernel on the normalized rows (input y, mean 0, rstd 1) gives
        # g - mean(g) - y * mean(g * y); it is linear in g, so the rows' rstd goes in with the gradient
        y, rstd = ctx.saved_tensors
        g = (grad * rstd).to(y.dtype)
        dx = torch.ops.aten.native_layer_norm_backward(g, y, (y.shape[-1],), torch.zeros_like(rstd),
                                                       torch.ones_like(rstd), None, None, [True, False, False])[0]
        return dx.to(ctx.x_dtype), None, None


def fits(norm: torch.nn.Module) -> bool:
    """Whether ``norm`` is a LayerNorm over the last dimension without affine weights (what ``_KeepOutput`` computes)."""
    return (isinstance(norm, torch.nn.LayerNorm) and len(norm.normalized_shape) == 1
            and getattr(norm, "weight", None) is None and getattr(norm, "bias", None) is None)


def _keep_output(norm: torch.nn.Module):
    plain = norm.forward

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or not (torch.is_grad_enabled() and x.requires_grad):
            return plain(x, *args, **kwargs)
        return _KeepOutput.apply(x, plain, norm.eps)

    return forward


@contextlib.contextmanager
def keeping_outputs(norms: Iterable[torch.nn.Module]) -> Iterator[int]:
    """While the block runs, each fitting norm of ``norms`` keeps its output, not its input (undone after).

    Yields how many were patched. Patch a trainable module or a twin, never a base model's modules.
    """
    patched = [norm for norm in norms if fits(norm) and "forward" not in norm.__dict__]
    for norm in patched:
        norm.forward = _keep_output(norm)
    try:
        yield len(patched)
    finally:
        for norm in patched:
            norm.__dict__.pop("forward", None)
