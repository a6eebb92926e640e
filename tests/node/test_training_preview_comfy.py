"""training.preview against ComfyUI's own machinery: k-diffusion's sample_euler with the KSampler's noise
scaling, the "simple" schedule, and the samplers' latent2rgb preview pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def preview(pack):
    from frozentune.training import preview

    return preview


def _sampling(kind: str):
    import comfy.model_sampling as cms

    parameterization = {"eps": cms.EPS, "v": cms.V_PREDICTION}[kind]

    class Sampling(parameterization, cms.ModelSamplingDiscrete):  # as comfy.model_base.model_sampling builds it
        pass

    return Sampling(None)  # SD1.5's scaled-linear betas


def _toy_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Nonlinear in x and sigma, per item: a mistake in any step's sigma, dt or start scaling shows."""
    s = sigma.view(-1, 1, 1, 1)
    return torch.tanh(x / (1 + s ** 2).sqrt()) * 0.8 + 0.1 * x.roll(1, dims=-1) / (1 + s)


@pytest.mark.parametrize("kind", ["eps", "v"])
def test_euler_equals_ksampler_euler(preview, kind):
    from comfy.k_diffusion.sampling import sample_euler

    ms = _sampling(kind)
    sigmas = preview.sigmas(ms, 4)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    # what comfy.samplers.KSAMPLER.sample does around the sampler function, for a full denoise
    start = ms.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), max_denoise=True)
    oracle = ms.inverse_noise_scaling(sigmas[-1], sample_euler(_toy_denoiser, start, sigmas, disable=True))
    torch.testing.assert_close(preview.euler(_toy_denoiser, noise, sigmas, model_sampling=ms), oracle,
                               rtol=1e-6, atol=1e-6)
    # without model_sampling the start is noise * sigma_max: k-diffusion's plain convention
    plain = sample_euler(_toy_denoiser, noise * sigmas[0], sigmas, disable=True)
    torch.testing.assert_close(preview.euler(_toy_denoiser, noise, sigmas), plain, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(plain, oracle)  # max denoise's sqrt(1 + sigma^2) matters: the check can fail


def test_sigmas_are_the_simple_schedule(preview):
    import comfy.samplers

    ms = _sampling("eps")
    s = preview.sigmas(ms, 4)
    assert torch.equal(s, comfy.samplers.calculate_sigmas(ms, "simple", 4))
    assert len(s) == 5 and float(s[-1]) == 0.0 and float(s[0]) == pytest.approx(float(ms.sigma_max))


@pytest.mark.parametrize("fmt", ["SD15", "SDXL"])
def test_to_image_is_the_samplers_latent2rgb_preview(preview, fmt, monkeypatch):
    import comfy.latent_formats
    import latent_preview
    from comfy.cli_args import LatentPreviewMethod

    latent_format = getattr(comfy.latent_formats, fmt)()
    latent = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(1)) * 2
    monkeypatch.setattr(latent_preview.args, "preview_method", LatentPreviewMethod.Latent2RGB)
    previewer = latent_preview.get_previewer("cpu", latent_format)  # what a KSampler's preview callback uses
    image = preview.to_image(latent, latent_format)
    assert image.shape == (2, 48, 40, 3)
    for i in range(2):
        kind, picture, _ = previewer.decode_latent_to_preview_image("JPEG", latent[i:i + 1])
        assert kind == "JPEG"
        expected = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)
        assert torch.equal(image[i, ::8, ::8], expected)
    # by hand: (latent . factors + bias + 1) / 2, clamped, in bytes
    factors = torch.tensor(latent_format.latent_rgb_factors)
    bias = torch.tensor(latent_format.latent_rgb_factors_bias or [0.0, 0.0, 0.0])
    rgb = ((latent[0].movedim(0, -1) @ factors + bias + 1) / 2).clamp(0, 1)
    assert (image[0, ::8, ::8] - (rgb * 255).to(torch.uint8).float() / 255).abs().max() <= 1 / 255 + 1e-6
