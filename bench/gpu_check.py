"""``make gpu-check``: the trainers and every example workflow on one CUDA GPU, with full-size random models.

Nothing here has run on a GPU when it was written (the project is built on a CPU-only machine), so
everything but the device is exercised by ``tests/unit/test_gpu_check.py`` through the same code on the
CPU (``--device cpu --tiny``: tiny UNets, 64 px, 2 steps; ``make test`` runs a subset, one load (SD1.5 in
fp16) and one workflow, with ``--loads`` and ``--workflows``; the whole dry run is a ``long`` test).

What it does, in one process plus one ComfyUI server:

1. Builds full-size random checkpoints ON THE GPU, in fp16, once (cached in ``build/gpu_check/``, never
   committed): SD1.5 (859.5M UNet) and SDXL (2.57B UNet), each with full-size random CLIP-L (+ CLIP-G)
   and a real-size KL VAE, which ComfyUI's loader detects as ``SD15`` / ``SDXL``; plus the stand-ins the
   InstantStyle workflows name: an SDXL IP-Adapter, a random ViT-bigG CLIP vision model and an SDXL
   ControlNet (encoder copied from the UNet).
2. Trainers, in this process: for SD1.5 at 512 px and SDXL at 1024 px, each loaded with ComfyUI's
   loader in bf16 and in fp16 (``model_options`` dtype), UniTune Fine-Tune and ControlNet-Zero
   Create + Train run a few steps. Their arguments are the nodes' schema defaults with only steps,
   sizes, seed and precision overridden (and, for SDXL, batch 1 with gradient checkpointing, plus the
   8-bit AdamW where the node offers it), so inputs added later need no change here.
3. Workflows: a headless ComfyUI on the GPU runs every ``workflows/*.json`` at its own sizes, samplers
   and batch; only training steps are capped (``--workflow-train-steps``) to stay in the time budget.
4. Writes ``out/gpu_check/report.json`` and ``report.md``: per item pass/fail, seconds, it/s (steps
   after the first, from the progress-bar updates) and ``torch.cuda.max_memory_allocated`` (reset
   before each item; the workflows' is read inside the server by ``bench/gpu_check_probe``).

Exit code 0 if every item passed, 1 if any failed (each item runs in its own try/except, so one failure
is reported and the rest still run), 2 with a one-line reason when no CUDA GPU is visible.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.util
import json
import logging
import os
import platform
import shutil
import sys
import time
import traceback
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # for `harness`, from any cwd

log = logging.getLogger("frozentune.gpu_check")

BUILD_VERSION = 1
SEED = 20261201
PROBE_DIR = Path(__file__).resolve().parent / "gpu_check_probe"
DTYPES = ("bf16", "fp16")
FAMILIES = ("sd15", "sdxl")
ALL_LOADS = tuple(f"{family}:{dtype}" for family in FAMILIES for dtype in DTYPES)  # what the GPU run loads
BUDGET_SECONDS = 600  # issue 21: the whole run, model build included, under 10 minutes on one H100
QUICK_BUDGET_SECONDS = 240  # issue 21: ``--quick`` in 4 minutes
# ``--quick``: one trainer item per family (both trainers and both dtypes still covered) and one workflow.
QUICK_TRAINERS = {"sd15:fp16": ("unitune_finetune",), "sdxl:bf16": ("controlnet_zero",)}
QUICK_WORKFLOW = "UniTune - edit a photo with a prompt (SD1.5)"
# the files each workflow's stand-ins need beyond the checkpoints (see ``stand_in``); trainers need checkpoints only
STAND_INS = ("ipadapter", "clip_vision", "controlnet")

# The full-size UNets, as comfy/model_detection.py spells them (unet_config_from_diffusers_unet: SD15, SDXL).
SD15_UNET = dict(
    model_channels=320, in_channels=4, out_channels=4, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    transformer_depth_middle=1, context_dim=768, num_heads=8, num_head_channels=-1,
    use_linear_in_transformer=False, adm_in_channels=None,
)
SDXL_UNET = dict(
    model_channels=320, in_channels=4, out_channels=4, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
    transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
    transformer_depth_middle=10, context_dim=2048, num_heads=-1, num_head_channels=64,
    use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential",
)
# The VAE every SD1.5/SDXL checkpoint carries (comfy/sd.py's default KL ddconfig).
KL_VAE = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
              num_res_blocks=2, attn_resolutions=[], dropout=0.0)


@dataclass(frozen=True)
class Mode:
    """Sizes of one run: ``full`` on the GPU, ``tiny`` for the CPU dry run of the same code."""

    name: str
    unets: dict[str, dict]  # family -> UNet kwargs
    detected: dict[str, str]  # family -> class name in comfy.supported_models the loader must pick
    sizes: dict[str, int]  # family -> training image side in pixels
    train_steps: int
    workflow_train_steps: int
    batch_size: int | None = None  # None: the node's default (SDXL: 1)


def full_mode(train_steps: int = 4, workflow_train_steps: int = 8) -> Mode:
    return Mode("full", {"sd15": SD15_UNET, "sdxl": SDXL_UNET}, {"sd15": "SD15", "sdxl": "SDXL"},
                {"sd15": 512, "sdxl": 1024}, train_steps, workflow_train_steps)


def tiny_mode() -> Mode:
    from harness import tiny_models  # SDXL_BLOCKS has SDXL's block ids, which the InstantStyle presets need

    return Mode("tiny", {"sd15": tiny_models.SD15.unet, "sdxl": tiny_models.SDXL_BLOCKS.unet},
                {"sd15": tiny_models.SD15.expected_config, "sdxl": tiny_models.SDXL_BLOCKS.expected_config},
                {"sd15": 64, "sdxl": 64}, 2, 2, batch_size=1)


# --- results ---------------------------------------------------------------------------------------------

@dataclass
class Item:
    """One line of the report."""

    name: str
    kind: str  # "load" | "trainer" | "workflow"
    passed: bool = False
    seconds: float = 0.0
    steps: int | None = None
    it_per_s: float | None = None
    max_memory_allocated: int | None = None  # bytes, None on the CPU
    node_it_per_s: dict[str, float] = field(default_factory=dict)  # workflows: per node that reported steps
    settings: dict = field(default_factory=dict)  # what was set on top of the schema / workflow values
    outputs: list[str] = field(default_factory=list)
    error: str = ""


def steps_per_second(times: list[float]) -> float | None:
    """Steps per second between the first and last progress update (the first step is warm-up)."""
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) / (times[-1] - times[0])


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:600]}"


def run_item(item: Item, fn: Callable[[], dict], device: str) -> Item:
    """Run ``fn`` as ``item``: time it, measure peak CUDA memory, and record a failure instead of raising."""
    cuda = device == "cuda"
    if cuda:
        _cuda_counter(reset=True)
    start = time.perf_counter()
    try:
        found = fn() or {}
        if cuda:
            import torch

            torch.cuda.synchronize()  # an asynchronous CUDA error belongs to this item
        item.passed = True
    except Exception as err:  # noqa: BLE001 - one failing item must not stop the others
        found = {}
        item.error = one_line(err)
        log.error("FAIL %s: %s\n%s", item.name, item.error, traceback.format_exc())
    item.seconds = round(time.perf_counter() - start, 2)
    if cuda:
        item.max_memory_allocated = _cuda_counter(reset=False)
        _empty_cache(device)  # what a failed item left behind must not fail the next one
    for key, value in found.items():
        setattr(item, key, value)
    log.info("%-4s %-40s %7.1fs  %s it/s  peak %s", "OK" if item.passed else "FAIL", item.name, item.seconds,
             _fmt(item.it_per_s), _gib(item.max_memory_allocated))
    return item


def _cuda_counter(reset: bool) -> int | None:
    """Reset, or read, ``torch.cuda.max_memory_allocated``; None if CUDA is in an error state."""
    import torch

    try:
        torch.cuda.synchronize()
        if reset:
            torch.cuda.reset_peak_memory_stats()
            return None
        return torch.cuda.max_memory_allocated()
    except RuntimeError as err:
        log.error("CUDA peak-memory counter unavailable: %s", one_line(err))
        return None


def exit_code(items: list[Item]) -> int:
    return 0 if items and all(i.passed for i in items) else 1


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


# --- random full-size weights, built on the device ----------------------------------------------------------

def random_weights(module, seed: int, dtype, device: str) -> dict:
    """Seeded random values for every tensor of ``module`` (on the meta device), made on ``device``.

    The same rules as ``harness.tiny_models.random_state_dict`` (norms 1/0, biases 0, matrices
    N(0, 1/fan_in), embeddings N(0, 0.02), one stream per tensor name), but drawn on the GPU so a
    2.6B-parameter UNet takes seconds and no host memory.
    """
    import torch

    from harness.tiny_models import _norm_param_names

    norms = _norm_param_names(module)
    out = {}
    for name, ref in module.state_dict().items():
        shape = ref.shape
        if device == "meta":  # the layout only (full_size_layouts)
            out[name] = torch.empty(shape, device="meta", dtype=ref.dtype if name.endswith("position_ids") else dtype)
            continue
        if name.endswith("position_ids"):
            out[name] = torch.arange(shape[-1], device=device).expand(shape).clone()
            continue
        if name in norms or len(shape) < 2:
            one = name.endswith("weight") if name in norms else not name.endswith("bias")
            t = torch.ones(shape, device=device) if one else torch.zeros(shape, device=device)
        elif name.endswith("logit_scale"):
            t = torch.full(shape, 4.6052, device=device)
        else:
            gen = torch.Generator(device=device).manual_seed(seed + zlib.crc32(name.encode()))
            std = 0.02 if "embedding" in name else shape[1:].numel() ** -0.5
            t = torch.empty(shape, device=device).normal_(0.0, std, generator=gen)
        out[name] = t.to(dtype)
    return out


def build_checkpoint(unet_kwargs: dict, expected: str, device: str, dtype) -> dict:
    """A checkpoint state dict (UNet, VAE, text encoders) in the layout CheckpointLoaderSimple reads."""
    import comfy.model_detection
    import comfy.ops
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(image_size=32, use_checkpoint=False, use_spatial_transformer=True, legacy=False,
                     dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init, **unet_kwargs)
    sd = {"model.diffusion_model." + k: v for k, v in random_weights(unet, SEED, dtype, device).items()}
    config = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    found = type(config).__name__ if config is not None else None
    if found != expected:
        raise RuntimeError(f"the random UNet is detected as {found}, expected {expected}")
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=KL_VAE, embed_dim=4)
    sd.update(config.process_vae_state_dict_for_saving(random_weights(vae, SEED + 1, dtype, device)))
    clip = config.clip_target(state_dict=sd).clip(device="meta", dtype=dtype, model_options={})
    sd.update(config.process_clip_state_dict_for_saving(random_weights(clip, SEED + 2, dtype, device)))
    return sd


def clip_vision_weights(tiny: bool, device: str, dtype) -> dict:
    """ViT-bigG (comfy/clip_vision_config_g.json) at full size, or the harness's tiny one."""
    import comfy.clip_model
    import comfy.ops
    import torch

    from harness import tiny_ipadapter

    path = (tiny_ipadapter.CLIP_VISION_CONFIG_PATH if tiny
            else Path(comfy.clip_model.__file__).parent / "clip_vision_config_g.json")
    config = json.loads(Path(path).read_text())
    model = comfy.clip_model.CLIPVisionModelProjection(config, torch.float32, "meta", comfy.ops.disable_weight_init)
    return random_weights(model, SEED + 3, dtype, device)


def controlnet_weights(checkpoint_sd: dict, device: str, dtype) -> dict:
    """A ControlNet in ComfyUI's ldm layout for this checkpoint: encoder copied from its UNet, the rest random."""
    import comfy.cldm.cldm
    import comfy.model_detection
    import comfy.ops
    import torch

    prefix = "model.diffusion_model."
    unet = {k[len(prefix):]: v for k, v in checkpoint_sd.items() if k.startswith(prefix)}
    config = dict(comfy.model_detection.model_config_from_unet(unet, "").unet_config)
    config.pop("out_channels", None)
    with torch.device("meta"):
        cn = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init,
                                        **{**config, "dtype": torch.float32})
    sd = random_weights(cn, SEED + 4, dtype, device)
    sd.update({k: unet[k] for k in sd if k in unet})
    return sd


def save(path: Path, sd: dict, note: str) -> Path:
    """Atomic safetensors write; safetensors moves GPU tensors to the host one at a time."""
    from harness.tiny_ipadapter import _save

    return _save(path, sd, {"frozentune_gpu_check": note})


def build_models(mode: Mode, folder: Path, device: str, stand_ins: bool = True) -> dict[str, Path]:
    """The checkpoints, and with ``stand_ins`` the InstantStyle stand-ins, for ``mode``, built if missing.

    Returns ``{name: path}`` for every name; ``--quick`` runs no InstantStyle workflow, so it skips the
    stand-ins (about 5 GB of the full-size build: the ViT-bigG and the SDXL ControlNet).
    """
    import torch

    from harness import tiny_ipadapter

    paths = {name: folder / f"gpu_check_{mode.name}_{name}_v{BUILD_VERSION}.safetensors"
             for name in ("sd15", "sdxl", *STAND_INS)}
    dtype = torch.float16
    for family in ("sd15", "sdxl"):
        needs = [paths[family]] + ([paths["controlnet"]] if family == "sdxl" and stand_ins else [])
        if all(p.exists() for p in needs):
            continue
        start = time.perf_counter()
        sd = build_checkpoint(mode.unets[family], mode.detected[family], device, dtype)
        if not paths[family].exists():
            save(paths[family], sd, f"{mode.name} {family} random")
        if family == "sdxl" and stand_ins:
            save(paths["controlnet"], controlnet_weights(sd, device, dtype), f"{mode.name} sdxl controlnet")
        del sd
        _empty_cache(device)
        log.info("built %s %s in %.1fs: %s", mode.name, family, time.perf_counter() - start, paths[family])
    if not stand_ins:
        return paths
    if not paths["ipadapter"].exists():
        layers = tiny_ipadapter.attn2_shapes(paths["sdxl"])
        save(paths["ipadapter"], tiny_ipadapter.ipadapter_state_dict(layers, 1280), f"{mode.name} sdxl ipadapter")
    if not paths["clip_vision"].exists():
        save(paths["clip_vision"], clip_vision_weights(mode.name == "tiny", device, dtype), f"{mode.name} clip vision")
        _empty_cache(device)
    return paths


def full_size_layouts() -> dict:
    """Build every full-size file's layout on the meta device (no memory, no time): what a GPU run builds.

    The CPU dry run reports this, so the full-size configs are checked against ComfyUI's detection here too.
    """
    import torch

    from harness import tiny_ipadapter

    mode, dtype = full_mode(), torch.float16
    out = {}
    for family in ("sd15", "sdxl"):
        sd = build_checkpoint(mode.unets[family], mode.detected[family], "meta", dtype)
        out[f"{family}_unet_parameters"] = _parameters(sd, "model.diffusion_model.")
        out[f"{family}_tensors"] = len(sd)
    out["sdxl_attn2_layers"] = sum(1 for k in sd if tiny_ipadapter._ATTN2.match(k))
    out["sdxl_controlnet_parameters"] = _parameters(controlnet_weights(sd, "meta", dtype), "")
    vision = clip_vision_weights(False, "meta", dtype)
    out["clip_vision_parameters"] = _parameters(vision, "")
    out["clip_vision_layers"] = sum(1 for k in vision if k.endswith("layer_norm1.weight"))
    return out


def _parameters(sd: dict, prefix: str) -> int:
    return sum(v.numel() for k, v in sd.items() if k.startswith(prefix) and v.is_floating_point())


def unet_parameters(path: Path) -> int:
    import safetensors

    with safetensors.safe_open(str(path), framework="pt") as f:
        return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("model.diffusion_model."))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _empty_cache(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        with contextlib.suppress(RuntimeError):  # a CUDA error state is reported by the item that caused it
            torch.cuda.empty_cache()


# --- trainers, in this process ------------------------------------------------------------------------------

def schema_defaults(node_cls) -> dict:
    """``{input id: default}`` of a V3 node (a combo without a default: its first option)."""
    out = {}
    for inp in node_cls.define_schema().inputs:
        default = getattr(inp, "default", None)
        if default is None and getattr(inp, "options", None):
            default = inp.options[0]
        if default is not None:
            out[inp.id] = default
    return out


def schema_arguments(node_cls, given: dict, overrides: dict) -> tuple[dict, dict]:
    """Every input of a V3 node: ``given`` values, else ``overrides`` (if the input exists and, for a combo,
    offers that value), else its schema default. Returns ``(arguments, overrides applied)``.

    Inputs the node gains later get their defaults; overrides for inputs it lacks are skipped.
    """
    schema = node_cls.define_schema()
    defaults = schema_defaults(node_cls)
    args, applied = {}, {}
    for inp in schema.inputs:
        name = inp.id
        options = getattr(inp, "options", None)
        if name in given:
            args[name] = given[name]
        elif name in overrides and (not options or overrides[name] in options):
            args[name] = applied[name] = overrides[name]
        elif name in defaults:
            args[name] = defaults[name]
        elif not inp.optional:
            raise ValueError(f"{schema.node_id} input {name!r} has no default: gpu_check must give it a value")
    return args, applied


class StepClock:
    """A ComfyUI progress-bar hook that records when each update happened."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, value, total, preview_image, prompt_id=None, node_id=None) -> None:
        self.times.append(time.perf_counter())


@contextlib.contextmanager
def progress_hook(hook) -> Iterator[None]:
    import comfy.utils

    stock = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        yield
    finally:
        comfy.utils.set_progress_bar_global_hook(stock)


def images(count: int, size: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.rand(count, size, size, 3, generator=gen)


def precision_overrides(dtype_name: str) -> dict:
    """The trainers' precision inputs, whichever name a node uses."""
    return {"precision": dtype_name, "mixed_precision": dtype_name}


def run_unitune(models: tuple, family: str, dtype_name: str, mode: Mode) -> dict:
    from frozentune.nodes.unitune_nodes import UniTuneFineTune

    model, clip, vae = models
    overrides = {"steps": mode.train_steps, "seed": 0, **precision_overrides(dtype_name)}
    if family == "sdxl":  # SDXL at 1024 px fits consumer cards at batch 1 with checkpointing (the bench's case)
        overrides.update(batch_size=1, gradient_checkpointing=True)
    if mode.batch_size:
        overrides["batch_size"] = mode.batch_size
    given = dict(model=model, clip=clip, vae=vae, image=images(1, mode.sizes[family], 1))
    args, applied = schema_arguments(UniTuneFineTune, given, overrides)
    clock = StepClock()
    with progress_hook(clock):
        tuned, curve = UniTuneFineTune.execute(**args).args[:2]
    if not tuned.patches:
        raise RuntimeError("UniTune Fine-Tune returned a MODEL without trained patches")
    del tuned, curve
    return {"steps": len(clock.times), "it_per_s": steps_per_second(clock.times),
            "settings": {**applied, "image": mode.sizes[family]}}


def run_controlnet_zero(models: tuple, family: str, dtype_name: str, mode: Mode) -> dict:
    from frozentune.nodes.controlnet_zero_nodes import ControlNetZeroCreate, ControlNetZeroTrain

    model, clip, vae = models
    create_args, _ = schema_arguments(ControlNetZeroCreate, {"model": model}, {})
    control_net = ControlNetZeroCreate.execute(**create_args).args[0]
    size = mode.sizes[family]
    overrides = {"steps": mode.train_steps, "resolution": size, "seed": 0, "checkpoint_every": 0,
                 "run_name": f"gpu_check_{family}_{dtype_name}", "resume": False, **precision_overrides(dtype_name)}
    if family == "sdxl":  # 1024 px, batch 1, 8-bit AdamW where offered (the bench's SDXL case)
        overrides.update(batch_size=1, gradient_checkpointing=True, optimizer="adamw8bit")
    if mode.batch_size:
        overrides["batch_size"] = mode.batch_size
    batch = overrides.get("batch_size", schema_defaults(ControlNetZeroTrain).get("batch_size", 1))
    hints = (images(batch, size, 3) > 0.5).float()
    given = dict(model=model, clip=clip, vae=vae, control_net=control_net, dataset_folder="",
                 images=images(batch, size, 2), hints=hints, captions="a photo of a red disk")
    args, applied = schema_arguments(ControlNetZeroTrain, given, overrides)
    clock = StepClock()
    with progress_hook(clock):
        trained, curve = ControlNetZeroTrain.execute(**args).args[:2]
    if trained is None:
        raise RuntimeError("ControlNet-Zero Train returned no CONTROL_NET")
    del trained, curve, control_net
    return {"steps": len(clock.times), "it_per_s": steps_per_second(clock.times),
            "settings": {**applied, "images": batch}}


TRAINERS: dict[str, Callable[[tuple, str, str, Mode], dict]] = {
    "unitune_finetune": run_unitune,
    "controlnet_zero": run_controlnet_zero,
}


def release_models(device: str) -> None:
    import comfy.model_management as mm

    try:
        mm.unload_all_models()
        mm.soft_empty_cache()
    except RuntimeError as err:  # the next items will report the device's state
        log.error("releasing the models failed: %s", one_line(err))
    _empty_cache(device)


def trainer_items(mode: Mode, path: Path, family: str, dtype_name: str, device: str,
                  trainers: tuple[str, ...] | None = None) -> list[Item]:
    """Load one checkpoint in one dtype, then run ``trainers`` (default: every trainer) on it."""
    from harness.precision import DTYPE_NAMES, load_checkpoint

    loaded: dict = {}

    def load() -> dict:
        # on the CPU, compute natively in half precision as a GPU does (harness.precision)
        loaded["models"] = load_checkpoint(path, DTYPE_NAMES[dtype_name], native=device == "cpu")
        model = loaded["models"][0].model
        return {"settings": {"unet_dtype": str(model.get_dtype()).removeprefix("torch."),
                             "manual_cast": str(model.manual_cast_dtype).removeprefix("torch.")}}

    items = [run_item(Item(f"load {family} {dtype_name}", "load"), load, device)]
    for trainer, fn in TRAINERS.items():
        if trainers is not None and trainer not in trainers:
            continue
        item = Item(f"{trainer} {family} {dtype_name}", "trainer")
        if "models" in loaded:
            run_item(item, functools.partial(fn, loaded["models"], family, dtype_name, mode), device)
        else:
            item.error = "not run: the checkpoint did not load"
        items.append(item)
    loaded.clear()
    return items


def parse_loads(text: str) -> list[tuple[str, str]]:
    """``"sd15:fp16,sdxl:bf16"`` -> ``[("sd15", "fp16"), ("sdxl", "bf16")]``; empty: every family in every dtype.

    A subset is how the CPU dry run in CI checks the wiring of every family and every dtype without the
    cost of all four loads (the full dry run is the ``long`` test).
    """
    names = [n.strip() for n in text.split(",") if n.strip()] or list(ALL_LOADS)
    unknown = [n for n in names if n not in ALL_LOADS]
    if unknown:
        raise SystemExit(f"gpu-check: unknown --loads {', '.join(unknown)}; choose from {', '.join(ALL_LOADS)}")
    return [tuple(n.split(":")) for n in names]


def run_trainers(mode: Mode, paths: dict[str, Path], device: str,
                 loads: list[tuple[str, str]] | None = None,
                 only: dict[str, tuple[str, ...]] | None = None) -> list[Item]:
    """Every trainer on each load, or per ``"family:dtype"`` of ``only`` just the trainers it names."""
    import torch

    items = []
    for family, dtype_name in loads or parse_loads(""):
        trainers = None if only is None else only[f"{family}:{dtype_name}"]
        with torch.inference_mode():  # as ComfyUI's executor runs every node
            items += trainer_items(mode, paths[family], family, dtype_name, device, trainers)
        release_models(device)
    return items


# --- workflows, on a ComfyUI server -------------------------------------------------------------------------

def stand_in(folder: str, family: str, paths: dict[str, Path]) -> Path:
    """The built file that stands in for a model name the example workflows use (harness.server.STAND_INS)."""
    sdxl = family in ("sdxl", "sdxl_blocks")
    key = ("sd15" if family == "sd15" else "sdxl" if sdxl else None) if folder == "checkpoints" else \
        (folder if sdxl else None)
    if key not in paths:
        raise KeyError(f"gpu_check has no full-size stand-in for {folder}/{family}: add one to build_models()")
    return paths[key]


def prepare_server_base(base: Path, paths: dict[str, Path], tiny: bool) -> Path:
    from harness import server

    server.prepare_base(base, with_models=False)
    for folder, names in server.STAND_INS.items():
        for name, family in names.items():
            server._link(base / "models" / folder / name, stand_in(folder, family, paths))
    server._link(base / "custom_nodes" / "frozentune_gpu_check_probe", PROBE_DIR)
    if tiny:  # the stock CLIPVisionLoader knows only full-size layouts (see harness.tiny_ipadapter)
        server._link(base / "custom_nodes" / "frozentune_tiny_clip_vision",
                     REPO / "tests" / "harness" / "tiny_clip_vision_node")
    return base


# Nodes whose step counts are training steps (pivotal_steps: UniTune's word steps before the tuning).
TRAINING_NODES = ("FrozenTuneUniTuneFineTune", "FrozenTuneControlNetZeroTrain", "FrozenTuneTextualInversionTrain")


def cap_training_steps(prompt: dict, steps: int) -> tuple[dict, dict]:
    """A copy of an API prompt whose training nodes run at most ``steps`` steps; returns it and what changed."""
    out = json.loads(json.dumps(prompt))
    changed = {}
    for node_id, node in out.items():
        inputs = node.get("inputs", {})
        if not node.get("class_type", "").startswith("FrozenTune") or not isinstance(inputs.get("steps"), int):
            continue
        if node["class_type"] not in TRAINING_NODES:
            continue
        for name in ("steps", "checkpoint_every", "pivotal_steps"):  # capped, not set: 0 (off) stays 0
            value = inputs.get(name)
            if isinstance(value, int) and value > steps:
                inputs[name] = steps
                changed[f"{node_id} {node['class_type']}.{name}"] = f"{value} -> {steps}"
    return out, changed


def run_workflow(srv, path: Path, mode: Mode, out: Path, timeout: float) -> dict:
    from harness.server import error_message, shrink_for_tiny_models

    prompt = srv.to_api(json.loads(path.read_text()))
    if mode.name == "tiny":
        prompt = shrink_for_tiny_models(prompt)
    prompt, changed = cap_training_steps(prompt, mode.workflow_train_steps)
    srv.post("/frozentune_gpu_check/reset", {})
    entry = srv.wait(srv.queue(prompt), timeout)
    stats = srv.get("/frozentune_gpu_check/stats")
    if entry["status"].get("status_str") != "success":
        raise RuntimeError(error_message(entry))
    files = srv.output_files(entry)
    if not files:
        raise RuntimeError("the workflow saved no image")
    dest = out / "workflows" / path.stem
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    copied = [str(Path(shutil.copy2(f, dest / f.name)).relative_to(out)) for f in files]
    rates = {}
    for node_id, times in stats["steps"].items():
        rate = steps_per_second(times)
        if rate is not None:
            rates[f"{node_id} {prompt.get(node_id, {}).get('class_type', '?')}"] = round(rate, 3)
    return {"max_memory_allocated": stats["max_memory_allocated"], "node_it_per_s": rates,
            "steps": sum(len(t) for t in stats["steps"].values()), "settings": changed, "outputs": copied}


# The base named in a workflow's title (its last parentheses) -> the family this check builds full-size models for.
# Workflows on other bases (Flux.1 dev, SD3.5) wait for their full-size stand-ins (issue 22) and are not run.
WORKFLOW_BASES = {"SD1.5": "sd15", "SDXL": "sdxl"}


def workflow_base(path: Path) -> str:
    return path.stem.rsplit("(", 1)[-1].rstrip(")") if path.stem.endswith(")") else ""


def workflow_files(names: list[str] | None = None) -> list[Path]:
    """The example workflows on the bases this check builds, or those of ``names`` (file stems; an unknown one,
    or one on another base, is an error naming the choices)."""
    files = [p for p in sorted((REPO / "workflows").glob("*.json")) if workflow_base(p) in WORKFLOW_BASES]
    if not names:
        return files
    stems = {p.stem: p for p in files}
    unknown = [n for n in names if n not in stems]
    if unknown:
        raise SystemExit(f"gpu-check: no workflow {', '.join(unknown)}; choose from {', '.join(stems)}")
    return [stems[n] for n in names]


def headless_server_args(build: Path) -> list[str]:
    """ComfyUI flags for a server nobody browses: no API nodes (none is used; a lent GPU machine has no
    internet), and where the frontend package is not installed (the offline bundle, ``make gpu-bundle``)
    an empty web root instead of ComfyUI's exit for the missing page."""
    args = ["--disable-api-nodes"]
    if importlib.util.find_spec("comfyui_frontend_package") is None:
        web = build / "empty_web_root"
        web.mkdir(parents=True, exist_ok=True)
        args += ["--front-end-root", str(web)]
    return args


def run_workflows(mode: Mode, paths: dict[str, Path], device: str, build: Path, out: Path,
                  timeout: float, names: list[str] | None = None) -> list[Item]:
    from harness.server import ComfyServer

    items = [Item(f"workflow {p.stem}", "workflow") for p in workflow_files(names)]
    try:
        base = prepare_server_base(build / f"server_{mode.name}", paths, tiny=mode.name == "tiny")
        srv = ComfyServer(base, cpu=device == "cpu", startup_timeout=300,
                          extra_args=headless_server_args(build)).start()
    except Exception as err:  # noqa: BLE001 - reported on every workflow item
        for item in items:
            item.error = f"not run: the ComfyUI server did not start: {one_line(err)}"
        return items
    try:
        for item, path in zip(items, workflow_files(names), strict=True):  # peak memory: measured in the server
            run_item(item, functools.partial(run_workflow, srv, path, mode, out, timeout), "cpu")
    finally:
        srv.stop()
        log.info("gpu-check server log: %s", srv.log_path)
    return items


# --- report ---------------------------------------------------------------------------------------------------

def environment(device: str) -> dict:
    import torch

    env = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "machine": platform.machine()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}",
                   bf16_supported=torch.cuda.is_bf16_supported())
    return env


def write_report(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# gpu-check ({report['mode']} models, {report['environment'].get('gpu', report['environment']['device'])})",
             "",
             f"{report['passed']}/{len(report['items'])} items passed in {report['seconds']:.0f}s "
             f"(building the models: {report['build_seconds']:.0f}s). torch {report['environment']['torch']}, "
             f"CUDA {report['environment']['cuda']}. UNet parameters: "
             + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in report["unet_parameters"].items()) + ".",
             "",
             f"Time, the build included: {report['seconds']:.0f}s (target: under "
             f"{QUICK_BUDGET_SECONDS if report.get('quick') else BUDGET_SECONDS}s on one H100"
             f"{', --quick' if report.get('quick') else ''}).",
             "",
             "| item | result | seconds | it/s | peak memory | settings / error |",
             "|---|---|---:|---:|---:|---|"]
    for it in report["items"]:
        rate = _fmt(it["it_per_s"]) if it["it_per_s"] is not None else (
            ", ".join(f"{k}: {v:.2f}" for k, v in it["node_it_per_s"].items()) or "-")
        detail = it["error"] or ", ".join(f"{k}={v}" for k, v in it["settings"].items())
        lines.append(f"| {it['name']} | {'pass' if it['passed'] else '**FAIL**'} | {it['seconds']:.1f} | {rate} | "
                     f"{_gib(it['max_memory_allocated'])} | {detail.replace('|', '/')} |")
    lines += ["", "it/s: steps after the first, from the progress-bar updates (workflows: per node). Peak memory: "
              "torch.cuda.max_memory_allocated, reset before each item. Workflows run at their own sizes; "
              "only training steps are capped (see settings).", ""]
    (out / "report.md").write_text("\n".join(lines))


# --- main -------------------------------------------------------------------------------------------------------

def no_gpu_reason() -> str | None:
    """Why this machine cannot run the GPU check, in one line (None when a CUDA GPU is visible)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return None
    return (f"no CUDA GPU visible to torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): run it on a machine "
            "with an NVIDIA GPU and driver")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu only with --tiny: the dry run the unit test uses")
    parser.add_argument("--tiny", action="store_true", help="tiny models, 64 px, 2 steps (the CPU dry run)")
    parser.add_argument("--only", choices=("all", "trainers", "workflows"), default="all")
    parser.add_argument("--train-steps", type=int, default=4, help="steps per trainer item (full size)")
    parser.add_argument("--workflow-train-steps", type=int, default=8,
                        help="cap on the training steps of the example workflows (full size)")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "gpu_check", help="report folder")
    parser.add_argument("--build", type=Path, default=REPO / "build" / "gpu_check",
                        help="where the random models are cached")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per workflow")
    parser.add_argument("--workflows", default="", help="comma-separated workflow file stems (default: all)")
    parser.add_argument("--loads", default="", help="comma-separated family:dtype checkpoint loads the trainers run "
                        f"on (default: all of {', '.join(ALL_LOADS)})")
    parser.add_argument("--quick", action="store_true",
                        help="one trainer item per family (" + ", ".join(f"{t[0]} {k}" for k, t in QUICK_TRAINERS.items())
                        + f") and one workflow ({QUICK_WORKFLOW}), in {QUICK_BUDGET_SECONDS // 60} minutes on one H100")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.device == "cpu" and not args.tiny:
        parser.error("--device cpu runs only with --tiny (full-size models need a GPU)")
    if args.device == "cuda" and (reason := no_gpu_reason()):
        print(f"gpu-check: {reason}", file=sys.stderr)
        return 2

    if args.quick and (args.loads or args.workflows):
        parser.error("--quick chooses the loads and the workflow itself: drop --loads / --workflows")
    loads = parse_loads(",".join(QUICK_TRAINERS) if args.quick else args.loads)  # a typo fails here, before any work
    names = [QUICK_WORKFLOW] if args.quick else [n.strip() for n in args.workflows.split(",") if n.strip()]
    if names:
        workflow_files(names)
    from harness import comfy_env

    comfy_env.import_comfy(cpu=args.device == "cpu")
    comfy_env.import_pack()
    import folder_paths

    mode = tiny_mode() if args.tiny else full_mode(args.train_steps, args.workflow_train_steps)
    build = args.build / mode.name
    for setter, sub in ((folder_paths.set_output_directory, "output"), (folder_paths.set_temp_directory, "temp"),
                        (folder_paths.set_input_directory, "input")):
        (build / "run" / sub).mkdir(parents=True, exist_ok=True)
        setter(str(build / "run" / sub))

    start = time.perf_counter()
    paths = build_models(mode, build, args.device, stand_ins=not args.quick)
    build_seconds = time.perf_counter() - start
    items = []
    if args.only in ("all", "trainers"):
        items += run_trainers(mode, paths, args.device, loads, QUICK_TRAINERS if args.quick else None)
    if args.only in ("all", "workflows"):
        items += run_workflows(mode, paths, args.device, build, args.out, args.timeout, names)
    report = {
        "mode": mode.name, "quick": args.quick, "environment": environment(args.device),
        "unet_parameters": {f: unet_parameters(paths[f]) for f in ("sd15", "sdxl")},
        "full_size_layouts": full_size_layouts() if mode.name == "tiny" else None,
        "build_seconds": round(build_seconds, 1), "seconds": round(time.perf_counter() - start, 1),
        "passed": sum(i.passed for i in items), "items": [asdict(i) for i in items],
    }
    write_report(args.out, report)
    failed = [i.name for i in items if not i.passed]
    log.info("gpu-check: %d/%d passed in %.0fs; report: %s", report["passed"], len(items), report["seconds"],
             args.out / "report.md")
    if failed:
        log.error("gpu-check failed: %s", ", ".join(failed))
    return exit_code(items)


if __name__ == "__main__":
    sys.exit(main())
