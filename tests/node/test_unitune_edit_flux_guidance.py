"""UniTune Edit's ``flux_guidance``: the guidance strength a guidance-embedding model (Flux.1 dev) samples at.

The node encodes its prompts itself, so a stock FluxGuidance node cannot sit between; ``flux_guidance`` sets the
value on the prompt, the baseline and the negative as that node does. Tiny random models from
``harness.tiny_dits``: Flux.1 dev (a guidance embedding), Flux.1 schnell and SD3 (none). What the Flux forward
receives is read by a ``DIFFUSION_MODEL`` wrapper; the oracle is the stock graph (VAEEncode, RandomNoise,
BasicScheduler, SplitSigmas, SamplerCustomAdvanced and the Prompt Guidance Guider) with and without FluxGuidance
nodes on its three conditionings.
"""

from __future__ import annotations

import math

import pytest
import torch

STEPS, START = 4, 0.6
CFG = {"flux1": 1.0, "flux1_schnell": 1.0, "sd3": 4.0}
PROMPTS = {"positive": "beikkpic a minion", "baseline": "beikkpic", "negative": ""}


@pytest.fixture(scope="module")
def photo():
    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    return torch.stack([x, y, 0.5 * (x + y)], dim=-1)[None]


class CachedClip:
    """The family's CLIP as UniTune Edit calls it (``tokenize`` + ``encode_from_tokens_scheduled``), each prompt
    encoded once by the real text encoders (about a second a prompt on a shared CPU)."""

    def __init__(self, encode):
        self.encode, self.cache = encode, {}

    def tokenize(self, text: str, **kwargs) -> str:
        return text

    def encode_from_tokens_scheduled(self, text: str, **kwargs) -> list:
        if text not in self.cache:
            self.cache[text] = self.encode(text)
        return self.cache[text]


@pytest.fixture
def edit(tiny_dit, pack):
    """``edit(family, model=None, **overrides) -> LATENT samples`` of UniTune Edit on the tiny ``family``."""
    from frozentune.nodes.unitune_nodes import UniTuneEdit

    clips = {}

    def run(family: str, photo, model=None, **overrides):
        dit = tiny_dit(family)
        clip = clips.setdefault(family, CachedClip(dit.encode))
        args = dict(model=model or dit.model, image=photo, vae=dit.vae, clip=clip, token="beikkpic",
                    edit_prompt="a minion", negative="", steps=STEPS, cfg=CFG[family], pg=2.0, sampler_name="euler",
                    scheduler="simple", seed=11, batch=1, start=START, blend=0.0, blend_unchanged=0.0)
        args.update(overrides)
        return UniTuneEdit.execute(**args).args[1]["samples"]

    return run


def spied(model):
    """A clone of ``model`` and the list that gets, per diffusion-model forward, {cond index: guidance} (None when
    the forward got no guidance): what the Flux forward receives, row by row (0 positive, 1 negative, 2 baseline)."""
    from comfy.patcher_extension import WrappersMP

    calls: list[dict[int, float] | None] = []

    def wrapper(executor, x, timestep, context, y=None, guidance=None, *args, **kwargs):
        options = kwargs.get("transformer_options") or (args[2] if len(args) > 2 else {})
        if guidance is None:
            calls.append(None)
        else:
            order = options["cond_or_uncond"]
            rows = guidance.float().reshape(len(order), -1)
            assert torch.equal(rows, rows[:, :1].expand_as(rows))  # the latents of one chunk share its value
            calls.append(dict(zip(order, rows[:, 0].tolist(), strict=True)))
        return executor(x, timestep, context, y, guidance, *args, **kwargs)

    clone = model.clone()
    clone.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "test_flux_guidance", wrapper)
    return clone, calls


def stock_graph(tiny_dit, family: str, photo, guidance: float | None):
    """The stock graph UniTune Edit equals, with FluxGuidance(``guidance``) on all three prompts (None: no node)."""
    import nodes
    from comfy_extras.nodes_custom_sampler import (
        BasicScheduler,
        KSamplerSelect,
        RandomNoise,
        SamplerCustomAdvanced,
        SplitSigmas,
    )
    from comfy_extras.nodes_flux import FluxGuidance

    from frozentune.nodes.guidance_nodes import PromptGuidanceGuider

    dit = tiny_dit(family)
    conds = {name: dit.encode(text) for name, text in PROMPTS.items()}
    if guidance is not None:
        conds = {name: FluxGuidance.execute(c, guidance).args[0] for name, c in conds.items()}
    guider = PromptGuidanceGuider.execute(dit.model, conds["positive"], conds["baseline"], conds["negative"],
                                          CFG[family], 2.0, 0.0, 1.0, 0.0).args[0]
    sigmas = BasicScheduler.execute(dit.model, "simple", STEPS, 1.0).args[0]
    low = SplitSigmas.execute(sigmas, round((1 - START) * STEPS)).args[1]
    return SamplerCustomAdvanced.execute(RandomNoise.execute(11).args[0], guider,
                                         KSamplerSelect.execute("euler").args[0], low,
                                         nodes.VAEEncode().encode(dit.vae, photo)[0]).args[0]["samples"]


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_every_flux_forward_gets_the_input_guidance(tiny_dit, edit, photo, cfg):
    """Prompt, baseline and (at cfg > 1, where it is evaluated) negative: every call, every row."""
    model, calls = spied(tiny_dit("flux1").model)
    edit("flux1", photo, model=model, cfg=cfg, flux_guidance=2.0)
    rows = (0, 2) if cfg == 1.0 else (0, 1, 2)
    assert calls and all(c is not None and set(c) <= set(rows) for c in calls)
    assert {i for c in calls for i in c} == set(rows)
    assert {g for c in calls for g in c.values()} == {2.0}

    calls.clear()
    edit("flux1", photo, model=model, cfg=cfg)  # not given (an API prompt from before the input): 3.5
    assert calls and {g for c in calls for g in c.values()} == {3.5}


def test_flux_default_is_the_output_before_the_input_and_another_value_is_the_stock_flux_guidance(
        tiny_dit, edit, photo):
    """3.5 (or not given) is bit for bit the stock graph without FluxGuidance, i.e. the node before
    flux_guidance existed; 2.0 is bit for bit the stock graph with FluxGuidance 2.0 on its three prompts."""
    before = stock_graph(tiny_dit, "flux1", photo, None)
    assert torch.equal(edit("flux1", photo), before)
    assert torch.equal(edit("flux1", photo, flux_guidance=3.5), before)
    at_two = edit("flux1", photo, flux_guidance=2.0)
    assert torch.equal(at_two, stock_graph(tiny_dit, "flux1", photo, 2.0))
    assert (at_two - before).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["flux1_schnell", "sd3"])
def test_models_without_a_guidance_embedding_ignore_it(tiny_dit, edit, photo, family):
    """Any value gives the same output bit for bit; schnell's forward keeps getting the model's own default (Flux's
    extra_conds always sends one; schnell has no layer that reads it), the input's value never reaches it."""
    model, calls = spied(tiny_dit(family).model) if family == "flux1_schnell" else (tiny_dit(family).model, [])
    default = edit(family, photo, model=model)
    received = list(calls)
    for value in (0.0, 7.0):
        calls.clear()
        assert torch.equal(edit(family, photo, model=model, flux_guidance=value), default), value
        assert calls == received, value
    if family == "flux1_schnell":
        assert received and {g for c in received for g in c.values()} == {3.5}


@pytest.mark.parametrize(("value", "message"), [
    (math.nan, r"flux_guidance is nan: give a finite number"),
    (math.inf, r"flux_guidance is inf: give a finite number"),
    (-1.0, r"flux_guidance=-1.0 must be 0 or more"),
])
def test_bad_values_are_refused_before_any_work(tiny_dit, edit, photo, monkeypatch, value, message):
    from frozentune.guidance import guider as guidance

    def no_work(*args, **kwargs):
        pytest.fail("UniTune Edit started work before checking flux_guidance")

    monkeypatch.setattr(guidance.PromptGuidanceGuider, "sample", no_work)
    monkeypatch.setattr(type(tiny_dit("sd3").vae), "encode", no_work)
    with pytest.raises(ValueError, match=message):
        edit("sd3", photo, flux_guidance=value)


def test_flux_guidance_is_an_optional_last_widget_with_the_stock_default(pack):
    """Optional and last: saved workflows store widget values by position, API prompts from before still run."""
    from comfy_extras.nodes_flux import FluxGuidance

    from frozentune.nodes.unitune_nodes import UniTuneEdit

    inputs = UniTuneEdit.define_schema().inputs
    stock = next(i for i in FluxGuidance.define_schema().inputs if i.id == "guidance")
    last = inputs[-1]
    assert last.id == "flux_guidance" and last.optional
    assert (last.default, last.min, last.max, last.step) == (stock.default, stock.min, stock.max, stock.step)
