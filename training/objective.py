"""The diffusion training objective in the model's own parameterization (eps or v), and its draws.

ComfyUI's ``model_sampling`` says how a raw network output becomes the denoised latent:
``denoised = a + b * output`` with ``a``, ``b`` depending on sigma and x_t. The target output is
the one that reproduces the clean latent, ``(x0 - a) / b``, so the MSE against it is the eps-MSE
for eps models and the v-MSE for v models, as the models were trained. Timesteps are uniform over
the model's discrete schedule.
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


def draw_sigmas(model_sampling, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` sigmas drawn uniformly from the model's discrete schedule (on the CPU)."""
    sigmas = model_sampling.sigmas
    idx = torch.randint(0, len(sigmas), (count,), generator=generator)
    return sigmas[idx.to(sigmas.device)].cpu()


def noised(model_sampling, sigma: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """``x_t`` for ``x0`` at ``sigma`` as ComfyUI's sampling builds it."""
    return model_sampling.noise_scaling(sigma, noise, x0)
