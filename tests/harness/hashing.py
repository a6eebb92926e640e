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


def frozen_hashes(model, clip) -> dict[str, str]:
    """Hashes of a loaded MODEL's UNet, its CLIP's text encoders and their token tables (the trainers' frozen parts)."""
    import comfy.model_management as mm

    mm.load_models_gpu([model])
    out = {"unet": weight_hash(model.model.diffusion_model), "text": weight_hash(clip.cond_stage_model)}
    for key in ("clip_l", "clip_g", "t5xxl"):
        enc = getattr(clip.cond_stage_model, key, None)
        if enc is not None:
            out[f"vocabulary {key}"] = weight_hash(enc.transformer.get_input_embeddings())
    return out


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def object_hash(obj) -> str:
    """Hash of a patch object's attributes (tensors bit-exact, other values by repr, other objects by identity),
    so a test sees any attribute set, added or changed in place, e.g. an attn2 replace another pack appends to."""
    h = hashlib.sha256()
    for name, value in sorted(vars(obj).items()):
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            h.update(f"{value.dtype}{tuple(value.shape)}".encode() + _tensor_bytes(value))
        elif value is None or isinstance(value, (bool, int, float, str, tuple)):
            h.update(repr(value).encode())
        else:
            h.update(f"{type(value).__qualname__}@{id(value)}".encode())
    return h.hexdigest()
