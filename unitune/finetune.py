"""UniTune fine-tuning: bind one image to a rare token by training a private copy of the UNet.

The base model is never touched: its weights are copied (with any patches the MODEL carries
baked in) under ``torch.inference_mode(False)``, the copy is trained and thrown away, and what
remains is a set of weight patches in ComfyUI's LoRA key format (``.diff`` deltas for the
``full`` and ``attention`` modes, ``lora_up``/``lora_down`` factors for ``lora``). The tuned
MODEL is the base's ``clone()`` carrying those patches, so saving it, loading it back and the
stock LoraLoader all read the same tensors.

The image latent and the text conditioning are computed once; each step runs only the UNet
forward and backward. The loss is the MSE of the UNet's raw output against the output that
would reproduce the clean latent, i.e. in the model's own parameterization (eps or v).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .lora import LoraWeight

log = logging.getLogger(__name__)

FILE_FORMAT = "frozentune.unitune/1"
TRAIN_MODES = ("full", "attention", "lora")
OPTIMIZERS = ("adafactor", "adamw")
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class FineTuneSettings:
    token: str = "beikkpic"
    class_word: str = ""
    steps: int = 128
    batch_size: int = 4
    learning_rate: float = 1e-4
    optimizer: str = "adafactor"
    mode: str = "full"
    lora_rank: int = 8
    gradient_checkpointing: bool = False
    seed: int = 0

    @property
    def caption(self) -> str:
        """The training caption: the token alone (as in the paper), or token + class word."""
        return f"{self.token.strip()} {self.class_word.strip()}".strip()

    def check(self) -> None:
        if not self.token.strip():
            raise ValueError("token is empty: give a rare nonsense word such as 'beikkpic' that the model "
                             "does not already know; it is what you will write in the edit prompt.")
        if self.mode not in TRAIN_MODES:
            raise ValueError(f"train mode {self.mode!r} is unknown: use one of {', '.join(TRAIN_MODES)}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is unknown: use one of {', '.join(OPTIMIZERS)}.")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps={self.steps} and batch_size={self.batch_size} must both be at least 1.")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate={self.learning_rate} must be a positive number such as 1e-4.")
        if self.mode == "lora" and self.lora_rank < 1:
            raise ValueError(f"lora_rank={self.lora_rank} must be at least 1 (8 is a good start).")

    def metadata(self) -> dict[str, str]:
        return {f"unitune.{k}": str(v) for k, v in asdict(self).items()}


@dataclass
class FineTuneResult:
    tensors: dict[str, torch.Tensor]  # the patches in ComfyUI's LoRA key format (what Save writes)
    losses: list[float]
    settings: FineTuneSettings
    base_fingerprint: str
    family: str
    metadata: dict[str, str] = field(default_factory=dict)


def model_family(model) -> str:
    """'sdxl' for the SDXL family (SDXL, SSD-1B, Vega, KOALA), else the config class name in lowercase."""
    import comfy.model_base

    if isinstance(model, comfy.model_base.SDXL):
        return "sdxl"
    return type(model.model_config).__name__.lower()


def fingerprint(diffusion_model: torch.nn.Module) -> str:
    """A cheap identity of a UNet's weights: every key, shape and dtype plus a sample of each tensor.

    Used to refuse a tuned file on a different base model; it costs milliseconds even for SDXL.
    """
    h = hashlib.sha256()
    for name, t in sorted(diffusion_model.state_dict().items()):
        flat = t.detach().reshape(-1)
        sample = torch.cat([flat[:64], flat[-64:]]).to("cpu", torch.float32)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]


def prepare_images(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack ComfyUI images ``[H, W, 3]`` into ``[B, H, W, 3]``, center-cropped to multiples of 8.

    All images must share one size (they are views of one subject at one resolution).
    """
    if not images:
        raise ValueError("no image given: connect the image to tune on.")
    sizes = sorted({tuple(img.shape[:2]) for img in images})
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h}" for h, w in sizes)
        raise ValueError(f"the images have different sizes ({shown}): resize them to one size first, "
                         "e.g. with the stock ImageScale node.")
    h, w = sizes[0]
    h8, w8 = h - h % 8, w - w % 8
    if h8 < 8 or w8 < 8:
        raise ValueError(f"image is {w}x{h}: it must be at least 8x8 pixels.")
    batch = torch.stack([img[..., :3] for img in images])
    if (h8, w8) != (h, w):
        top, left = (h - h8) // 2, (w - w8) // 2
        log.info("UniTune: image %dx%d is not a multiple of 8; center-cropped to %dx%d", w, h, w8, h8)
        batch = batch[:, top:top + h8, left:left + w8]
    return batch


def training_conds(model, conditioning: list, latent: torch.Tensor, device: torch.device) -> dict:
    """The UNet's extra inputs (``c_crossattn``, SDXL ``y``) for one caption, built once.

    Uses the model's own ``extra_conds`` exactly as sampling does, so SDXL gets its pooled output and
    size conditioning (width/height of the training image).
    """
    cond, extras = conditioning[0]
    params = dict(extras)
    params.update(cross_attn=cond, device=device, noise=latent, prompt_type="positive",
                  width=params.get("width", latent.shape[-1] * 8), height=params.get("height", latent.shape[-2] * 8))
    # detach + clone: upstream nodes hand over inference tensors, which autograd cannot save.
    return {name: value.cond.detach().to(device).clone() for name, value in model.extra_conds(**params).items()}


def _target_coefficients(model_sampling, sigma: torch.Tensor, x_t: torch.Tensor):
    """``denoised = a + b * output`` for this parameterization; returns (a, b)."""
    zeros = torch.zeros_like(x_t)
    a = model_sampling.calculate_denoised(sigma, zeros, x_t)
    b = model_sampling.calculate_denoised(sigma, torch.ones_like(x_t), x_t) - a
    return a, b


def _trainable(unet: torch.nn.Module, settings: FineTuneSettings, generator: torch.Generator):
    """Mark what trains; returns (parameters, loras by module path)."""
    unet.requires_grad_(False)
    loras: dict[str, LoraWeight] = {}
    if settings.mode == "full":
        params = list(unet.parameters())
    elif settings.mode == "attention":
        params = [p for n, p in unet.named_parameters() if ".attn1." in n or ".attn2." in n]
    else:
        params = []
        for name, module in unet.named_modules():
            if (".attn1." in name or ".attn2." in name) and name.endswith(ATTENTION_PROJECTIONS) \
                    and hasattr(module, "weight_function"):
                lora = LoraWeight(module.weight.shape, settings.lora_rank, generator=generator)
                lora.to(module.weight.device)
                module.weight_function = list(module.weight_function) + [lora]
                loras[name] = lora
                params.extend(lora.parameters())
    if not params:
        raise ValueError(f"train mode {settings.mode!r} found nothing to train in this model "
                         "(no attention layers?): use mode 'full'.")
    for p in params:
        p.requires_grad_(True)
    return params, loras


def _optimizer(params, settings: FineTuneSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=1e-2)
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=settings.learning_rate, scale_parameter=False, relative_step=False,
                     warmup_init=False)


def _checkpointed(unet: torch.nn.Module) -> None:
    """Recompute each UNet block in the backward pass instead of storing its activations."""
    from torch.utils.checkpoint import checkpoint

    blocks = list(getattr(unet, "input_blocks", [])) + list(getattr(unet, "output_blocks", []))
    if getattr(unet, "middle_block", None) is not None:
        blocks.append(unet.middle_block)
    for block in blocks:
        plain = block.forward

        def forward(*args, _plain=plain, **kwargs):
            return checkpoint(_plain, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def fine_tune(base, latents: torch.Tensor, conditioning: list, settings: FineTuneSettings,
              on_step: Callable[[int, int, float], None] | None = None) -> FineTuneResult:
    """Train a private copy of ``base`` (a ModelPatcher) on ``latents`` ``[N, C, h, w]`` (VAE space).

    ``on_step(step, total, loss)`` runs after every optimizer step; ComfyUI's ProgressBar there is
    what makes Cancel work. Returns the trained patches; the copy is freed before returning.
    """
    import comfy.model_management as mm

    settings.check()
    mm.load_models_gpu([base], force_patch_weights=True)
    device = base.load_device
    family = model_family(base.model)
    ft = None
    try:
        with torch.inference_mode(False), torch.enable_grad():
            ft = copy.deepcopy(base.model)
            ft.to(device=device, dtype=torch.float32)  # fp32 master weights for training
            ft.manual_cast_dtype = None
            unet = ft.diffusion_model
            unet.dtype = torch.float32
            base_print = fingerprint(unet)
            ms = ft.model_sampling
            gen = torch.Generator().manual_seed(settings.seed)
            params, loras = _trainable(unet, settings, gen)
            initial, live_print = _initial_weights(base, unet, loras)
            if settings.gradient_checkpointing:
                _checkpointed(unet)
            unet.train()
            opt = _optimizer(params, settings)

            x0_all = ft.latent_format.process_in(latents.detach().to(device, torch.float32).clone())
            conds = training_conds(ft, conditioning, x0_all[:1], device)
            n_sigmas = len(ms.sigmas)
            losses = []
            for step in range(settings.steps):
                pick = torch.randint(0, x0_all.shape[0], (settings.batch_size,), generator=gen)
                x0 = x0_all[pick.to(device)]
                noise = torch.randn(x0.shape, generator=gen).to(device)
                sigma = ms.sigmas[torch.randint(0, n_sigmas, (settings.batch_size,), generator=gen)].to(device)
                x_t = ms.noise_scaling(sigma, noise, x0)
                batch_conds = {k: v.expand(settings.batch_size, *v.shape[1:]) for k, v in conds.items()}
                denoised = ft.apply_model(x_t, sigma, **batch_conds)
                _, b = _target_coefficients(ms, sigma, x_t)
                loss = (((denoised - x0) / b) ** 2).mean()  # = MSE(output, target output)
                value = loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"UniTune: the loss became {value} at step {step + 1} of {settings.steps}: "
                        f"lower the learning rate (now {settings.learning_rate:g}), e.g. to "
                        f"{settings.learning_rate / 10:g}.")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(value)
                if on_step is not None:
                    on_step(step + 1, settings.steps, value)

            with torch.no_grad():
                if loras:
                    tensors = {}
                    for name, lora in loras.items():
                        tensors.update({k: v.cpu() for k, v in lora.file_tensors(f"diffusion_model.{name}").items()})
                else:
                    if live_print is not None and fingerprint(base.model.diffusion_model) != live_print:
                        raise RuntimeError("UniTune: the base model's weights changed during training, so the "
                                           "tuning cannot be expressed as a patch; run the fine-tune again.")
                    tensors = _deltas(unet, initial, base)
        metadata = settings.metadata()
        metadata.update({"unitune.base_fingerprint": base_print, "unitune.family": family,
                         "unitune.final_loss": f"{losses[-1]:.6g}"})
        return FineTuneResult(tensors, losses, settings, base_print, family, metadata)
    finally:
        del ft
        mm.soft_empty_cache()


def _initial_weights(base, unet: torch.nn.Module, loras: dict) -> tuple[dict[str, torch.Tensor], str | None]:
    """The starting weights the full/attention deltas are taken against, and a fingerprint to check them by.

    The training copy was cast to fp32 from the base's live (patched) weights, so when the base carries no
    patches its own parameters are exactly that starting point and no second copy is kept (a UNet's worth
    of memory). With patches applied, the live weights could be unpatched meanwhile, so a copy is kept.
    """
    if loras:
        return {}, None
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    if not base.patches:
        live = dict(base.model.diffusion_model.named_parameters())
        return {n: live[n].detach() for n in trainable}, fingerprint(base.model.diffusion_model)
    own = dict(unet.named_parameters())
    return {n: own[n].detach().to(base.offload_device, copy=True) for n in trainable}, None


def _deltas(unet: torch.nn.Module, initial: dict, base) -> dict[str, torch.Tensor]:
    """``.diff`` / ``.diff_b`` tensors (trained minus initial, in fp32) in the base weight dtype."""
    dtype = base.model.get_dtype()
    out = {}
    for name, p in unet.named_parameters():
        if name not in initial:
            continue
        start = initial[name]
        delta = (p.detach().to(start.device) - start.to(torch.float32)).to(dtype).contiguous()
        module, _, leaf = name.rpartition(".")
        suffix = "diff" if leaf == "weight" else "diff_b" if leaf == "bias" else None
        if suffix is None:
            raise RuntimeError(f"cannot express a delta for parameter {name!r} in ComfyUI's patch format")
        out[f"diffusion_model.{module}.{suffix}"] = delta.cpu()
    return out


PATCH_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".alpha", ".diff_b", ".diff")


def _module_key(key: str) -> str:
    for suffix in PATCH_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


def apply_patches(base, tensors: dict[str, torch.Tensor], strength: float = 1.0):
    """A clone of ``base`` carrying the patches in ``tensors`` (ComfyUI LoRA key format)."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(base.model, {})
    patches = comfy.lora.load_lora(tensors, key_map, log_missing=False)
    missing = sorted({_module_key(k) for k in tensors} - set(key_map))
    if missing or not patches:
        raise ValueError(f"{len(missing)} UniTune patches do not fit this MODEL (e.g. {missing[:3]}): "
                         "load the file onto the base model it was trained on.")
    tuned = base.clone()
    tuned.add_patches(patches, strength)
    return tuned
