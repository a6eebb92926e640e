"""The step loop every trainer runs: progress (which is also Cancel), the non-finite-loss check, the curve.

``on_step(step, total, loss)`` is the trainer's hook into ComfyUI: a node passes one that updates
its ``comfy.utils.ProgressBar``, which raises when the user presses Cancel, so a run stops within
one step and its ``finally`` blocks clean up.
"""

from __future__ import annotations

import math
from collections.abc import Callable

StepHook = Callable[[int, int, float], None]


def check_finite(value: float, step: int, total: int, what: str, learning_rate: float, hint: str = "") -> None:
    """Stop with an error that names the step and the fix when the loss is NaN or infinite."""
    if not math.isfinite(value):
        raise FloatingPointError(
            f"{what}: the loss became {value} at step {step} of {total}: lower the learning rate (now "
            f"{learning_rate:g}), e.g. to {learning_rate / 10:g}{hint}.")


def run(total: int, step_fn: Callable[[int], float], *, what: str, learning_rate: float,
        on_step: StepHook | None = None, start: int = 0, losses: list[float] | None = None,
        after_step: Callable[[int, list[float]], None] | None = None, hint: str = "") -> list[float]:
    """Run ``step_fn(step)`` (0-based; it returns the step's loss) for steps ``start..total-1``.

    Returns the loss curve (``losses`` extended). ``after_step(step, losses)`` runs after the check
    and before ``on_step`` (checkpoint saves go there, so a Cancel never interrupts a save).
    """
    losses = list(losses or [])
    for step in range(start, total):
        value = float(step_fn(step))
        check_finite(value, step + 1, total, what, learning_rate, hint)
        losses.append(value)
        if after_step is not None:
            after_step(step + 1, losses)
        if on_step is not None:
            on_step(step + 1, total, value)
    return losses
