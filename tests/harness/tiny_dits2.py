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
from harness.precision import DTYPE_NAMES, FP8, HALF

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

def _zimage_config(dtype: torch.dtype, manual_cast: torch.dtype | None):
    import comfy.supported_models

    config = comfy.supported_models.ZImage(dict(ZIMAGE_UNET))
    config.set_inference_dtype(dtype, manual_cast)
    return config


@functools.cache
def zimage_state_dict() -> dict[str, torch.Tensor]:
    """Seeded random fp32 weights of the tiny Z-Image under ComfyUI's key names."""
    module = _zimage_config(torch.float32, None).get_model({}, device=torch.device("meta")).diffusion_model
    return tiny_models.random_state_dict(module, SEED)


def zimage_model(dtype: torch.dtype | str = torch.float32):
    """A fresh tiny Z-Image MODEL in ``dtype`` (fp32, bf16/fp16 native, fp8 storage computed in fp32)."""
    import comfy.model_management as mm
    import comfy.model_patcher

    dtype = DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in (torch.float32, FP8, *HALF):
        raise ValueError(f"dtype {dtype} is not fp32, bf16, fp16 or fp8")
    manual_cast = torch.float32 if dtype == FP8 else None
    base = _zimage_config(dtype, manual_cast).get_model({})
    base.load_model_weights({k: v.to(dtype) for k, v in zimage_state_dict().items()}, "")
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    assert patcher.model.get_dtype() == dtype and base.manual_cast_dtype == manual_cast
    return patcher


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


def zimage_clip(embedding_directory=None):
    """The tiny Qwen3 through ``comfy.sd.load_clip`` (CLIPLoader type lumina2): Z-Image's text encoder."""
    import comfy.sd
    import folder_paths

    if embedding_directory is None:
        embedding_directory = folder_paths.get_folder_paths("embeddings")
    return comfy.sd.load_clip([str(qwen3_path())], embedding_directory=embedding_directory,
                              clip_type=comfy.sd.CLIPType.LUMINA2, model_options=dict(QWEN3_OPTIONS))


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

