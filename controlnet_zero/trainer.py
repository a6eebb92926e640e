"""The ControlNet-Zero training loop, shared by the ComfyUI node and the command line / torchrun.

Each step mirrors how ComfyUI runs a ControlNet at sampling time (``comfy.controlnet.ControlNet.
get_control``): the ControlNet sees ``calculate_input(sigma, x_t)``, the discrete timestep, the text
context (and SDXL ``y``) and the RGB hint in [0, 1]; its outputs go into the frozen UNet's ``control``
argument. The loss is the MSE of the UNet's raw output against the output that reproduces the clean
latent, i.e. in the base model's own parameterization (eps or v), with timesteps uniform.

The base UNet is never written: it runs through a frozen twin whose weights alias the base's memory.
Only the ControlNet (fp32 master weights) trains, with AdamW.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import checkpoints, network
from .cache import TrainingData
from .distributed import Dist

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


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
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every={self.checkpoint_every} must be 0 (off) or a number of steps.")
        from .dataset import check_resolution

        check_resolution(self.resolution)

    def metadata(self) -> dict[str, str]:
        return {f"controlnet_zero.{k}": str(v) for k, v in asdict(self).items()}


@dataclass
class TrainResult:
    control_model: torch.nn.Module
    losses: list[float]
    step: int
    metadata: dict[str, str] = field(default_factory=dict)


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``setting`` on ``device`` (None = plain fp32)."""
    if setting == "fp32" or (setting == "auto" and device.type != "cuda"):
        return None
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if setting == "bf16" else torch.float16


@contextlib.contextmanager
def _checkpointing(modules: list[torch.nn.Module], enabled: bool):
    """Recompute each block in the backward pass while the loop runs; undo the patch afterwards."""
    from ..unitune.finetune import _checkpointed

    patched = []
    if enabled:
        for module in modules:
            _checkpointed(module)
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            for block in module.modules():
                block.__dict__.pop("forward", None)


def _control(outputs: dict, dtype: torch.dtype) -> dict:
    """The ControlNet's outputs as the UNet's ``control`` argument (fresh lists: the UNet pops them)."""
    return {"input": [], "middle": [c.to(dtype) for c in outputs["middle"]],
            "output": [c.to(dtype) for c in outputs["output"]]}


def _loss(model, unet, ms, x0, hint, conds, sigma, noise, base_dtype, amp_ctx) -> torch.Tensor:
    """MSE of the controlled UNet's output against its eps/v target, inputs built as ComfyUI's sampling does."""
    from ..unitune.finetune import _target_coefficients

    x_t = ms.noise_scaling(sigma, noise, x0)
    x_in = ms.calculate_input(sigma, x_t)
    timesteps = ms.timestep(sigma).float()
    context, y = conds["c_crossattn"], conds.get("y")
    with amp_ctx():
        outputs = model(x=x_in, hint=hint, timesteps=timesteps, context=context, y=y)
        out = unet(x_in.to(base_dtype), timesteps, context=context.to(base_dtype),
                   y=None if y is None else y.to(base_dtype), control=_control(outputs, base_dtype),
                   transformer_options={})
    a, b = _target_coefficients(ms, sigma, x_t)
    return torch.nn.functional.mse_loss(out.float(), ((x0 - a) / b).float())


def train(base_model, control_model: torch.nn.Module, data: TrainingData, settings: TrainSettings,
          device: torch.device, *, checkpoint_root: Path | None = None, resume: bool | Path = False,
          dist: Dist | None = None, metadata: dict[str, str] | None = None,
          on_step: Callable[[int, int, float], None] | None = None) -> TrainResult:
    """Train ``control_model`` (a trainable fp32 ``cldm.ControlNet`` on ``device``) around ``base_model``.

    ``base_model`` is a loaded ``comfy.model_base.BaseModel`` on ``device``; it is only read.
    ``resume``: True = the newest checkpoint under ``checkpoint_root`` if any, or a checkpoint folder.
    ``on_step(step, total, loss)`` runs after every optimizer step (ComfyUI's ProgressBar there makes
    Cancel work; the last checkpoint on disk stays as it was).
    """
    from ..unitune.finetune import fingerprint

    settings.check()
    dist = dist or Dist()
    network.check_fits(control_model, base_model)
    metadata = dict(metadata or {})
    metadata.update(settings.metadata())
    metadata["controlnet_zero.dataset_size"] = str(len(data))
    metadata["controlnet_zero.world_size"] = str(dist.world)
    metadata["controlnet_zero.base_fingerprint"] = fingerprint(base_model.diffusion_model)
    ms = base_model.model_sampling
    base_dtype = base_model.manual_cast_dtype or base_model.get_dtype()
    amp = autocast_dtype(settings.mixed_precision, device)
    unet = network.frozen_twin(base_model.diffusion_model)
    control_model.to(device).train().requires_grad_(True)
    params = list(control_model.parameters())
    model = control_model
    if dist.enabled:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(control_model, device_ids=ids)
    opt = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    gen = torch.Generator().manual_seed(settings.seed)
    step, losses = 0, []
    folder = None
    if resume is True:
        folder = checkpoints.latest(checkpoint_root) if checkpoint_root else None
    elif resume:
        folder = checkpoints.latest(Path(resume)) or Path(resume)
    if folder is not None:
        done = checkpoints.load(Path(folder), control_model, opt, gen, scaler)
        _check_resume(done.metadata, metadata, folder)
        step, losses = done.step, done.losses
        log.info("ControlNet-Zero: resumed from %s at step %d", folder, step)
    latent_shape = tuple(data.images[0]["latent"].shape)
    per_rank, accum = settings.batch_size, settings.gradient_accumulation
    global_batch = per_rank * dist.world
    mine = slice(dist.rank * per_rank, (dist.rank + 1) * per_rank)
    n_sigmas = len(ms.sigmas)
    amp_ctx = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else contextlib.nullcontext

    with _checkpointing([control_model, unet], settings.gradient_checkpointing):
        while step < settings.steps:
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(accum):
                # Every rank draws the whole global batch (same seed) and keeps its slice.
                rows = torch.randint(0, len(data), (global_batch,), generator=gen)[mine]
                dropped = (torch.rand(global_batch, generator=gen) < settings.prompt_dropout)[mine]
                t = torch.randint(0, n_sigmas, (global_batch,), generator=gen)[mine]
                noise = torch.randn((global_batch, *latent_shape), generator=gen)[mine].to(device)
                x0, hint, conds = data.batch(rows, dropped, device)
                last = micro == accum - 1
                sync = model.no_sync() if dist.enabled and not last else contextlib.nullcontext()
                with sync:
                    loss = _loss(model, unet, ms, x0, hint, conds, ms.sigmas[t].to(device), noise, base_dtype, amp_ctx)
                    scaler.scale(loss / accum).backward()
                total += loss.item() / accum
            scaler.unscale_(opt)
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            step += 1
            value = dist.mean(total)
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"ControlNet-Zero: the loss became {value} at step {step}: lower the learning rate (now "
                    f"{settings.learning_rate:g}) or use mixed_precision fp32.")
            losses.append(value)
            if checkpoint_root is not None and settings.checkpoint_every and step % settings.checkpoint_every == 0:
                if dist.is_main:
                    checkpoints.save(checkpoint_root, step, control_model, opt, gen, losses, metadata,
                                     keep=settings.keep_checkpoints, scaler=scaler)
                dist.barrier()
            if on_step is not None:
                on_step(step, settings.steps, value)

    control_model.eval().requires_grad_(False)
    del unet
    metadata["controlnet_zero.steps_done"] = str(step)
    if losses:
        metadata["controlnet_zero.final_loss"] = f"{losses[-1]:.6g}"
    return TrainResult(control_model, losses, step, metadata)


def _check_resume(saved: dict[str, str], now: dict[str, str], folder) -> None:
    """Refuse a checkpoint from another base model or dataset; a changed batch layout only warns."""
    for key, what in (("controlnet_zero.base_fingerprint", "base model"), ("controlnet_zero.dataset_size",
                                                                         "dataset size")):
        if key in saved and key in now and saved[key] != now[key]:
            raise ValueError(f"checkpoint {folder} was trained with another {what} ({saved[key]}, now {now[key]}): "
                             "resume with the same model and dataset, or start a new run (another run name).")
    for key in ("controlnet_zero.batch_size", "controlnet_zero.gradient_accumulation", "controlnet_zero.world_size",
                "controlnet_zero.seed"):
        if saved.get(key) != now.get(key):
            log.warning("ControlNet-Zero: %s was %s in the checkpoint and is %s now; the resumed run will not "
                        "match an uninterrupted one exactly", key, saved.get(key), now.get(key))


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
    base_dtype = base_model.manual_cast_dtype or base_model.get_dtype()
    unet = network.frozen_twin(base_model.diffusion_model)
    gen = torch.Generator().manual_seed(seed)
    latent_shape = tuple(data.images[0]["latent"].shape)
    was_training = control_model.training
    control_model.eval()
    total, count = 0.0, 0
    shifted = list(rows[1:]) + list(rows[:1])
    with torch.no_grad():
        for _ in range(repeats):
            for start in range(0, len(rows), batch_size):
                part = torch.tensor(rows[start:start + batch_size])
                t = torch.randint(0, len(ms.sigmas), (len(part),), generator=gen)
                noise = torch.randn((len(part), *latent_shape), generator=gen).to(device)
                no_drop = torch.zeros(len(part), dtype=torch.bool)
                x0, hint, conds = data.batch(part, no_drop, device)
                if shuffle_hints:  # row i gets row i+1's hint
                    hint = data.batch(torch.tensor(shifted[start:start + batch_size]), no_drop, device)[1]
                loss = _loss(control_model, unet, ms, x0, hint, conds, ms.sigmas[t].to(device), noise, base_dtype,
                             contextlib.nullcontext)
                total += float(loss) * len(part)
                count += len(part)
    control_model.train(was_training)
    return total / count
