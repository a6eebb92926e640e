"""Tiny random flow-matching DiTs (Flux.1 dev, Flux.1 schnell, SD3; Chroma) that ComfyUI's stock loaders read.

No weights can be downloaded here, so tests build these on demand and cache them under
``build/tiny_models/dits/`` (``FROZENTUNE_TINY_DIR`` moves ``build/tiny_models``), one folder per
ComfyUI model kind, file names keyed by ``RECIPE_VERSION``. They are seeded and deterministic, a few MB
in all, and build in seconds. Random weights prove plumbing, maths and learning dynamics, never quality.

- Diffusion models (loaded by the stock ``UNETLoader``):
  SD3 is a 2-block MMDiT-X (hidden 128, context 4096, pooled 128) that ComfyUI's shape detection
  classes as ``SD3`` by itself. Flux detection fixes 24 heads of 128 (hidden 3072), so the tiny Flux.1-dev
  (``guidance_in`` present: ``Flux``) and schnell (no ``guidance_in``: ``FluxSchnell``) files carry their
  config in the safetensors metadata key ``CONFIG_KEY``; ``install_detection_shim()`` makes ComfyUI read it.
  The shim answers only for files carrying that key, so stock detection never changes.
- VAE: one 16-channel TAESD-format file (``taesd_encoder.*``/``taesd_decoder.*`` keys, as ``VAELoader``
  reads), 8x down/up-sampling; SD3's and Flux's latent scale/shift live in the model's latent format.
- Text encoders (through ``comfy.sd.load_clip``, what CLIPLoader/DualCLIPLoader call, with
  ``model_options`` giving the tiny widths): CLIP-L (12 layers) + T5 (2 layers) for Flux, cond [B, 256, 64]
  and pooled [B, 64]; CLIP-L (12 layers) + CLIP-G (32 layers) for SD3, no T5 (as checkpoints that ship only
  the two CLIPs), cond [B, 77, 4096] zero-padded by ComfyUI and pooled [B, 128] (real: 2048). Widths are 64; the CLIPs
  keep their real depth because ComfyUI routes CLIP-G files on ``layers.30`` and shares one
  ``model_config`` between both CLIPs. A tiny SD3 T5 is impossible: its output is concatenated with the
  4096-wide CLIP context, so it would need d_model 4096 (a 131M-parameter token table).
  Each file carries its options in the metadata key ``TE_OPTIONS_KEY``; ``install_text_encoder_shim()``
  makes the stock loader nodes (DualCLIPLoader, CheckpointLoaderSimple, ...) pass them, for those files only.
- ``checkpoint_path("sd3")``: the tiny SD3, VAE and CLIP-L + CLIP-G in one checkpoint, as ComfyUI's SD3.5
  templates load SD3.5 (CheckpointLoaderSimple).
- Chroma (issue 24; not in ``FAMILIES``, see ``harness.tiny_dits2``): recipe "chroma", Flux's blocks under the same
  shim; its CLIP is ComfyUI's PixArt-T5 tokenizer and encoder on the tiny T5 (``load_clip`` builds it: the stock
  loader reads a T5 this narrow as T5-base).
- ``real_width_flux_one_block()``: a Flux.1-dev at the real width (hidden 3072, 1 double + 1 single
  block, ~531M parameters, 1 GB bf16) that the stock detection reads without the shim (``long`` tests).

Import it only after ComfyUI is importable (see ``harness.comfy_env``).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness import tiny_models
from harness.precision import DTYPE_NAMES, HALF, computing_in, native_compute

log = logging.getLogger(__name__)

RECIPE_VERSION = 2  # 2: the text encoders carry TE_OPTIONS_KEY; the SD3 checkpoint
SEED = 20261201
CONFIG_KEY = "frozentune_tiny_unet_config"  # safetensors metadata: the file's ComfyUI unet_config as JSON
# safetensors metadata of the tiny text encoders (and the SD3 checkpoint): the ComfyUI text-encoder
# model_options (JSON) that build their widths; read by the text-encoder shim (install_text_encoder_shim)
TE_OPTIONS_KEY = "frozentune_tiny_te_options"
FAMILIES = ("flux1", "flux1_schnell", "sd3")
WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")  # UNETLoader's weight_dtype choices
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
LATENT_CHANNELS = 16
DOWNSCALE = 8

_FLUX_UNET = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 64, "context_in_dim": 64,
    "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
    "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True, "guidance_embed": True, "patch_size": 2,
}
# SD3 detection reads everything from shapes: hidden = 64 * depth, heads = depth. x_block_self_attn_layers
# gives block 0 SD3.5-Medium's second attention (MMDiT-X).
_SD3_UNET = {
    "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "input_size": None, "adm_in_channels": 128,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
    "num_patches": 1024, "pos_embed_max_size": 32, "pos_embed_scaling_factor": None, "qk_norm": "rms",
    "x_block_self_attn_layers": [0],
}
# Shared by CLIP-L and CLIP-G (ComfyUI's long_clipl.py applies one "model_config" to every CLIP file), so
# no layer count here: each keeps its real depth. ComfyUI's text projection is square, so SD3's pooled
# vector (CLIP-L's + CLIP-G's) is 64 + 64 = 128 wide and the tiny SD3 takes adm_in_channels 128.
CLIP_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2}
T5_CONFIG = {"d_model": 64, "d_ff": 128, "d_kv": 32, "num_heads": 2, "num_layers": 2}
# What ``encode`` gives per family: (context width, pooled width); the context length is 256 (Flux T5) / 77.
COND_WIDTHS = {"flux1": (64, 64), "flux1_schnell": (64, 64), "sd3": (4096, 128), "chroma": (64, None)}
# The model_options each tiny text-encoder file needs (written into its TE_OPTIONS_KEY metadata).
TE_FILE_OPTIONS = {"clip_l": {"model_config": CLIP_CONFIG}, "clip_g": {"model_config": CLIP_CONFIG},
                   "t5xxl": {"t5xxl_model_config": T5_CONFIG}}

# Chroma (issue 24): Flux's blocks with modulation=False, fed by distilled_guidance_layer (an Approximator whose
# input is 16 timestep + 16 guidance + 32 modulation-index features, so in_dim 64, and whose output is the
# hidden width); img_in takes the 2x2-patchified latent (in_channels 64). Its detection is Flux's (hidden 3072,
# 24 heads), so it rides the same CONFIG_KEY shim; ComfyUI's config matching classes it Chroma.
_CHROMA_UNET = {
    "image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 64, "hidden_size": 64,
    "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000,
    "qkv_bias": True, "patch_size": 2, "in_dim": 64, "out_dim": 64, "hidden_dim": 32, "n_layers": 2,
}

REAL_FLUX_UNET = {
    **_FLUX_UNET, "hidden_size": 3072, "num_heads": 24, "axes_dim": [16, 56, 56], "vec_in_dim": 768,
    "context_in_dim": 4096, "depth": 1, "depth_single_blocks": 1,
}


@dataclass(frozen=True)
class DiTRecipe:
    """A diffusion-model shape, the ComfyUI config class its file must be detected as, and its text encoders."""

    family: str
    config_class: str  # class name in comfy.supported_models
    unet: dict
    needs_shim: bool  # True: detection must read CONFIG_KEY from the file's metadata
    text_encoders: tuple[str, ...]  # names in TEXT_ENCODERS
    clip_type: str  # comfy.sd.CLIPType member name

    @property
    def filename(self) -> str:
        return f"frozentune_tiny_{self.family}_v{RECIPE_VERSION}.safetensors"


RECIPES = {r.family: r for r in (
    DiTRecipe("flux1", "Flux", _FLUX_UNET, True, ("clip_l", "t5xxl"), "FLUX"),
    DiTRecipe("flux1_schnell", "FluxSchnell", {**_FLUX_UNET, "guidance_embed": False}, True,
              ("clip_l", "t5xxl"), "FLUX"),
    DiTRecipe("sd3", "SD3", _SD3_UNET, False, ("clip_l", "clip_g"), "SD3"),
    # Not in FAMILIES (the issue-22 set that build_all and the loader tests walk); tiny_dits2 has the issue-24 ones.
    DiTRecipe("chroma", "Chroma", _CHROMA_UNET, True, ("t5xxl",), "CHROMA"),
)}
TEXT_ENCODERS = ("clip_l", "clip_g", "t5xxl")
VAE_FILENAME = f"frozentune_tiny_vae16_v{RECIPE_VERSION}.safetensors"
REAL_FLUX_FILENAME = f"frozentune_flux1_real_width_one_block_v{RECIPE_VERSION}.safetensors"


@dataclass
class TinyDiT:
    """A loaded tiny DiT: the stock-loaded MODEL, its CLIP and VAE, and ``encode(prompt) -> CONDITIONING``."""

    model: Any  # comfy.model_patcher.ModelPatcher
    clip: Any  # comfy.sd.CLIP
    vae: Any  # comfy.sd.VAE
    encode: Callable[[str], list]
    family: str
    model_name: str = ""  # file name under ComfyUI's "diffusion_models" folder
    config_class: str = ""  # the comfy.supported_models class its file is detected as

    def empty_latent(self, size: int = 64, batch: int = 1) -> dict:
        """A LATENT of zeros for ``size`` px, as EmptySD3LatentImage makes for SD3 and Flux."""
        return {"samples": torch.zeros(batch, LATENT_CHANNELS, size // DOWNSCALE, size // DOWNSCALE)}


def cache_dir() -> Path:
    return tiny_models.cache_dir() / "dits"


def folder(kind: str) -> Path:
    """The cache folder for one ComfyUI model kind ("diffusion_models", "vae", "text_encoders", "checkpoints")."""
    return cache_dir() / kind


def register_folders() -> None:
    """Make the cache folders ComfyUI model folders, so the stock loader nodes list the tiny files."""
    import folder_paths

    for kind in ("diffusion_models", "vae", "text_encoders", "checkpoints"):
        folder(kind).mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(kind, str(folder(kind)))


# --- the detection shim -------------------------------------------------------------------------------

def install_detection_shim() -> None:
    """Let ComfyUI's model detection read a file's unet_config from its ``CONFIG_KEY`` metadata (idempotent).

    Flux detection hard-codes 24 heads of 128, so a tiny Flux cannot be detected from its shapes. Files
    without the key take the stock path unchanged.
    """
    import comfy.model_detection as md

    if getattr(md.detect_unet_config, "frozentune_tiny_shim", False):
        return
    stock = md.detect_unet_config

    def detect_unet_config(state_dict, key_prefix, metadata=None):
        if metadata and CONFIG_KEY in metadata:
            return json.loads(metadata[CONFIG_KEY])
        return stock(state_dict, key_prefix, metadata=metadata)

    detect_unet_config.frozentune_tiny_shim = True
    detect_unet_config.stock = stock
    md.detect_unet_config = detect_unet_config
    log.info("tiny-DiT detection shim installed (answers only for files with %s metadata)", CONFIG_KEY)


def uninstall_detection_shim() -> bool:
    """Put ComfyUI's own detection back; True if the shim was installed."""
    import comfy.model_detection as md

    if not getattr(md.detect_unet_config, "frozentune_tiny_shim", False):
        return False
    md.detect_unet_config = md.detect_unet_config.stock
    return True


@contextlib.contextmanager
def without_detection_shim():
    """Stock detection only, inside; the shim comes back after if it was installed."""
    was = uninstall_detection_shim()
    try:
        yield
    finally:
        if was:
            install_detection_shim()


# --- the text-encoder shim --------------------------------------------------------------------------

def te_options_of(paths) -> dict:
    """The tiny text-encoder ``model_options`` that the files at ``paths`` carry (``TE_OPTIONS_KEY``), merged;
    {} when none does (other files, including anything that is not safetensors)."""
    import safetensors

    options: dict = {}
    for path in paths:
        try:
            with safetensors.safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
        except Exception:  # not a safetensors file (.pt, .bin, gguf...): the stock loader's business
            continue
        if TE_OPTIONS_KEY in metadata:
            options.update(json.loads(metadata[TE_OPTIONS_KEY]))
    return options


def install_text_encoder_shim() -> None:
    """Let the stock text-encoder loaders read the tiny text encoders (idempotent).

    ComfyUI builds CLIP-L/G and T5 from fixed full-size configs and its loader nodes (CLIPLoader,
    DualCLIPLoader, TripleCLIPLoader, CheckpointLoaderSimple) pass no ``model_options`` that could change
    that. This wraps ``comfy.sd.load_clip`` and ``comfy.sd.load_state_dict_guess_config`` (what those nodes
    call) to add the options a file carries in its ``TE_OPTIONS_KEY`` metadata; files without the key load
    exactly as stock ComfyUI loads them (the same arguments reach the stock functions).
    """
    import comfy.sd

    if getattr(comfy.sd.load_clip, "frozentune_tiny_shim", False):
        return
    stock_load_clip = comfy.sd.load_clip
    stock_guess = comfy.sd.load_state_dict_guess_config

    def load_clip(ckpt_paths, embedding_directory=None, clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
                  model_options={}):  # noqa: B006 - the stock signature, never mutated
        tiny = te_options_of(ckpt_paths)
        if tiny:
            model_options = {**model_options, **tiny}
        return stock_load_clip(ckpt_paths, embedding_directory=embedding_directory, clip_type=clip_type,
                               model_options=model_options)

    def load_state_dict_guess_config(sd, *args, **kwargs):
        metadata = kwargs.get("metadata", args[7] if len(args) > 7 else None)
        if metadata and TE_OPTIONS_KEY in metadata:
            tiny = json.loads(metadata[TE_OPTIONS_KEY])
            if len(args) > 6:
                args = (*args[:6], {**args[6], **tiny}, *args[7:])
            else:
                kwargs["te_model_options"] = {**kwargs.get("te_model_options", {}), **tiny}
        return stock_guess(sd, *args, **kwargs)

    for shim, stock in ((load_clip, stock_load_clip), (load_state_dict_guess_config, stock_guess)):
        shim.frozentune_tiny_shim = True
        shim.stock = stock
    comfy.sd.load_clip = load_clip
    comfy.sd.load_state_dict_guess_config = load_state_dict_guess_config
    log.info("tiny-DiT text-encoder shim installed (answers only for files with %s metadata)", TE_OPTIONS_KEY)


def uninstall_text_encoder_shim() -> bool:
    """Put ComfyUI's own text-encoder loading back; True if the shim was installed."""
    import comfy.sd

    if not getattr(comfy.sd.load_clip, "frozentune_tiny_shim", False):
        return False
    comfy.sd.load_clip = comfy.sd.load_clip.stock
    if getattr(comfy.sd.load_state_dict_guess_config, "frozentune_tiny_shim", False):
        comfy.sd.load_state_dict_guess_config = comfy.sd.load_state_dict_guess_config.stock
    return True


@contextlib.contextmanager
def without_text_encoder_shim():
    """Stock text-encoder loading only, inside; the shim comes back after if it was installed."""
    was = uninstall_text_encoder_shim()
    try:
        yield
    finally:
        if was:
            install_text_encoder_shim()


# --- building ----------------------------------------------------------------------------------------

def _save(sd: dict, path: Path, metadata: dict | None = None) -> Path:
    """Write atomically (several test processes may build at once)."""
    import safetensors.torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        meta = {"frozentune_tiny": path.stem, "recipe_version": str(RECIPE_VERSION), **(metadata or {})}
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _config_class(name: str):
    import comfy.supported_models

    return getattr(comfy.supported_models, name)


def _meta_diffusion_model(config_class: str, unet: dict) -> torch.nn.Module:
    """The real ComfyUI diffusion model class for ``unet``, on the meta device (shapes and names only)."""
    mc = _config_class(config_class)(dict(unet))
    mc.set_inference_dtype(torch.float32, None)
    return mc.get_model({}, device=torch.device("meta")).diffusion_model


def config_model(config_class: str, unet: dict, state_dict: dict[str, torch.Tensor],
                 dtype: torch.dtype | str = torch.float32):
    """A fresh MODEL built from ComfyUI's config class ``config_class`` for ``unet`` directly (no file, no
    detection) holding ``state_dict``: for the families whose detection fixes every width (Qwen-Image:
    ``harness.tiny_qwen``; Z-Image: ``harness.tiny_dits2``). It samples as a loaded one does.

    ``dtype``: fp32; bf16/fp16 (stored and computed natively, as on a GPU); fp8 (weights stored in
    ``float8_e4m3fn``, cast to fp32 for compute, as ComfyUI does for fp8 storage on the CPU).
    """
    import comfy.model_management as mm
    import comfy.model_patcher

    dtype = DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in (torch.float32, torch.float8_e4m3fn, *HALF):
        raise ValueError(f"dtype {dtype} is not fp32, bf16, fp16 or fp8")
    manual_cast = torch.float32 if dtype == torch.float8_e4m3fn else None
    config = _config_class(config_class)(dict(unet))
    config.set_inference_dtype(dtype, manual_cast)
    base = config.get_model({})
    base.load_model_weights({k: v.to(dtype) for k, v in state_dict.items()}, "")
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    assert patcher.model.get_dtype() == dtype and base.manual_cast_dtype == manual_cast
    return patcher


def diffusion_model_state_dict(family: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Seeded random weights for ``family``'s tiny diffusion model, under ComfyUI's own key names."""
    recipe = RECIPES[family]
    module = _meta_diffusion_model(recipe.config_class, recipe.unet)
    sd = tiny_models.random_state_dict(module, SEED, dtype)
    if "pos_embed" in sd:  # SD3 stores a fixed 2-D sin-cos table, not a learned one
        from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed

        n, dim = sd["pos_embed"].shape[1:]
        table = get_2d_sincos_pos_embed(dim, int(round(n ** 0.5)))
        sd["pos_embed"] = torch.from_numpy(table).float().unsqueeze(0).to(dtype)
    return sd


def diffusion_model_path(family: str) -> Path:
    """Path to ``family``'s cached tiny diffusion-model file ("flux1", "flux1_schnell", "sd3"), built if missing."""
    recipe = RECIPES[family]
    path = folder("diffusion_models") / recipe.filename
    if not path.exists():
        log.info("building tiny %s diffusion model at %s", family, path)
        meta = {CONFIG_KEY: json.dumps(recipe.unet)} if recipe.needs_shim else {}
        _save(diffusion_model_state_dict(family), path, meta)
    return path


def _vae_state_dict() -> dict[str, torch.Tensor]:
    from comfy.taesd.taesd import TAESD

    with torch.device("meta"):
        taesd = TAESD(latent_channels=LATENT_CHANNELS)
    sd = tiny_models.random_state_dict(taesd, SEED + 1)
    sd["vae_scale"], sd["vae_shift"] = torch.tensor(1.0), torch.tensor(0.0)
    return sd


def vae_path() -> Path:
    """Path to the cached 16-channel TAESD-format VAE, built if missing."""
    path = folder("vae") / VAE_FILENAME
    if not path.exists():
        log.info("building tiny 16-channel VAE at %s", path)
        _save(_vae_state_dict(), path)
    return path


def _text_encoder_module(name: str) -> torch.nn.Module:
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.text_encoders.sd3_clip

    kw = {"device": "meta", "dtype": torch.float16}
    if name == "clip_l":
        return comfy.sd1_clip.SDClipModel(model_options={"clip_l_model_config": dict(CLIP_CONFIG)}, **kw).transformer
    if name == "clip_g":
        return comfy.sdxl_clip.SDXLClipG(model_options={"clip_g_model_config": dict(CLIP_CONFIG)}, **kw).transformer
    return comfy.text_encoders.sd3_clip.T5XXLModel(model_options={"t5xxl_model_config": dict(T5_CONFIG)},
                                                   **kw).transformer


def text_encoder_path(name: str) -> Path:
    """Path to one cached tiny text encoder ("clip_l", "clip_g", "t5xxl"; fp16, bare HF key names), built if missing."""
    if name not in TEXT_ENCODERS:
        raise ValueError(f"unknown tiny text encoder {name!r}; known: {TEXT_ENCODERS}")
    path = folder("text_encoders") / f"frozentune_tiny_{name}_v{RECIPE_VERSION}.safetensors"
    if not path.exists():
        log.info("building tiny %s text encoder at %s", name, path)
        seed = SEED + 10 + TEXT_ENCODERS.index(name)
        _save(tiny_models.random_state_dict(_text_encoder_module(name), seed, torch.float16), path,
              {TE_OPTIONS_KEY: json.dumps(TE_FILE_OPTIONS[name])})
    return path


def text_encoder_options(family: str) -> dict:
    """The ``model_options`` that make ``comfy.sd.load_clip`` build the tiny widths (a fresh dict each call).

    The CLIP config goes under "model_config": ComfyUI's long_clipl.py overwrites "clip_l_model_config".
    """
    options = {"model_config": dict(CLIP_CONFIG)}
    if "t5xxl" in RECIPES[family].text_encoders:
        options["t5xxl_model_config"] = dict(T5_CONFIG)
    return options


def checkpoint_path(family: str = "sd3") -> Path:
    """Path to a tiny all-in-one checkpoint (CheckpointLoaderSimple's kind, like ComfyUI's SD3.5 templates load),
    built if missing: the tiny SD3 under ``model.diffusion_model.``, the 16-channel VAE under
    ``first_stage_model.`` and CLIP-L + CLIP-G under ``text_encoders.`` (no T5, see the module docstring).

    Its ``TE_OPTIONS_KEY`` metadata gives the tiny text-encoder widths to the text-encoder shim.
    """
    if family != "sd3":
        raise ValueError(f"only the tiny SD3 comes as a checkpoint, not {family!r}")
    path = folder("checkpoints") / f"frozentune_tiny_{family}_checkpoint_v{RECIPE_VERSION}.safetensors"
    if not path.exists():
        import safetensors.torch

        log.info("building the tiny %s checkpoint at %s", family, path)
        sd = {f"model.diffusion_model.{k}": v for k, v in diffusion_model_state_dict(family).items()}
        sd.update({f"first_stage_model.{k}": v for k, v in _vae_state_dict().items()})
        options: dict = {}
        for name in RECIPES[family].text_encoders:
            # per CLIP: load_state_dict_guess_config has no long_clipl step that maps "model_config" to each
            options[f"{name}_model_config"] = dict(CLIP_CONFIG)
            te = safetensors.torch.load_file(str(text_encoder_path(name)))
            sd.update({f"text_encoders.{name}.transformer.{k}": v for k, v in te.items()})
        _save(sd, path, {TE_OPTIONS_KEY: json.dumps(options)})
    return path


def build_all() -> list[Path]:
    """Every tiny file (not the real-width Flux, nor the SD3 checkpoint, a copy of the SD3 files built on first
    use): for a warm cache before timing-sensitive runs."""
    paths = [diffusion_model_path(f) for f in FAMILIES] + [vae_path()]
    return paths + [text_encoder_path(n) for n in TEXT_ENCODERS]


# --- loading -----------------------------------------------------------------------------------------

def _dtype(value) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    return DTYPE_NAMES[value]


def load_model(family: str, dtype: torch.dtype | str | None = None, weight_dtype: str | None = None):
    """``family``'s tiny MODEL through the stock loader (``UNETLoader``, or ``comfy.sd.load_diffusion_model`` it calls).

    ``dtype`` (bf16/fp16) stores and computes natively in that dtype, as a GPU would (the CPU alone would cast
    up to fp32); with ``weight_dtype`` ("fp8_e4m3fn", UNETLoader's choice, or "fp8") the weights are stored
    in fp8 and ``dtype`` is the compute dtype (None: ComfyUI's own pick, fp32 on the CPU).
    """
    import comfy.sd
    import nodes

    install_detection_shim()
    register_folders()
    path = diffusion_model_path(family)
    dtype = _dtype(dtype)
    if weight_dtype == "fp8":
        weight_dtype = "fp8_e4m3fn"
    if weight_dtype not in (None, *WEIGHT_DTYPES):
        raise ValueError(f"weight_dtype {weight_dtype!r} is not one of UNETLoader's {WEIGHT_DTYPES}")
    if weight_dtype not in (None, "default"):
        ctx = computing_in(FP8, dtype) if dtype is not None else contextlib.nullcontext()
        with ctx:
            return nodes.UNETLoader().load_unet(path.name, weight_dtype)[0]
    if dtype is None or dtype == torch.float32:
        return nodes.UNETLoader().load_unet(path.name, "default")[0]
    with native_compute() if dtype in HALF else contextlib.nullcontext():
        model = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": dtype})
    assert model.model.manual_cast_dtype is None, "the half-precision model would still compute in fp32"
    return model


def load_clip(family: str, embedding_directory: list[str] | str | None = None):
    """``family``'s tiny CLIP through ``comfy.sd.load_clip`` (what DualCLIPLoader calls) with tiny-width options.

    ``embedding_directory`` (default: ComfyUI's "embeddings" folders now) is where ``embedding:name`` looks;
    files keyed ``clip_l``/``t5xxl`` (Flux) or ``clip_l``/``clip_g`` (SD3), 64 wide.
    """
    import comfy.sd
    import folder_paths

    recipe = RECIPES[family]
    if embedding_directory is None:
        embedding_directory = folder_paths.get_folder_paths("embeddings")
    if recipe.clip_type == "CHROMA":
        return _chroma_clip(embedding_directory)
    paths = [str(text_encoder_path(n)) for n in recipe.text_encoders]
    return comfy.sd.load_clip(paths, embedding_directory=embedding_directory,
                              clip_type=getattr(comfy.sd.CLIPType, recipe.clip_type),
                              model_options=text_encoder_options(family))


def _chroma_clip(embedding_directory):
    """Chroma's CLIP (ComfyUI's PixArt T5 tokenizer and text encoder, what CLIPLoader type "chroma" builds) on the
    tiny T5. The stock loader cannot take it: ``detect_te_model`` reads a T5 this narrow as T5-base, and only a
    T5-XXL is routed to Chroma's encoder; so the ``comfy.sd.CLIP`` is built as ``load_text_encoder_state_dicts``
    builds it for a T5-XXL, with the tiny width in ``model_options``."""
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.pixart_t5
    import comfy.utils

    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.pixart_t5.PixArtTokenizer,
                                                    comfy.text_encoders.pixart_t5.pixart_te())
    sd = comfy.utils.load_torch_file(str(text_encoder_path("t5xxl")), safe_load=True)
    clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory,
                         parameters=comfy.utils.calculate_parameters(sd),
                         model_options={"t5xxl_model_config": dict(T5_CONFIG)})
    missing, _ = clip.load_sd(sd)
    if missing:
        raise RuntimeError(f"tiny Chroma T5: missing {missing[:3]}")
    return clip


def load_vae():
    """The tiny 16-channel TAESD-format VAE through the stock ``VAELoader``."""
    import nodes

    register_folders()
    return nodes.VAELoader().load_vae(vae_path().name)[0]


def encoder(clip) -> Callable[[str], list]:
    """``encode(prompt) -> CONDITIONING`` through the stock CLIPTextEncode node (Flux: no guidance key, so
    the model's default 3.5 applies unless FluxGuidance sets one)."""
    import nodes

    def encode(prompt: str) -> list:
        return nodes.CLIPTextEncode().encode(clip, prompt)[0]

    return encode


def load(family: str, dtype: torch.dtype | str | None = None, weight_dtype: str | None = None) -> TinyDiT:
    """A fresh MODEL of ``family`` (see ``load_model`` for ``dtype``/``weight_dtype``) with the shared CLIP and VAE."""
    shared = get(family)
    return TinyDiT(model=load_model(family, dtype, weight_dtype), clip=shared.clip, vae=shared.vae,
                   encode=shared.encode, family=family, model_name=shared.model_name,
                   config_class=shared.config_class)


@functools.cache
def get(family: str) -> TinyDiT:
    """``family``'s tiny DiT in fp32, loaded once per process (the ``tiny_dit`` fixture). Never mutate it."""
    if family not in RECIPES:
        raise ValueError(f"unknown tiny DiT family {family!r}; known: {FAMILIES}")
    clip = load_clip(family)
    return TinyDiT(model=load_model(family), clip=clip, vae=_shared_vae(), encode=encoder(clip), family=family,
                   model_name=RECIPES[family].filename, config_class=RECIPES[family].config_class)


@functools.cache
def _shared_vae():
    return load_vae()


def forget() -> None:
    """Drop the cached models (the ``tiny_dit`` fixture's teardown), so none is left for interpreter exit,
    where ``ModelPatcher.__del__`` would run after ComfyUI's module globals are gone."""
    get.cache_clear()
    _shared_vae.cache_clear()
    gc.collect()


# --- the real-width Flux -----------------------------------------------------------------------------

def real_width_flux_one_block() -> Path:
    """Path to a Flux.1-dev at the real width (1 double + 1 single block, ~531M parameters, bf16), built if missing.

    Stock shape detection reads it (no ``CONFIG_KEY`` metadata): the one check that the real detection path
    and real head layout work. Building takes ~1 GB of disk and RAM and tens of seconds.
    """
    path = folder("diffusion_models") / REAL_FLUX_FILENAME
    if not path.exists():
        log.info("building the real-width one-block Flux at %s", path)
        module = _meta_diffusion_model("Flux", REAL_FLUX_UNET)
        _save(tiny_models.random_state_dict(module, SEED + 100, torch.bfloat16), path)
    return path


def tiny_flux_widths(detect: Callable) -> Callable:
    """``detect`` (a ``detect_unet_config``), except that a Flux state dict of the tiny Flux's width gets the tiny
    Flux's heads and RoPE axes (Flux detection fixes 24 heads of 128). Every other width detects as ``detect`` does.

    For a ControlNet file trained on the tiny Flux: ``ControlNetLoader`` passes no file metadata, so the
    ``CONFIG_KEY`` shim cannot reach it (``flux_controlnet_detection``; the e2e server's ``tiny_dit_node``).
    """
    tiny = RECIPES["flux1"].unet

    def detect_unet_config(state_dict, key_prefix, metadata=None):
        cfg = detect(state_dict, key_prefix, metadata=metadata)
        if cfg and cfg.get("image_model") == "flux" and cfg.get("hidden_size") == tiny["hidden_size"]:
            cfg = {**cfg, "num_heads": tiny["num_heads"], "axes_dim": list(tiny["axes_dim"])}
        return cfg

    return detect_unet_config


@contextlib.contextmanager
def flux_controlnet_detection():
    """ComfyUI's detection, plus (test-only) the tiny Flux's widths for a ControlNet file of its width
    (``tiny_flux_widths``), inside."""
    import comfy.model_detection as md

    current = md.detect_unet_config
    md.detect_unet_config = tiny_flux_widths(current)
    try:
        yield
    finally:
        md.detect_unet_config = current
