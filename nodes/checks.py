"""Input checks shared by the nodes, run where a node starts, before any work."""

from __future__ import annotations

import math
from collections.abc import Sequence


def finite(**values: float | None) -> None:
    """Refuse NaN and infinite numbers (ComfyUI's min/max check lets NaN through), naming the input."""
    for name, value in values.items():
        if value is None:
            continue
        if not math.isfinite(float(value)):
            raise ValueError(f"{name} is {value!r}: give a finite number (NaN and infinity would make every "
                             "result black or break training).")


def choice(name: str, value: str, options: Sequence[str]) -> None:
    """Refuse a value outside a dropdown's list: ComfyUI 0.3.75 does not check V3 combo values when queued."""
    if value not in options:
        shown = ", ".join(map(repr, list(options)[:12])) + (", ..." if len(options) > 12 else "")
        raise ValueError(f"{name} {value!r} is not one of its choices ({shown}): pick one from the list.")


def vae(value) -> None:
    """Refuse a missing or empty VAE (a checkpoint saved without one) before any encoding."""
    if value is None or getattr(value, "first_stage_model", None) is None:
        raise ValueError("the VAE input is missing or empty: connect the checkpoint's VAE.")
