"""Tiny Qwen-Image, Z-Image and Chroma (issue 24) behind one interface: ``kit(family, dtype) -> Kit``.

ComfyUI 0.3.75's detection fixes the widths of all three, so each takes a test-only route:

- Qwen-Image: ``harness.tiny_qwen`` (real ``QwenImage`` config class + ``ModelPatcher``, a tiny Wan-2.1 VAE,
  prompt-keyed conditioning in place of its Qwen2.5-VL-7B encoder, whose vision tower cannot be tiny).
- Z-Image: the real ``ZImage`` config class + ``ModelPatcher`` here. Its detection (``cap_embedder.1.weight``)
  classes every dim but 3840 as Lumina2, and its modulation (``adaLN_modulation`` reads ``min(dim, 256)``
  features of a 256-wide timestep embedding) needs dim >= 256, so the tiny one is 256 wide (about 3M
  parameters). Its text encoder is a tiny Qwen3 (what ``CLIPLoader`` type lumina2 builds for a Qwen3-4B
  file: ComfyUI detects it by its keys) through ``comfy.sd.load_clip``, its width in ``model_options``; the
  16-channel TAESD-format VAE of ``harness.tiny_dits`` (Z-Image uses Flux's latent format).
- Chroma: ``harness.tiny_dits`` (recipe "chroma": the stock ``UNETLoader`` through the metadata detection
  shim, as the tiny Flux; the T5 and VAE of the tiny Flux).

Each MODEL comes in fp32, bf16 (stored and computed natively, as on a GPU) or fp8 (``float8_e4m3fn``
storage, computed in fp32 as ComfyUI casts it on the CPU).

Import it only after ComfyUI is importable (see ``harness.comfy_env``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from harness import tiny_dits, tiny_models, tiny_qwen

FAMILIES = ("qwen_image", "z_image", "chroma")
SEED = 20261206
# The ComfyUI unet_config of the tiny Z-Image: model_detection's Z-Image branch (dim 3840) at dim 256, with
# 4 heads of 64 (rope axes 16 + 24 + 24), 2 main blocks and 1 block in each refiner.
ZIMAGE_UNET = {
    "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": 64, "n_layers": 2,
    "n_refiner_layers": 1, "qk_norm": True, "n_heads": 4, "n_kv_heads": 4, "axes_dims": [16, 24, 24],
    "axes_lens": [256, 64, 64], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0, "multiple_of": 32,
    "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32,
}
QWEN3_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2,
                "num_key_value_heads": 1}
QWEN3_OPTIONS = {"qwen3_4b_model_config": QWEN3_CONFIG}
QWEN3_FILENAME = f"frozentune_tiny_qwen3_4b_v{tiny_dits.RECIPE_VERSION}.safetensors"


@dataclass
class Kit:
    """A tiny model of one family: its MODEL, a CLIP (or stand-in), VAE, ``encode(prompt) -> CONDITIONING``."""

    model: Any
    clip: Any
    vae: Any
    encode: Callable[[str], list]
    family: str

    def empty_latent(self, size: int = 64, batch: int = 1) -> dict:
        """A LATENT of zeros for ``size`` px, in the shape the family samples (5-D for Qwen-Image)."""
        side = size // tiny_dits.DOWNSCALE
        shape = (batch, 16, 1, side, side) if self.family == "qwen_image" else (batch, 16, side, side)
        return {"samples": torch.zeros(shape)}


# --- Z-Image -----------------------------------------------------------------------------------------

@functools.cache
def zimage_state_dict() -> dict[str, torch.Tensor]:
    """Seeded random fp32 weights of the tiny Z-Image under ComfyUI's key names."""
    return tiny_models.random_state_dict(tiny_dits._meta_diffusion_model("ZImage", ZIMAGE_UNET), SEED)


def zimage_model(dtype: torch.dtype | str = torch.float32):
    """A fresh tiny Z-Image MODEL in ``dtype`` (fp32, bf16/fp16 native, fp8 storage computed in fp32)."""
    return tiny_dits.config_model("ZImage", ZIMAGE_UNET, zimage_state_dict(), dtype)


def qwen3_path():
    """The cached tiny Qwen3 text-encoder file (fp16, ComfyUI's key names), built if missing. It carries its
    ``model_options`` in ``tiny_dits.TE_OPTIONS_KEY``, so the stock CLIPLoader reads it under the text-encoder shim."""
    import comfy.text_encoders.z_image

    path = tiny_dits.folder("text_encoders") / QWEN3_FILENAME
    if not path.exists():
        module = comfy.text_encoders.z_image.Qwen3_4BModel(device="meta", dtype=torch.float16,
                                                           model_options={"model_name": "qwen3_4b",
                                                                          **QWEN3_OPTIONS}).transformer
        tiny_dits._save(tiny_models.random_state_dict(module, SEED + 10, torch.float16), path,
                        {tiny_dits.TE_OPTIONS_KEY: json.dumps(QWEN3_OPTIONS)})
    return path


def zimage_clip(embedding_directory=None, path=None):
    """The tiny Qwen3 (``path``, default ``qwen3_path()``) through ``comfy.sd.load_clip`` (CLIPLoader type lumina2):
    Z-Image's text encoder."""
    import comfy.sd
    import folder_paths

    if embedding_directory is None:
        embedding_directory = folder_paths.get_folder_paths("embeddings")
    return comfy.sd.load_clip([str(path or qwen3_path())], embedding_directory=embedding_directory,
                              clip_type=comfy.sd.CLIPType.LUMINA2, model_options=dict(QWEN3_OPTIONS))


FP8_LAYOUTS = ("fp8_e4m3fn", "fp8_scaled")
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def fp8_text_encoder_path(item: str, layout: str = "fp8_e4m3fn"):
    """A copy of a tiny Qwen text-encoder file (``harness.tiny_stand_ins2.path(item)``: "qwen25_7b", Qwen-Image's;
    "qwen3_4b", Z-Image's) stored in ``float8_e4m3fn`` as users load the real ones, built if missing.

    - "fp8_e4m3fn": every tensor in fp8. ComfyUI builds a Qwen encoder in the dtype of its file's
      ``model.norm.weight`` (``llama_detect``), so every weight, the token table included, stays fp8 and each op
      casts it at use.
    - "fp8_scaled": Comfy-Org's ``*_fp8_scaled`` layout (e.g. qwen_2.5_vl_7b_fp8_scaled.safetensors): each Linear
      weight in fp8 with its fp32 ``scale_weight`` (max |w| / 448), a ``scaled_fp8`` marker, the norms and the
      token table left 16-bit; ComfyUI builds scaled-fp8 Linear layers for it (``comfy.ops.scaled_fp8_ops``).
    """
    import safetensors

    from harness import tiny_stand_ins2

    if layout not in FP8_LAYOUTS:
        raise ValueError(f"unknown fp8 layout {layout!r}; known: {FP8_LAYOUTS}")
    source = tiny_stand_ins2.path(item)
    path = source.with_name(f"{source.stem}_{layout}.safetensors")
    if not path.exists():
        with safetensors.safe_open(str(source), framework="pt") as f:
            sd, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        fp8 = torch.float8_e4m3fn
        if layout == "fp8_e4m3fn":
            out = {k: v.to(fp8) for k, v in sd.items()}
        else:
            out = {"scaled_fp8": torch.empty(0, dtype=fp8)}
            for k, v in sd.items():
                if v.ndim == 2 and "embed_tokens" not in k:  # a Linear weight
                    scale = v.float().abs().max() / FP8_MAX
                    out[k], out[k.removesuffix("weight") + "scale_weight"] = (v.float() / scale).to(fp8), scale
                else:
                    out[k] = v
        tiny_dits._save(out, path, {tiny_dits.TE_OPTIONS_KEY: metadata[tiny_dits.TE_OPTIONS_KEY]})
    return path


# --- one interface -----------------------------------------------------------------------------------

def model(family: str, dtype: str = "fp32"):
    """A fresh MODEL of ``family`` in ``dtype`` ("fp32", "bf16", "fp8")."""
    if family == "qwen_image":
        return tiny_qwen.model(dtype)
    if family == "z_image":
        return zimage_model(dtype)
    if family == "chroma":
        if dtype == "fp8":
            return tiny_dits.load_model("chroma", weight_dtype="fp8_e4m3fn")
        return tiny_dits.load_model("chroma", None if dtype == "fp32" else dtype)
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")


@functools.cache
def _shared(family: str) -> tuple:
    """(CLIP, VAE, encode) of ``family``, built once per process."""
    import nodes

    if family == "qwen_image":
        return tiny_qwen.PromptClip(), tiny_qwen.vae(), tiny_qwen.conditioning
    tiny_dits.install_detection_shim()
    tiny_dits.register_folders()
    clip = zimage_clip() if family == "z_image" else tiny_dits.load_clip("chroma")
    return clip, tiny_dits.load_vae(), lambda prompt: nodes.CLIPTextEncode().encode(clip, prompt)[0]


@functools.cache
def _fp32_model(family: str):
    return model(family)


def kit(family: str, dtype: str = "fp32", fresh: bool = False) -> Kit:
    """``family``'s tiny kit; the fp32 MODEL is shared per process unless ``fresh`` (never mutate it)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    clip, vae, encode = _shared(family)
    m = _fp32_model(family) if dtype == "fp32" and not fresh else model(family, dtype)
    return Kit(m, clip, vae, encode, family)


def forget() -> None:
    """Drop the cached models (before interpreter exit, as ``tiny_dits.forget``)."""
    import gc

    _shared.cache_clear()
    _fp32_model.cache_clear()
    gc.collect()

