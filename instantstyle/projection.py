"""Image projection of an IP-Adapter: CLIP-vision features -> the image tokens the adapter's attention reads.

Functional versions of IP-Adapter's ``ImageProjModel`` (Linear -> reshape to N tokens -> LayerNorm) and
``Resampler`` (Plus: learned latent queries attending over the CLIP patch tokens), read straight from the
file's original key layout, so no module is built and nothing is copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .adapter_file import RESAMPLER_DIM_HEAD, IPAdapter


def _layer_norm(x: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    w = sd[prefix + "weight"]
    return F.layer_norm(x, w.shape, w, sd.get(prefix + "bias"))


def _linear(x: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return F.linear(x, sd[prefix + "weight"], sd.get(prefix + "bias"))


def plain_projection(sd: dict[str, torch.Tensor], embeds: torch.Tensor) -> torch.Tensor:
    """[B, E] image embeddings -> [B, tokens, C] (IP-Adapter ``ImageProjModel``)."""
    cross = sd["norm.weight"].shape[0]
    tokens = _linear(embeds, sd, "proj.").reshape(embeds.shape[0], -1, cross)
    return _layer_norm(tokens, sd, "norm.")


def _resampler_attention(sd: dict[str, torch.Tensor], p: str, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    x = _layer_norm(x, sd, p + "norm1.")
    latents = _layer_norm(latents, sd, p + "norm2.")
    q = _linear(latents, sd, p + "to_q.")
    k, v = _linear(torch.cat([x, latents], dim=1), sd, p + "to_kv.").chunk(2, dim=-1)
    b, n, inner = q.shape
    heads = inner // RESAMPLER_DIM_HEAD

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, -1, heads, RESAMPLER_DIM_HEAD).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return _linear(out.transpose(1, 2).reshape(b, n, inner), sd, p + "to_out.")


def resampler_projection(sd: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """[B, patches, H] penultimate CLIP-vision tokens -> [B, queries, C] (IP-Adapter Plus ``Resampler``)."""
    if "layers.0.0.to_q.weight" not in sd:
        raise ValueError("the Plus image projection has no 'layers.0.0.to_q.weight': the file is damaged.")
    latents = sd["latents"].expand(hidden.shape[0], -1, -1)
    x = _linear(hidden, sd, "proj_in.")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    for i in range(depth):
        latents = _resampler_attention(sd, f"layers.{i}.0.", x, latents) + latents
        ff = _layer_norm(latents, sd, f"layers.{i}.1.0.")
        ff = F.linear(F.gelu(F.linear(ff, sd[f"layers.{i}.1.1.weight"])), sd[f"layers.{i}.1.3.weight"])
        latents = ff + latents
    return _layer_norm(_linear(latents, sd, "proj_out."), sd, "norm_out.")


def project(adapter: IPAdapter, features: torch.Tensor) -> torch.Tensor:
    """Image tokens [B, T, C] for ``features`` (image_embeds [B, E], or penultimate tokens [B, P, H] for Plus)."""
    expected_ndim = 3 if adapter.projection == "plus" else 2
    if features.ndim != expected_ndim or features.shape[-1] != adapter.embed_width:
        what = "penultimate CLIP-vision tokens [B, P, W]" if adapter.projection == "plus" else "image embeds [B, W]"
        raise ValueError(f"{adapter.name} expects {what} with W = {adapter.embed_width} ({adapter.encoder}); got "
                         f"shape {tuple(features.shape)}: load the CLIP vision model this adapter was trained with.")
    # In float32 on the features' device whatever the file's dtype: it runs once per node execution.
    sd = {k: v.to(device=features.device, dtype=torch.float32) for k, v in adapter.image_proj.items()}
    x = features.float()
    with torch.no_grad():
        if adapter.projection == "plus":
            return resampler_projection(sd, x)
        return plain_projection(sd, x)
