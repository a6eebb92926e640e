"""Files for the e2e/demo server's Qwen-Image and Z-Image Turbo stand-ins (issue 24): the tiny models of
``harness.tiny_qwen`` and ``harness.tiny_dits2`` written where the stock loader nodes read them.

- Diffusion models carry their unet_config in ``tiny_dits.CONFIG_KEY`` metadata (the detection shim reads it):
  Qwen-Image's config class matches it as it is; a Z-Image below the real width (3840) is classed Lumina2 by
  stock ComfyUI, so ``tests/harness/tiny_dit_node`` gives such a config the ZImage class (only metadata-carrying
  tiny files reach that branch).
- Qwen-Image's text encoder: a 2-layer Qwen2.5-VL whose output width is the tiny Qwen-Image's context width
  (32), in ``TE_OPTIONS_KEY``; ComfyUI detects the family from ``k_proj.bias`` (512 = 4 kv heads of 128, as the
  7B), and ``tiny_dit_node`` builds its vision tower one block deep (the stock one is 0.67B parameters; a text
  prompt never runs it, and the file carries no vision weights).
- Z-Image's text encoder: ``tiny_dits2.qwen3_path()`` (CLIPLoader type lumina2).
- Qwen-Image's VAE: the tiny Wan-2.1 VAE (``VAELoader`` detects it from its keys); Z-Image uses Flux's
  ``ae.safetensors`` (the tiny 16-channel TAESD-format file of ``harness.tiny_dits``).

Import it only after ComfyUI is importable (see ``harness.comfy_env``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from harness import tiny_dits, tiny_models

# The Qwen2.5-VL text-encoder widths: hidden = the tiny Qwen-Image's joint_attention_dim; 4 heads and 4 kv heads
# of the fixed 128 (k_proj.bias 512 is what ComfyUI reads as the 7B).
QWEN25_CONFIG = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 4}
QWEN25_OPTIONS = {"qwen25_7b_model_config": QWEN25_CONFIG}
VISION_LAYERS = 1  # the test-only vision tower depth (tiny_dit_node); stock: 32
V = tiny_dits.RECIPE_VERSION
FILES = {
    "qwen_image": ("diffusion_models", f"frozentune_tiny_qwen_image_v{V}.safetensors"),
    "z_image": ("diffusion_models", f"frozentune_tiny_z_image_v{V}.safetensors"),
    "qwen25_7b": ("text_encoders", f"frozentune_tiny_qwen25_7b_v{V}.safetensors"),
    "wan21_vae": ("vae", f"frozentune_tiny_wan21_vae_v{V}.safetensors"),
}


def _unet_config_json(config: dict) -> str:
    return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in config.items()})


def _build(item: str) -> tuple[dict, dict]:
    """(state dict, metadata) of one stand-in file."""
    from harness import tiny_dits2, tiny_qwen

    if item == "qwen_image":
        return tiny_qwen.state_dict(), {tiny_dits.CONFIG_KEY: _unet_config_json(tiny_qwen.UNET_CONFIG)}
    if item == "z_image":
        return tiny_dits2.zimage_state_dict(), {tiny_dits.CONFIG_KEY: _unet_config_json(tiny_dits2.ZIMAGE_UNET)}
    if item == "wan21_vae":
        return tiny_qwen.vae_state_dict(), {}
    if item == "qwen25_7b":
        import comfy.text_encoders.qwen_image

        module = comfy.text_encoders.qwen_image.Qwen25_7BVLIModel(
            device="meta", dtype=torch.float16, model_options={"model_name": "qwen25_7b", **QWEN25_OPTIONS}).transformer
        sd = {f"model.{k}": v for k, v in
              tiny_models.random_state_dict(module.model, tiny_dits.SEED + 24, torch.float16).items()}
        return sd, {tiny_dits.TE_OPTIONS_KEY: json.dumps(QWEN25_OPTIONS)}
    raise ValueError(f"unknown stand-in {item!r}; known: {sorted(FILES)} and qwen3_4b")


def path(item: str) -> Path:
    """The stand-in file for ``item`` ("qwen_image", "z_image", "qwen25_7b", "qwen3_4b", "wan21_vae"), built if
    missing."""
    if item == "qwen3_4b":
        from harness import tiny_dits2

        return tiny_dits2.qwen3_path()
    kind, name = FILES[item]
    out = tiny_dits.folder(kind) / name
    if not out.exists():
        sd, metadata = _build(item)
        tiny_dits._save(sd, out, metadata)
    return out
