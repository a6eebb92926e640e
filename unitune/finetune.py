"""UniTune fine-tuning: bind one image to a rare token by training on a frozen twin of the UNet (or DiT).

The base model is never touched and never copied: training runs on a ``training.precision.frozen_twin``
of the base's ``BaseModel`` (its weights alias the base's live, patched weights in their load dtype,
cast to the compute dtype at each use). Only what trains is fp32: LoRA factors (``lora``), master
copies of the attention weights (``attention``) or of every weight (``full``); which layers each mode
trains is the family's (``families.train_targets``: SD1.x/SDXL attention; the DiTs (Flux.1, SD3, Qwen-Image,
Z-Image, Chroma) attention and MLP projections of every transformer block). What remains is a
set of weight patches in ComfyUI's LoRA key format (``.diff`` deltas for ``full`` and ``attention``,
``lora_up``/``lora_down`` factors for ``lora``). The tuned MODEL is the base's ``clone()`` carrying
those patches, so saving it, loading it back and the stock LoraLoader all read the same tensors.

The image latent and the text conditioning are computed once; each step runs only the UNet
forward and backward, under autocast in the compute dtype. The loss is the MSE of the UNet's raw
output against the output that would reproduce the clean latent (``training.objective``), i.e. in
the model's own parameterization (eps, v, or the flow velocity noise - x0 of Flux and SD3). Flux.1 dev
trains at an explicit guidance strength (``FineTuneSettings.guidance``), set in the conditioning as the
FluxGuidance node sets it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .. import families
from ..families import fingerprint
from ..training import checkpointing, objective, optimizers, precision, trainer
from ..training import preview as previews
from ..training.conditioning import batched, training_conds
from .lora import LoraWeight

log = logging.getLogger(__name__)

FILE_FORMAT = "frozentune.unitune/1"
TRAIN_MODES = ("full", "attention", "lora")
OPTIMIZERS = optimizers.OPTIMIZERS
PRECISIONS = precision.PRECISIONS
# What steps = 0 and learning_rate = 0 ("auto") mean, by train mode. full/attention: the paper's recipe
# (128 steps, batch 4; lr 1e-4 from the xuduo35 re-implementation). lora: measured on the tiny models
# (bench/README.md, "UniTune LoRA recipe"): at the paper's lr a rank-8 LoRA closes 37-56% of the way to
# full mode's reconstruction, at lr 1e-3 and 256 steps (rank 32) 99% on SD1.5 and 71% on the SDXL family; on the
# tiny DiTs (bench/unitune_lora_recipe_dit.py, one seed) 78% on Flux.1 dev and 99% on SD3 (rank 8 at 1e-4: 15%, 41%).
RECIPES = {"full": (128, 1e-4), "attention": (128, 1e-4), "lora": (256, 1e-3)}
# The guidance strength Flux.1 dev (guidance-distilled: the value is a model input) trains at. kohya sd-scripts'
# README trains Flux LoRAs with --guidance_scale 1.0, x-flux's train_flux_lora_deepspeed.py with guidance_vec = 1;
# diffusers' train_dreambooth_lora_flux.py defaults to 3.5, the sampling default. Families without the input ignore it.
TRAIN_GUIDANCE = 1.0


def recipe(mode: str, steps: int, learning_rate: float) -> tuple[int, float]:
    """``(steps, learning_rate)`` with 0 ("auto") replaced by the mode's recipe value."""
    if mode not in RECIPES:
        raise ValueError(f"train mode {mode!r} is unknown: use one of {', '.join(TRAIN_MODES)}.")
    auto_steps, auto_lr = RECIPES[mode]
    return (steps or auto_steps), (learning_rate or auto_lr)



@dataclass(frozen=True)
class FineTuneSettings:
    token: str = "beikkpic"
    class_word: str = ""
    steps: int = 128
    batch_size: int = 4
    learning_rate: float = 1e-4
    optimizer: str = "adafactor"
    mode: str = "full"
    lora_rank: int = 32
    gradient_checkpointing: bool = False
    seed: int = 0
    precision: str = "auto"
    embedding: str = ""  # pivotal: the learned word's name; the caption says "embedding:<name>" instead of the token
    pivotal_steps: int = 0  # pivotal: steps the word was learned for first (0: read from a file, or no word)
    timestep_sampling: str = objective.UNIFORM  # how training sigmas are drawn (training.objective.draw_sigmas)
    guidance: float = TRAIN_GUIDANCE  # the guidance strength a guidance-embedding model (Flux.1 dev) trains at

    @property
    def word(self) -> str:
        """What the image is bound to: the token, or ``embedding:<name>`` (pivotal)."""
        return f"embedding:{self.embedding}" if self.embedding else self.token.strip()

    @property
    def caption(self) -> str:
        """The training caption: the token (or learned word) alone (as in the paper), or + class word."""
        return f"{self.word} {self.class_word.strip()}".strip()

    def check(self) -> None:
        if not self.token.strip():
            raise ValueError("token is empty: give a rare nonsense word such as 'beikkpic' that the model "
                             "does not already know; it is what you will write in the edit prompt.")
        if self.mode not in TRAIN_MODES:
            raise ValueError(f"train mode {self.mode!r} is unknown: use one of {', '.join(TRAIN_MODES)}.")
        if self.optimizer not in optimizers.OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is unknown: use one of "
                             f"{', '.join(optimizers.OPTIMIZERS)}.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is unknown: use one of {', '.join(PRECISIONS)}.")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps={self.steps} and batch_size={self.batch_size} must both be at least 1.")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate={self.learning_rate} must be a positive number such as 1e-4.")
        if self.pivotal_steps < 0:
            raise ValueError(f"pivotal_steps={self.pivotal_steps} must be 0 (off) or more.")
        if self.mode == "lora" and self.lora_rank < 1:
            raise ValueError(f"lora_rank={self.lora_rank} must be at least 1 (32 is the default).")
        if self.timestep_sampling not in objective.TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling {self.timestep_sampling!r} is unknown: use one of "
                             f"{', '.join(objective.TIMESTEP_SAMPLINGS)}.")
        if not (self.guidance >= 0 and math.isfinite(self.guidance)):
            raise ValueError(f"guidance={self.guidance} must be a number of 0 or more (Flux.1 dev: "
                             f"{TRAIN_GUIDANCE:g}).")

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
    word: object = None  # pivotal.Word: the learned word the caption used (Save writes it beside the patches)


def supported_families() -> tuple[str, ...]:
    """The family ids UniTune trains: those with train targets in the family table."""
    return tuple(f.id for f in families.FAMILIES.values() if f.targets is not None)


def family_of(model) -> families.Family:
    """The family of ``model`` (a MODEL or its BaseModel), refused with the supported list if UniTune cannot train it."""
    return families.require(model, "UniTune Fine-Tune", supported_families())


def auto_mode(family: families.Family) -> str:
    """The train mode ``auto`` means for ``family`` (``Family.auto_train``: full on SD1.x, lora on the others)."""
    if family.auto_train not in TRAIN_MODES:
        raise ValueError(f"UniTune has no automatic train mode for {family.label}: pick one of {', '.join(TRAIN_MODES)}.")
    return family.auto_train


def with_guidance(family: families.Family, conditioning: list, guidance: float) -> list:
    """``conditioning`` with ``guidance`` set as the FluxGuidance node sets it, for a family whose model takes a
    guidance strength as input (Flux.1 dev); for the others unchanged (they would ignore it)."""
    if not family.guidance_embed:
        return conditioning
    return [[cond, {**extras, "guidance": guidance}] for cond, extras in conditioning]


def _trainable(unet: torch.nn.Module, settings: FineTuneSettings, generator: torch.Generator,
               family: families.Family | str = families.SD15):
    """Make what trains fp32 and trainable in ``unet`` (a twin); returns (parameters, loras by module path).

    What trains is the family's train targets for the mode (``families.train_targets``). full/attention:
    each trained weight becomes an fp32 master copy in the twin (the base keeps its own); lora: fp32
    factors ride on the twin's target layers as ComfyUI weight functions.
    """
    targets = families.train_targets(family, settings.mode)
    unet.requires_grad_(False)
    loras: dict[str, LoraWeight] = {}
    params = []
    if settings.mode in ("full", "attention"):
        for name, module in unet.named_modules():
            if not targets(name):
                continue
            for leaf, p in list(module._parameters.items()):
                if p is not None:
                    params.append(precision.master_parameter(module, leaf))
    else:
        for name, module in unet.named_modules():
            if targets(name) and hasattr(module, "weight_function"):
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


def _optimizer(params, settings: FineTuneSettings, in_backward: bool = False):
    """The settings' optimizer; ``in_backward``: stepped per parameter during backward (no gradient buffer)."""
    return trainer.make_optimizer(settings.optimizer, params, settings.learning_rate, in_backward=in_backward)


class TrainingRun(trainer.Trainer):
    """One fine-tune on the trainer skeleton (``training.trainer``): the frozen twin, what trains, the batch draws.

    Build it under ``torch.inference_mode(False)`` after the base is loaded; ``loss()`` draws a batch and
    runs the forward (what autograd keeps for backward is measurable around it), ``step()`` is one
    optimizer step, ``fit()`` the whole run.
    """

    what = "UniTune"

    def __init__(self, base, latents: torch.Tensor, conditioning: list, settings: FineTuneSettings):
        device = base.load_device
        super().__init__(device, settings.precision, steps=settings.steps, learning_rate=settings.learning_rate,
                         seed=settings.seed)
        self.settings = settings
        self.family = family_of(base)
        objective.check_timestep_sampling(base.get_model_object("model_sampling"), settings.timestep_sampling)
        self.twin = trainer.frozen_model(base.model, self.dtype)
        self.unet = self.twin.diffusion_model
        params, self.loras = _trainable(self.unet, settings, self.generator, self.family)
        self.unet.train()
        # full/attention train large fp32 masters: step each one during backward so no whole-model gradient
        # buffer exists (fp16 needs the GradScaler's global inf check first, so it keeps the plain step).
        self.in_backward = settings.mode != "lora" and self.dtype != torch.float16
        self.use_optimizer(_optimizer(params, settings, in_backward=self.in_backward), params)
        self.preview_modules = (self.twin,)
        self.x0 = self.twin.latent_format.process_in(latents.detach().to(device, torch.float32).clone())
        self.conditioning = with_guidance(self.family, conditioning, settings.guidance)
        self.conds = batched(training_conds(self.twin, self.conditioning, self.x0[:1], device), settings.batch_size)

    def loss(self) -> torch.Tensor:
        """The loss of one drawn batch (the forward runs under autocast in the compute dtype)."""
        ms = self.twin.model_sampling
        x0, noise, sigma = trainer.draw(self.x0, self.settings.batch_size, self.generator, ms,
                                        self.settings.timestep_sampling)
        x_t = objective.noised(ms, sigma, noise, x0)
        with precision.autocast(self.device, self.dtype):
            denoised = self.twin.apply_model(x_t, sigma, **self.conds)
        return objective.denoised_loss(ms, sigma, x_t, x0, denoised)

    def batch_loss(self, step: int) -> torch.Tensor:
        return self.loss()

    def preview_conds(self, noise: torch.Tensor) -> dict:
        """The training caption's conditioning at the preview's size (SDXL's size conditioning built for it)."""
        return training_conds(self.twin, self.conditioning, noise, self.device)

    def checkpointing(self):
        """The settings' gradient checkpointing on the twin's UNet layers, undone on exit."""
        return checkpointing.gradient_checkpointing([self.unet], self.settings.gradient_checkpointing)


def fine_tune(base, latents: torch.Tensor, conditioning: list, settings: FineTuneSettings,
              on_step: Callable[[int, int, float], None] | None = None,
              preview: previews.Preview | None = None) -> FineTuneResult:
    """Train on a frozen twin of ``base`` (a ModelPatcher) on ``latents`` ``[N, C, h, w]`` (VAE space).

    ``on_step(step, total, loss)`` runs after every optimizer step; ComfyUI's ProgressBar there is
    what makes Cancel work. Then, when one is due, ``preview`` draws the caption at the current weights
    (``TrainingRun.render``; no effect on training). Returns the trained patches; the twin and its fp32
    state are freed before returning.
    """
    import comfy.model_management as mm

    settings.check()
    family = family_of(base)
    mm.load_models_gpu([base], force_patch_weights=True)
    run = None
    try:
        with torch.inference_mode(False), torch.enable_grad():
            base_print = fingerprint.fingerprint(base.model.diffusion_model)
            run = TrainingRun(base, latents, conditioning, settings)
            initial, live_print = _initial_weights(base, run.unet, run.loras)
            losses = run.fit(on_step, preview)  # releases the optimizer state and gradients, also on Cancel
            with torch.no_grad():
                if run.loras:
                    tensors = {}
                    for name, lora in run.loras.items():
                        tensors.update({k: v.cpu() for k, v in lora.file_tensors(f"diffusion_model.{name}").items()})
                else:
                    if live_print is not None and live_print != fingerprint.legacy_fingerprint(base.model.diffusion_model):
                        raise RuntimeError("UniTune: the base model's weights changed during training, so the "
                                           "tuning cannot be expressed as a patch; run the fine-tune again.")
                    tensors = _deltas(run.unet, initial, base)
            compute = str(run.dtype).removeprefix("torch.")
        metadata = settings.metadata()
        if not family.guidance_embed:
            metadata.pop("unitune.guidance")  # not a model input: it did nothing
        metadata.update({"unitune.base_fingerprint": base_print, "unitune.family": family.id,
                         "unitune.final_loss": f"{losses[-1]:.6g}", "unitune.compute_dtype": compute})
        return FineTuneResult(tensors, losses, settings, base_print, family.id, metadata)
    finally:
        if run is not None:
            run.release()  # also on Cancel: the per-parameter hooks would keep the state alive
        del run
        mm.soft_empty_cache()


def _initial_weights(base, unet: torch.nn.Module, loras: dict) -> tuple[dict[str, torch.Tensor], str | None]:
    """The starting weights the full/attention deltas are taken against, and a fingerprint to check them by.

    The fp32 masters were cast from the base's live (patched) weights, so when the base carries no
    patches its own parameters are exactly that starting point and nothing is copied. With patches
    applied the live weights could be unpatched meanwhile, so a copy of the trained ones is kept, in
    the base's own dtype (the masters were cast from exactly those values, so it is exact).
    """
    if loras:
        return {}, None
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    live = dict(base.model.diffusion_model.named_parameters())
    if not base.patches:
        return {n: live[n].detach() for n in trainable}, fingerprint.legacy_fingerprint(base.model.diffusion_model)
    return {n: live[n].detach().to(base.offload_device, copy=True) for n in trainable}, None


def delta_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype saved ``.diff`` deltas are stored in: one that holds them.

    fp32 for fp32 and fp8 bases (fp8 rounds a small delta to zero). For bf16/fp16 bases bf16: it has
    fp32's exponent range, so no delta underflows (fp16 flushes deltas below 6e-8 to zero and keeps
    fewer bits below 6e-5), its rounding (2^-9 of the delta) is below half an ulp of the
    half-precision weight the delta is added to, and the file is half the size of fp32. Measured on the
    tiny SD1.5 (attention mode, 4 steps, bf16 and fp16 bases): bf16 storage keeps every delta non-zero
    at 0.15% relative error; fp16 storage zeroes 0.001% of them.
    """
    return torch.bfloat16 if base_dtype in (torch.bfloat16, torch.float16) else torch.float32


def _deltas(unet: torch.nn.Module, initial: dict, base) -> dict[str, torch.Tensor]:
    """``.diff`` / ``.diff_b`` tensors (trained minus initial, in fp32), stored in ``delta_dtype``."""
    dtype = delta_dtype(base.model.get_dtype())
    out = {}
    for name, p in unet.named_parameters():
        if name not in initial:
            continue
        start = initial[name]
        delta = (p.detach().to(start.device, torch.float32) - start.to(torch.float32)).to(dtype).contiguous()
        out[delta_key(name)] = delta.cpu()
    return out


def delta_key(name: str) -> str:
    """The file key of the ``.diff`` delta for diffusion-model parameter ``name``, in ComfyUI's generic format.

    ``<module>.diff`` for a weight, ``<module>.diff_b`` for a bias; any other parameter (a DiT's RMSNorm
    ``scale``, an embedding table) by its full name, ``<parameter>.diff``, which ``comfy.lora.model_lora_keys_unet``
    maps for every ``diffusion_model.*`` key that does not end in ``.weight``.
    """
    module, _, leaf = name.rpartition(".")
    if leaf == "weight":
        return f"diffusion_model.{module}.diff"
    if leaf == "bias":
        return f"diffusion_model.{module}.diff_b"
    return f"diffusion_model.{name}.diff"


PATCH_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".alpha", ".diff_b", ".diff")


def _module_key(key: str) -> str:
    for suffix in PATCH_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


def _expected_shape(base, target) -> tuple[str, tuple[int, ...]]:
    """The model weight a key-map target names, and its shape (a ``(name, (dim, start, length))`` target
    is a slice of that weight, as ComfyUI's key maps use for fused weights)."""
    import comfy.utils

    name, offset = (target[0], target[1]) if isinstance(target, tuple) else (target, None)
    shape = list(comfy.utils.get_attr(base.model, name).shape)
    if offset is not None:
        shape[offset[0]] = offset[2]
    return name, tuple(shape)


def _patch_shape(patch) -> tuple[int, ...] | None:
    """The shape of the weight change a loaded patch makes: ``.diff``/``set`` tensors, or a plain LoRA's
    ``up @ down`` (as ``comfy.weight_adapter.LoRAAdapter`` computes it); None for other adapter kinds."""
    from comfy.weight_adapter.lora import LoRAAdapter

    if isinstance(patch, tuple) and patch[0] in ("diff", "set"):
        return tuple(patch[1][0].shape)
    if isinstance(patch, LoRAAdapter) and patch.weights[3] is None and patch.weights[5] is None:
        up, down = patch.weights[0], patch.weights[1]
        if up.flatten(1).shape[1] != down.shape[0]:  # lora_up and lora_down ranks disagree: never fits
            return (up.shape[0], -1)
        return (up.shape[0], *down.shape[1:])
    return None


def check_fit(base, tensors: dict[str, torch.Tensor], patches: dict, key_map: dict, source: str) -> None:
    """Refuse patches that would not merge: keys no model weight has, or shapes that differ from the weight's.

    ComfyUI itself only logs "WEIGHT NOT MERGED" when it samples and carries on with the unpatched
    weight, so a file made for another model would seem to load.
    """
    fix = "load it onto the base model it was trained on."
    missing = sorted({_module_key(k) for k in tensors} - set(key_map))
    if missing or not patches:
        example = f" (the first: {missing[0]!r})" if missing else ""
        raise ValueError(f"{source}: {len(missing) or len(tensors)} of its {len(tensors)} tensors match no weight "
                         f"of this MODEL{example}: {fix}")
    in_file = {_module_key(k) for k in tensors}
    module_of = {(t if isinstance(t, str) else t[0]): m for m, t in key_map.items() if m in in_file}  # weight -> key
    for target, patch in patches.items():
        name, expected = _expected_shape(base, target)
        key = _file_key(name, module_of, tensors)
        shape = _patch_shape(patch)
        if shape is None:
            raise ValueError(f"{source}: {key!r} is a {getattr(patch, 'name', patch[0])} patch; UniTune files "
                             "hold .diff deltas or lora_up/lora_down factors. Load other LoRA kinds with the stock "
                             "LoraLoader.")
        # ComfyUI reshapes up @ down to the weight, so a LoRA only has to match in size per output row.
        fits = (shape == expected if isinstance(patch, tuple)
                else shape[0] == expected[0] and math.prod(shape[1:]) == math.prod(expected[1:]))
        if not fits:
            raise ValueError(f"{source}: {key!r} changes a weight of shape {list(shape)}, but this MODEL's "
                             f"{name} has shape {list(expected)}: {fix}")


def _file_key(weight: str, module_of: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """The file key that patches model weight ``weight`` (for the error message)."""
    if weight.endswith(".bias"):
        return f"{module_of.get(weight[: -len('bias')] + 'weight', weight)}.diff_b"
    module = module_of.get(weight, weight)
    return next((module + s for s in (".diff", ".lora_up.weight", ".set_weight") if module + s in tensors), module)


def apply_patches(base, tensors: dict[str, torch.Tensor], strength: float = 1.0, source: str = "UniTune patches"):
    """A clone of ``base`` carrying the patches in ``tensors`` (ComfyUI LoRA key format), checked to fit first."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(base.model, {})
    patches = comfy.lora.load_lora(tensors, key_map, log_missing=False)
    check_fit(base, tensors, patches, key_map, source)
    tuned = base.clone()
    tuned.add_patches(patches, strength)
    return tuned
