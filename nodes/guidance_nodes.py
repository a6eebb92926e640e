"""Prompt Guidance Guider node: a thin V3 wrapper over ``guidance.guider``."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..guidance.guider import FORMULA
from ..guidance.guider import PromptGuidanceGuider as Guider
from . import checks
from .sampling_inputs import guidance_inputs

log = logging.getLogger(__name__)

class PromptGuidanceGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrozenTunePromptGuidanceGuider",
            display_name="Prompt Guidance Guider",
            category="FrozenTune/Sampling",
            description=(
                f"CFG plus Prompt Guidance: {FORMULA}. The baseline is another prompt, e.g. the bare UniTune "
                "token or a caption of the original, so pg pushes along the direction 'baseline → edit'. "
                "All three prompts run in one batched model call per step (attention patches see "
                "cond_or_uncond 0 = positive, 1 = negative, 2 = baseline, and the guider declares only 1 "
                "unconditional, so InstantStyle gives the baseline the style tokens); at cfg 1 (Flux.1 dev and "
                "schnell) the negative is skipped as in stock CFG, so the call holds two predictions, positive "
                "and baseline, and a baseline without a Flux guidance value gets the positive's. Outside the "
                "pg_start..pg_end window the baseline is skipped and the step is exactly stock CFG. Model "
                "hooks written for plain CFG (APG, LatentApplyOperationCFG: sampler_pre_cfg_function) get the "
                "[positive, negative] pair stock CFG gives them and rewrite the CFG term; the pg term uses the "
                "raw predictions. A baseline without a ControlNet gets the positive's. Connect to "
                "SamplerCustomAdvanced."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to sample, e.g. the UniTune-tuned MODEL."),
                io.Conditioning.Input("positive", tooltip="The edit prompt, e.g. 'beikkpic a minion'."),
                io.Conditioning.Input("baseline", tooltip="The prompt to guide away from, e.g. the bare token "
                                      "'beikkpic' or a caption of the original image."),
                io.Conditioning.Input("negative", tooltip="The unconditional / negative prompt (often empty)."),
                *guidance_inputs(),
                io.Float.Input("pg_start", default=0.0, min=0.0, max=1.0, step=0.01, tooltip="Where in the "
                               "schedule the pg term starts acting (0 = first step)."),
                io.Float.Input("pg_end", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="Where in the "
                               "schedule the pg term stops acting (1 = last step). E.g. 0..0.5 = early only."),
                io.Float.Input("rescale", default=0.0, min=0.0, max=1.0, step=0.01, tooltip="Guidance rescale φ "
                               "(as CFG-rescale) on the combined prediction; tames high cfg/pg. 0 = off, 0.7 usual."),
            ],
            outputs=[io.Guider.Output(tooltip="Connect to SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, positive, baseline, negative, cfg, pg, pg_start, pg_end, rescale) -> io.NodeOutput:
        checks.finite(cfg=cfg, pg=pg, pg_start=pg_start, pg_end=pg_end, rescale=rescale)
        guider = Guider(model, cfg=cfg, pg=pg, pg_start=pg_start, pg_end=pg_end, rescale=rescale)
        guider.set_conds(positive, negative, baseline)
        return io.NodeOutput(guider)


NODES = [PromptGuidanceGuider]
