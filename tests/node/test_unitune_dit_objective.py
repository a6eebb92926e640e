"""The flow objective and the training timestep draws on ComfyUI's own model_sampling objects (SD3, Flux.1, schnell).

Each draw is checked against the formula of the trainer it cites (``training.objective.draw_sigmas``): quantiles
of many draws from a fixed generator against the closed form, and the index mapping against diffusers' schedule
built the way its scheduler builds it. The default draw stays the old one, bitwise.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

N_DRAWS = 200_000
QUANTILES = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])


def sampling(config_name: str, model_type: str):
    """The model_sampling object ComfyUI builds for a supported-model class (its own sampling settings)."""
    import comfy.model_base
    import comfy.supported_models

    config = SimpleNamespace(sampling_settings=getattr(comfy.supported_models, config_name).sampling_settings)
    return comfy.model_base.model_sampling(config, getattr(comfy.model_base.ModelType, model_type))


@pytest.fixture(scope="module")
def samplings(pack):
    return {"sd3": sampling("SD3", "FLOW"), "flux1": sampling("Flux", "FLUX"),
            "flux1_schnell": sampling("FluxSchnell", "FLOW"), "sd15": sampling("SD15", "EPS")}


def draws(ms, how: str, count: int = N_DRAWS, seed: int = 0) -> torch.Tensor:
    from frozentune.training import objective

    return objective.draw_sigmas(ms, count, torch.Generator().manual_seed(seed), how)


def normal_quantile(q: torch.Tensor) -> torch.Tensor:
    return torch.distributions.Normal(0.0, 1.0).icdf(q.double())


def shift(s: float, t: torch.Tensor) -> torch.Tensor:
    """SD3's / kohya's shift: ``t * s / (1 + (s - 1) * t)``."""
    return s * t / (1 + (s - 1) * t)


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux1"])
def test_default_draw_is_the_old_uniform_index_draw_bitwise(family, samplings):
    ms = samplings[family]
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, len(ms.sigmas), (64,), generator=gen)  # the draw before the setting existed
    assert torch.equal(draws(ms, "uniform", 64, seed=3), ms.sigmas[idx])
    from frozentune.training import objective

    assert torch.equal(objective.draw_sigmas(ms, 64, torch.Generator().manual_seed(3)), ms.sigmas[idx])


@pytest.mark.parametrize("family, shift_value", [("sd3", 3.0), ("flux1", math.exp(1.15)), ("flux1_schnell", 1.0)])
def test_logit_normal_is_diffusers_sd3_draw_on_the_models_schedule(family, shift_value, samplings):
    """diffusers: u = sigmoid(N(0,1)); indices = (u * N).long(); timesteps[indices] of a schedule that runs from the
    noisiest entry down. Quantile q of sigma is the shifted (1 - u) at u's (1 - q) quantile, up to one schedule step."""
    ms = samplings[family]
    got = draws(ms, "logit-normal")
    n = len(ms.sigmas)
    u = torch.sigmoid(normal_quantile(1 - QUANTILES))
    expected = shift(shift_value, 1 - u)
    measured = torch.quantile(got.double(), QUANTILES.double())
    assert torch.allclose(measured, expected, atol=0.006 + 2 / n), (family, measured, expected)
    if family == "sd3":
        assert abs(measured[2].item() - 0.75) < 0.005  # the median: shift 3 of 1/2

    # The same u on diffusers' own schedule (FlowMatchEulerDiscreteScheduler.__init__: timesteps N..1, sigmas
    # t / N shifted) picks the same sigmas.
    gen = torch.Generator().manual_seed(0)
    u = torch.sigmoid(torch.randn(1000, generator=gen))
    descending = torch.linspace(1, n, n).flip(0) / n
    diffusers_sigmas = ms.sigma(descending * ms.multiplier) if hasattr(ms, "multiplier") else ms.sigma(descending)
    assert torch.allclose(draws(ms, "logit-normal", 1000), diffusers_sigmas[(u * n).long()], atol=1e-6)


@pytest.mark.parametrize("family, shift_value", [("flux1", math.exp(1.15)), ("sd3", 3.0), ("flux1_schnell", 1.0)])
def test_sigmoid_is_kohyas_shifted_sigmoid_with_the_models_shift(family, shift_value, samplings):
    """kohya (--timestep_sampling shift): t = sigmoid(N(0,1)); sigma = t*s / (1 + (s-1)*t), continuous."""
    ms = samplings[family]
    got = draws(ms, "sigmoid")
    expected = shift(shift_value, torch.sigmoid(normal_quantile(QUANTILES)))
    measured = torch.quantile(got.double(), QUANTILES.double())
    assert torch.allclose(measured, expected, atol=0.006), (family, measured, expected)
    # Draw by draw: kohya's formula on the same normals (Flux: its README's --discrete_flow_shift 3.1582).
    t = torch.sigmoid(torch.randn(1000, generator=torch.Generator().manual_seed(0)))
    kohya_shift = 3.1582 if family == "flux1" else shift_value
    assert torch.allclose(draws(ms, "sigmoid", 1000), shift(kohya_shift, t).float(), atol=2e-5)
    assert len(set(got[:1000].tolist())) > 990, "continuous, not snapped to the schedule"


def test_flow_draws_are_refused_on_noise_predicting_models(samplings):
    from frozentune.training import objective

    for how in ("logit-normal", "sigmoid"):
        with pytest.raises(ValueError, match="flow-matching models"):
            draws(samplings["sd15"], how, 4)
    with pytest.raises(ValueError, match="'cosine' is unknown"):
        objective.check_timestep_sampling(samplings["sd3"], "cosine")
    objective.check_timestep_sampling(samplings["sd15"], "uniform")


@pytest.mark.parametrize("family", ["flux1", "sd3"])
def test_flow_target_is_diffusers_v_equals_noise_minus_x0(family, samplings):
    """diffusers train_dreambooth_lora_flux.py / _sd3.py: noisy = (1 - sigma) * x0 + sigma * noise, target =
    noise - x0, loss = MSE(model_pred, target). Ours derives it from calculate_denoised."""
    from frozentune.training import objective

    ms = samplings[family]
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 16, 4, 4, generator=gen), torch.randn(3, 16, 4, 4, generator=gen)
    sigma = draws(ms, "logit-normal", 3)
    x_t = objective.noised(ms, sigma, noise, x0)
    s = sigma.view(-1, 1, 1, 1)
    assert torch.allclose(x_t, (1 - s) * x0 + s * noise, atol=1e-6)
    target = noise - x0
    assert torch.allclose(objective.target_output(ms, sigma, x_t, x0), target, atol=1e-4)
    v = torch.randn(x0.shape, generator=gen)  # a model's raw prediction, and the denoised latent ComfyUI makes of it
    denoised = ms.calculate_denoised(sigma, v, x_t)
    expected = torch.nn.functional.mse_loss(v, target)
    assert torch.allclose(objective.denoised_loss(ms, sigma, x_t, x0, denoised), expected, rtol=1e-4)
    assert torch.allclose(objective.output_loss(ms, sigma, x_t, x0, v), expected, rtol=1e-4)
