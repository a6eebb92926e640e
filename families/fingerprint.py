"""Which base checkpoint a file was trained on: a dtype-independent fingerprint of its weights.

The fingerprint identifies a checkpoint whatever dtype ComfyUI loaded it in (fp32, fp16, bf16 or
fp8 storage): it is the hash of every weight's name and shape plus a fixed sample of weight values,
and two fingerprints match when the structure hashes are equal and every sampled value agrees
within the rounding of the coarsest dtype (fp8 e5m2 keeps 2 mantissa bits: a relative error of
at most 2^-3). Another checkpoint's sampled weights disagree far beyond that.
"""

from __future__ import annotations

import base64
import hashlib

import torch

FINGERPRINT_PREFIX = "v2:"
SAMPLE_TENSORS = 16  # weight tensors sampled, spread over the network
SAMPLE_VALUES = 16  # values sampled from each
RTOL, ATOL = 0.13, 2e-3  # fp8 e5m2 half-ulp is 12.5% relative; fp8 subnormals need the absolute part


def _weights(unet: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return sorted(unet.state_dict().items())


def fingerprint(unet: torch.nn.Module) -> str:
    """``v2:<structure hash>:<sampled values>`` for a UNet (``diffusion_model``) in any load dtype."""
    items = _weights(unet)
    h = hashlib.sha256()
    for name, t in items:
        h.update(f"{name}:{tuple(t.shape)}".encode())
    big = [(n, t) for n, t in items if t.numel() >= SAMPLE_VALUES and t.dtype.is_floating_point]
    if not big:
        raise ValueError("this model has no weights to fingerprint")
    stride = max(len(big) // SAMPLE_TENSORS, 1)
    sample = []
    for _, t in big[::stride][:SAMPLE_TENSORS]:
        flat = t.detach().reshape(-1)
        # fp32 positions (as files were fingerprinted); past 2**24 elements they can round up to numel
        idx = torch.linspace(0, flat.numel() - 1, SAMPLE_VALUES).long().clamp_(max=flat.numel() - 1).to(flat.device)
        sample.append(_take(flat, idx))
    values = base64.b64encode(torch.cat(sample).numpy().tobytes()).decode("ascii")
    return f"{FINGERPRINT_PREFIX}{h.hexdigest()[:32]}:{values}"


def _take(flat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``flat[idx]`` as fp32 on the CPU. 1-byte floats (fp8 weights) are gathered as their bytes: the same values,
    without needing an fp8 indexing kernel on the weights' device."""
    if flat.dtype.is_floating_point and flat.element_size() == 1:
        return flat.view(torch.uint8)[idx].view(flat.dtype).to("cpu").to(torch.float32)
    return flat[idx].to("cpu", torch.float32)


def fingerprints_match(expected: str, actual: str) -> bool:
    """Whether two fingerprints name one checkpoint (loaded in the same or different dtypes)."""
    if not (expected.startswith(FINGERPRINT_PREFIX) and actual.startswith(FINGERPRINT_PREFIX)):
        return expected == actual
    e_struct, _, e_vals = expected[len(FINGERPRINT_PREFIX):].partition(":")
    a_struct, _, a_vals = actual[len(FINGERPRINT_PREFIX):].partition(":")
    if e_struct != a_struct:
        return False
    try:
        e = torch.frombuffer(bytearray(base64.b64decode(e_vals)), dtype=torch.float32)
        a = torch.frombuffer(bytearray(base64.b64decode(a_vals)), dtype=torch.float32)
    except ValueError:
        return False
    return e.shape == a.shape and bool(torch.allclose(a, e, rtol=RTOL, atol=ATOL))


def short(fp: str) -> str:
    """A fingerprint shortened for error messages."""
    body = fp[len(FINGERPRINT_PREFIX):] if fp.startswith(FINGERPRINT_PREFIX) else fp
    return body.split(":", 1)[0][:12]


def legacy_fingerprint(unet: torch.nn.Module) -> str:
    """The fingerprint files from before v2 carry (keys, shapes, dtypes and values: dtype-dependent)."""
    h = hashlib.sha256()
    for name, t in _weights(unet):
        flat = t.detach().reshape(-1)
        sample = torch.cat([flat[:64].to("cpu", torch.float32), flat[-64:].to("cpu", torch.float32)])
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]


def same_base(expected: str, unet: torch.nn.Module) -> tuple[bool, str]:
    """(matches, this model's fingerprint) for a fingerprint read from a file, old or new."""
    if expected.startswith(FINGERPRINT_PREFIX):
        actual = fingerprint(unet)
        return fingerprints_match(expected, actual), actual
    actual = legacy_fingerprint(unet)
    return expected == actual, actual
