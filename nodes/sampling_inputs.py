"""The cfg and pg inputs the Prompt Guidance Guider and UniTune Edit share (one definition, one tooltip)."""

from __future__ import annotations

from comfy_api.latest import io

from ..guidance.guider import DEFAULT_PG


def guidance_inputs() -> list:
    """cfg and pg; pg starts at DEFAULT_PG in every node, so the guider and UniTune Edit guide alike."""
    return [
        io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="Classifier-free guidance scale: how strongly the positive prompt is followed, "
                       "away from the negative. Distilled models (Flux.1 dev and schnell) sample at 1, where the "
                       "negative is not evaluated."),
        io.Float.Input("pg", default=DEFAULT_PG, min=-20.0, max=100.0, step=0.1, round=0.01,
                       tooltip="Prompt-guidance scale: how strongly the result moves from the baseline prompt "
                       "toward the positive one. 0 = plain CFG (the baseline is then never evaluated)."),
    ]
