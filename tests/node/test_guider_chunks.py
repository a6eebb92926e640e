"""InstantStyle beside real guiders: the unconditional image tokens reach exactly the unconditional chunks.

Each guider samples one step of the tiny SDXL (``sdxl_blocks``) patched by the real InstantStyle Apply node.
A recording wrapper around every attn2 patch runs the patch as ComfyUI called it and twice more on the same
q/k/v, once told every chunk is conditional and once that every chunk is unconditional; each chunk's output
rows equal one of the two, which says which image tokens that chunk got. Expected, from the guiders'
``calc_cond_batch`` orders (``sampling.cond_chunks.STOCK``):

- CFGGuider [positive, negative]: 1 unconditional;
- PerpNegGuider [positive, negative, empty]: 1 and 2;
- DualCFGGuider [negative, cond2, cond1], both styles: 0;
- our Prompt Guidance [positive, negative, baseline]: 1 (the baseline is a prompt);
- a guider of unknown order: the fallback, 1, and one log line.

Conditionings are random tensors of SDXL's shapes (the full-size random CLIP would add ~15 s and ~4 GiB).
The half-precision tier runs PerpNeg, DualCFG (regular) and ours on the UNet stored in bf16 / fp16 (computing
natively).
"""

from __future__ import annotations

import logging

import pytest
import torch

from harness import half_tier
from harness.hashing import weight_hash

# fp16 repeats bf16's cases at ~3 min on a CPU: a `long` test (make test-long / test-all), to keep CI under 30 min
DTYPES = ("fp32", "bf16", pytest.param("fp16", marks=pytest.mark.long))
HALF_SKIPS = ("CFGGuider", "DualCFGGuider nested")  # same chunk orders as tested ones; native half is slow on a CPU


@pytest.fixture(scope="module", autouse=True)
def _forget_unets():
    yield
    half_tier.forget()


@pytest.fixture(scope="module")
def style_kit(tiny_checkpoints, pack):
    from frozentune.instantstyle import adapter_file
    from harness import tiny_ipadapter

    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    return adapter_file.load(tiny_ipadapter.ipadapter_path("sdxl_blocks")), tiny_ipadapter.clip_vision_model(), image


@pytest.fixture(scope="module")
def conds():
    gen = torch.Generator().manual_seed(11)
    return {name: [[torch.randn(1, 77, 2048, generator=gen), {"pooled_output": torch.randn(1, 1280, generator=gen)}]]
            for name in ("positive", "negative", "third")}


def styled(model, style_kit):
    from frozentune.nodes.instantstyle_nodes import InstantStyleApply

    adapter, clip_vision, image = style_kit
    return InstantStyleApply.execute(model=model, ipadapter=adapter, clip_vision=clip_vision, image=image, weight=1.0,
                                     preset="style", custom_blocks="", combine_images="average", content_text="",
                                     subtract=0.0, start_at=0.0, end_at=1.0).args[0]


class Recorder:
    """attn2 replace wrapper: records (cond index, "cond"|"uncond") for every chunk of every call."""

    def __init__(self, inner, log):
        self.inner, self.log = inner, log

    def to(self, target):
        return Recorder(self.inner.to(target) if hasattr(self.inner, "to") else self.inner, self.log)

    def __call__(self, q, k, v, extra):
        from frozentune.sampling import cond_chunks

        out = self.inner(q, k, v, extra)
        chunks = list(extra["cond_or_uncond"])
        n = len(chunks)
        as_cond = self.inner(q, k, v, {**extra, "cond_or_uncond": [0] * n, cond_chunks.KEY: ()})
        as_uncond = self.inner(q, k, v, {**extra, "cond_or_uncond": [1] * n, cond_chunks.KEY: (1,)})
        per = q.shape[0] // n
        for i, index in enumerate(chunks):
            rows = slice(i * per, (i + 1) * per)
            d_cond = (out[rows] - as_cond[rows]).float().abs().max().item()
            d_uncond = (out[rows] - as_uncond[rows]).float().abs().max().item()
            assert min(d_cond, d_uncond) <= 0.05 * max(d_cond, d_uncond), (index, d_cond, d_uncond)
            self.log.append((index, "cond" if d_cond < d_uncond else "uncond"))
        return out


def recording(model):
    log = []
    rec = model.clone()
    attn2 = model.model_options["transformer_options"]["patches_replace"]["attn2"]
    for key, patch in attn2.items():
        rec.set_model_attn2_replace(Recorder(patch, log), *key)
    return rec, log


def sample_once(guider, model):
    import comfy.sample
    import comfy.samplers

    latent = torch.zeros(1, 4, 8, 8)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 1).cpu()
    out = guider.sample(comfy.sample.prepare_noise(latent, 3), latent, comfy.samplers.sampler_object("euler"), sigmas,
                        disable_pbar=True, seed=3)
    assert torch.isfinite(out).all()


def guiders(model, c):
    from comfy_extras.nodes_custom_sampler import CFGGuider, DualCFGGuider
    from comfy_extras.nodes_perpneg import PerpNegGuider

    from frozentune.nodes.guidance_nodes import PromptGuidanceGuider

    pos, neg, third = c["positive"], c["negative"], c["third"]
    return {
        "CFGGuider": (CFGGuider.execute(model, pos, neg, 5.0).args[0], {0: "cond", 1: "uncond"}),
        "PerpNegGuider": (PerpNegGuider.execute(model, pos, neg, third, 5.0, 1.0).args[0],
                          {0: "cond", 1: "uncond", 2: "uncond"}),
        "DualCFGGuider regular": (DualCFGGuider.execute(model, pos, third, neg, 5.0, 4.0, "regular").args[0],
                                  {0: "uncond", 1: "cond", 2: "cond"}),
        "DualCFGGuider nested": (DualCFGGuider.execute(model, pos, third, neg, 5.0, 4.0, "nested").args[0],
                                 {0: "uncond", 1: "cond", 2: "cond"}),
        "PromptGuidanceGuider": (PromptGuidanceGuider.execute(model=model, positive=pos, baseline=third, negative=neg,
                                                              cfg=5.0, pg=2.0, pg_start=0.0, pg_end=1.0,
                                                              rescale=0.0).args[0],
                                 {0: "cond", 1: "uncond", 2: "cond"}),
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_guider_gives_the_unconditional_tokens_to_exactly_its_unconditional_chunks(tiny_checkpoints, style_kit,
                                                                                        conds, dtype):
    from frozentune.sampling import cond_chunks

    base = half_tier.unet(tiny_checkpoints["sdxl_blocks"], dtype)
    before, wrappers = weight_hash(base.model.diffusion_model), repr(base.wrappers)
    model, log = recording(styled(base, style_kit))
    for name, (guider, expected) in guiders(model, conds).items():
        if dtype != "fp32" and name in HALF_SKIPS:
            continue
        log.clear()
        sample_once(guider, model)
        got = dict(log)
        assert len(set(log)) == len(got), (name, sorted(set(log)))  # every layer and row agrees per chunk
        assert got == expected, name
    assert weight_hash(base.model.diffusion_model) == before and repr(base.wrappers) == wrappers
    assert not base.get_wrappers("outer_sample", cond_chunks.WRAPPER_KEY)


def test_unknown_guider_falls_back_to_index_1_and_says_so(tiny_checkpoints, style_kit, conds, caplog):
    """A third-party guider with its own order [negative, positive] and no declaration: only 1 (here the
    positive!) gets the unconditional tokens, and the log names the guider and the fix."""
    import comfy.samplers

    from frozentune.sampling import cond_chunks

    class ReversedGuider(comfy.samplers.CFGGuider):
        def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006
            neg, pos = comfy.samplers.calc_cond_batch(self.inner_model, [self.conds["negative"],
                                                                         self.conds["positive"]], x, timestep,
                                                      model_options)
            return neg + (pos - neg) * self.cfg

    model, log = recording(styled(half_tier.unet(tiny_checkpoints["sdxl_blocks"], "fp32"), style_kit))
    guider = ReversedGuider(model)
    guider.set_conds(conds["positive"], conds["negative"])
    guider.set_cfg(5.0)
    with caplog.at_level(logging.INFO, logger=cond_chunks.__name__):
        sample_once(guider, model)
        sample_once(guider, model)
    assert dict(log) == {0: "cond", 1: "uncond"}
    said = [r.getMessage() for r in caplog.records if "ReversedGuider" in r.getMessage()]
    assert len(said) == 1 and cond_chunks.ATTRIBUTE in said[0]

    log.clear()
    ReversedGuider.frozentune_unconditional_indexes = (0,)  # the documented way to declare
    sample_once(guider, model)
    assert dict(log) == {0: "uncond", 1: "cond"}
