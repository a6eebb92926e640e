"""The base fingerprint on full-size tensors (SDXL has 29.5M-value convolutions)."""

from __future__ import annotations

import torch

from harness.comfy_env import import_pack

import_pack()  # the pack as package `frozentune`; training/ needs no ComfyUI
from frozentune.families import fingerprint as family  # noqa: E402


def _model(numel: int, dtype: torch.dtype) -> torch.nn.Module:
    model = torch.nn.Module()
    generator = torch.Generator().manual_seed(0)
    model.conv = torch.nn.Parameter(torch.randn(numel, generator=generator).to(dtype), requires_grad=False)
    return model


def test_fingerprint_of_a_tensor_past_2_to_the_24():
    # 2560 x 1280 x 3 x 3, the SDXL output blocks' skip convolution: fp32 positions round up to numel
    numel = 2560 * 1280 * 9
    assert int(torch.linspace(0, numel - 1, family.SAMPLE_VALUES).long().max()) == numel  # the trap
    bf16, fp16 = family.fingerprint(_model(numel, torch.bfloat16)), family.fingerprint(_model(numel, torch.float16))
    assert family.fingerprints_match(bf16, fp16)  # one checkpoint in two load dtypes


def test_fingerprint_positions_unchanged_below_2_to_the_24():
    """Files written before the clamp hold fingerprints sampled at the plain fp32 positions."""
    model = _model(4096, torch.float32)
    flat = model.conv.reshape(-1)
    plain = flat[torch.linspace(0, 4095, family.SAMPLE_VALUES).long()]
    import base64

    values = family.fingerprint(model).rsplit(":", 1)[1]
    assert torch.equal(torch.frombuffer(bytearray(base64.b64decode(values)), dtype=torch.float32), plain)


def test_fp8_weights_are_sampled_by_their_bytes_with_the_same_values():
    """fp8 weights are gathered as bytes (no fp8 indexing kernel needed on the GPU): the values are unchanged, so an
    fp8 load still matches its fp32 checkpoint, and a legacy (v1) fingerprint reads the same first/last values."""
    model = _model(4096, torch.float8_e4m3fn)
    flat = model.conv.reshape(-1)
    idx = torch.linspace(0, 4095, family.SAMPLE_VALUES).long()
    assert torch.equal(family._take(flat, idx), flat.to(torch.float32)[idx])
    wide = _model(4096, torch.float32)
    with torch.no_grad():
        wide.conv.copy_(model.conv.to(torch.float32))
    assert family.fingerprints_match(family.fingerprint(wide), family.fingerprint(model))
    assert family.legacy_fingerprint(model) != family.legacy_fingerprint(wide)  # v1 hashed the dtype: as before
