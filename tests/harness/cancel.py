"""Press Cancel at a given progress step, as ComfyUI's own progress hook does, for the node tier."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def cancel_at(step: int, seen: list[int] | None = None) -> Iterator[None]:
    """Interrupt when a ProgressBar reaches ``step``; records every reported step in ``seen``."""
    import comfy.model_management as mm
    import comfy.utils

    def hook(value, total, preview, node_id=None):
        if seen is not None:
            seen.append(value)
        if value == step:
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()  # what ComfyUI's own hook does

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        yield
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
