"""Qwen-Image, Z-Image and Chroma at their real width, one block deep, through the stock UNETLoader (issue 24).

The tiny models of ``harness.tiny_dits2`` take test-only routes (detection fixes every width of these three), so
this is the one check per family that ComfyUI's own detection, head layout and RoPE read a file shaped like the
real one, that it samples, and that UniTune trains a LoRA on it. Each file is random (bf16, seeded) and
cached like the tiny ones: Qwen-Image about 380M parameters, Z-Image 909M, Chroma 631M (0.8 to 1.8 GB of disk,
built in tens of seconds). The text encoders are stand-ins of the real widths (conditioning keyed on the prompt):
the real ones are 4B to 7B parameters. ``long``: minutes on a CPU, several GB of RAM.
"""

from __future__ import annotations

import gc
import logging
import zlib
from pathlib import Path

import pytest
import torch

from harness.hashing import weight_hash
from harness.images import subject_image

log = logging.getLogger(__name__)
pytestmark = pytest.mark.long

SEED = 20261207
# family -> (ComfyUI config class, unet_config of the real model at one block, context width, parameters)
REAL_ONE_BLOCK = {
    "qwen_image": ("QwenImage", {"image_model": "qwen_image", "num_layers": 1}, 3584, 380e6),
    "z_image": ("ZImage", {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 3840,
                           "cap_feat_dim": 2560, "n_layers": 1, "qk_norm": True, "n_heads": 30, "n_kv_heads": 30,
                           "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "rope_theta": 256.0,
                           "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0,
                           "pad_tokens_multiple": 32}, 2560, 909e6),
    "chroma": ("Chroma", {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 4096,
                          "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 1,
                          "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2,
                          "qkv_bias": True, "in_dim": 64, "out_dim": 3072, "hidden_dim": 5120, "n_layers": 5},
               4096, 631e6),
}
# What ComfyUI's detection must read back from each file (the widths it fixes and the depth it counts).
DETECTED = {
    "qwen_image": {"image_model": "qwen_image", "num_layers": 1},
    "z_image": {"image_model": "lumina2", "dim": 3840, "n_layers": 1, "z_image_modulation": True},
    "chroma": {"image_model": "chroma", "hidden_size": 3072, "depth": 1, "depth_single_blocks": 1},
}


def real_width_path(family: str) -> Path:
    """The cached real-width one-block file of ``family`` (bf16, no detection metadata), built if missing."""
    import comfy.supported_models

    from harness import tiny_dits, tiny_models

    path = tiny_dits.folder("diffusion_models") / \
        f"frozentune_{family}_real_width_one_block_v{tiny_dits.RECIPE_VERSION}.safetensors"
    if not path.exists():
        config_class, unet, _, _ = REAL_ONE_BLOCK[family]
        log.info("building the real-width one-block %s at %s", family, path)
        mc = getattr(comfy.supported_models, config_class)(dict(unet))
        mc.set_inference_dtype(torch.float32, None)
        module = mc.get_model({}, device=torch.device("meta")).diffusion_model
        sd = tiny_models.random_state_dict(module, SEED + zlib.crc32(family.encode()) % 1000, torch.bfloat16)
        tiny_dits._save(sd, path)
        del sd
    return path


class WideClip:
    """Stands in for the family's text encoder at its real context width: ``tokenize`` keeps the text and
    ``encode_from_tokens_scheduled`` gives seeded conditioning ``[1, 8, width]`` keyed on it."""

    def __init__(self, width: int):
        self.width = width

    def tokenize(self, text: str, **kwargs) -> str:
        return text

    def encode_from_tokens_scheduled(self, tokens: str, **kwargs) -> list:
        gen = torch.Generator().manual_seed(SEED + zlib.crc32(tokens.encode()))
        return [[torch.randn(1, 8, self.width, generator=gen) * 0.5, {"pooled_output": None}]]


@pytest.fixture(scope="module")
def stock(pack):
    """ComfyUI with the tiny cache folders registered and the detection shim off (stock detection only)."""
    from harness import tiny_dits

    tiny_dits.register_folders()
    with tiny_dits.without_detection_shim():
        yield tiny_dits
    tiny_dits.forget()
    gc.collect()


def _vae(family: str, tiny_dits):
    if family == "qwen_image":
        from harness import tiny_qwen

        return tiny_qwen.vae()
    return tiny_dits.load_vae()


def _latent(family: str) -> dict:
    return {"samples": torch.zeros((1, 16, 1, 8, 8) if family == "qwen_image" else (1, 16, 8, 8))}


@pytest.mark.parametrize("family", list(REAL_ONE_BLOCK))
def test_real_width_one_block_loads_samples_and_trains_a_lora(stock, family):
    """Stock UNETLoader (no shim) gives the family's config class at the real width; one Euler step is finite and
    in the family's latent shape; one UniTune LoRA step gives a model that samples differently, the input's
    weights unchanged."""
    import nodes

    from frozentune import families
    from frozentune.nodes.unitune_nodes import UniTuneFineTune

    config_class, _, width, params = REAL_ONE_BLOCK[family]
    path = real_width_path(family)
    model = nodes.UNETLoader().load_unet(path.name, "default")[0]
    try:
        assert type(model.model.model_config).__name__ == config_class
        assert families.family_of(model.model).id == family
        unet = model.model.model_config.unet_config
        assert {k: unet.get(k) for k in DETECTED[family]} == DETECTED[family]
        n = sum(p.numel() for p in model.model.diffusion_model.parameters())
        assert n == pytest.approx(params, rel=0.02)

        clip = WideClip(width)
        cond = clip.encode_from_tokens_scheduled("a photo of beikkpic")

        def one_step(m):
            return nodes.common_ksampler(m, 7, 1, 1.0, "euler", "simple", cond, cond, _latent(family),
                                         denoise=1.0)[0]["samples"]

        before = one_step(model)
        assert before.shape == _latent(family)["samples"].shape and torch.isfinite(before).all()

        import comfy.model_management as mm

        mm.load_models_gpu([model])
        base_hash = weight_hash(model.model.diffusion_model)
        image = subject_image()[:, :64, :64, :]
        tuned = UniTuneFineTune.execute(model=model, clip=clip, vae=_vae(family, stock), image=image,
                                        token="beikkpic", class_word="", steps=1, batch_size=1,
                                        learning_rate=1e-3, optimizer="adamw", train="lora", lora_rank=4,
                                        gradient_checkpointing=True, seed=0).args[0]
        after = one_step(tuned)
        assert torch.isfinite(after).all() and not torch.equal(after, before)
        mm.load_models_gpu([model])
        assert weight_hash(model.model.diffusion_model) == base_hash
        log.info("%s real width one block: %.1fM parameters, one step and one LoRA step OK", family, n / 1e6)
    finally:
        import comfy.model_management as mm

        del model
        mm.unload_all_models()
        mm.soft_empty_cache()
        gc.collect()
