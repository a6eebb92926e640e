"""Prompt Guidance Guider against ComfyUI's own guiders (CFGGuider, DualCFGGuider, RescaleCFG) as oracles.

The half-precision tier runs the oracle tests on the tiny SD1.5 UNet stored in bf16/fp16 (computing
natively in that dtype) and fp8 (storage; computes in fp32), with the fp32 CLIP: the stock guider in the
same dtype is the oracle.
"""

from __future__ import annotations

import logging

import pytest
import torch

from harness import half_tier, node_runs
from harness.guiders import ours, stock_cfg

STEPS = 4
# DualCFGGuider sums the same three predictions in another order: ~1e-7 relative in fp32. In bf16/fp16 the
# UNet rounds its input to 8/11 mantissa bits, so that fp32 difference can flip a rounding at the next step
# (one bf16 ulp = 2**-8 = 3.9e-3, fp16 2**-11 = 4.9e-4) and grow over the steps; fp8 computes in fp32.
# Measured at cfg 6.5, pg 2, 4 steps: 2.5e-3 (bf16), 2.5e-7 (fp16), 7.8e-7 (fp8 and fp32).
TOLERANCE = {"fp32": 1e-5, "fp8": 1e-5, "bf16": 1e-2, "fp16": 1e-3}


sd15, _forget_unets = node_runs.sd15_module_fixtures()  # (MODEL, CLIP, VAE) of the tiny SD1.5; half_tier's dropped


def unet(sd15, tiny_checkpoints, dtype: str):
    """The tiny SD1.5 MODEL with its UNet in ``dtype`` (the fp32 one is the module's)."""
    return sd15[0] if dtype == "fp32" else half_tier.unet(tiny_checkpoints["sd15"], dtype)


@pytest.fixture(scope="module")
def prompts(sd15):
    import nodes

    clip = sd15[1]
    enc = nodes.CLIPTextEncode()
    return {name: enc.encode(clip, text)[0] for name, text in
            (("positive", "beikkpic a minion"), ("baseline", "beikkpic"), ("negative", ""))}


def sample(guider, model, steps=STEPS, seed=3, latent=None, denoise_mask=None):
    """What SamplerCustomAdvanced does: same noise, sampler and sigmas for every guider compared."""
    import comfy.sample
    import comfy.samplers

    latent = torch.zeros(1, 4, 8, 8) if latent is None else latent
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps).cpu()
    noise = comfy.sample.prepare_noise(latent, seed)
    return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, denoise_mask=denoise_mask,
                         disable_pbar=True, seed=seed)


def assert_close(got, expected, tol=1e-5):
    """Within ``tol`` relative to the result's scale: the random tiny model's latents reach a few hundred,
    where float32 rounding alone differs by ~1e-4 between two orderings of the same sum."""
    err, scale = (got - expected).abs().max().item(), max(1.0, expected.abs().max().item())
    logging.getLogger(__name__).info("max abs error %.3g at scale %.3g (relative %.3g)", err, scale, err / scale)
    assert err <= tol * scale, f"max abs error {err:.3g} at scale {scale:.3g}"


# fp16 (long) repeats bf16's native half path; fp16 with the guider stays in make test in test_prompt_guidance_pre_cfg
@pytest.mark.parametrize("dtype", half_tier.dtype_params(long=("fp16",)))
def test_pg_zero_is_stock_cfg_bitwise(sd15, tiny_checkpoints, prompts, dtype):
    model = unet(sd15, tiny_checkpoints, dtype)
    for cfg in (1.0, 6.5):
        got = sample(ours(model, prompts, cfg, 0.0), model)
        assert torch.isfinite(got).all()
        assert torch.equal(got, sample(stock_cfg(model, prompts, cfg), model))


# fp16 and fp8 (long) repeat bf16's native path and fp32's compute (fp8 storage casts to fp32) on the same formula
@pytest.mark.parametrize(("cfg", "pg", "dtype"), [(6.5, 2.0, "fp32"), (6.5, 2.0, "bf16"),
                                                  pytest.param(6.5, 2.0, "fp16", marks=pytest.mark.long),
                                                  pytest.param(6.5, 2.0, "fp8", marks=pytest.mark.long),
                                                  (1.0, 3.0, "fp32"), (4.0, -1.5, "fp32"), (0.0, 5.0, "fp32")])
def test_matches_stock_dual_cfg_guider(sd15, tiny_checkpoints, prompts, cfg, pg, dtype):
    from comfy_extras.nodes_custom_sampler import DualCFGGuider

    model = unet(sd15, tiny_checkpoints, dtype)
    dual = DualCFGGuider.execute(model, prompts["positive"], prompts["baseline"], prompts["negative"],
                                 cfg_conds=cfg + pg, cfg_cond2_negative=cfg, style="regular").args[0]
    expected, got = sample(dual, model), sample(ours(model, prompts, cfg, pg), model)
    assert torch.isfinite(got).all()
    assert_close(got, expected, TOLERANCE[dtype])
    assert not torch.allclose(got, sample(stock_cfg(model, prompts, cfg), model), atol=1e-3)  # pg did act


def counting(model):
    """A clone whose every UNet call is recorded as (batch size, cond_or_uncond)."""
    calls = []
    counted = model.clone()

    def wrapper(apply_model, args):
        calls.append((args["input"].shape[0], tuple(sorted(args["cond_or_uncond"]))))  # batch order varies
        return apply_model(args["input"], args["timestep"], **args["c"])

    counted.set_model_unet_function_wrapper(wrapper)
    return counted, calls


def test_one_batched_call_per_step_and_none_for_an_idle_baseline(sd15, prompts):
    import comfy.samplers

    model, calls = counting(sd15[0])
    sample(ours(model, prompts, 5.0, 2.0), model, steps=6)
    assert calls == [(3, (0, 1, 2))] * 6

    calls.clear()
    guider = ours(model, prompts, 5.0, 2.0, pg_start=0.0, pg_end=0.5)
    sample(guider, model, steps=6)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 6)[:-1]
    active = [guider.pg_at(float(s)) != 0.0 for s in sigmas]
    assert 0 < sum(active) < 6, active
    assert calls == [(3, (0, 1, 2)) if a else (2, (0, 1)) for a in active]


def test_rescale_matches_stock_rescale_cfg(sd15, prompts):
    from comfy_extras.nodes_model_advanced import RescaleCFG

    model = sd15[0]
    rescaled = RescaleCFG().patch(model, 0.7)[0]
    expected = sample(stock_cfg(rescaled, prompts, 6.0), rescaled)
    got = sample(ours(model, prompts, 6.0, 0.0, rescale=0.7), model)
    assert_close(got, expected)
    assert not torch.allclose(got, sample(stock_cfg(model, prompts, 6.0), model), atol=1e-3)


@pytest.fixture(scope="module")
def random_controlnet(sd15, tmp_path_factory):
    """A ControlNet for the tiny SD1.5 with random (non-zero) weights, loaded by ComfyUI's own loader."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    import safetensors.torch

    cfg = dict(sd15[0].model.model_config.unet_config)
    cfg.pop("out_channels", None)
    cfg.update(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu")
    net = comfy.cldm.cldm.ControlNet(**cfg)
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=gen) * 0.05).contiguous() for k, v in net.state_dict().items()}
    path = tmp_path_factory.mktemp("controlnet") / "random_cn.safetensors"
    safetensors.torch.save_file(state, str(path))
    return comfy.controlnet.load_controlnet(str(path))


def test_controlnet_on_positive_and_negative_steers_the_guider(sd15, prompts, random_controlnet):
    import nodes

    model = sd15[0]
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    apply = nodes.ControlNetApplyAdvanced()
    pos, neg = apply.apply_controlnet(prompts["positive"], prompts["negative"], random_controlnet, hint, 1.0, 0.0, 1.0)
    controlled = dict(prompts, positive=pos, negative=neg)
    plain = sample(ours(model, prompts, 5.0, 2.0), model)
    counted, calls = counting(model)
    steered = sample(ours(counted, controlled, 5.0, 2.0), counted)
    assert (steered - plain).abs().max().item() > 1e-3
    assert calls == [(3, (0, 1, 2))] * STEPS  # the baseline got the positive's ControlNet: still one batch

    # Oracle: the stock DualCFGGuider with the ControlNet applied to the baseline too.
    from comfy_extras.nodes_custom_sampler import DualCFGGuider

    base, _ = apply.apply_controlnet(prompts["baseline"], prompts["negative"], random_controlnet, hint, 1.0, 0.0, 1.0)
    dual = DualCFGGuider.execute(model, pos, base, neg, cfg_conds=7.0, cfg_cond2_negative=5.0, style="regular").args[0]
    assert_close(steered, sample(dual, model))


@pytest.mark.parametrize("dtype", half_tier.dtype_params(long=("fp16",)))
def test_guider_never_mutates_model_or_conditionings(sd15, tiny_checkpoints, prompts, random_controlnet, dtype):
    import nodes

    from harness.hashing import weight_hash

    model = unet(sd15, tiny_checkpoints, dtype)
    hint = torch.rand(1, 64, 64, 3)
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(prompts["positive"], prompts["negative"],
                                                                random_controlnet, hint, 1.0, 0.0, 1.0)
    baseline_extras = dict(prompts["baseline"][0][1])
    before, options = weight_hash(model.model.diffusion_model), repr(model.model_options)
    assert torch.isfinite(sample(ours(model, dict(prompts, positive=pos, negative=neg), 5.0, 2.0, rescale=0.5),
                                 model)).all()
    assert weight_hash(model.model.diffusion_model) == before
    assert repr(model.model_options) == options
    assert prompts["baseline"][0][1] == baseline_extras and "control" not in prompts["baseline"][0][1]


@pytest.mark.parametrize(("kw", "message"), [
    (dict(pg_start=0.7, pg_end=0.2), "pg_start=0.7"),
    (dict(rescale=1.5), "rescale=1.5"),
])
def test_guider_bad_settings_are_named(sd15, prompts, kw, message):
    with pytest.raises(ValueError, match=message):
        ours(sd15[0], prompts, 5.0, 2.0, **kw)


def test_hooks_on_a_conditioning_keep_working(sd15, prompts):
    """A LoRA hook on the positive prompt only (stock hooks API) acts, and matches the stock DualCFGGuider."""
    import comfy.hooks
    from comfy_extras.nodes_custom_sampler import DualCFGGuider

    model = sd15[0]
    unet = model.model.diffusion_model
    name, layer = next((n, m) for n, m in unet.named_modules() if n.endswith("attn2.to_v"))
    gen = torch.Generator().manual_seed(2)
    lora = {f"diffusion_model.{name}.lora_up.weight": torch.randn(layer.weight.shape[0], 4, generator=gen),
            f"diffusion_model.{name}.lora_down.weight": torch.randn(4, layer.weight.shape[1], generator=gen)}
    hooks = comfy.hooks.create_hook_lora(lora, strength_model=1.0, strength_clip=0.0)
    hooked = dict(prompts, positive=comfy.hooks.set_hooks_for_conditioning(prompts["positive"], hooks))
    got = sample(ours(model, hooked, 5.0, 2.0), model)
    assert (got - sample(ours(model, prompts, 5.0, 2.0), model)).abs().max().item() > 1e-3
    dual = DualCFGGuider.execute(model, hooked["positive"], prompts["baseline"], prompts["negative"],
                                 cfg_conds=7.0, cfg_cond2_negative=5.0, style="regular").args[0]
    assert_close(got, sample(dual, model))
