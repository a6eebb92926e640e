"""The trainer skeleton UniTune, textual inversion and ControlNet-Zero share (kohya sd-scripts' shape: one
base class, each trainer overrides a few hooks), so the parts that must be alike in all three are written once.

What the base does: the compute dtype (``training.precision``) and its fp16 GradScaler, the seeded draw
generator, the optimizer over fp32 trainables (optionally stepped per parameter during backward,
``optimizers.StepInBackward``), one step (loss -> finite check before any update -> backward -> step),
the loop with the node's ``on_step`` hook and the preview after it (``training.loop``, ``training.preview``),
and the release of optimizer state and gradients in a ``finally`` (also when Cancel raises in ``on_step``).

What a trainer gives (hooks): ``batch_loss(step)`` (draw a batch and run the forward), ``preview_conds(noise)``
or ``render(preview)`` for previews, optionally ``after_update()`` (e.g. norm control), ``after_step(done,
losses)`` (checkpoint saves), ``checkpointing()``, ``preview_modules``; a trainer whose step is unusual
(gradient accumulation, DDP) overrides ``step`` and keeps ``backward``/``update``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from functools import partial

import torch

from . import loop, objective, optimizers, precision
from . import preview as previews


def frozen_model(base_model, dtype: torch.dtype):
    """A frozen twin of a ``comfy.model_base.BaseModel`` (weights aliased, cast per op) that computes in ``dtype``."""
    twin = precision.frozen_twin(base_model)
    precision.cast_on_use(twin)
    precision.set_compute_dtype(twin, dtype)
    return twin


def draw(pool: torch.Tensor, n: int, generator: torch.Generator, model_sampling,
         sampling: str = objective.UNIFORM) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x0, noise, sigma)`` for ``n`` rows drawn from ``pool`` (clean latents), in this order from ``generator``."""
    pick = torch.randint(0, pool.shape[0], (n,), generator=generator)
    x0 = pool[pick.to(pool.device)]
    noise = torch.randn(x0.shape, generator=generator).to(pool.device)
    sigma = objective.draw_sigmas(model_sampling, n, generator, sampling).to(pool.device)
    return x0, noise, sigma


def require_fp32(params: Iterable[torch.Tensor], subject: str = "the weights to train",
                 fix: str = "train an fp32 copy, the master weights must be fp32.") -> None:
    """Refuse trainables that are not fp32 (the optimizer updates fp32 master weights only)."""
    wrong = sorted({str(p.dtype) for p in params} - {"torch.float32"})
    if wrong:
        raise ValueError(f"{subject} holds {', '.join(wrong)} weights: {fix}")


def make_optimizer(name: str, params: list[torch.Tensor], learning_rate: float, weight_decay: float = 1e-2,
                   in_backward: bool = False):
    """The optimizer ``name`` over ``params``; ``in_backward``: stepped per parameter during backward, so no
    whole-model gradient buffer exists (``optimizers.StepInBackward``)."""
    if in_backward:
        return optimizers.StepInBackward(name, params, learning_rate, weight_decay)
    return optimizers.make(name, params, learning_rate, weight_decay)


class Trainer:
    """One training run's compute dtype, draw generator, optimizer and step loop; subclasses add the model.

    Call ``build_optimizer`` once the trainables exist, then ``fit``. Attributes a subclass may read:
    ``device``, ``dtype`` (compute), ``generator``, ``scaler``, ``optimizer``, ``params``, ``in_backward``.
    """

    what = "Training"  # names the trainer in the non-finite-loss error
    hint = ""  # appended to that error's advice
    preview_modules: tuple[torch.nn.Module, ...] = ()  # put in eval mode while a preview draws

    def __init__(self, device: torch.device, precision_setting: str, *, steps: int, learning_rate: float,
                 seed: int) -> None:
        self.device = device
        self.dtype = precision.compute_dtype(precision_setting, device)
        self.steps, self.learning_rate = steps, learning_rate
        self.generator = torch.Generator().manual_seed(seed)
        self.scaler = precision.grad_scaler(device, self.dtype)
        self.params: list[torch.Tensor] = []
        self.optimizer = None
        self.in_backward = False
        self.max_grad_norm = 0.0

    # --- hooks
    def batch_loss(self, step: int) -> torch.Tensor:
        """The loss of optimizer step ``step``'s drawn batch (0-based)."""
        raise NotImplementedError

    def after_update(self) -> None:
        """Runs after every optimizer step (a skipped fp16 step too)."""

    def after_step(self, done: int, losses: list[float]) -> None:
        """Runs after step ``done`` (1-based) passed the finite check, before ``on_step`` (checkpoint saves go here)."""

    def checkpointing(self):
        """The gradient checkpointing context the loop runs in (none by default)."""
        return contextlib.nullcontext()

    def preview_conds(self, noise: torch.Tensor) -> dict:
        """The twin's extra inputs for a preview drawn from ``noise`` (for the default ``render``)."""
        raise NotImplementedError

    def render(self, preview: previews.Preview) -> torch.Tensor:
        """The preview latent: Euler on ``self.twin`` from the preview's fixed noise with ``preview_conds``.

        The noise keeps the training latents' (``self.x0``) aspect at the preview's size; the forward is the
        training one (current weights, training autocast).
        """
        h, w = preview.latent_size(self.x0.shape[-2] * 8, self.x0.shape[-1] * 8)
        # the latents' own layout at the preview's size ([1, C, h, w]; Qwen-Image's Wan-2.1 latents [1, C, 1, h, w])
        noise = previews.fixed_noise((1, *self.x0.shape[1:-2], h, w), preview.seed, self.device, torch.float32)
        conds = self.preview_conds(noise)
        ms = self.twin.model_sampling

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            with precision.autocast(self.device, self.dtype):
                return self.twin.apply_model(x, sigma, **conds).float()

        return previews.euler(denoise, noise, previews.sigmas(ms, preview.steps), model_sampling=ms)

    def preview_render(self, preview: previews.Preview) -> previews.Render:
        """What ``Preview.maybe`` draws (built once, before the loop)."""
        return partial(self.render, preview)

    # --- the shared parts
    def use_optimizer(self, optimizer, params: list[torch.Tensor], subject: str = "the weights to train",
                      fix: str = "train an fp32 copy, the master weights must be fp32.") -> None:
        """Train ``params`` (fp32) with ``optimizer`` (from ``make_optimizer``).

        Stepping in backward skips the GradScaler, so it is refused for fp16 compute (the scaler's global
        inf check must see every gradient before any step).
        """
        require_fp32(params, subject, fix)
        self._adopt(optimizer, params)

    def build_optimizer(self, name: str, params: list[torch.Tensor], weight_decay: float = 1e-2, *,
                        in_backward: bool = False, **refusal: str) -> None:
        """``use_optimizer`` with the optimizer ``name`` (``make_optimizer``); the fp32 check runs before it is
        built, since an in-backward optimizer hooks the parameters as it is made."""
        params = list(params)
        require_fp32(params, **refusal)
        self._adopt(make_optimizer(name, params, self.learning_rate, weight_decay, in_backward), params)

    def _adopt(self, optimizer, params: list[torch.Tensor]) -> None:
        self.params, self.optimizer = list(params), optimizer
        self.in_backward = isinstance(optimizer, optimizers.StepInBackward)
        if self.in_backward and self.dtype == torch.float16:
            raise ValueError("stepping in backward cannot run with fp16 loss scaling: compute in bf16 or fp32.")

    def zero_grad(self) -> None:
        if not self.in_backward:  # StepInBackward drops each gradient as it steps
            self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` (scaled for fp16); in-backward optimizers step here."""
        if self.in_backward:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()

    def update(self) -> None:
        """The optimizer step from the gradients (unscaled and clipped to ``max_grad_norm`` when set), then ``after_update``."""
        if not self.in_backward:
            if self.max_grad_norm > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.after_update()

    def step(self, i: int) -> float:
        """Optimizer step ``i`` (0-based); returns its loss. A non-finite loss stops before the update."""
        self.zero_grad()
        loss = self.batch_loss(i)
        value = loss.item()
        loop.check_finite(value, i + 1, self.steps, self.what, self.learning_rate, self.hint)
        self.backward(loss)
        self.update()
        return value

    def release(self) -> None:
        """Free the optimizer state and the gradients (idempotent)."""
        if isinstance(self.optimizer, optimizers.StepInBackward):
            self.optimizer.close()
        self.optimizer = None
        for p in self.params:
            p.grad = None

    def fit(self, on_step: loop.StepHook | None = None, preview: previews.Preview | None = None, *,
            start: int = 0, losses: list[float] | None = None) -> list[float]:
        """Steps ``start..steps-1``; ``on_step`` (the node's progress bar, which raises on Cancel) then the
        preview when due after each. Returns the loss curve. The optimizer state is released in any case."""
        hook: Callable | None = on_step
        if preview is not None and preview.every:
            hook = previews.after_step(on_step, preview, self.preview_render(preview), modules=self.preview_modules)
        try:
            with self.checkpointing():
                return loop.run(self.steps, self.step, what=self.what, learning_rate=self.learning_rate,
                                on_step=hook, start=start, losses=losses, after_step=self.after_step,
                                hint=self.hint)
        finally:
            self.release()
