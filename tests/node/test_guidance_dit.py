"""Prompt Guidance Guider and UniTune Edit on flow-matching DiTs (issue 22; Qwen-Image, Z-Image, Chroma: issue 24).

Tiny random models: Flux.1 dev (guidance-distilled: the ``guidance`` value rides in the conditioning),
Flux.1 schnell and SD3 from ``harness.tiny_dits`` (stock UNETLoader, 16-channel TAESD-format VAE, tiny text
encoders), and a tiny Qwen-Image from ``harness.tiny_qwen`` (Wan-2.1 VAE, latents ``[B, 16, 1, H, W]``,
prompt-keyed conditioning in place of its 7B text encoder), a tiny Z-Image (its real config class, a tiny Qwen3 text
encoder) and a tiny Chroma (stock UNETLoader through the detection shim, a tiny T5) from ``harness.tiny_dits2``. The oracles are stock: CFGGuider (pg = 0, bit for
bit), DualCFGGuider (pg ≠ 0, the same sum in another order), ``model_sampling.noise_scaling`` (the SDEdit
start), the stock sampling graph (UniTune Edit) and the original pixels (outside the mask). Model calls are
counted by a ``set_model_unet_function_wrapper`` wrapper: one entry per call, with its batch and cond indexes.

The half-precision tier stores each model in bf16 computing natively, and Flux.1 dev in fp8 (UNETLoader's
``fp8_e4m3fn``, computing in fp32 on the CPU) for inference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from harness import tiny_dits, tiny_dits2, tiny_qwen
from harness.guiders import ours, stock_cfg
from harness.hashing import weight_hash
from harness.tiny_dits2 import Kit

FAMILIES = ("flux1", "flux1_schnell", "sd3")
ISSUE24 = ("z_image", "chroma")  # harness.tiny_dits2 (issue 24); Qwen-Image is harness.tiny_qwen's
ALL = (*FAMILIES, "qwen_image", *ISSUE24)
STEPS = 2
# What the families sample at: Flux.1 dev/schnell are distilled (cfg 1), SD3.5 and Qwen-Image true CFG.
CFG = {"flux1": 1.0, "flux1_schnell": 1.0, "sd3": 4.0, "qwen_image": 4.0, "z_image": 1.0, "chroma": 4.0}
# DualCFGGuider sums the same predictions in another order (fp32 rounding, ~1e-7 relative); in bf16 the model
# rounds its input to 8 mantissa bits, so such a difference can flip a rounding at the next step (one bf16 ulp
# is 3.9e-3). Measured at cfg 1 and 4, pg 2, 2 steps, relative: <= 1.0e-6 fp32, 4.6e-7 fp8, 1.6e-7 bf16 (this
# CPU's bf16 kernels round a row alike in any batch; a GPU's need not).
TOLERANCE = {"fp32": 1e-5, "fp8": 1e-5, "bf16": 2e-2}
# Model calls per step for each (cfg, pg): the cond indexes of the one batched call (0 positive, 1 negative,
# 2 baseline). At cfg 1 the negative is skipped as stock sampling_function skips it; at pg 0 the baseline.
CHUNKS = {(1.0, 0.0): (0,), (1.0, 2.0): (0, 2), (4.0, 0.0): (0, 1), (4.0, 2.0): (0, 1, 2)}
DTYPE_CASES = [*((f, "fp32") for f in ALL), *((f, "bf16") for f in ALL), ("flux1", "fp8")]


def zeros(k: Kit) -> torch.Tensor:
    """An empty 64 px latent in the shape the family samples (5-D for Qwen-Image)."""
    return k.empty_latent()["samples"]


_MODELS: dict[tuple[str, str], Any] = {}
_PROMPTS: dict[str, dict[str, list]] = {}  # family -> prompt -> CONDITIONING


@pytest.fixture(scope="module", autouse=True)
def _forget_models():
    yield
    _MODELS.clear()
    _PROMPTS.clear()
    tiny_dits2.forget()


class EncodedOnce:
    """The family's CLIP as UniTune Edit uses it (``tokenize`` + ``encode_from_tokens_scheduled``), each prompt
    encoded once per module by the real CLIP: the tiny Flux/SD3 text encoders take about a second a prompt on a
    shared CPU, and the node's CLIP path is the same for every family (test_unitune_edit.py covers it)."""

    def __init__(self, family: str, encode: Callable[[str], list]):
        self.family, self.encode = family, encode

    def tokenize(self, text: str, **kwargs) -> str:
        return text

    def __call__(self, text: str) -> list:
        cache = _PROMPTS.setdefault(self.family, {})
        if text not in cache:
            cache[text] = self.encode(text)
        return cache[text]

    def encode_from_tokens_scheduled(self, tokens: str, **kwargs) -> list:
        return self(tokens)


@pytest.fixture
def kit(tiny_dit, pack):
    """``kit(family, dtype="fp32")``: the family's MODEL in ``dtype`` with its CLIP, VAE and encoder."""
    def make(family: str, dtype: str = "fp32") -> Kit:
        if family in ISSUE24:  # Z-Image Turbo (distilled, cfg 1), Chroma (true CFG)
            if (family, dtype) not in _MODELS:
                _MODELS[family, dtype] = tiny_dits2.kit(family, dtype, fresh=True)
            k2 = _MODELS[family, dtype]
            clip = EncodedOnce(family, k2.encode)
            return Kit(k2.model, clip, k2.vae, clip, family)
        if family == "qwen_image":
            if (family, dtype) not in _MODELS:
                _MODELS[family, dtype] = tiny_qwen.model(dtype)
            if (family, "vae") not in _MODELS:
                _MODELS[family, "vae"] = tiny_qwen.vae()
            return Kit(_MODELS[family, dtype], tiny_qwen.PromptClip(), _MODELS[family, "vae"],
                       tiny_qwen.conditioning, family)
        dit = tiny_dit(family)
        if dtype == "fp32":
            model = dit.model
        else:
            if (family, dtype) not in _MODELS:
                _MODELS[family, dtype] = (tiny_dits.load_model(family, weight_dtype="fp8_e4m3fn") if dtype == "fp8"
                                          else tiny_dits.load_model(family, dtype))
            model = _MODELS[family, dtype]
        clip = EncodedOnce(family, dit.encode)
        return Kit(model, clip, dit.vae, clip, family)

    return make


def prompts(k: Kit) -> dict:
    return {name: k.encode(text) for name, text in
            (("positive", "beikkpic a minion"), ("baseline", "beikkpic"), ("negative", ""))}


def sample(guider, model, latent, steps=STEPS, seed=3):
    """What SamplerCustomAdvanced does: same noise, sampler and sigmas for every guider compared."""
    import comfy.sample
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps).cpu()
    noise = comfy.sample.prepare_noise(latent, seed)
    out = guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, disable_pbar=True, seed=seed)
    assert torch.isfinite(out).all()
    return out


def stock_dual(model, p, cfg, pg):
    """Stock DualCFGGuider computing the same formula: neg + cfg·(base − neg) + (cfg + pg)·(pos − base)."""
    from comfy_extras.nodes_custom_sampler import DualCFGGuider

    return DualCFGGuider.execute(model, p["positive"], p["baseline"], p["negative"], cfg_conds=cfg + pg,
                                 cfg_cond2_negative=cfg, style="regular").args[0]


@dataclass
class Call:
    batch: int
    chunks: tuple[int, ...]  # cond indexes in the batch, sorted (calc_cond_batch's batch order varies)
    guidance: dict[int, float] | None  # Flux's embedded guidance per cond index, if the model got one
    x: torch.Tensor  # the model input, chunk by chunk in ``order``
    sigma: float
    order: tuple[int, ...]


def counting(model):
    """A clone whose every model call is recorded as a ``Call``."""
    calls: list[Call] = []
    counted = model.clone()

    def wrapper(apply_model, args):
        order = tuple(args["cond_or_uncond"])
        guidance = args["c"].get("guidance")
        if guidance is not None:  # one value per latent; the latents of one chunk share their conditioning's
            rows = guidance.float().reshape(len(order), -1)
            assert torch.equal(rows, rows[:, :1].expand_as(rows))
            guidance = dict(zip(order, rows[:, 0].tolist(), strict=True))
        calls.append(Call(batch=args["input"].shape[0], chunks=tuple(sorted(order)), guidance=guidance,
                          x=args["input"].detach().clone(), sigma=float(args["timestep"][0]), order=order))
        return apply_model(args["input"], args["timestep"], **args["c"])

    counted.set_model_unet_function_wrapper(wrapper)
    return counted, calls


def unbatched(calls: list[Call]) -> list[tuple[int, ...]]:
    """The cond indexes evaluated at each step, over all of its calls. Z-Image's and Chroma's prompts of different
    lengths carry attention masks (and Z-Image a token count) of different sizes, which stock ``calc_cond_batch``
    cannot concatenate: it runs one call per prompt there, for stock CFGGuider as for this guider."""
    steps: dict[float, list[int]] = {}
    for c in calls:
        steps.setdefault(c.sigma, []).extend(c.chunks)
    return [tuple(sorted(v)) for v in steps.values()]


def assert_close(got, expected, tol):
    err, scale = (got - expected).abs().max().item(), max(1.0, expected.abs().max().item())
    logging.getLogger(__name__).info("max abs error %.3g at scale %.3g (relative %.3g)", err, scale, err / scale)
    assert err <= tol * scale, f"max abs error {err:.3g} at scale {scale:.3g}"


def conditioning_snapshot(conditioning: list) -> list:
    return [(t.clone(), {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in extras.items()})
            for t, extras in conditioning]


def same_conditioning(conditioning: list, snapshot: list) -> bool:
    if len(conditioning) != len(snapshot):
        return False
    for (t, extras), (t0, extras0) in zip(conditioning, snapshot, strict=True):
        if not torch.equal(t, t0) or extras.keys() != extras0.keys():
            return False
        for key, value in extras.items():
            old = extras0[key]
            if isinstance(value, torch.Tensor) and not torch.equal(value, old):
                return False
            if not isinstance(value, torch.Tensor) and value != old:
                return False
    return True


# --- the guider ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ALL)
def test_one_batched_call_per_step_with_the_predictions_the_cfg_needs(kit, family):
    """Flux.1 dev at cfg 1: [positive, baseline], two predictions; at cfg > 1 three; pg 0: stock CFG's calls."""
    k = kit(family)
    model, calls = counting(k.model)
    for (cfg, pg), chunks in CHUNKS.items():
        calls.clear()
        sample(ours(model, prompts(k), cfg, pg), model, zeros(k))
        if family in ISSUE24:  # see unbatched()
            assert unbatched(calls) == [chunks] * STEPS, (cfg, pg)
            continue
        assert [(c.batch, c.chunks) for c in calls] == [(len(chunks), chunks)] * STEPS, (cfg, pg)
    if family in ISSUE24:  # stock CFGGuider runs one call per prompt there too
        calls.clear()
        sample(stock_cfg(model, prompts(k), 4.0), model, zeros(k))
        assert [c.chunks for c in calls] == [(0,), (1,)] * STEPS or [c.chunks for c in calls] == [(1,), (0,)] * STEPS


def test_flux_baseline_is_predicted_at_the_positive_guidance(kit, caplog):
    """A baseline without ``guidance`` (another encode, no FluxGuidance) gets the positive's; one with its own
    keeps it (logged); the negative keeps the stock default, as in CFGGuider; no input changes."""
    from comfy_extras.nodes_flux import FluxGuidance

    k = kit("flux1")
    p = prompts(k)
    p = dict(p, positive=FluxGuidance.execute(p["positive"], 2.0).args[0])
    snapshots = {name: conditioning_snapshot(c) for name, c in p.items()}
    model, calls = counting(k.model)

    got = sample(ours(model, p, 1.0, 2.0), model, zeros(k))
    assert [c.guidance for c in calls] == [{0: 2.0, 2: 2.0}] * STEPS
    # Oracle: the stock DualCFGGuider with the baseline given guidance 2 by the stock FluxGuidance node.
    explicit = dict(p, baseline=FluxGuidance.execute(p["baseline"], 2.0).args[0])
    assert_close(got, sample(stock_dual(k.model, explicit, 1.0, 2.0), k.model, zeros(k)), TOLERANCE["fp32"])
    at_default = sample(stock_dual(k.model, p, 1.0, 2.0), k.model, zeros(k))  # the baseline at 3.5
    logging.getLogger(__name__).info("baseline at 2 vs 3.5: %.3g", (got - at_default).abs().max().item())
    assert (got - at_default).abs().max() > 1e-3

    calls.clear()
    sample(ours(model, p, 4.0, 2.0), model, zeros(k))
    assert [c.guidance for c in calls] == [{0: 2.0, 1: 3.5, 2: 2.0}] * STEPS

    calls.clear()
    with caplog.at_level(logging.WARNING):
        sample(ours(model, dict(p, baseline=FluxGuidance.execute(p["baseline"], 5.0).args[0]), 1.0, 2.0), model,
               zeros(k))
    assert [c.guidance for c in calls] == [{0: 2.0, 2: 5.0}] * STEPS
    assert "the baseline's guidance 5.0 is not the positive's 2.0" in caplog.text
    assert all(same_conditioning(p[name], snap) for name, snap in snapshots.items())
    assert "guidance" not in p["baseline"][0][1]


@pytest.mark.parametrize(("family", "dtype"), DTYPE_CASES)
def test_pg_zero_is_stock_cfg_bitwise(kit, family, dtype):
    k = kit(family, dtype)
    for cfg in (1.0, 4.0):
        got = sample(ours(k.model, prompts(k), cfg, 0.0), k.model, zeros(k))
        assert torch.equal(got, sample(stock_cfg(k.model, prompts(k), cfg), k.model, zeros(k))), cfg


@pytest.mark.parametrize(("family", "dtype"), DTYPE_CASES)
def test_pg_matches_stock_dual_cfg_and_moves_the_result(kit, family, dtype):
    k = kit(family, dtype)
    for cfg in (1.0, 4.0):
        got = sample(ours(k.model, prompts(k), cfg, 2.0), k.model, zeros(k))
        assert_close(got, sample(stock_dual(k.model, prompts(k), cfg, 2.0), k.model, zeros(k)), TOLERANCE[dtype])
        assert (got - sample(stock_cfg(k.model, prompts(k), cfg), k.model, zeros(k))).abs().max() > 1e-3, cfg


@pytest.mark.parametrize("family", ALL)
def test_guider_never_mutates_model_or_conditionings(kit, family):
    k = kit(family)
    p = prompts(k)
    snapshots = {name: conditioning_snapshot(c) for name, c in p.items()}
    before, options = weight_hash(k.model.model.diffusion_model), repr(k.model.model_options)
    for cfg in (1.0, 4.0):
        sample(ours(k.model, p, cfg, 2.0, rescale=0.5), k.model, zeros(k))
    assert weight_hash(k.model.model.diffusion_model) == before
    assert repr(k.model.model_options) == options
    assert all(same_conditioning(p[name], snap) for name, snap in snapshots.items())


# --- UniTune Edit ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photo():
    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    return torch.stack([x, y, 0.5 * (x + y)], dim=-1)[None]


def run_edit(k: Kit, image, model=None, **overrides):
    from frozentune.nodes.unitune_nodes import UniTuneEdit

    args = dict(model=model or k.model, image=image, vae=k.vae, clip=k.clip, token="beikkpic", edit_prompt="a minion",
                negative="", steps=4, cfg=CFG[k.family], pg=2.0, sampler_name="euler", scheduler="simple", seed=11,
                batch=1, start=0.6, blend=0.0, blend_unchanged=0.0)
    args.update(overrides)
    image_out, latent_out = UniTuneEdit.execute(**args).args
    return image_out, latent_out["samples"]


@pytest.mark.parametrize("family", ALL)
def test_edit_starts_from_the_models_noise_scaling(kit, photo, family):
    """SDEdit's late start is ComfyUI's ``model_sampling.noise_scaling`` (flow: σ·ε + (1 − σ)·x0), not an
    eps-style x0 + σ·ε: the first model input, every chunk, bit for bit."""
    import comfy.sample
    import comfy.samplers

    from frozentune.guidance import sdedit

    k = kit(family)
    model, calls = counting(k.model)
    run_edit(k, photo, model=model, start=0.6, steps=5, batch=2)
    ms = model.get_model_object("model_sampling")
    sigmas = sdedit.late_start(comfy.samplers.calculate_sigmas(ms, "simple", 5).cpu(), 0.6)
    original = sdedit.repeat_batch(k.vae.encode(photo), 2)
    x0 = model.model.process_latent_in(original)
    expected = ms.noise_scaling(sigmas[0], comfy.sample.prepare_noise(original, 11), x0)
    first = calls[0]
    assert first.sigma == float(sigmas[0]) < float(ms.sigma_max)
    chunks = (0, 2) if CFG[family] == 1.0 else (0, 1, 2)
    if family in ISSUE24:  # one call per prompt (see unbatched()): each call of the first step
        assert unbatched(calls) == [chunks] * 3
        firsts = [c for c in calls if c.sigma == first.sigma]
    else:
        assert len(calls) == 3 and first.chunks == chunks
        firsts = [first]
    for chunk in (x for c in firsts for x in c.x.chunk(len(c.order))):
        assert chunk.shape == original.shape and torch.equal(chunk, expected)
    eps_style = x0 + float(sigmas[0]) * comfy.sample.prepare_noise(original, 11)
    assert (expected - eps_style).abs().max() > 0.1


@pytest.mark.parametrize(("family", "dtype"), DTYPE_CASES)
def test_edit_mask_keeps_the_original_pixels_outside_exactly(kit, photo, family, dtype):
    k = kit(family, dtype)
    before = weight_hash(k.model.model.diffusion_model)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    image, latent = run_edit(k, photo, mask=mask, batch=2)
    assert latent.shape[0] == 2 and torch.isfinite(latent).all()
    outside = mask[0] == 0
    assert torch.equal(image[:, outside], photo.expand(2, -1, -1, -1)[:, outside])
    assert (image[:, ~outside] - photo.expand(2, -1, -1, -1)[:, ~outside]).abs().max() > 0.01
    assert not torch.equal(image[0], image[1])  # batch = variations, each with its own noise

    image, _ = run_edit(k, photo, blend=1.0, start=1.0, steps=2)
    assert torch.equal(image, photo)
    assert weight_hash(k.model.model.diffusion_model) == before


@pytest.mark.parametrize("family", ["flux1", "sd3", "qwen_image"])
def test_edit_equals_the_stock_graph_with_the_guider(kit, photo, family):
    """The node = VAEEncode + RandomNoise + BasicScheduler + SplitSigmas + SamplerCustomAdvanced + the guider."""
    import nodes
    from comfy_extras.nodes_custom_sampler import (
        BasicScheduler,
        KSamplerSelect,
        RandomNoise,
        SamplerCustomAdvanced,
        SplitSigmas,
    )

    from frozentune.nodes.guidance_nodes import PromptGuidanceGuider

    k = kit(family)
    _, latent = run_edit(k, photo, start=0.6, steps=5)
    cfg = CFG[family]
    guider = PromptGuidanceGuider.execute(k.model, k.encode("beikkpic a minion"), k.encode("beikkpic"), k.encode(""),
                                          cfg, 2.0, 0.0, 1.0, 0.0).args[0]
    sigmas = BasicScheduler.execute(k.model, "simple", 5, 1.0).args[0]
    low = SplitSigmas.execute(sigmas, 2).args[1]  # round((1 - 0.6) * 5) = 2 steps skipped
    out = SamplerCustomAdvanced.execute(RandomNoise.execute(11).args[0], guider, KSamplerSelect.execute("euler").args[0],
                                        low, nodes.VAEEncode().encode(k.vae, photo)[0]).args[0]
    assert torch.equal(latent, out["samples"])


def test_qwen_image_5d_latent_start_zero_repeats_the_batch(kit, photo):
    k = kit("qwen_image")
    image, latent = run_edit(k, photo, start=0.0, batch=3)
    original = k.vae.encode(photo)
    assert original.shape == (1, 16, 1, 8, 8)
    assert torch.equal(latent, original.expand(3, -1, -1, -1, -1)) and torch.equal(image, photo.expand(3, -1, -1, -1))


def test_qwen_image_one_mask_per_variation_reaches_the_latent(kit, photo):
    """ComfyUI folds a mask batch into the time axis of a 5-D latent (averaging the masks): each variation
    must keep its own mask, so its latent outside the mask stays the original's."""
    k = kit("qwen_image")
    masks = torch.zeros(2, 64, 64)
    masks[0, :32] = 1.0  # top half edited in the first variation
    masks[1, 32:] = 1.0  # bottom half in the second
    image, latent = run_edit(k, photo, mask=masks, batch=2)
    assert torch.equal(image[0, 32:], photo[0, 32:]) and torch.equal(image[1, :32], photo[0, :32])
    original = k.vae.encode(photo)[0]
    top, bottom = slice(0, 4), slice(4, 8)
    for i, (kept, edited) in enumerate(((bottom, top), (top, bottom))):
        assert_close(latent[i, ..., kept, :], original[..., kept, :], 1e-5)
        assert (latent[i, ..., edited, :] - original[..., edited, :]).abs().max() > 0.1
