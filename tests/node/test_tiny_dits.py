"""The tiny DiTs (harness.tiny_dits) load through ComfyUI's stock loaders as the right family and sample.

Engineers write the Flux/SD3 tests against these fixtures, so each promise of the harness is checked here:
the detected config class, sampling to finite output, the VAE's 16-channel shapes, ``embedding:`` in the
tiny text encoders, the bf16 and fp8 variants, and that the detection shim changes nothing for other files.
"""

from __future__ import annotations

import json

import pytest
import torch

from harness.hashing import weight_hash

EXPECTED = {  # family: (config class, model_base class, model_sampling base class, has guidance_in)
    "flux1": ("Flux", "Flux", "ModelSamplingFlux", True),
    "flux1_schnell": ("FluxSchnell", "Flux", "ModelSamplingDiscreteFlow", False),
    "sd3": ("SD3", "SD3", "ModelSamplingDiscreteFlow", False),
}


def flux_guidance(conditioning, guidance):
    from comfy_extras.nodes_flux import FluxGuidance

    return FluxGuidance.execute(conditioning, guidance).args[0]


def sample(dit, model=None, guidance=3.5, steps=2, seed=0):
    """``steps`` of euler at 64 px as a user's graph would: Flux at cfg 1 with FluxGuidance, SD3 at cfg 4."""
    import nodes

    model = dit.model if model is None else model
    if dit.family.startswith("flux"):
        positive = flux_guidance(dit.encode("a photo of a cat"), guidance)
        negative, cfg = positive, 1.0
    else:
        positive, negative, cfg = dit.encode("a photo of a cat"), dit.encode(""), 4.0
    return nodes.common_ksampler(model, seed, steps, cfg, "euler", "simple", positive, negative,
                                 dit.empty_latent(64))[0]["samples"]


@pytest.mark.parametrize("family", ["flux1", "flux1_schnell", "sd3"])
def test_stock_unet_loader_detects_the_family(family, tiny_dit):
    import nodes

    from harness import tiny_dits

    config_cls, model_cls, sampling, guidance_in = EXPECTED[family]
    model = nodes.UNETLoader().load_unet(tiny_dits.RECIPES[family].filename, "default")[0]
    assert type(model.model.model_config).__name__ == config_cls
    assert type(model.model).__name__ == model_cls
    assert sampling in [c.__name__ for c in type(model.model.model_sampling).__mro__]
    assert model.model.diffusion_model.params.guidance_embed if guidance_in else not hasattr(
        model.model.diffusion_model, "params") or not model.model.diffusion_model.params.guidance_embed
    assert any(k.startswith("guidance_in.") for k in model.model.diffusion_model.state_dict()) == guidance_in
    assert model.model.latent_format.latent_channels == 16
    assert tiny_dit(family).config_class == config_cls


def test_sd3_needs_no_shim_and_flux_needs_it(tiny_dit):
    """SD3 is found by ComfyUI's own shape detection; tiny Flux is not (24 fixed heads), only through the shim."""
    import comfy.sd

    from harness import tiny_dits

    with tiny_dits.without_detection_shim():
        sd3 = comfy.sd.load_diffusion_model(str(tiny_dits.diffusion_model_path("sd3")))
        assert type(sd3.model.model_config).__name__ == "SD3"
        with pytest.raises(Exception, match="divisible by num_heads 24"):
            comfy.sd.load_diffusion_model(str(tiny_dits.diffusion_model_path("flux1")))


def test_shim_answers_only_for_files_with_the_key(tiny_dit):
    import comfy.model_detection as md

    from harness import tiny_dits

    tiny_dits.install_detection_shim()
    tiny_dits.install_detection_shim()  # idempotent: one layer, not two
    assert md.detect_unet_config.stock.__module__ == "comfy.model_detection"
    stock = md.detect_unet_config.stock
    for family in tiny_dits.FAMILIES:
        sd = tiny_dits.diffusion_model_state_dict(family)
        assert md.detect_unet_config(sd, "", metadata=None) == stock(sd, "", metadata=None)
        assert md.detect_unet_config(sd, "", metadata={"other": "x"}) == stock(sd, "", metadata={"other": "x"})
    flux = tiny_dits.RECIPES["flux1"].unet
    sd = tiny_dits.diffusion_model_state_dict("flux1")
    assert md.detect_unet_config(sd, "", metadata={tiny_dits.CONFIG_KEY: json.dumps(flux)}) == flux


@pytest.mark.parametrize("family", ["flux1", "flux1_schnell", "sd3"])
def test_ksampler_two_steps_to_finite_output(family, tiny_dit):
    dit = tiny_dit(family)
    before = weight_hash(dit.model.model.diffusion_model)
    out = sample(dit)
    assert out.shape == (1, 16, 8, 8)
    assert torch.isfinite(out).all() and out.abs().mean() > 0.01
    assert torch.equal(out, sample(dit)), "the same seed must give the same samples"
    assert weight_hash(dit.model.model.diffusion_model) == before


@pytest.mark.parametrize("family", ["flux1", "flux1_schnell"])
def test_flux_guidance_reaches_only_the_dev_model(family, tiny_dit):
    """Flux.1-dev embeds the FluxGuidance value (guidance_in); schnell has no guidance input and ignores it."""
    dit = tiny_dit(family)
    changed = not torch.equal(sample(dit, guidance=1.0, steps=1), sample(dit, guidance=6.0, steps=1))
    assert changed == (family == "flux1")


@pytest.mark.parametrize("family", ["flux1", "sd3"])
def test_encode_gives_the_family_conditioning_shapes(family, tiny_dit):
    from harness import tiny_dits

    context, pooled = tiny_dits.COND_WIDTHS[family]
    (cond, extra), = tiny_dit(family).encode("a photo of a cat")
    assert cond.shape == (1, 256 if family == "flux1" else 77, context)
    assert extra["pooled_output"].shape == (1, pooled)
    if family == "sd3":  # CLIP-L 64 + CLIP-G 64, zero-padded to SD3's 4096 by ComfyUI
        assert cond[..., :128].abs().sum() > 0 and not cond[..., 128:].any()


def test_vae_encodes_and_decodes_16_channels_at_64px(tiny_dit):
    import nodes

    vae = tiny_dit("flux1").vae
    assert vae.latent_channels == 16 and type(vae.first_stage_model).__name__ == "TAESD"
    image = torch.rand(1, 64, 64, 3)
    latent = nodes.VAEEncode().encode(vae, image)[0]
    assert latent["samples"].shape == (1, 16, 8, 8) and torch.isfinite(latent["samples"]).all()
    decoded = nodes.VAEDecode().decode(vae, latent)[0]
    assert decoded.shape == (1, 64, 64, 3) and 0.0 <= decoded.min() and decoded.max() <= 1.0


@pytest.mark.parametrize("family, keys, counts", [
    ("flux1", ("clip_l", "t5xxl"), {"l": 2, "t5xxl": 2}),
    ("sd3", ("clip_l", "clip_g"), {"l": 2, "g": 2}),
])
def test_embedding_word_resolves_in_the_tiny_text_encoders(family, keys, counts, tiny_dit, tmp_path):
    import nodes
    import safetensors.torch

    from harness import tiny_dits

    gen = torch.Generator().manual_seed(0)
    safetensors.torch.save_file({k: torch.randn(2, 64, generator=gen) for k in keys}, str(tmp_path / "tiword.safetensors"))
    clip = tiny_dits.load_clip(family, embedding_directory=[str(tmp_path)])
    tokens = clip.tokenize("a photo of embedding:tiword cat")
    vectors = {k: sum(not isinstance(t[0], int) for batch in v for t in batch) for k, v in tokens.items()}
    assert {k: vectors[k] for k in counts} == counts
    with_word = nodes.CLIPTextEncode().encode(clip, "a photo of embedding:tiword cat")[0][0]
    plain = nodes.CLIPTextEncode().encode(clip, "a photo of cat")[0][0]
    assert not torch.allclose(with_word[0], plain[0][:, :with_word[0].shape[1]])
    assert not torch.allclose(with_word[1]["pooled_output"], plain[1]["pooled_output"])


@pytest.mark.parametrize("family", ["flux1", "sd3"])
@pytest.mark.parametrize("dtype, weight_dtype, stored, compute", [
    ("bf16", None, torch.bfloat16, None),  # stored and computing natively in bf16
    (None, "fp8", torch.float8_e4m3fn, "comfy"),  # UNETLoader fp8_e4m3fn: ComfyUI picks (fp32 on the CPU)
    ("bf16", "fp8", torch.float8_e4m3fn, torch.bfloat16),  # fp8 stored, cast to bf16 as a bf16 GPU does
])
def test_half_variants_load_with_their_weight_dtype_and_sample(family, dtype, weight_dtype, stored, compute,
                                                               tiny_dit):
    from harness import tiny_dits

    dit = tiny_dits.load(family, dtype=dtype, weight_dtype=weight_dtype)
    assert dit.model is not tiny_dit(family).model
    assert {p.dtype for p in dit.model.model.diffusion_model.parameters()} == {stored}
    if compute == "comfy":
        import comfy.model_management as mm

        device = mm.get_torch_device()
        compute = mm.unet_manual_cast(stored, device, dit.model.model.model_config.supported_inference_dtypes)
        assert compute == torch.float32 or device.type != "cpu"
    assert dit.model.model.manual_cast_dtype == compute
    assert type(dit.model.model.model_config).__name__ == EXPECTED[family][0]
    out = sample(dit)
    assert out.shape == (1, 16, 8, 8) and torch.isfinite(out).all()


def test_tiny_files_are_deterministic_and_small(tiny_dit):
    from harness import tiny_dits

    a, b = (tiny_dits.diffusion_model_state_dict("flux1") for _ in range(2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sizes = [p.stat().st_size for p in tiny_dits.build_all()]
    assert sum(sizes) < 64 * 2**20, sizes


@pytest.mark.long
def test_real_width_one_block_flux_through_the_stock_loader(tiny_dit):
    """Hidden 3072 (24 heads of 128), 1 double + 1 single block: ComfyUI's own detection reads it, no shim."""
    import nodes

    from harness import tiny_dits

    path = tiny_dits.real_width_flux_one_block()
    with tiny_dits.without_detection_shim():
        model = nodes.UNETLoader().load_unet(path.name, "default")[0]
    assert type(model.model.model_config).__name__ == "Flux"
    unet = model.model.model_config.unet_config
    assert (unet["hidden_size"], unet["depth"], unet["depth_single_blocks"]) == (3072, 1, 1)
    assert 500e6 < sum(p.numel() for p in model.model.diffusion_model.parameters()) < 560e6
    gen = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 16, 4096, generator=gen), {"pooled_output": torch.randn(1, 768, generator=gen),
                                                         "guidance": 3.5}]]
    out = nodes.common_ksampler(model, 0, 1, 1.0, "euler", "simple", cond, cond,
                                {"samples": torch.zeros(1, 16, 8, 8)})[0]["samples"]
    assert out.shape == (1, 16, 8, 8) and torch.isfinite(out).all()
