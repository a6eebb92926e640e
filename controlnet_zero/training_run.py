"""The ControlNet-Zero training loop, shared by the ComfyUI node and the command line / torchrun.

Each step mirrors how ComfyUI runs a ControlNet at sampling time (``comfy.controlnet.ControlNet.
get_control``): the ControlNet sees ``calculate_input(sigma, x_t)``, the discrete timestep, the text
context (and ``y``: SDXL, SD3, Flux; Flux.1 dev's ``guidance``) and the hint (RGB in [0, 1], or SD3's
latents); its outputs go into the frozen diffusion model's ``control`` argument. What runs the control
module and shapes its outputs is the family's layout (``layouts``: ldm, flux_xlabs, sd3_diffusers). The
loss is ``training.objective``'s: the MSE of the model's raw output against the output that reproduces
the clean latent, in the base model's own parameterization (eps, v, or the flow target), timesteps uniform.

Precision (``training.precision``): only the ControlNet trains, as fp32 master weights. The base UNet
is never written or copied: it runs through a frozen twin whose weights alias the base's memory in its
load dtype (fp32, fp16, bf16 or fp8) and are cast per op to the compute dtype. The UNet input, the
text conditioning and the control residuals are handed over in the compute dtype (fp32, or the
autocast dtype), never in the base's storage dtype, so no gradient passes through an fp16 hop that
was not asked for. Gradient checkpointing (``training.checkpointing``) covers both networks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import families
from ..families import fingerprint
from ..training import checkpointing, loop, objective, optimizers, precision, trainer
from ..training import preview as previews
from . import layouts, resume_state
from .cache import TrainingData
from .distributed import Dist

log = logging.getLogger(__name__)

PRECISIONS = precision.PRECISIONS
# The optimizers offered for a ControlNet (AdamW as in the paper; its 8-bit-state variant where the core has it).
OPTIMIZERS = tuple(name for name in ("adamw", "adamw8bit") if name in optimizers.OPTIMIZERS)
FINGERPRINT_KEY = resume_state.BASE

LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, dict, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 1000
    batch_size: int = 4
    gradient_accumulation: int = 1
    learning_rate: float = 1e-5
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    prompt_dropout: float = 0.5
    resolution: int = 512
    gradient_checkpointing: bool = True
    mixed_precision: str = "auto"
    optimizer: str = "adamw"
    seed: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.gradient_accumulation < 1:
            raise ValueError(f"steps={self.steps}, batch_size={self.batch_size} and gradient_accumulation="
                             f"{self.gradient_accumulation} must all be at least 1.")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate={self.learning_rate} must be a positive number such as 1e-5.")
        if not 0.0 <= self.prompt_dropout <= 1.0:
            raise ValueError(f"prompt_dropout={self.prompt_dropout} must be between 0 and 1 (the paper: 0.5).")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision {self.mixed_precision!r} is unknown: use one of {', '.join(PRECISIONS)}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is unknown: use one of {', '.join(OPTIMIZERS)}.")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every={self.checkpoint_every} must be 0 (off) or a number of steps.")
        from .dataset import check_resolution

        check_resolution(self.resolution)

    def metadata(self) -> dict[str, str]:
        return {f"controlnet_zero.{k}": str(v) for k, v in asdict(self).items()}


GUIDANCE_KEY = "controlnet_zero.flux_guidance"


def training_guidance(base_model, value: float) -> float | None:
    """The guidance a guidance-embedding base (Flux.1 dev) trains at: ``value``; None for the others (no such input)."""
    return float(value) if families.family_of(base_model).guidance_embed else None


def guidance_metadata(guidance: float | None) -> dict[str, str]:
    """The training guidance in the metadata (part of a run's identity, ``resume_state.IDENTITY``); none without."""
    return {} if guidance is None else {GUIDANCE_KEY: f"{guidance:g}"}


@dataclass
class TrainResult:
    control_model: torch.nn.Module
    losses: list[float]
    step: int
    metadata: dict[str, str] = field(default_factory=dict)


Forward = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]


@contextlib.contextmanager
def controlled_forward(base_model, control_model: torch.nn.Module, device: torch.device, compute: torch.dtype,
                       gradient_checkpointing: bool = False) -> Iterator[Forward]:
    """``forward(model, x_t, sigma, hint, conds)``: the controlled frozen UNet's raw output, while the block runs.

    As ComfyUI runs a ControlNet at sampling time; ``model`` is ``control_model`` or its DDP wrapper.
    The frozen twin of the base UNet (aliased weights, cast per op) and the checkpointing of both
    networks live as long as the block; both are undone after.
    """
    layout = layouts.for_module(control_model)
    unet = precision.frozen_twin(base_model.diffusion_model)
    precision.cast_on_use(unet)
    ms = base_model.model_sampling

    def forward(model, x_t, sigma, hint, conds) -> torch.Tensor:
        x_in = ms.calculate_input(sigma, x_t)
        timesteps = ms.timestep(sigma).float()
        # the base's other inputs by name: SDXL/SD3 y, Flux y and guidance (the training guidance, cached)
        extra = {k: v.to(compute) for k, v in conds.items() if k != "c_crossattn" and isinstance(v, torch.Tensor)}
        with precision.autocast(device, compute):
            control = layout.control(model, x_in, hint, timesteps, conds, compute)
            return unet(x_in.to(compute), timesteps, context=conds["c_crossattn"].to(compute), control=control,
                        transformer_options={}, **extra)

    with layouts.training(layout, control_model, unet), \
            checkpointing.gradient_checkpointing([control_model, unet], gradient_checkpointing):
        yield forward


def _loss(forward: Forward, ms) -> LossFn:
    def loss(model, x0, hint, conds, sigma, noise) -> torch.Tensor:
        x_t = objective.noised(ms, sigma, noise, x0)
        return objective.output_loss(ms, sigma, x_t, x0, forward(model, x_t, sigma, hint, conds))

    return loss


@contextlib.contextmanager
def controlled_loss(base_model, control_model: torch.nn.Module, device: torch.device, compute: torch.dtype,
                    gradient_checkpointing: bool = False) -> Iterator[LossFn]:
    """``loss(model, x0, hint, conds, sigma, noise)`` of the controlled frozen UNet, while the block runs.

    The MSE of the UNet's raw output against the output that reproduces ``x0``, in the base model's
    own parameterization (``training.objective``), through ``controlled_forward``.
    """
    with controlled_forward(base_model, control_model, device, compute, gradient_checkpointing) as forward:
        yield _loss(forward, base_model.model_sampling)


def preview_render(forward: Forward, control_model: torch.nn.Module, data: TrainingData, ms,
                   pv: previews.Preview, device: torch.device) -> previews.Render:
    """The preview: the first dataset hint (and its caption) -> image, by Euler from the preview's fixed noise.

    Drawn at the preview's size (the hint is resized to it) through the training forward with the
    ControlNet's current weights; ``Preview.maybe`` runs it under no_grad with the RNG forked.
    """
    _, hint, conds = data.batch(torch.tensor([0]), torch.zeros(1, dtype=torch.bool), device)
    lead = tuple(data.images[0]["latent"].shape[:-2])  # (C,), or (C, T) for Qwen-Image's 5-D latents
    scale = 8 if data.images[0]["hint"].dtype == torch.uint8 else 1  # pixel hints, or latent ones (SD3, Qwen-Image)
    h, w = pv.latent_size(hint.shape[-2] * 8 // scale, hint.shape[-1] * 8 // scale)
    if (h * scale, w * scale) != tuple(hint.shape[-2:]):  # 5-D hints resized as a batch of 4-D ones
        hint = torch.nn.functional.interpolate(hint.flatten(0, hint.ndim - 4), size=(h * scale, w * scale),
                                               mode="bilinear", antialias=True).view(*hint.shape[:-2], h * scale,
                                                                                     w * scale)
    noise = previews.fixed_noise((1, *lead, h, w), pv.seed, device, torch.float32)
    sigmas = previews.sigmas(ms, pv.steps)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out = forward(control_model, x, sigma, hint, conds)
        return ms.calculate_denoised(sigma, out.float(), x)

    return lambda: previews.euler(denoise, noise, sigmas, model_sampling=ms)


class _Run(trainer.Trainer):
    """ControlNet-Zero on the trainer skeleton: gradient accumulation over micro-batches, each rank's slice of
    the global batch (DDP), gradient clipping, checkpoint saves after a step; the loss check after the ranks'
    mean (a rank must not stop alone inside DDP's all-reduce)."""

    what = "ControlNet-Zero"
    hint = ", or set mixed_precision to fp32"

    def __init__(self, base_model, control_model: torch.nn.Module, model: torch.nn.Module, data: TrainingData,
                 settings: TrainSettings, device: torch.device, dist: Dist, run, metadata: dict[str, str]):
        super().__init__(device, settings.mixed_precision, steps=settings.steps,
                         learning_rate=settings.learning_rate, seed=settings.seed)
        self.base_model, self.control_model, self.model, self.data = base_model, control_model, model, data
        self.settings, self.dist, self.run, self.metadata = settings, dist, run, metadata
        self.max_grad_norm = settings.max_grad_norm
        self.preview_modules = (control_model,)
        self.forward: Forward | None = None  # set inside ``controlled_forward``
        self.build_optimizer(settings.optimizer, list(control_model.parameters()), settings.weight_decay,
                             subject="the ControlNet to train",
                             fix="train an fp32 copy (network.trainable_copy), the master weights must be fp32.")
        self.latent_shape = tuple(data.images[0]["latent"].shape)
        self.global_batch = settings.batch_size * dist.world
        self.mine = slice(dist.rank * settings.batch_size, (dist.rank + 1) * settings.batch_size)

    def step(self, _: int) -> float:
        ms, gen, accum, n = self.base_model.model_sampling, self.generator, self.settings.gradient_accumulation, \
            self.global_batch
        loss_fn = _loss(self.forward, ms)
        self.zero_grad()
        total = 0.0
        for micro in range(accum):
            # Every rank draws the whole global batch (same seed) and keeps its slice.
            rows = torch.randint(0, len(self.data), (n,), generator=gen)[self.mine]
            dropped = (torch.rand(n, generator=gen) < self.settings.prompt_dropout)[self.mine]
            t = torch.randint(0, len(ms.sigmas), (n,), generator=gen)[self.mine]
            noise = torch.randn((n, *self.latent_shape), generator=gen)[self.mine].to(self.device)
            x0, hint, conds = self.data.batch(rows, dropped, self.device)
            last = micro == accum - 1
            sync = self.model.no_sync() if self.dist.enabled and not last else contextlib.nullcontext()
            with sync:
                loss = loss_fn(self.model, x0, hint, conds, ms.sigmas[t].to(self.device), noise)
                self.backward(loss / accum)
            total += loss.item() / accum
        self.update()
        return self.dist.mean(total)

    def preview_render(self, preview: previews.Preview) -> previews.Render:
        return preview_render(self.forward, self.control_model, self.data, self.base_model.model_sampling, preview,
                              self.device)

    def after_step(self, done: int, losses: list[float]) -> None:
        every = self.settings.checkpoint_every
        if self.run.folder is not None and every and done % every == 0:
            if self.dist.is_main:
                resume_state.save(self.run.folder, done, self.control_model, self.optimizer, self.generator, losses,
                                  self.metadata, keep=self.settings.keep_checkpoints, scaler=self.scaler)
            self.dist.barrier()


def train(base_model, control_model: torch.nn.Module, data: TrainingData, settings: TrainSettings,
          device: torch.device, *, checkpoint_root: Path | None = None, resume: bool | Path = False,
          dist: Dist | None = None, metadata: dict[str, str] | None = None,
          on_step: loop.StepHook | None = None, run_folders: bool = False,
          preview: previews.Preview | None = None) -> TrainResult:
    """Train ``control_model`` (a trainable fp32 control module of the base's layout on ``device``) around ``base_model``.

    ``base_model`` is a loaded ``comfy.model_base.BaseModel`` on ``device``; it is only read.
    ``resume``: True = the newest checkpoint of a matching run under ``checkpoint_root`` if any, or a
    checkpoint folder; a run that does not match is refused (``resume_state.plan``). ``run_folders``:
    ``checkpoint_root`` is a run name's folder and every new run gets its own ``run_NNN/`` in it (the
    node and the CLI); otherwise the checkpoints go to ``checkpoint_root`` itself.
    ``on_step(step, total, loss)`` runs after every optimizer step (ComfyUI's ProgressBar there makes
    Cancel work; the last checkpoint on disk stays as it was). ``preview`` (``training.preview``) draws
    the first dataset hint -> image after ``on_step`` when due, on rank 0 only; it never changes the
    trained weights (no_grad, its own noise, the RNG forked).
    """
    settings.check()
    dist = dist or Dist()
    layout = layouts.check_pair(control_model, base_model)
    metadata = dict(metadata or {})
    metadata.update(settings.metadata())
    metadata["controlnet_zero.dataset_size"] = str(len(data))
    metadata["controlnet_zero.world_size"] = str(dist.world)
    metadata[FINGERPRINT_KEY] = fingerprint.fingerprint(base_model.diffusion_model)
    if data.fingerprint:
        metadata[resume_state.DATASET] = data.fingerprint
    run = _plan(checkpoint_root, metadata, resume, base_model, dist, run_folders, bool(settings.checkpoint_every))
    metadata[resume_state.RUN_ID] = run.run_id
    control_model.to(device).train().requires_grad_(True)
    model = control_model
    if dist.enabled:
        ids = [device.index] if device.type == "cuda" else None
        # a layout whose module has weights the loss never reaches (Flux: the last double block's text stream)
        # says so; DDP would otherwise wait for their gradients forever
        model = torch.nn.parallel.DistributedDataParallel(
            control_model, device_ids=ids, find_unused_parameters=getattr(layout, "UNUSED_PARAMETERS", False))
    fit = _Run(base_model, control_model, model, data, settings, device, dist, run, metadata)
    step, losses = 0, []
    if run.resume_from is not None:
        done = resume_state.load(run.resume_from, control_model, fit.optimizer, fit.generator, fit.scaler,
                                 to_module=getattr(layout, "module_tensors", None))
        step, losses = done.step, done.losses
        log.info("ControlNet-Zero: resumed from %s at step %d (run %s)", run.resume_from, step, run.run_id)

    with controlled_forward(base_model, control_model, device, fit.dtype, settings.gradient_checkpointing) as forward:
        fit.forward = forward
        losses = fit.fit(on_step, preview if dist.is_main else None, start=step, losses=losses)
        step = max(step, settings.steps)

    control_model.eval().requires_grad_(False)
    metadata["controlnet_zero.steps_done"] = str(step)
    if losses:
        metadata["controlnet_zero.final_loss"] = f"{losses[-1]:.6g}"
    return TrainResult(control_model, losses, step, metadata)


def _same_base(base_model) -> Callable[[str], tuple[bool, str]]:
    """Compare a stored base fingerprint with ``base_model``'s in any load dtype (``fingerprint.same_base``)."""
    return lambda stored: fingerprint.same_base(stored, base_model.diffusion_model)


def _check_resume(saved: dict[str, str], now: dict[str, str], folder, base_model) -> None:
    """Refuse a checkpoint of another run (base model, dataset, settings); a changed world size only warns."""
    resume_state.check(saved, now, folder, _same_base(base_model))


def _plan(root: Path | None, metadata: dict[str, str], resume: bool | Path, base_model, dist: Dist,
          run_folders: bool, checkpointing: bool) -> resume_state.Run:
    """``resume_state.plan`` on rank 0 (it may create the run folder), its answer (or refusal) shared with all."""
    answer = None
    if dist.is_main:
        try:
            run = resume_state.plan(root, metadata, resume, _same_base(base_model), sub_folders=run_folders,
                                   checkpointing=checkpointing)
            answer = json.dumps({"folder": run.folder and str(run.folder), "run_id": run.run_id,
                                 "resume_from": run.resume_from and str(run.resume_from)})
        except ValueError as error:
            if not dist.enabled:
                raise
            answer = json.dumps({"error": str(error)})
    shared = json.loads(dist.share_text(answer))
    if "error" in shared:
        raise ValueError(shared["error"])
    return resume_state.Run(shared["folder"] and Path(shared["folder"]), shared["run_id"],
                           shared["resume_from"] and Path(shared["resume_from"]))


def evaluate(base_model, control_model: torch.nn.Module, data: TrainingData, device: torch.device,
             rows: list[int], *, shuffle_hints: bool = False, repeats: int = 4, seed: int = 1234,
             batch_size: int = 8) -> float:
    """Mean loss over ``rows`` at fixed noise and timesteps (same draws for every call with this seed).

    ``shuffle_hints`` gives each row another row's hint (a derangement): if the ControlNet uses the
    hint, the loss with the true hints is lower. Captions are kept (no prompt dropout).
    """
    if shuffle_hints and len(rows) < 2:
        raise ValueError("shuffled hints need at least 2 rows")
    ms = base_model.model_sampling
    gen = torch.Generator().manual_seed(seed)
    latent_shape = tuple(data.images[0]["latent"].shape)
    was_training = control_model.training
    control_model.eval()
    total, count = 0.0, 0
    shifted = list(rows[1:]) + list(rows[:1])
    with torch.no_grad(), controlled_loss(base_model, control_model, device, torch.float32) as loss_fn:
        for _ in range(repeats):
            for start in range(0, len(rows), batch_size):
                part = torch.tensor(rows[start:start + batch_size])
                t = torch.randint(0, len(ms.sigmas), (len(part),), generator=gen)
                noise = torch.randn((len(part), *latent_shape), generator=gen).to(device)
                no_drop = torch.zeros(len(part), dtype=torch.bool)
                x0, hint, conds = data.batch(part, no_drop, device)
                if shuffle_hints:  # row i gets row i+1's hint
                    hint = data.batch(torch.tensor(shifted[start:start + batch_size]), no_drop, device)[1]
                loss = loss_fn(control_model, x0, hint, conds, ms.sigmas[t].to(device), noise)
                total += float(loss) * len(part)
                count += len(part)
    control_model.train(was_training)
    return total / count
