"""The diffusion training objective in the model's own parameterization (eps or v), and its draws.

ComfyUI's ``model_sampling`` says how a raw network output becomes the denoised latent:
``denoised = a + b * output`` with ``a``, ``b`` depending on sigma and x_t. The target output is
the one that reproduces the clean latent, ``(x0 - a) / b``, so the MSE against it is the eps-MSE
for eps models and the v-MSE for v models, as the models were trained. For flow models (``CONST``:
x_t = sigma * eps + (1 - sigma) * x0, denoised = x_t - sigma * v) it is v = eps - x0, the target of
diffusers' Flux/SD3 LoRA scripts, kohya, ai-toolkit and x-flux.

Timesteps (``draw_sigmas``): by default uniform over the model's own discrete schedule (for flow models
that schedule is already shifted: SD3 shift 3, Flux.1-dev e^1.15); flow models can also draw them
logit-normal (diffusers' SD3 default) or as a shifted sigmoid of a normal (kohya's Flux recipe).
"""

from __future__ import annotations

import torch


def target_coefficients(model_sampling, sigma: torch.Tensor, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` with ``denoised = a + b * output`` for this parameterization."""
    zeros = torch.zeros_like(x_t)
    a = model_sampling.calculate_denoised(sigma, zeros, x_t)
    b = model_sampling.calculate_denoised(sigma, torch.ones_like(x_t), x_t) - a
    return a, b


def target_output(model_sampling, sigma: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The raw network output that would reproduce ``x0`` (eps for eps models, v for v models)."""
    a, b = target_coefficients(model_sampling, sigma, x_t)
    return (x0 - a) / b


def output_loss(model_sampling, sigma: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor,
                output: torch.Tensor) -> torch.Tensor:
    """MSE of a raw network ``output`` against its target, computed in fp32."""
    target = target_output(model_sampling, sigma.float(), x_t.float(), x0.float())
    return torch.nn.functional.mse_loss(output.float(), target)


def denoised_loss(model_sampling, sigma: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor,
                  denoised: torch.Tensor) -> torch.Tensor:
    """The same loss from ``apply_model``'s denoised output: ``((denoised - x0) / b)^2``, in fp32."""
    _, b = target_coefficients(model_sampling, sigma.float(), x_t.float())
    return (((denoised.float() - x0.float()) / b) ** 2).mean()


UNIFORM = "uniform"
LOGIT_NORMAL = "logit-normal"
SIGMOID = "sigmoid"
TIMESTEP_SAMPLINGS = (UNIFORM, LOGIT_NORMAL, SIGMOID)


def is_flow(model_sampling) -> bool:
    """Whether the model is a flow-matching one (ComfyUI's ``CONST`` parameterization: SD3, Flux, ...)."""
    import comfy.model_sampling

    return isinstance(model_sampling, comfy.model_sampling.CONST)


def check_timestep_sampling(model_sampling, sampling: str) -> None:
    """Refuse an unknown timestep sampling, or a flow-only one on an eps/v model (SD1.5, SDXL)."""
    if sampling not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"timestep_sampling {sampling!r} is unknown: use one of {', '.join(TIMESTEP_SAMPLINGS)}.")
    if sampling != UNIFORM and not is_flow(model_sampling):
        raise ValueError(f"timestep_sampling {sampling!r} is for flow-matching models (Flux, SD3); this model "
                         f"predicts noise or v: use {UNIFORM!r}, its discrete schedule, as it was trained.")


def _shifted(model_sampling, t: torch.Tensor) -> torch.Tensor:
    """Unshifted flow times ``t`` in (0, 1) moved by the model's own shift (what its schedule does to them)."""
    import comfy.model_sampling as ms

    if isinstance(model_sampling, ms.ModelSamplingDiscreteFlow):  # SD3 (shift 3), Flux schnell (1), Z-Image (3)
        return model_sampling.sigma(t * model_sampling.multiplier)
    if isinstance(model_sampling, ms.ModelSamplingFlux):  # Flux.1-dev (mu 1.15), Chroma, Qwen-Image
        return model_sampling.sigma(t)
    raise ValueError(f"timestep_sampling {SIGMOID!r} does not know the shift of {type(model_sampling).__name__}: "
                     f"use {UNIFORM!r}.")


def draw_sigmas(model_sampling, count: int, generator: torch.Generator, sampling: str = UNIFORM) -> torch.Tensor:
    """``count`` training sigmas (on the CPU, fp32 as the schedule), drawn as ``sampling`` says.

    - ``uniform``: uniformly from the model's discrete schedule (every family; for flow models the schedule
      is the shifted one, i.e. kohya's ``--timestep_sampling shift`` with a uniform draw).
    - ``logit-normal``: u = sigmoid(N(0, 1)) picks the schedule entry at index ``int(u * N)`` counted from
      the noisy end, as diffusers' ``train_dreambooth_lora_sd3.py`` does (``compute_density_for_timestep_
      sampling(weighting_scheme="logit_normal")`` in ``diffusers/training_utils.py``, then
      ``indices = (u * num_train_timesteps).long()``, ``timesteps = noise_scheduler.timesteps[indices]``,
      whose timesteps run from the noisiest down); its SD3 schedule is ComfyUI's (1000 entries, shift 3).
    - ``sigmoid``: t = sigmoid(N(0, 1)), then the model's own shift: kohya sd-scripts
      ``library/flux_train_utils.py`` ``get_noisy_model_input_and_timesteps`` with ``--timestep_sampling
      shift`` (sigmoid of a normal, then ``t * s / (1 + (s - 1) * t)``), as kohya's README recommends for
      Flux LoRAs with ``--discrete_flow_shift 3.1582`` = e^1.15, Flux.1-dev's own shift. Continuous, not
      snapped to the schedule. (kohya's mode named ``sigmoid`` is the same draw without the shift.)

    The default draw is exactly what it always was (same generator calls), so SD1.5/SDXL runs repeat bitwise.
    """
    sigmas = model_sampling.sigmas
    if sampling == UNIFORM:
        idx = torch.randint(0, len(sigmas), (count,), generator=generator)
        return sigmas[idx.to(sigmas.device)].cpu()
    check_timestep_sampling(model_sampling, sampling)
    u = torch.sigmoid(torch.randn(count, generator=generator, dtype=torch.float32))
    if sampling == LOGIT_NORMAL:
        n = len(sigmas)
        idx = (u * n).long().clamp(max=n - 1)
        return sigmas.cpu().float().flip(0)[idx]
    return _shifted(model_sampling, u).float().cpu()


def noised(model_sampling, sigma: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """``x_t`` for ``x0`` at ``sigma`` as ComfyUI's sampling builds it."""
    return model_sampling.noise_scaling(sigma, noise, x0)
