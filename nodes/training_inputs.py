"""What the trainer nodes (UniTune Fine-Tune, Textual Inversion Train, ControlNet-Zero Train) share: the
precision input's definition and the progress bar with its previews, one definition each."""

from __future__ import annotations

import logging
from collections.abc import Callable

import comfy.utils
import torch
from comfy_api.latest import io

from ..training import precision as training_precision
from ..training import preview as previews

log = logging.getLogger(__name__)

PREVIEW_SIZE = 256  # pixels of a training preview's longer side, at most
# The second half of the precision tooltip, the same in every trainer node whose input reads "auto" this way.
AUTO_PRECISION = "auto: bf16 on a CUDA GPU that supports it, else fp16 with loss scaling; fp32 on the CPU."


def precision_tooltip(dtypes: str) -> str:
    """The precision tooltip; ``dtypes`` says what trains in fp32 and what keeps its load dtype."""
    return f"Compute dtype of training (autocast); {dtypes}. {AUTO_PRECISION}"


def precision_input(name: str = "precision", *, tooltip: str, optional: bool = True) -> io.Combo.Input:
    """The compute-precision dropdown (``training.precision.PRECISIONS``, default auto) under the node's own id."""
    return io.Combo.Input(name, options=list(training_precision.PRECISIONS), default="auto", optional=optional,
                          tooltip=tooltip)


def preview_size(pixels: torch.Tensor) -> int:
    """The previews' longer side for training images ``pixels`` (an IMAGE batch): theirs rounded up to 64 px,
    at most ``PREVIEW_SIZE``."""
    longest = max(int(v) for v in pixels.shape[1:3])
    return min(PREVIEW_SIZE, max(64, -(-longest // 64) * 64))


class Progress:
    """A trainer node's ProgressBar (``total`` steps over all phases) and the previews it shows and gathers.

    ``on_step`` hooks update the bar (which raises on Cancel, so a run stops within one step) and log
    now and then; ``preview`` is the ``training.preview.Preview`` a trainer draws into the same bar.
    """

    def __init__(self, total: int, preview_every: int, latent_format, preview_size: int) -> None:
        self.total = total
        self.pbar = comfy.utils.ProgressBar(total)
        self.shown = previews.Shown(self.pbar, total)
        self.preview_every, self.latent_format, self.preview_size = preview_every, latent_format, preview_size

    def preview(self, offset: int = 0) -> previews.Preview:
        """Previews of a phase that starts after ``offset`` steps of the bar."""
        show = self.shown if not offset else (lambda step, image: self.shown(offset + step, image))
        return previews.Preview(every=self.preview_every, show=show, latent_format=self.latent_format,
                                size=self.preview_size)

    def on_step(self, what: str, log_every: int, offset: int = 0) -> Callable[[int, int, float], None]:
        """The step hook of a phase that starts after ``offset`` steps: the bar, and a log line every ``log_every``."""
        def on_step(step: int, total: int, loss: float) -> None:
            self.pbar.update_absolute(offset + step, self.total)  # also raises on Cancel
            if step == 1 or step % log_every == 0 or step == total:
                log.info("%s %d/%d loss %.5f", what, step, total, loss)

        return on_step

    def grid(self) -> torch.Tensor:
        """The previews drawn, side by side (64x64 black when none)."""
        return self.shown.grid()
