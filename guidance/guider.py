"""Prompt Guidance: classifier-free guidance plus a second term whose baseline is another prompt.

    ε = ε_neg + cfg·(ε_pos − ε_neg) + pg·(ε_pos − ε_base)

The coefficients (1 − cfg, cfg + pg, −pg) sum to one, so the same formula holds for the denoised
predictions ComfyUI's guiders work with. Stock ``DualCFGGuider`` can express the bare formula; this
guider adds what UniTune editing needs on top of it:

- one batched ``calc_cond_batch`` call per step for all three conditionings, in the order
  [positive, negative, baseline], so attention patches see ``cond_or_uncond`` 0 = positive,
  1 = negative (unconditional), 2 = baseline (a conditional prompt). The guider declares this through
  ``sampling.cond_chunks`` (only index 1 is unconditional), so e.g. InstantStyle gives the baseline the
  style image tokens and the negative the unconditional ones;
- at cfg 1 the negative is not evaluated, as stock ``sampling_function`` skips it there (guidance-distilled
  models such as Flux.1 dev sample at cfg 1): the call holds two predictions, [positive, baseline], and
  the indexes keep their meaning (0 and 2; no chunk has index 1);
- the positive's embedded guidance value (Flux.1 dev's ``guidance``) is given to a baseline that has
  none, so both are predicted at the same guidance;
- a ``pg`` window (``pg_start``..``pg_end`` as fractions of the schedule); outside it the baseline
  is not evaluated at all and the step is exactly stock CFG;
- guidance rescale (φ, as in CFG-rescale) applied to the combined prediction;
- the positive prompt's ControlNet is given to a baseline that has none, so structure guidance
  applies to all three terms and they stay in one batch; likewise its reference latents (the image an
  edit model such as Qwen-Image Edit reads).

Model hooks that assume plain CFG (``sampler_pre_cfg_function``: stock APG, LatentApplyOperationCFG,
TCFG, FreSca...) get exactly what stock ``CFGGuider`` hands them: ``conds`` [positive, negative],
``conds_out`` a new list [D_pos, D_neg], ``cond_scale`` cfg; the baseline is not shown to them. They
rewrite the CFG term only; the pg term uses the raw predictions. With (D_pos', D_neg') what the hooks
return, one step is

    D = D_neg' + cfg·(D_pos' − D_neg') + pg·(D_pos − D_base)

(the CFG part is the model's ``sampler_cfg_function`` instead, if it has one), then rescale toward
D_pos' and the ``sampler_post_cfg_function`` hooks (given D_pos', D_neg'), in ``cfg_function``'s order.
With pg = 0 (or outside the window) and rescale = 0 the step is stock ``sampling_function`` itself.
"""

from __future__ import annotations

import logging
import math

import comfy.samplers
import torch

from ..sampling import cond_chunks

log = logging.getLogger(__name__)

FORMULA = "ε = ε_neg + cfg·(ε_pos − ε_neg) + pg·(ε_pos − ε_base)"
# The pg the nodes start from (Prompt Guidance Guider, UniTune Edit): one value, so both guide alike.
DEFAULT_PG = 2.0
GUIDER_CONDS = ("positive", "negative", "baseline")
BASELINE_INDEX = 2  # cond_or_uncond value of the baseline chunks
UNCONDITIONAL = (1,)  # the negative; the baseline is a conditional prompt


def _from_positive(baseline: list, positive: list, key: str) -> list:
    """The baseline conditioning, given the positive's ``key`` entry where it has none (copies, never mutates)."""
    value = next((extras[key] for _, extras in positive if extras.get(key) is not None), None)
    if value is None:
        return baseline
    return [[tensor, extras if extras.get(key) is not None else {**extras, key: value}] for tensor, extras in baseline]


def with_positive_control(baseline: list, positive: list) -> list:
    """The baseline conditioning, given the positive's ControlNet where it has none (copies, never mutates)."""
    return _from_positive(baseline, positive, "control")


def with_positive_guidance(baseline: list, positive: list) -> list:
    """The baseline conditioning, given the positive's embedded guidance value where it has none.

    Guidance-distilled models (Flux.1 dev/Krea) read a ``guidance`` value from each conditioning, and one
    without it gets the model's default (3.5 for Flux.1). A baseline from another encode than the positive
    (say, no FluxGuidance node on it) would then be predicted at another guidance, and the pg term would
    measure that difference as well as the prompts'. A value the baseline sets itself is kept (logged when
    it differs). Copies, never mutates.
    """
    value = next((extras["guidance"] for _, extras in positive if extras.get("guidance") is not None), None)
    for _, extras in baseline:
        if value is not None and extras.get("guidance") is not None and extras["guidance"] != value:
            log.warning("Prompt Guidance: the baseline's guidance %s is not the positive's %s; keeping the "
                        "baseline's (the pg term then measures both differences)", extras["guidance"], value)
    return _from_positive(baseline, positive, "guidance")


def with_positive_reference(baseline: list, positive: list) -> list:
    """The baseline conditioning, given the positive's reference latents where it has none (copies, never mutates).

    Edit models (Qwen-Image Edit, Flux Kontext) read the image to edit from each conditioning's
    ``reference_latents`` (the ReferenceLatent / TextEncodeQwenImageEdit nodes set them). A baseline encoded
    without them would be predicted without the image, and the pg term would measure that as well as the prompts'.
    """
    return _from_positive(baseline, positive, "reference_latents")


def rescale_guidance(denoised: torch.Tensor, positive: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor,
                     phi: float) -> torch.Tensor:
    """CFG-rescale (Lin et al. 2023) of a combined prediction, done on v-prediction as stock RescaleCFG does.

    The guided prediction's per-sample standard deviation is matched to the positive prediction's and
    mixed back with weight ``phi``. All tensors are denoised predictions ``[B, C, H, W]``.
    """
    sigma = sigma.view(sigma.shape[:1] + (1,) * (x.ndim - 1))
    scale = (sigma ** 2 + 1.0) ** 0.5
    x_in = x / (sigma * sigma + 1.0)

    def to_v(d):
        return (x_in - d) * scale / sigma

    v_cfg, v_pos = to_v(denoised), to_v(positive)
    ratio = v_pos.std(dim=tuple(range(1, x.ndim)), keepdim=True) / v_cfg.std(dim=tuple(range(1, x.ndim)), keepdim=True)
    v_final = phi * (v_cfg * ratio) + (1.0 - phi) * v_cfg
    return x_in - v_final * sigma / scale


class PromptGuidanceGuider(comfy.samplers.CFGGuider):
    """A GUIDER for ``SamplerCustomAdvanced`` (and UniTune Edit) computing the formula above."""

    frozentune_unconditional_indexes = UNCONDITIONAL  # read by sampling.cond_chunks (cond_chunks.ATTRIBUTE)

    def __init__(self, model_patcher, cfg: float = 7.0, pg: float = 0.0, pg_start: float = 0.0,
                 pg_end: float = 1.0, rescale: float = 0.0):
        super().__init__(model_patcher)
        check_scales(cfg, pg, pg_start, pg_end, rescale)
        self.cfg, self.pg, self.pg_start, self.pg_end, self.rescale = cfg, pg, pg_start, pg_end, rescale

    def set_conds(self, positive: list, negative: list, baseline: list) -> None:
        baseline = with_positive_reference(with_positive_control(baseline, positive), positive)
        self.inner_set_conds({"positive": positive, "negative": negative,
                              "baseline": with_positive_guidance(baseline, positive)})

    def pg_at(self, sigma: float) -> float:
        """The prompt-guidance scale at this sigma: ``pg`` inside the window, else 0."""
        if self.pg == 0.0:
            return 0.0
        ms = self.model_patcher.get_model_object("model_sampling")
        high, low = ms.percent_to_sigma(self.pg_start), ms.percent_to_sigma(self.pg_end)
        return self.pg if low <= sigma <= high else 0.0

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
        positive, negative, baseline = (self.conds.get(k) for k in GUIDER_CONDS)
        model_options = cond_chunks.declare(model_options, UNCONDITIONAL)
        pg = self.pg_at(float(timestep.reshape(-1)[0]))
        if pg == 0.0 and self.rescale == 0.0:
            # Exactly what the stock CFGGuider does (and the baseline is never evaluated).
            return comfy.samplers.sampling_function(self.inner_model, x, timestep, negative, positive, self.cfg,
                                                    model_options=model_options, seed=seed)
        skip_negative = math.isclose(self.cfg, 1.0) and not model_options.get("disable_cfg1_optimization", False)
        conds = [positive, None if skip_negative else negative]
        if pg != 0.0:
            conds.append(baseline)
        if "sampler_calc_cond_batch_function" in model_options:
            args = {"conds": conds, "input": x, "sigma": timestep, "model": self.inner_model,
                    "model_options": model_options}
            out = model_options["sampler_calc_cond_batch_function"](args)
        else:
            out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        hooked = list(out[:2])  # a new list: hooks such as LatentApplyOperationCFG assign into it
        for fn in model_options.get("sampler_pre_cfg_function", []):
            hooked = fn({"conds": conds[:2], "conds_out": hooked, "cond_scale": self.cfg, "timestep": timestep,
                         "input": x, "sigma": timestep, "model": self.inner_model, "model_options": model_options})
        denoised = self._cfg(hooked[0], hooked[1], x, timestep, model_options, positive, conds[1])
        if pg != 0.0:
            denoised = denoised + (out[0] - out[BASELINE_INDEX]) * pg
        return self._finish(denoised, hooked[0], hooked[1], x, timestep, model_options, positive, conds[1])

    def _cfg(self, pos, neg, x, timestep, model_options, positive, negative):
        """The CFG term, as ``cfg_function`` computes it (the model's ``sampler_cfg_function`` if it has one)."""
        if "sampler_cfg_function" in model_options:
            args = {"cond": x - pos, "uncond": x - neg, "cond_scale": self.cfg, "timestep": timestep, "input": x,
                    "sigma": timestep, "cond_denoised": pos, "uncond_denoised": neg, "model": self.inner_model,
                    "model_options": model_options, "input_cond": positive, "input_uncond": negative}
            return x - model_options["sampler_cfg_function"](args)
        return neg + (pos - neg) * self.cfg

    def _finish(self, denoised, pos, neg, x, timestep, model_options, positive, negative):
        """Rescale, then the model's post-cfg hooks (as ``cfg_function`` orders them)."""
        if self.rescale > 0.0:
            denoised = rescale_guidance(denoised, pos, x, timestep, self.rescale)
        for fn in model_options.get("sampler_post_cfg_function", []):
            denoised = fn({"denoised": denoised, "cond": positive, "uncond": negative, "cond_scale": self.cfg,
                           "model": self.inner_model, "uncond_denoised": neg, "cond_denoised": pos, "sigma": timestep,
                           "model_options": model_options, "input": x})
        return denoised


def check_scales(cfg: float, pg: float, pg_start: float, pg_end: float, rescale: float) -> None:
    for name, value in (("cfg", cfg), ("pg", pg), ("pg_start", pg_start), ("pg_end", pg_end), ("rescale", rescale)):
        if not math.isfinite(value):
            raise ValueError(f"{name}={value} is not a number: give a finite value.")
    if not 0.0 <= pg_start <= pg_end <= 1.0:
        raise ValueError(f"pg_start={pg_start} and pg_end={pg_end} must satisfy 0 <= pg_start <= pg_end <= 1 "
                         "(fractions of the schedule, 0 = first step).")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"rescale={rescale} must be between 0 (off) and 1; 0.7 is the usual CFG-rescale value.")
