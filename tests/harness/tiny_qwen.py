"""A tiny random Qwen-Image (5-D Wan-2.1 latents) with a tiny Wan-2.1 VAE, built in memory for node tests.

ComfyUI 0.3.75 detects Qwen-Image from ``txt_norm.weight`` + ``img_in.weight`` and the block count and fixes
every width (24 heads of 128, joint width 3584), so a tiny one cannot come through the stock loader: it is
built from the real config class ``comfy.supported_models.QwenImage`` wrapped in a ``ModelPatcher``
(the research recipe's "real config class + ModelPatcher" route). It samples exactly as a loaded Qwen-Image
does: flow ``CONST`` with shift 1.15, the ``Wan21`` latent format, latents ``[B, 16, 1, H/8, W/8]``.

- VAE: a Wan-2.1 VAE at ``dim`` 8 (about 0.9M parameters); the stock ``comfy.sd.VAE`` detects the format
  from its keys and reads the width from ``decoder.head.0.gamma``, so this is the real video VAE code path
  (encode gives 5-D latents, decode gives ``[B, T, H, W, C]``).
- Text: the Qwen2.5-VL-7B encoder cannot be tiny (ComfyUI always builds its 1280-wide vision tower), so
  ``PromptClip`` stands in for a CLIP: deterministic random conditioning ``[1, 8, JOINT_DIM]`` keyed on the
  prompt, through the two methods the nodes call (``tokenize``, ``encode_from_tokens_scheduled``).
- Files for the stock loaders (UNETLoader, CLIPLoader, VAELoader; the ControlNet-Zero CLI): ``harness.tiny_stand_ins2``.
- ``controlnet_detection()``: ComfyUI's Qwen-Image detection plus the tiny widths for a ControlNet file as wide
  as the tiny model (the stock ``ControlNetLoader`` passes no metadata, so the metadata shim cannot answer).

Import it only after ComfyUI is importable (see ``harness.comfy_env``).
"""

from __future__ import annotations

import contextlib
import functools
import zlib

import torch

from harness import tiny_dits, tiny_models

SEED = 20261224
JOINT_DIM = 32
TOKENS = 8
UNET_CONFIG = {
    "image_model": "qwen_image", "num_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
    "joint_attention_dim": JOINT_DIM, "axes_dims_rope": (4, 6, 6), "in_channels": 64, "out_channels": 16,
    "patch_size": 2,
}
WIDTH = UNET_CONFIG["num_attention_heads"] * UNET_CONFIG["attention_head_dim"]  # the transformer's inner width
VAE_DIM = 8


@functools.cache
def state_dict() -> dict[str, torch.Tensor]:
    """Seeded random fp32 weights of the tiny Qwen-Image under ComfyUI's key names (about 55k parameters)."""
    return tiny_models.random_state_dict(tiny_dits._meta_diffusion_model("QwenImage", UNET_CONFIG), SEED)


def model(dtype: torch.dtype | str = torch.float32):
    """A fresh tiny Qwen-Image MODEL.

    ``dtype``: fp32; bf16 (stored and computed natively in bf16, as on a GPU); fp8 (weights stored in
    ``float8_e4m3fn``, cast to fp32 for compute, as ComfyUI does for fp8 storage on the CPU).
    """
    return tiny_dits.config_model("QwenImage", UNET_CONFIG, state_dict(), dtype)


@functools.cache
def vae_state_dict() -> dict[str, torch.Tensor]:
    """Seeded random weights of the tiny Wan-2.1 VAE (``dim`` 8, about 0.9M parameters), its stock key names."""
    import comfy.ldm.wan.vae

    with torch.device("meta"):
        module = comfy.ldm.wan.vae.WanVAE(dim=VAE_DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                          attn_scales=[], temperal_downsample=[False, True, True])
    return tiny_models.random_state_dict(module, SEED + 1)


def vae():
    """A fresh tiny Wan-2.1 VAE through the stock ``comfy.sd.VAE`` format detection (keys, width from the file)."""
    import comfy.ldm.wan.vae
    import comfy.sd

    loaded = comfy.sd.VAE(sd=dict(vae_state_dict()))
    assert type(loaded.first_stage_model) is comfy.ldm.wan.vae.WanVAE and loaded.latent_dim == 3
    return loaded


def conditioning(prompt: str) -> list:
    """Deterministic random conditioning for ``prompt`` (same text, same tensor), Qwen-Image's layout."""
    gen = torch.Generator().manual_seed(SEED + zlib.crc32(prompt.encode()))
    return [[torch.randn(1, TOKENS, JOINT_DIM, generator=gen), {}]]


class PromptClip:
    """Stands in for Qwen-Image's CLIP where a node needs one: ``tokenize`` keeps the text, and
    ``encode_from_tokens_scheduled`` returns ``conditioning(text)``."""

    def tokenize(self, text: str, **kwargs) -> str:
        return text

    def encode_from_tokens_scheduled(self, tokens: str, **kwargs) -> list:
        return conditioning(tokens)


@contextlib.contextmanager
def controlnet_detection():
    """ComfyUI's Qwen-Image detection plus the tiny model's widths for a file as wide as the tiny one (test only).

    What the stock ``ControlNetLoader`` needs for a tiny Qwen-Image ControlNet: every other file detects as stock.
    """
    import comfy.model_detection as md

    stock = md.detect_unet_config

    def detect(state_dict, key_prefix, metadata=None):
        config = stock(state_dict, key_prefix, metadata=metadata)
        width = state_dict.get(f"{key_prefix}img_in.weight")
        if config and config.get("image_model") == "qwen_image" and width is not None and width.shape[0] == WIDTH:
            config = {**UNET_CONFIG, **config}
        return config

    md.detect_unet_config = detect
    try:
        yield
    finally:
        md.detect_unet_config = stock
