"""InstantStyle embeds nodes (Encode, Apply Embeds, Combine, Save, Load), per-block weights, batch mode,
style + composition from two images and precise style, on the tiny SDXL-layout model (SDXL's block ids).

The oracle for Apply Embeds is InstantStyle Apply itself: the same images through Encode -> Save -> Load
-> Apply Embeds must sample bitwise what InstantStyle Apply samples from the images.
"""

from __future__ import annotations

import pytest
import torch

from harness import half_tier
from harness.hashing import weight_hash

STEPS = 2


@pytest.fixture(scope="module")
def xl(tiny_checkpoints, pack):
    import nodes

    from frozentune.instantstyle import adapter_file
    from harness import tiny_ipadapter

    model, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoints["sdxl_blocks"].name)[:3]
    pos = nodes.CLIPTextEncode().encode(clip, "a house")[0]
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    yield dict(model=model, clip=clip, pos=pos, neg=neg, cv=tiny_ipadapter.clip_vision_model(),
               ad=adapter_file.load(tiny_ipadapter.ipadapter_path("sdxl_blocks")))
    half_tier.forget()


def picture(seed: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    f = 4 + 3 * seed
    return torch.stack([0.5 + 0.4 * torch.sin(f * x), 0.3 + 0.5 * y * (seed % 2), 0.6 - 0.4 * x * y], dim=-1)[None]


def unet(xl, tiny_checkpoints, dtype):
    return xl["model"] if dtype == "fp32" else half_tier.unet(tiny_checkpoints["sdxl_blocks"], dtype)


def sample(xl, model, batch: int = 1):
    import nodes

    latent = {"samples": torch.zeros(batch, 4, 8, 8)}
    return nodes.common_ksampler(model, 3, STEPS, 5.0, "euler", "normal", xl["pos"], xl["neg"], latent)[0]["samples"]


def attn2(model) -> dict:
    return model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})


def encode(xl, image, **kw):
    from frozentune.nodes.instantstyle_nodes import InstantStyleEncode

    args = dict(content_text="", subtract=0.5)
    args.update(kw)
    return InstantStyleEncode.execute(ipadapter=xl["ad"], clip_vision=xl["cv"], image=image, **args).args


def apply_embeds(xl, model, embeds, **kw):
    from frozentune.nodes.instantstyle_nodes import InstantStyleApplyEmbeds

    args = dict(weight=1.0, composition_weight=1.0, preset="style", custom_blocks="", combine_embeds="average",
                embeds_scaling="V only", start_at=0.0, end_at=1.0)
    args.update(kw)
    return InstantStyleApplyEmbeds.execute(model=model, ipadapter=xl["ad"], embeds=embeds, **args).args[0]


def apply_images(xl, model, image, **kw):
    from frozentune.nodes.instantstyle_nodes import InstantStyleApply

    args = dict(weight=1.0, preset="style", custom_blocks="", combine_images="average", content_text="",
                subtract=0.5, start_at=0.0, end_at=1.0)
    args.update(kw)
    return InstantStyleApply.execute(model=model, ipadapter=xl["ad"], clip_vision=xl["cv"], image=image,
                                     **args).args[0]


@pytest.fixture
def embeds_folder(tmp_path, monkeypatch):
    import folder_paths

    from frozentune.nodes.instantstyle_nodes import EMBEDS_FOLDER

    monkeypatch.setitem(folder_paths.folder_names_and_paths, EMBEDS_FOLDER, ([str(tmp_path)], {".safetensors"}))
    return tmp_path


@pytest.mark.parametrize("dtype", ["fp32", "bf16", pytest.param("fp16", marks=pytest.mark.long)])  # fp16: make test-long
def test_saved_embeds_sample_bitwise_what_apply_samples_from_the_images(xl, tiny_checkpoints, embeds_folder,
                                                                          dtype):
    from frozentune.nodes.instantstyle_nodes import InstantStyleLoadEmbeds, InstantStyleSaveEmbeds

    model = unet(xl, tiny_checkpoints, dtype)
    before = weight_hash(model.model.diffusion_model)
    image = torch.cat([picture(1), picture(2)])
    embeds, negative = encode(xl, image, content_text="a cat", clip=xl["clip"])
    kept = embeds.features.clone()
    saved, saved_negative, path = InstantStyleSaveEmbeds.execute(embeds, "ipadapter_embeds/paint/monet",
                                                                 negative).args
    assert path == str(embeds_folder / "paint" / "monet.safetensors")
    loaded, loaded_negative = InstantStyleLoadEmbeds.execute("paint/monet.safetensors").args
    for got in (saved, loaded):
        assert torch.equal(got.features, embeds.features) and got.kind == "image_embeds"
    assert torch.equal(loaded_negative.features, negative.features)
    settings = dict(preset="style+layout", weight=0.8)
    reference = sample(xl, apply_images(xl, model, image, content_text="a cat", clip=xl["clip"], **settings))
    via_file = sample(xl, apply_embeds(xl, model, loaded, negative_embeds=loaded_negative, composition_weight=0.8,
                                       **settings))
    assert torch.isfinite(reference).all()
    assert torch.equal(via_file, reference)
    assert not torch.allclose(reference, sample(xl, model), atol=1e-3)
    assert torch.equal(embeds.features, kept) and weight_hash(model.model.diffusion_model) == before
    assert attn2(model) == {}


HALF_LONG = ["fp32", pytest.param("bf16", marks=pytest.mark.long), pytest.param("fp16", marks=pytest.mark.long)]


@pytest.mark.parametrize("dtype", HALF_LONG)
def test_per_block_weights_reach_only_their_layers_with_their_values(xl, tiny_checkpoints, dtype, monkeypatch):
    from frozentune.instantstyle.attention import IPAttention

    seen: dict[tuple, set] = {}
    original = IPAttention.__call__

    def recording(self, q, k, v, extra):
        seen.setdefault((*extra["block"], extra["block_index"]), set()).add(self.weight)
        return original(self, q, k, v, extra)

    monkeypatch.setattr(IPAttention, "__call__", recording)
    embeds, _ = encode(xl, picture(1))
    model = unet(xl, tiny_checkpoints, dtype)
    patched = apply_embeds(xl, model, embeds, preset="custom", weight=0.5,
                           custom_blocks="output 1:1.0, input 8:0.5, input 8 1:-0.25, middle 0")
    from frozentune.instantstyle import blocks

    keys = [layer.key for layer in blocks.attention_layers(model.model.diffusion_model)]
    assert ("input", 8, 1) in keys
    expected = {k: 0.5 for k in keys if k[:2] in (("output", 1), ("middle", 0))}
    expected.update({k: 0.25 for k in keys if k[:2] == ("input", 8)})
    expected[("input", 8, 1)] = -0.125
    assert {k: p.weight for k, p in attn2(patched).items()} == expected
    sample(xl, patched)
    assert seen == {k: {w} for k, w in expected.items()}


def test_a_block_the_model_lacks_is_an_error_naming_it_and_the_valid_ones(xl):
    embeds, _ = encode(xl, picture(1))
    with pytest.raises(ValueError, match=r"custom block 'input 9' does not exist in this model; its cross-attention "
                                         r"blocks are: input 4 \(down_blocks.1.attentions.0\), .*output 1 "
                                         r"\(up_blocks.0.attentions.1\)"):
        apply_embeds(xl, xl["model"], embeds, preset="custom", custom_blocks="output 1:1, input 9:0.5")
    with pytest.raises(ValueError, match=r"custom block 'output 1:x'"):
        apply_embeds(xl, xl["model"], embeds, preset="custom", custom_blocks="output 1:x")


@pytest.mark.parametrize("dtype", HALF_LONG)
def test_batch_mode_gives_latent_i_the_tokens_of_image_i(xl, tiny_checkpoints, dtype):
    from frozentune.instantstyle import projection

    images = torch.cat([picture(1), picture(2)])
    embeds, negative = encode(xl, images)
    model = unet(xl, tiny_checkpoints, dtype)
    patched = apply_embeds(xl, model, embeds, negative_embeds=negative, combine_embeds="batch")
    patch = attn2(patched)[("output", 1, 0)]
    features = xl["cv"].encode_image(images)["image_embeds"].float()
    assert patch.cond.shape == (2, 4, 2048)
    for i in range(2):  # (a batched projection rounds like a single one within fp32 noise)
        torch.testing.assert_close(patch.cond[i], projection.project(xl["ad"], features[i:i + 1])[0], rtol=1e-6,
                                   atol=1e-6)
    assert not torch.allclose(patch.cond[0], patch.cond[1], atol=1e-2)
    from frozentune.instantstyle.embeds import StyleEmbeds

    batched = sample(xl, patched, batch=3)
    # The same computation with image 0 in both rows: latent 0 gets the same tokens, latents 1 and 2 do not
    # (ulp-level token differences grow to ~2e-3 in two cfg-5 steps of the random UNet, so the tokens are
    # made the same way: a batch of two rows through one projection)
    only_first = StyleEmbeds(embeds.features[[0, 0]], embeds.kind)
    first = sample(xl, apply_embeds(xl, model, only_first, negative_embeds=negative, combine_embeds="batch"),
                   batch=3)
    gap = (batched[0] - first[0]).abs().max().item()
    assert gap < 1e-5, gap
    assert not torch.allclose(batched[1], first[1], atol=1e-3)
    assert torch.isfinite(batched).all()


def test_style_and_composition_from_two_images_and_precise_style(xl):
    from frozentune.nodes.instantstyle_nodes import InstantStyleCombineEmbeds

    style, negative = encode(xl, picture(1))
    composition, _ = encode(xl, picture(2))
    two = apply_embeds(xl, xl["model"], style, negative_embeds=negative, composition_embeds=composition,
                       preset="style+layout", weight=1.2, composition_weight=0.6)
    style_patch, layout_patch = attn2(two)[("output", 1, 0)], attn2(two)[("input", 8, 0)]
    assert (style_patch.weight, layout_patch.weight) == (1.2, 0.6)
    assert not torch.equal(style_patch.cond, layout_patch.cond)
    one = attn2(apply_embeds(xl, xl["model"], composition, preset="layout"))[("input", 8, 0)]
    assert torch.equal(layout_patch.cond, one.cond) and torch.equal(layout_patch.uncond, style_patch.uncond)
    assert torch.isfinite(sample(xl, two)).all()

    precise = attn2(apply_embeds(xl, xl["model"], style, preset="precise style", weight=1.0, composition_weight=2.0))
    assert {k[:2] for k in precise} == {("output", 1), ("input", 8)}
    p_style, p_layout = precise[("output", 1, 0)], precise[("input", 8, 0)]
    assert p_style.weight == 1.0 and p_layout.weight == 2.0
    assert torch.equal(p_layout.uncond, p_style.cond) and not p_layout.cond.any()  # cubiq's swap
    with pytest.raises(ValueError, match="composition_embeds need a preset with the layout block"):
        apply_embeds(xl, xl["model"], style, composition_embeds=composition, preset="style")

    averaged = InstantStyleCombineEmbeds.execute("weighted", style, 3.0, composition, 1.0).args[0]
    torch.testing.assert_close(averaged.features, (3 * style.features + composition.features) / 4, rtol=0,
                               atol=1e-6)
