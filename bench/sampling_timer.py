"""Seconds per sampling step of several guiders on one model, timed fairly in one run.

Every guider samples the same zero latent with the same noise, euler sampler and "normal" sigmas.
After one warm-up run each (model load, first-call allocations), rounds are interleaved (A, B, C, A,
B, C, ...) so background load hits every contender alike; callers report the median over rounds.
"""

from __future__ import annotations

import time


def seconds_per_step(guiders: dict, model, size: int, steps: int, rounds: int) -> dict[str, list[float]]:
    """``{name: [seconds per step, one per round]}`` for each GUIDER in ``guiders``."""
    import comfy.sample
    import comfy.samplers
    import torch

    latent = torch.zeros(1, 4, size // 8, size // 8)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps).cpu()
    sampler = comfy.samplers.sampler_object("euler")
    noise = comfy.sample.prepare_noise(latent, 0)

    def run(guider) -> float:
        start = time.perf_counter()
        guider.sample(noise, latent, sampler, sigmas, disable_pbar=True, seed=0)
        return (time.perf_counter() - start) / steps

    for guider in guiders.values():
        run(guider)
    times: dict[str, list[float]] = {name: [] for name in guiders}
    for _ in range(rounds):
        for name, guider in guiders.items():
            times[name].append(run(guider))
    return times
