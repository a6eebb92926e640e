"""Tiny random stand-ins for InstantStyle on Flux.1: an XLabs-layout Flux IP-Adapter and a CLIP ViT-L-like vision model.

- XLabs IP-Adapter files in x-flux's key layout (``double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.*``
  + ``ip_adapter_proj_model.{proj,norm}.*``), sized for the tiny Flux of ``harness.tiny_dits`` (hidden 64, two
  double blocks), 4 tokens of width 32. Unlike a freshly initialised XLabs adapter (k/v zero), the k/v are random,
  so the image attention visibly acts.
- A 2-layer CLIP vision model whose ``image_embeds`` are 64-d: the width of the tiny Flux CLIP-L's (square) text
  projection, so content subtraction type-checks as CLIP ViT-L image embeds minus CLIP-L text embeds do at 768.
  Built from a config written beside the cache (the stock ``ClipVisionModel`` reads a config path).

Import it only after ComfyUI is importable (see ``harness.comfy_env``).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

from . import tiny_ipadapter, tiny_models

SEED = 20261206
HIDDEN, CONTEXT, EMBED, TOKENS, DOUBLE = 64, 32, 64, 4, 2
CLIP_VISION_L_FILE = "frozentune_tiny_clip_vision_l64_v1.safetensors"


def _randn(shape, name: str, seed: int, std: float | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
    if std is None:
        std = shape[-1] ** -0.5 if len(shape) > 1 else 1.0
    return torch.randn(shape, generator=gen) * std


def xlabs_state_dict(hidden: int = HIDDEN, context: int = CONTEXT, embed: int = EMBED, tokens: int = TOKENS,
                     double: int = DOUBLE, seed: int = SEED) -> dict[str, torch.Tensor]:
    sd = {"ip_adapter_proj_model.proj.weight": _randn((tokens * context, embed), "proj.weight", seed),
          "ip_adapter_proj_model.proj.bias": _randn((tokens * context,), "proj.bias", seed, 0.02),
          "ip_adapter_proj_model.norm.weight": 1 + _randn((context,), "norm.weight", seed, 0.1),
          "ip_adapter_proj_model.norm.bias": _randn((context,), "norm.bias", seed, 0.1)}
    for i in range(double):
        for which in ("k", "v"):
            p = f"double_blocks.{i}.processor.ip_adapter_double_stream_{which}_proj."
            sd[p + "weight"] = _randn((hidden, context), p + "weight", seed)
            sd[p + "bias"] = _randn((hidden,), p + "bias", seed, 0.1)
    return sd


def xlabs_path(dtype: torch.dtype = torch.float32) -> Path:
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    path = tiny_models.cache_dir() / f"frozentune_tiny_flux_xlabs_ipadapter_{name}_v1.safetensors"
    if not path.exists():
        tiny_ipadapter._save(path, {k: v.to(dtype) for k, v in xlabs_state_dict().items()},
                             {"frozentune_tiny": "xlabs flux ipadapter"})
    return path


def clip_vision_l_config_path() -> Path:
    path = tiny_models.cache_dir() / "frozentune_tiny_clip_vision_l64_config.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**tiny_ipadapter.clip_vision_config(), "projection_dim": EMBED}))
    return path


def clip_vision_l_path() -> Path:
    import comfy.clip_model
    import comfy.ops

    path = tiny_models.cache_dir() / CLIP_VISION_L_FILE
    if not path.exists():
        config = json.loads(clip_vision_l_config_path().read_text())
        model = comfy.clip_model.CLIPVisionModelProjection(config, torch.float32, "meta", comfy.ops.disable_weight_init)
        tiny_ipadapter._save(path, tiny_models.random_state_dict(model, SEED + 7), {"frozentune_tiny": "clip_vision"})
    return path


def clip_vision_l_model():
    """The tiny ViT-L stand-in as the stock ``comfy.clip_vision.ClipVisionModel`` (64-d image_embeds)."""
    import comfy.clip_vision
    import comfy.utils

    model = comfy.clip_vision.ClipVisionModel(str(clip_vision_l_config_path()))
    model.load_sd(comfy.utils.load_torch_file(str(clip_vision_l_path())))
    return model
