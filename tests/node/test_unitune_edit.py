"""UniTune Edit: late start, masks, blend-back and bad inputs, with stock nodes as the oracle.

The half-precision tier runs the oracle tests on the tiny SD1.5 UNet stored in bf16/fp16 (computing
natively) and fp8 (storage), with the fp32 CLIP and VAE; the stock graph in the same dtype is the oracle.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from harness import half_tier, node_runs

sd15, _forget_unets = node_runs.sd15_module_fixtures()  # (MODEL, CLIP, VAE) of the tiny SD1.5; half_tier's dropped


def in_dtype(sd15, tiny_checkpoints, dtype: str):
    """(MODEL, CLIP, VAE) with the UNet stored in ``dtype``."""
    return sd15 if dtype == "fp32" else (half_tier.unet(tiny_checkpoints["sd15"], dtype), *sd15[1:])


@pytest.fixture(scope="module")
def photo():
    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    return torch.stack([x, y, 0.5 * (x + y)], dim=-1)[None]


def run_edit(sd15, image, **overrides):
    from frozentune.nodes.unitune_nodes import UniTuneEdit

    model, clip, vae = sd15
    args = dict(model=model, image=image, vae=vae, clip=clip, token="beikkpic", edit_prompt="a minion",
                negative="", steps=5, cfg=5.0, pg=2.0, sampler_name="euler", scheduler="normal", seed=11, batch=1,
                start=0.6, blend=0.0, blend_unchanged=0.0)
    args.update(overrides)
    image_out, latent_out = UniTuneEdit.execute(**args).args
    return image_out, latent_out["samples"]


def test_start_zero_returns_the_original(sd15, photo):
    image, latent = run_edit(sd15, photo, start=0.0, batch=2)
    assert torch.equal(latent, sd15[2].encode(photo).repeat(2, 1, 1, 1))
    assert torch.equal(image, photo.repeat(2, 1, 1, 1))


@pytest.mark.parametrize("dtype", half_tier.dtype_params(long=("fp16",)))  # fp16 runs the bf16 path: long
def test_equals_the_stock_graph_with_the_guider(sd15, tiny_checkpoints, photo, dtype):
    """The all-in-one node = VAEEncode + RandomNoise + BasicScheduler + SplitSigmas + SamplerCustomAdvanced."""
    import nodes
    from comfy_extras.nodes_custom_sampler import (
        BasicScheduler,
        KSamplerSelect,
        RandomNoise,
        SamplerCustomAdvanced,
        SplitSigmas,
    )

    from frozentune.nodes.guidance_nodes import PromptGuidanceGuider

    sd15 = in_dtype(sd15, tiny_checkpoints, dtype)
    model, clip, vae = sd15
    image, latent = run_edit(sd15, photo, start=0.6, steps=5)
    assert torch.isfinite(latent).all() and torch.isfinite(image).all()

    enc = nodes.CLIPTextEncode()
    guider = PromptGuidanceGuider.execute(model, enc.encode(clip, "beikkpic a minion")[0], enc.encode(clip, "beikkpic")[0],
                                          enc.encode(clip, "")[0], 5.0, 2.0, 0.0, 1.0, 0.0).args[0]
    sigmas = BasicScheduler.execute(model, "normal", 5, 1.0).args[0]
    low = SplitSigmas.execute(sigmas, 2).args[1]  # round((1 - 0.6) * 5) = 2 steps skipped
    out = SamplerCustomAdvanced.execute(RandomNoise.execute(11).args[0], guider, KSamplerSelect.execute("euler").args[0],
                                        low, nodes.VAEEncode().encode(vae, photo)[0]).args[0]
    assert torch.equal(latent, out["samples"])


# fp16 runs the bf16 path (the graph test has it, long); the blend-back is in pixels, the graph test has fp8 in make test
@pytest.mark.parametrize("dtype", ["fp32", "bf16", pytest.param("fp8", marks=pytest.mark.long)])
def test_mask_keeps_outside_exactly_and_blend_one_is_the_original(sd15, tiny_checkpoints, photo, dtype):
    from harness.hashing import weight_hash

    sd15 = in_dtype(sd15, tiny_checkpoints, dtype)
    before = weight_hash(sd15[0].model.diffusion_model)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    image, _ = run_edit(sd15, photo, mask=mask, batch=2)
    outside = mask[0] == 0
    assert torch.equal(image[:, outside], photo.expand(2, -1, -1, -1)[:, outside])
    assert (image[:, ~outside] - photo.expand(2, -1, -1, -1)[:, ~outside]).abs().max() > 0.01
    assert not torch.equal(image[0], image[1])  # batch = variations, each with its own noise

    image, _ = run_edit(sd15, photo, blend=1.0, start=1.0)
    assert torch.equal(image, photo)
    assert weight_hash(sd15[0].model.diffusion_model) == before


def test_mask_of_another_size_is_resized_with_a_note(sd15, photo, caplog):
    mask = torch.ones(1, 32, 32)
    with caplog.at_level(logging.INFO):
        image, _ = run_edit(sd15, photo, mask=mask, steps=2)
    assert "mask is 32x32, image is 64x64" in caplog.text
    assert image.shape == photo.shape


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(start=1.5), r"start=1.5 must be between 0 and 1"),
    (dict(start=-0.1), r"start=-0.1 must be between 0 and 1"),
    (dict(vae=None), "VAE input is missing"),
    (dict(token="  "), "token is empty"),
    (dict(blend=2.0), r"blend=2.0 must be between 0 and 1"),
])
def test_bad_inputs_are_named(sd15, photo, overrides, message):
    with pytest.raises(ValueError, match=message):
        run_edit(sd15, photo, steps=1, **overrides)


def test_one_image_only(sd15, photo):
    with pytest.raises(ValueError, match="batch of 2"):
        run_edit(sd15, photo.repeat(2, 1, 1, 1), steps=1)


def _no_work(*args, **kwargs):
    pytest.fail("UniTune Edit started work (encoding or sampling) before checking its inputs")


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(blend=2.0), r"blend=2.0 must be between 0 and 1"),
    (dict(blend_unchanged=-0.5), r"blend_unchanged=-0.5 must be between 0 and 1"),
    (dict(blend=math.nan), r"blend is nan: give a finite number"),
    (dict(blend_unchanged=math.inf), r"blend_unchanged is inf: give a finite number"),
    (dict(cfg=math.nan), r"cfg is nan: give a finite number"),
    (dict(pg=-math.inf), r"pg is -inf: give a finite number"),
    (dict(start=math.nan), r"start is nan: give a finite number"),
    # ComfyUI 0.3.75 does not check V3 combo values at POST /prompt; before: a raw AttributeError from sampling
    (dict(sampler_name="no_such_sampler"), r"sampler_name 'no_such_sampler' is not one of its choices \('euler'"),
    (dict(scheduler="no_such_schedule"), r"scheduler 'no_such_schedule' is not one of its choices"),
    (dict(mask=torch.ones(2, 64, 64), batch=3), r"mask is a batch of 2 masks but batch is 3: give 1 mask \(used "
                                                r"for every variation\) or 3 \(one per variation\)"),
])
def test_bad_numbers_and_mask_batches_are_refused_before_any_work(sd15, photo, monkeypatch, overrides, message):
    from frozentune.guidance import guider as guidance

    monkeypatch.setattr(sd15[2], "encode", _no_work)
    monkeypatch.setattr(guidance.PromptGuidanceGuider, "sample", _no_work)
    with pytest.raises(ValueError, match=message):
        run_edit(sd15, photo, steps=1, **overrides)


def test_one_mask_per_variation(sd15, photo):
    masks = torch.zeros(2, 64, 64)
    masks[0, :32] = 1.0  # top half edited in the first variation
    masks[1, 32:] = 1.0  # bottom half in the second
    image, _ = run_edit(sd15, photo, mask=masks, batch=2, steps=2)
    assert torch.equal(image[0, 32:], photo[0, 32:]) and torch.equal(image[1, :32], photo[0, :32])
    assert not torch.equal(image[0, :32], photo[0, :32]) and not torch.equal(image[1, 32:], photo[0, 32:])


def schema_default(node_class, name: str):
    return next(i.default for i in node_class.define_schema().inputs if i.id == name)


def test_edit_guides_by_default_like_the_guider(pack):
    """Its description promises guidance against the tuning caption: the default pg is the guider's, not 0."""
    from frozentune.guidance.guider import DEFAULT_PG
    from frozentune.nodes.guidance_nodes import PromptGuidanceGuider
    from frozentune.nodes.unitune_nodes import UniTuneEdit

    assert schema_default(UniTuneEdit, "pg") == schema_default(PromptGuidanceGuider, "pg") == DEFAULT_PG > 0
    assert schema_default(UniTuneEdit, "class_word") == ""


def test_newer_optional_widgets_come_last(pack):
    """Saved workflows store widget values by position: the newer optional inputs must not shift the older ones."""
    from frozentune.nodes.unitune_nodes import UniTuneEdit

    widgets = [i.id for i in UniTuneEdit.define_schema().inputs if i.get_io_type() in ("STRING", "INT", "FLOAT",
                                                                                           "BOOLEAN", "COMBO")]
    assert widgets == ["token", "edit_prompt", "negative", "steps", "cfg", "pg", "sampler_name", "scheduler", "seed",
                       "batch", "start", "blend", "blend_unchanged", "class_word", "flux_guidance"]


class _Stop(Exception):
    pass


def guider_prompts(sd15, photo, monkeypatch, **overrides) -> tuple[list, list]:
    """(positive, baseline) conditioning UniTune Edit gives the guider; sampling is stopped before it starts."""
    from frozentune.guidance import guider as guidance

    seen = {}

    def set_conds(self, positive, negative, baseline):
        seen.update(positive=positive, baseline=baseline)

    def stop(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(guidance.PromptGuidanceGuider, "set_conds", set_conds)
    monkeypatch.setattr(guidance.PromptGuidanceGuider, "sample", stop)
    with pytest.raises(_Stop):
        run_edit(sd15, photo, steps=1, **overrides)
    return seen["positive"], seen["baseline"]


def assert_encodes(clip, conditioning, text: str):
    expected = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    assert len(conditioning) == len(expected) == 1
    assert torch.equal(conditioning[0][0], expected[0][0]), f"not the encoding of {text!r}"
    assert torch.equal(conditioning[0][1]["pooled_output"], expected[0][1]["pooled_output"])


@pytest.mark.parametrize(("class_word", "edit", "prompt", "baseline"), [
    ("", "a minion", "beikkpic a minion", "beikkpic"),
    ("dog", "a minion", "beikkpic dog a minion", "beikkpic dog"),
    ("dog", "Beikkpic, a minion", "Beikkpic dog, a minion", "beikkpic dog"),
    ("", "beikkpic, a minion", "beikkpic, a minion", "beikkpic"),
])
def test_guider_gets_the_caption_prompts(sd15, photo, monkeypatch, class_word, edit, prompt, baseline):
    positive, base = guider_prompts(sd15, photo, monkeypatch, class_word=class_word, edit_prompt=edit)
    assert_encodes(sd15[1], positive, prompt)
    assert_encodes(sd15[1], base, baseline)


def test_class_word_comes_with_the_tuned_model(sd15, photo, monkeypatch, tmp_path, caplog):
    """Fine-Tune and Load outputs carry the tuning caption, so Edit's prompts have its class word unasked."""
    import folder_paths

    from frozentune.nodes.unitune_nodes import FOLDER, UniTuneFineTune, UniTuneLoad, UniTuneSave

    monkeypatch.setitem(folder_paths.folder_names_and_paths, FOLDER, ([str(tmp_path / "unitune")], {".safetensors"}))
    model, clip, vae = sd15
    tuned = UniTuneFineTune.execute(model=model, clip=clip, vae=vae, image=photo, token="beikkpic", class_word=" dog ",
                                    steps=1, batch_size=1, learning_rate=1e-4, optimizer="adamw", train="lora",
                                    lora_rank=1, gradient_checkpointing=False, seed=0).args[0]
    UniTuneSave.execute(model=tuned, filename="unitune/dog")
    loaded = UniTuneLoad.execute(model=model, unitune_name="dog.safetensors", strength=1.0).args[0]
    for source in (tuned, loaded, loaded.clone()):  # the caption survives clones (e.g. a LoraLoader after Load)
        positive, base = guider_prompts((source, clip, vae), photo, monkeypatch, edit_prompt="beikkpic, a minion")
        assert_encodes(clip, positive, "beikkpic dog, a minion")
        assert_encodes(clip, base, "beikkpic dog")
    with caplog.at_level(logging.WARNING):  # the input wins over the MODEL's, with a warning
        positive, base = guider_prompts((loaded, clip, vae), photo, monkeypatch, class_word="cat")
    assert_encodes(clip, positive, "beikkpic cat a minion")
    assert_encodes(clip, base, "beikkpic cat")
    assert "class_word 'cat' is not the one this MODEL was tuned with ('dog')" in caplog.text
