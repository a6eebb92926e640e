"""``training.lean_norm``: a LayerNorm that keeps its output for backward, on a block shaped like ComfyUI's Flux ones
(norm -> modulation whose scale trains -> linear, then ``x += ...`` into the norm's own input)."""

from __future__ import annotations

import pytest
import torch

from harness.comfy_env import import_pack

import_pack()  # the pack as package `frozentune`; training/ needs no ComfyUI
from frozentune.training import checkpointing, lean_norm  # noqa: E402

D = 64


def _norm() -> torch.nn.LayerNorm:
    return torch.nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)


@pytest.mark.parametrize("case", ["fp32", "bf16", "fp32 under bf16 autocast"])
def test_forward_is_the_modules_and_the_gradient_the_same_maths(case):
    """The output is the module's own (values and dtype, autocast included); the input's gradient is autograd's
    to fp32 rounding, and in bf16 no further from the fp64 one than autograd's own bf16 kernel is (x2)."""
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 17, D, generator=gen) * 4 + 1).to(dtype)
    g = torch.randn(3, 17, D, generator=gen).to(dtype)
    norm = _norm()

    def run(lean: bool):
        xi = x.clone().requires_grad_(True)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if "autocast" in case else torch.autocast("cpu",
                                                                                                      enabled=False)
        with ctx, lean_norm.keeping_outputs([norm] if lean else []):
            y = norm(xi)
        y.backward(g.to(y.dtype))
        return y.detach(), xi.grad

    (y_lean, g_lean), (y_stock, g_stock) = run(True), run(False)
    assert y_lean.dtype == y_stock.dtype and torch.equal(y_lean, y_stock)
    x64 = x.double().requires_grad_(True)
    torch.nn.functional.layer_norm(x64, (D,), eps=1e-6).backward(g.double())
    if dtype == torch.float32:
        assert torch.allclose(g_lean, g_stock, rtol=1e-5, atol=1e-6)
    else:
        err_lean = (g_lean.double() - x64.grad).abs().max()
        err_stock = (g_stock.double() - x64.grad).abs().max()
        assert err_lean <= 2 * err_stock + 1e-3, (err_lean, err_stock)
    assert "forward" not in norm.__dict__


def _flux_like(x: torch.Tensor, norm, scale: torch.Tensor, shift: torch.Tensor, lin) -> torch.Tensor:
    """``x += lin(addcmul(shift, norm(x), 1 + scale))``, as ComfyUI's Flux blocks add into their stream."""
    x += lin(torch.addcmul(shift, norm(x), 1 + scale))
    return x


def test_an_in_place_block_trains_without_a_copy_and_keeps_one_stream_less():
    """Stock, the block's in-place add breaks the norm's saved input; with the input copied first
    (``checkpointing.protect_inplace_blocks``) it trains; keeping outputs it trains to the same gradients and
    retains one stream-sized tensor less (the modulation keeps the norm's output anyway)."""
    gen = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(D, D)
    scale = torch.randn(2, 1, D, generator=gen).requires_grad_(True)
    shift = torch.randn(2, 1, D, generator=gen).requires_grad_(True)
    x0 = torch.randn(2, 256, D, generator=gen)
    stream = x0.numel() * x0.element_size()

    def run(mode: str):
        norm = _norm()
        if mode == "copy":
            norm.register_forward_pre_hook(checkpointing._copy_input)
        lin.zero_grad(set_to_none=True)
        scale.grad = shift.grad = None
        x = x0.clone().requires_grad_(True)
        with lean_norm.keeping_outputs([norm] if mode == "lean" else []) as patched:
            assert patched == (mode == "lean")
            out, kept = checkpointing.retained_bytes(lambda: _flux_like(x * 1, norm, scale, shift, lin))
            out.square().sum().backward()
        return kept, [x.grad, scale.grad, shift.grad, lin.weight.grad]

    with pytest.raises(RuntimeError, match="inplace operation"):
        run("stock")
    kept_copy, grads_copy = run("copy")
    kept_lean, grads_lean = run("lean")
    assert kept_copy - kept_lean >= stream, (kept_copy, kept_lean, stream)
    assert kept_copy - kept_lean < 1.1 * stream
    for a, b in zip(grads_lean, grads_copy, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_only_plain_layer_norms_are_patched_and_no_grad_runs_the_stock_forward(monkeypatch):
    affine = torch.nn.LayerNorm(D)
    plain = _norm()
    calls = []
    monkeypatch.setattr(lean_norm._KeepOutput, "apply", lambda *a: calls.append(1) or a[1](a[0]))
    with lean_norm.keeping_outputs([affine, plain, torch.nn.Linear(D, D)]) as patched:
        assert patched == 1 and "forward" not in affine.__dict__
        with torch.no_grad():
            plain(torch.randn(2, D, requires_grad=True))
        plain(torch.randn(2, D))  # nothing to differentiate
        assert not calls
        plain(torch.randn(2, D, requires_grad=True))
        assert calls == [1]
    assert "forward" not in plain.__dict__
