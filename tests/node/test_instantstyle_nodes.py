"""IP-Adapter Loader and InstantStyle Apply on tiny random models, through the real node classes.

The SDXL-family model is the tiny ``sdxl_blocks`` recipe (SDXL's real block ids; the KOALA-layout "sdxl"
lacks the layout block ("input", 8) and the middle block's attention). The CLIP vision model is a tiny
random stock ``ClipVisionModel`` with a 1280-d (bigG-width) projection.

The half-precision tier loads the same UNet in bf16 and fp16 computing natively in that dtype, and in fp8
storage (``harness.precision``); the text encoders stay the fp32 ones (ComfyUI casts the conditioning to
the UNet's dtype), so only the UNet is loaded again.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from harness import half_tier
from harness.hashing import weight_hash

STEPS = 2


@pytest.fixture(scope="module")
def models(tiny_checkpoints, pack):
    import nodes

    return {f: nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoints[f].name)[:3]
            for f in ("sdxl_blocks", "sdxl", "sd15")}


def xl_unet(models, tiny_checkpoints, dtype: str):
    """The tiny SDXL-family MODEL with its UNet stored in ``dtype`` (half precision computing natively)."""
    return models["sdxl_blocks"][0] if dtype == "fp32" else half_tier.unet(tiny_checkpoints["sdxl_blocks"], dtype)


@pytest.fixture(scope="module")
def stand_ins(models):
    from frozentune.instantstyle import adapter_file
    from harness import tiny_ipadapter

    return dict(
        xl=adapter_file.load(tiny_ipadapter.ipadapter_path("sdxl_blocks")),
        xl_plus=adapter_file.load(tiny_ipadapter.ipadapter_path("sdxl_blocks", "plus", 64)),  # tiny ViT is 64 wide
        koala=adapter_file.load(tiny_ipadapter.ipadapter_path("sdxl")),
        sd15=adapter_file.load(tiny_ipadapter.ipadapter_path("sd15", embed_width=1024)),
        clip_vision=tiny_ipadapter.clip_vision_model(),
    )


def style(model, adapter, clip_vision, image, **kw):
    from harness import tiny_ipadapter

    return tiny_ipadapter.apply_style(model, adapter, clip_vision, image, **kw)


_CONDS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _forget_conds():
    """Drop the cached conditionings and their CLIPs with this module: a CLIP left for interpreter exit is
    collected after ComfyUI's modules and prints an "Exception ignored in ModelPatcher.__del__" traceback."""
    yield
    _CONDS.clear()
    half_tier.forget()


def conds(clip):
    """Prompt conditionings, encoded once per CLIP (the tiny checkpoints carry full-size random text towers)."""
    import nodes

    if id(clip) not in _CONDS:
        _CONDS[id(clip)] = (clip, nodes.CLIPTextEncode().encode(clip, "a house")[0],
                            nodes.CLIPTextEncode().encode(clip, "")[0])
    return _CONDS[id(clip)][1:]


def sample(model, clip, positive=None, negative=None):
    import nodes

    pos, neg = conds(clip)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    return nodes.common_ksampler(model, 3, STEPS, 5.0, "euler", "normal", positive or pos, negative or neg, latent,
                                 disable_noise=False)[0]["samples"]


def attn2(model) -> dict:
    return model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})


def at_rest_hash(patcher) -> str:
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])
    return weight_hash(patcher.model.diffusion_model)


@pytest.fixture
def recorder(monkeypatch):
    """Every (block, block_index, cond_or_uncond) an InstantStyle patch is called with."""
    from frozentune.instantstyle.attention import IPAttention

    seen = []
    original = IPAttention.__call__

    def recording(self, q, k, v, extra):
        seen.append(((*extra["block"], extra["block_index"]), tuple(extra["cond_or_uncond"])))
        return original(self, q, k, v, extra)

    monkeypatch.setattr(IPAttention, "__call__", recording)
    return seen


def test_loader_node_reads_models_ipadapter(stand_ins):
    import folder_paths

    from frozentune.nodes.instantstyle_nodes import IPAdapterLoader
    from harness import tiny_ipadapter

    path = tiny_ipadapter.ipadapter_path("sdxl_blocks")
    folder_paths.add_model_folder_path("ipadapter", str(path.parent))
    assert path.name in folder_paths.get_filename_list("ipadapter")
    ad = IPAdapterLoader.execute(path.name).args[0]
    assert (ad.family, ad.projection, ad.tokens, ad.embed_width, len(ad.layers)) == ("sdxl", "plain", 4, 1280, 16)


@pytest.mark.parametrize("preset, blocks", [("style", {("output", 1)}), ("style+layout", {("output", 1), ("input", 8)}),
                                            ("custom", {("middle", 0)})])
def test_only_the_selected_blocks_run_the_patch(models, stand_ins, style_image, recorder, preset, blocks):
    model, clip, _ = models["sdxl_blocks"]
    patched = style(model, stand_ins["xl"], stand_ins["clip_vision"], style_image, preset=preset,
                    custom_blocks="middle 0")
    assert {k[:2] for k in attn2(patched)} == blocks
    sample(patched, clip)
    assert {key[:2] for key, _ in recorder} == blocks
    assert {key for key, _ in recorder} == set(attn2(patched))  # every transformer index of those blocks
    assert {tuple(sorted(chunks)) for _, chunks in recorder} == {(0, 1)}


def test_all_blocks_patch_every_cross_attention_layer(models, stand_ins, style_image):
    model, _, _ = models["sdxl_blocks"]
    patched = style(model, stand_ins["xl"], stand_ins["clip_vision"], style_image, preset="all blocks")
    assert len(attn2(patched)) == 16 and ("middle", 0, 0) in attn2(patched)


@pytest.mark.parametrize("dtype", half_tier.dtype_params(long=("fp16",)))  # fp16 runs bf16's native path: long
def test_weight_zero_is_bitwise_the_unpatched_model_and_input_is_untouched(models, tiny_checkpoints, stand_ins,
                                                                           style_image, dtype):
    model, clip = xl_unet(models, tiny_checkpoints, dtype), models["sdxl_blocks"][1]
    before_hash, before_options = at_rest_hash(model), repr(model.model_options)
    unpatched = sample(model, clip)
    assert torch.isfinite(unpatched).all()
    zero = style(model, stand_ins["xl"], stand_ins["clip_vision"], style_image, weight=0.0, preset="style+layout")
    assert torch.equal(sample(zero, clip), unpatched)
    patched = style(model, stand_ins["xl"], stand_ins["clip_vision"], style_image)
    styled = sample(patched, clip)
    assert torch.isfinite(styled).all()
    assert not torch.allclose(styled, unpatched, atol=1e-3)
    assert at_rest_hash(model) == before_hash and repr(model.model_options) == before_options
    assert attn2(model) == {}
    # ComfyUI moved the patches to the model's dtype on load: they keep the adapter's and the tokens' own
    for patch in attn2(patched).values():
        assert (patch.to_k_ip.dtype, patch.to_v_ip.dtype, patch.cond.dtype, patch.uncond.dtype) == (torch.float32,) * 4


@pytest.mark.half
def test_fp8_model_keeps_the_patch_dtypes_and_the_image_attention_exact(models, tiny_checkpoints, stand_ins,
                                                                         style_image, monkeypatch):
    """ComfyUI's load calls ``model_patches_to(fp8)``: the adapter and tokens must not become fp8 (issue 11 #5).

    Reference: the image-attention term of the patches as made (fp32 adapter and tokens), in float64 on
    the very queries the sampler produced. The fp8 UNet computes in fp32 (manual cast), so the patch's
    term is an fp32 computation of the same maths: its relative error is a few fp32 roundings summed over
    a 64-wide head and 4 tokens (~1e-7); the bound 1e-5 leaves room for the order of those sums and is
    ~4000x below the fp8-quantized adapter's error (4.9%, issue 11).
    """
    from frozentune.instantstyle.attention import IPAttention

    model, clip = xl_unet(models, tiny_checkpoints, "fp8"), models["sdxl_blocks"][1]
    patched = style(model, stand_ins["xl"], stand_ins["clip_vision"], style_image)
    made = dict(attn2(patched))
    calls = []
    original = IPAttention.image_attention

    def recording(self, q, extra):
        out = original(self, q, extra)
        calls.append((self, q.detach().clone(), dict(extra), out.detach().clone()))
        return out

    monkeypatch.setattr(IPAttention, "image_attention", recording)
    # The first run samples with a copy of the options taken before the load moved the patches; every
    # later run (the next queue, a second sampler) gets the moved ones: sample twice.
    for _ in range(2):
        assert torch.isfinite(sample(patched, clip)).all()
    assert len(calls) == 2 * STEPS * len(made)
    for patch in attn2(patched).values():
        assert (patch.to_k_ip.dtype, patch.to_v_ip.dtype, patch.cond.dtype, patch.uncond.dtype) == (torch.float32,) * 4
    errors = []
    for patch, q, extra, out in calls:
        assert q.dtype == torch.float32  # fp8 storage computes in fp32
        reference = original(made[patch.key], q.double(), extra)
        errors.append(((out.double() - reference).norm() / reference.norm()).item())
    logging.getLogger(__name__).info("fp8 UNet: image attention relative error %.3g (max over %d calls)",
                                     max(errors), len(errors))
    assert max(errors) < 1e-5, f"image attention off by {max(errors):.3g} (relative)"


def test_chaining_wraps_without_touching_the_upstream_patches(models, stand_ins, style_image):
    model, clip, _ = models["sdxl_blocks"]
    cv, ad = stand_ins["clip_vision"], stand_ins["xl"]
    base_hash = at_rest_hash(model)
    first = style(model, ad, cv, style_image, weight=0.8)
    first_patches = dict(attn2(first))
    first_result = sample(first, clip)
    second = style(first, ad, cv, style_image.flip(2), weight=0.5, preset="style+layout")
    assert attn2(first) == first_patches and all(p.prev is None for p in first_patches.values())
    for key, patch in attn2(second).items():
        assert patch.prev is (first_patches.get(key))
    assert torch.equal(sample(first, clip), first_result)
    both = sample(second, clip)
    assert not torch.allclose(both, first_result, atol=1e-3)
    # the same result however the clone is copied: the patch objects are shared, never duplicated
    assert attn2(second.clone())[("output", 1, 0)] is attn2(second)[("output", 1, 0)]
    assert torch.equal(sample(second.clone(), clip), both)
    assert attn2(model) == {} and at_rest_hash(model) == base_hash


def test_subtraction_changes_only_the_conditional_tokens_by_the_official_formula(models, stand_ins, style_image):
    from frozentune.instantstyle import projection

    model, clip, _ = models["sdxl_blocks"]
    cv, ad = stand_ins["clip_vision"], stand_ins["xl"]
    plain = attn2(style(model, ad, cv, style_image))[("output", 1, 0)]
    sub = attn2(style(model, ad, cv, style_image, content_text="a cat", subtract=0.7, clip=clip))[("output", 1, 0)]
    embeds = cv.encode_image(style_image)["image_embeds"].float()
    _, pooled = clip.encode_from_tokens(clip.tokenize("a cat"), return_pooled=True)
    assert pooled.shape == (1, 1280)  # SDXL: the clip_g projected pooled output
    assert torch.equal(sub.cond, projection.project(ad, embeds - pooled.float() * 0.7))
    assert torch.equal(plain.cond, projection.project(ad, embeds))
    assert not torch.allclose(sub.cond, plain.cond)
    assert torch.equal(sub.uncond, plain.uncond)
    assert torch.equal(plain.uncond, projection.project(ad, torch.zeros(1, 1280)))


def test_mismatches_are_clear_errors(models, stand_ins, style_image):
    xl, xl_clip, _ = models["sdxl_blocks"]
    sd15, sd15_clip, _ = models["sd15"]
    koala, _, _ = models["sdxl"]
    cv = stand_ins["clip_vision"]
    with pytest.raises(ValueError, match="IP-Adapter is sd15 \\(768-d context\\) but MODEL is sdxl \\(2048-d\\)"):
        style(xl, stand_ins["sd15"], cv, style_image)
    with pytest.raises(ValueError, match="IP-Adapter is sdxl \\(2048-d context\\) but MODEL is sd15 \\(768-d\\)"):
        style(sd15, stand_ins["xl"], cv, style_image, preset="all blocks")
    with pytest.raises(ValueError, match="Plus adapter"):
        style(xl, stand_ins["xl_plus"], cv, style_image, content_text="a cat", clip=xl_clip)
    with pytest.raises(ValueError, match="768-d but .* expects 1280-d"):
        style(xl, stand_ins["xl"], cv, style_image, content_text="a cat", clip=sd15_clip)
    with pytest.raises(ValueError, match="clip input is empty"):
        style(xl, stand_ins["xl"], cv, style_image, content_text="a cat")
    with pytest.raises(ValueError, match="has 16 cross-attention layers but MODEL has 11"):
        style(koala, stand_ins["xl"], cv, style_image)
    with pytest.raises(ValueError, match="down_blocks.2.attentions.1, which this model does not have"):
        style(koala, stand_ins["koala"], cv, style_image, preset="layout")
    with pytest.raises(ValueError, match="'input 9' does not exist"):
        style(xl, stand_ins["xl"], cv, style_image, preset="custom", custom_blocks="output 1, input 9")
    with pytest.raises(ValueError, match="start 0.6 / end 0.4"):
        style(xl, stand_ins["xl"], cv, style_image, start_at=0.6, end_at=0.4)


def test_koala_layout_style_preset_runs(models, stand_ins, style_image):
    model, clip, _ = models["sdxl"]
    patched = style(model, stand_ins["koala"], stand_ins["clip_vision"], style_image)
    assert set(attn2(patched)) == {("output", 1, 0)}  # KOALA keeps up_blocks.0.attentions.1 (one transformer)
    assert torch.isfinite(sample(patched, clip)).all()


def test_three_conditionings_of_the_prompt_guidance_guider(models, stand_ins, style_image, recorder):
    import comfy.sample
    import comfy.samplers
    import nodes

    from frozentune.nodes.guidance_nodes import PromptGuidanceGuider

    model, clip, _ = models["sdxl_blocks"]
    pos, neg = conds(clip)
    baseline = nodes.CLIPTextEncode().encode(clip, "a building")[0]

    def guided(m):
        guider = PromptGuidanceGuider.execute(model=m, positive=pos, baseline=baseline, negative=neg, cfg=5.0, pg=2.0,
                                              pg_start=0.0, pg_end=1.0, rescale=0.0).args[0]
        latent = torch.zeros(1, 4, 8, 8)
        sigmas = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "normal", STEPS).cpu()
        return guider.sample(comfy.sample.prepare_noise(latent, 3), latent, comfy.samplers.sampler_object("euler"),
                             sigmas, disable_pbar=True, seed=3)

    cv, ad = stand_ins["clip_vision"], stand_ins["xl"]
    unpatched = guided(model)
    assert torch.equal(guided(style(model, ad, cv, style_image, weight=0.0)), unpatched)
    recorder.clear()
    styled = guided(style(model, ad, cv, style_image))
    assert {tuple(sorted(chunks)) for _, chunks in recorder} == {(0, 1, 2)}
    assert not torch.allclose(styled, unpatched, atol=1e-3)


def test_with_a_stock_controlnet(models, stand_ins, style_image):
    import folder_paths
    import nodes

    from harness import tiny_ipadapter

    model, clip, _ = models["sdxl_blocks"]
    path = tiny_ipadapter.controlnet_path("sdxl_blocks")
    folder_paths.add_model_folder_path("controlnet", str(path.parent))
    control = nodes.ControlNetLoader().load_controlnet(path.name)[0]
    pos, neg = conds(clip)
    hint = style_image.flip(1)
    cpos, cneg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, control, hint, 0.8, 0.0, 1.0)[:2]
    cv, ad = stand_ins["clip_vision"], stand_ins["xl"]
    controlled = sample(model, clip, cpos, cneg)
    assert not torch.allclose(controlled, sample(model, clip), atol=1e-3)  # the control acts
    assert torch.equal(sample(style(model, ad, cv, style_image, weight=0.0, preset="style+layout"), clip, cpos, cneg),
                       controlled)
    both = sample(style(model, ad, cv, style_image, preset="style+layout"), clip, cpos, cneg)
    assert not torch.allclose(both, controlled, atol=1e-3)


def test_plus_adapter_negative_image_concat_mask_and_window(models, stand_ins, style_image):
    from frozentune.instantstyle import projection

    model, clip, _ = models["sdxl_blocks"]
    cv, plus = stand_ins["clip_vision"], stand_ins["xl_plus"]
    patch = attn2(style(model, plus, cv, style_image))[("output", 1, 0)]
    zero_pixels = cv.model(pixel_values=torch.zeros(1, 3, 224, 224), intermediate_output=-2)[1].float()
    assert torch.equal(patch.uncond, projection.project(plus, zero_pixels))  # diffusers' Plus uncond
    two = torch.cat([style_image, style_image.flip(2)])
    negative = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1
    patched = style(model, plus, cv, two, combine_images="concat", negative_image=negative, attn_mask=mask,
                    start_at=0.2, end_at=0.9)
    p = attn2(patched)[("output", 1, 0)]
    assert p.cond.shape == (1, 32, 2048) and p.uncond.shape == (1, 16, 2048)
    negative_penultimate = cv.encode_image(negative)["penultimate_hidden_states"].float()
    assert torch.equal(p.uncond, projection.project(plus, negative_penultimate))
    ms = model.get_model_object("model_sampling")
    assert (p.sigma_start, p.sigma_end) == (float(ms.percent_to_sigma(0.2)), float(ms.percent_to_sigma(0.9)))
    assert torch.isfinite(sample(patched, clip)).all()


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("name", ["weight", "subtract", "start_at", "end_at"])
def test_non_finite_numbers_are_refused_before_any_work(models, stand_ins, style_image, monkeypatch, name, value):
    """NaN passes ComfyUI's min/max check; with content_text set, subtract = NaN used to give black images."""
    xl, xl_clip, _ = models["sdxl_blocks"]
    cv = stand_ins["clip_vision"]
    monkeypatch.setattr(cv, "encode_image", lambda *a, **k: pytest.fail("encoded the image before the checks"))
    with pytest.raises(ValueError, match=rf"{name} is {value!r}: give a finite number"):
        style(xl, stand_ins["xl"], cv, style_image, content_text="a cat", clip=xl_clip, **{name: value})


def test_loader_node_names_a_bad_file(tmp_path, monkeypatch):
    import folder_paths

    from frozentune.nodes.instantstyle_nodes import FOLDER, IPAdapterLoader
    from harness import tiny_ipadapter

    monkeypatch.setitem(folder_paths.folder_names_and_paths, FOLDER, ([str(tmp_path)], {".safetensors", ".bin"}))
    good = tiny_ipadapter.ipadapter_path("sdxl_blocks").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"cut\.safetensors could not be read as a safetensors file .*truncated"):
        IPAdapterLoader.execute("cut.safetensors")
