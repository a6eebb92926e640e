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
    for key in ("clip_l", "clip_g"):
        enc = getattr(clip.cond_stage_model, key, None)
        if enc is not None:
            out[f"vocabulary {key}"] = weight_hash(enc.transformer.get_input_embeddings())
    return out
