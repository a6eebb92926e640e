"""The tiny checkpoints load through the stock CheckpointLoaderSimple and sample end to end."""

from __future__ import annotations

import pytest
import torch

from harness.hashing import weight_hash

EXPECTED = {"sd15": ("BaseModel", "SD15", 768, 768), "sdxl": ("SDXL", "KOALA_700M", 2048, 1280)}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_stock_loader_detects_family_and_samples_two_steps(family, tiny_checkpoints):
    import comfy.model_base
    import nodes

    model_cls, config_cls, context_dim, pooled_dim = EXPECTED[family]
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoints[family].name)[:3]
    assert type(model.model).__name__ == model_cls
    assert type(model.model.model_config).__name__ == config_cls
    assert isinstance(model.model, comfy.model_base.SDXL) == (family == "sdxl")
    assert clip is not None and vae.first_stage_model is not None

    positive = nodes.CLIPTextEncode().encode(clip, "a photo of beikkpic")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    cond, extra = positive[0]
    assert cond.shape == (1, 77, context_dim)
    assert extra["pooled_output"].shape == (1, pooled_dim)

    before = weight_hash(model.model.diffusion_model)
    latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    samples = nodes.common_ksampler(model, 0, 2, 5.0, "euler", "normal", positive, negative, latent)[0]
    image = nodes.VAEDecode().decode(vae, samples)[0]
    assert samples["samples"].shape == (1, 4, 8, 8)
    assert torch.isfinite(samples["samples"]).all()
    assert image.shape == (1, 64, 64, 3) and 0.0 <= image.min() and image.max() <= 1.0
    assert weight_hash(model.model.diffusion_model) == before


def test_factory_is_deterministic(comfy_root):
    from harness import tiny_models

    a = tiny_models._unet_state_dict(tiny_models.SD15)
    b = tiny_models._unet_state_dict(tiny_models.SD15)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    n = sum(v.numel() for v in a.values())
    assert 15e6 < n < 17e6, n
