"""Prompt Guidance with stock pre-CFG model hooks (APG, LatentApplyOperationCFG): issue 15.

What the guider hands ``sampler_pre_cfg_function`` hooks is documented in ``guidance.guider``: exactly
what stock CFGGuider hands them ([positive, negative]); they rewrite the CFG term and the pg term uses the
raw predictions:

    D = CFG(hooks(D_pos, D_neg)) + pg·(D_pos − D_base)

Oracles are stock only: with pg = 0 the guider on a hooked model is bitwise stock CFGGuider on it (4 steps
of euler); with pg ≠ 0 one evaluation of the guider equals stock CFGGuider on the hooked model plus pg
times the difference of two stock BasicGuider evaluations (positive, baseline) of the unhooked model, at
the same x and sigma (a one-evaluation sampler returns the denoised prediction). Tiny SD1.5 UNet, random
conditionings of its shape; the half-precision tier stores the UNet in bf16 / fp16 computing natively
(one hook per dtype and test, the other hook in the other test).
"""

from __future__ import annotations

import logging

import pytest
import torch

from harness import half_tier

CFG, PG = 5.0, 2.0
# The guider evaluates [positive, negative, baseline] in one batch of 3, the oracle in batches of 2 and 1,
# and the oracle sums three results where the guider sums inside one expression: a few roundings of the
# dtype, amplified by cfg and pg (relative to the result's scale). Measured (cfg 5, pg 2, both hooks):
# 2.1e-6 (fp32), 0 (bf16: this CPU's bf16 kernels give each row the same result in any batch), 1.4e-3 (fp16).
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 4e-3}


@pytest.fixture(scope="module", autouse=True)
def _forget_unets():
    yield
    half_tier.forget()


@pytest.fixture(scope="module")
def conds(pack):
    gen = torch.Generator().manual_seed(21)
    return {name: [[torch.randn(1, 77, 768, generator=gen), {}]] for name in ("positive", "negative", "baseline")}


def unet(tiny_checkpoints, dtype):
    return half_tier.unet(tiny_checkpoints["sd15"], dtype)


def apg(model):
    from comfy_extras.nodes_apg import APG

    return APG.execute(model, eta=0.5, norm_threshold=3.0, momentum=0.4).args[0]


def tonemap(model):
    from comfy_extras.nodes_latent import LatentApplyOperationCFG, LatentOperationTonemapReinhard

    return LatentApplyOperationCFG.execute(model, LatentOperationTonemapReinhard.execute(0.5).args[0]).args[0]


HOOKS = {"APG": apg, "LatentApplyOperationCFG": tonemap}


def ours(model, c, pg, cfg=CFG):
    from frozentune.nodes.guidance_nodes import PromptGuidanceGuider

    return PromptGuidanceGuider.execute(model=model, positive=c["positive"], baseline=c["baseline"],
                                        negative=c["negative"], cfg=cfg, pg=pg, pg_start=0.0, pg_end=1.0,
                                        rescale=0.0).args[0]


def stock_cfg(model, c, cfg=CFG):
    from comfy_extras.nodes_custom_sampler import CFGGuider

    return CFGGuider.execute(model, c["positive"], c["negative"], cfg).args[0]


def basic(model, conditioning):
    from comfy_extras.nodes_custom_sampler import BasicGuider

    return BasicGuider.execute(model, conditioning).args[0]


def sigmas_of(model, steps=4):
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps).cpu()


def sample(guider, model, steps=4):
    import comfy.sample
    import comfy.samplers

    latent = torch.zeros(1, 4, 8, 8)
    return guider.sample(comfy.sample.prepare_noise(latent, 3), latent, comfy.samplers.sampler_object("euler"),
                         sigmas_of(model, steps), disable_pbar=True, seed=3)


def evaluate(guider, model, step):
    """The guider's denoised prediction at sigma_step of a 4-step schedule, on the noised zero latent."""
    import comfy.sample
    import comfy.samplers

    got = []

    def once(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        got.append(model_k(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {})))
        return got[-1]

    latent = torch.zeros(1, 4, 8, 8)
    guider.sample(comfy.sample.prepare_noise(latent, 3), latent, comfy.samplers.KSAMPLER(once),
                  sigmas_of(model)[step:step + 2], disable_pbar=True, seed=3)
    return got[0].float()


def assert_close(got, expected, tol):
    err, scale = (got - expected).abs().max().item(), max(1.0, expected.abs().max().item())
    logging.getLogger(__name__).info("max abs error %.3g at scale %.3g (relative %.3g)", err, scale, err / scale)
    assert err <= tol * scale, f"max abs error {err:.3g} at scale {scale:.3g} (relative {err / scale:.3g})"


# Every hook in fp32; in half precision each test runs one hook per dtype (native half on a CPU is slow).
CASES = [("fp32", "APG"), ("fp32", "LatentApplyOperationCFG"), ("bf16", "APG"), ("fp16", "LatentApplyOperationCFG")]
FORMULA_CASES = [("fp32", "APG"), ("fp32", "LatentApplyOperationCFG"), ("bf16", "LatentApplyOperationCFG"),
                 ("fp16", "APG")]


@pytest.mark.parametrize(("dtype", "hook"), CASES)
def test_pg_zero_with_a_stock_pre_cfg_hook_is_stock_cfg_bitwise(tiny_checkpoints, conds, dtype, hook):
    model = unet(tiny_checkpoints, dtype)
    got = sample(ours(HOOKS[hook](model), conds, 0.0), model, steps=3)
    assert torch.isfinite(got).all()
    assert torch.equal(got, sample(stock_cfg(HOOKS[hook](model), conds), model, steps=3))
    if dtype == "fp32":
        assert not torch.allclose(got, sample(stock_cfg(model, conds), model, steps=3), atol=1e-3)  # the hook acted


@pytest.mark.parametrize(("dtype", "hook"), FORMULA_CASES)
def test_pg_with_a_stock_pre_cfg_hook_matches_the_documented_formula(tiny_checkpoints, conds, dtype, hook):
    model = unet(tiny_checkpoints, dtype)
    for step in (0, 2) if dtype == "fp32" else (1,):
        got = evaluate(ours(HOOKS[hook](model), conds, PG), model, step)
        cfg_part = evaluate(stock_cfg(HOOKS[hook](model), conds), model, step)
        pg_part = evaluate(basic(model, conds["positive"]), model, step) - evaluate(basic(model, conds["baseline"]),
                                                                                   model, step)
        assert torch.isfinite(got).all()
        assert_close(got, cfg_part + PG * pg_part, TOLERANCE[dtype])
        unhooked = evaluate(stock_cfg(model, conds), model, step) + PG * pg_part
        assert not torch.allclose(got, unhooked, atol=1e-2)  # the hook acted on the CFG term


def test_hooks_get_what_stock_cfg_gives_them(tiny_checkpoints, conds):
    """Two entries (the baseline hidden), the guider's cfg, and a list they may assign into."""
    model = unet(tiny_checkpoints, "fp32")
    seen = []

    def hook(args):
        seen.append((len(args["conds"]), len(args["conds_out"]), args["cond_scale"],
                     tuple(tuple(t.shape) for t in args["conds_out"])))
        out = args["conds_out"]
        out[0] = out[0] * 1.0  # assigns into the list it was given, as LatentApplyOperationCFG does
        return out

    hooked = model.clone()
    hooked.set_model_sampler_pre_cfg_function(hook)
    sample(stock_cfg(hooked, conds), hooked, steps=2)
    stock = list(seen)
    seen.clear()
    sample(ours(hooked, conds, PG), hooked, steps=2)
    assert seen == stock == [(2, 2, CFG, ((1, 4, 8, 8),) * 2)] * 2
