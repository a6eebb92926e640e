"""Input checks shared by the nodes, run where a node starts, before any work."""

from __future__ import annotations

import math


def finite(**values: float | None) -> None:
    """Refuse NaN and infinite numbers (ComfyUI's min/max check lets NaN through), naming the input."""
    for name, value in values.items():
        if value is None:
            continue
        if not math.isfinite(float(value)):
            raise ValueError(f"{name} is {value!r}: give a finite number (NaN and infinity would make every "
                             "result black or break training).")
