"""Tiny random checkpoints that ComfyUI's stock loaders detect as SD1.5 and SDXL-family.

No weights can be downloaded here, so tests, benchmarks and the demo build these on demand
and cache them under ``build/tiny_models/`` (``FROZENTUNE_TINY_DIR`` overrides). They are
seeded and deterministic. Random weights prove plumbing, maths and learning dynamics,
never image quality.

- SD1.5: a 16.2M-parameter UNet (320 channels, one level, conv proj, context 768) that
  ``comfy.supported_models.SD15`` matches, TAESD-format VAE keys and full-size random CLIP-L
  text weights, so ``CLIPTextEncode`` works.
- SDXL-family: the KOALA-700M shape at one width (76M UNet, transformer depth [0, 2, 5],
  context 2048, adm 2816), TAESD VAE keys and full-size random CLIP-L + CLIP-G text weights,
  so ``CLIPTextEncode`` produces the pooled output and SDXL size conditioning works.

Import it only after ComfyUI is importable (see ``harness.comfy_env``).
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

RECIPE_VERSION = 1
SEED = 20261122
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class TinyRecipe:
    """A UNet shape plus what else the checkpoint carries."""

    family: str  # "sd15" | "sdxl"
    unet: dict
    expected_config: str  # class name in comfy.supported_models the loader must pick

    @property
    def filename(self) -> str:
        return f"frozentune_tiny_{self.family}_v{RECIPE_VERSION}.safetensors"


SD15 = TinyRecipe(
    family="sd15",
    unet=dict(
        model_channels=320, in_channels=4, out_channels=4, num_res_blocks=[1], channel_mult=[1],
        transformer_depth=[1], transformer_depth_output=[0, 1], transformer_depth_middle=-2,
        context_dim=768, num_heads=8, num_head_channels=-1, use_linear_in_transformer=False,
        adm_in_channels=None,
    ),
    expected_config="SD15",
)

SDXL = TinyRecipe(
    family="sdxl",
    unet=dict(
        model_channels=320, in_channels=4, out_channels=4, num_res_blocks=[1, 1, 1], channel_mult=[1, 1, 1],
        transformer_depth=[0, 2, 5], transformer_depth_output=[0, 0, 1, 1, 1, 1], transformer_depth_middle=-1,
        context_dim=2048, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True,
        adm_in_channels=2816, num_classes="sequential",
    ),
    expected_config="KOALA_700M",
)

# The full SDXL block layout at one width (Segmind-Vega depths): it has SDXL's real block ids, so the
# InstantStyle presets ("output", 1) / ("input", 8) and ("middle", 0) exist, which KOALA's layout lacks.
SDXL_BLOCKS = TinyRecipe(
    family="sdxl_blocks",
    unet=dict(
        model_channels=320, in_channels=4, out_channels=4, num_res_blocks=[2, 2, 2], channel_mult=[1, 1, 1],
        transformer_depth=[0, 0, 1, 1, 2, 2], transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2],
        transformer_depth_middle=1, context_dim=2048, num_heads=-1, num_head_channels=64,
        use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential",
    ),
    expected_config="Segmind_Vega",
)

RECIPES = {r.family: r for r in (SD15, SDXL, SDXL_BLOCKS)}


def cache_dir() -> Path:
    return Path(os.environ.get("FROZENTUNE_TINY_DIR", REPO_ROOT / "build" / "tiny_models"))


def _norm_param_names(module: torch.nn.Module) -> set[str]:
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    return {
        f"{name}.{p}" if name else p
        for name, m in module.named_modules() if isinstance(m, norms)
        for p, _ in m.named_parameters(recurse=False)
    }


def random_state_dict(module: torch.nn.Module, seed: int, dtype: torch.dtype = torch.float32) -> dict:
    """Seeded random values for every tensor of ``module`` (which may live on the meta device).

    Norm layers get weight 1 / bias 0, other biases 0, matrices N(0, 1/fan_in) so activations keep
    their scale through deep random stacks, embeddings N(0, 0.02). Each tensor's stream is seeded by
    its name, so a value never depends on the order or presence of other tensors.
    """
    norms = _norm_param_names(module)
    out = {}
    for name, ref in module.state_dict().items():
        shape = ref.shape
        if name in norms:
            t = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        elif name.endswith("logit_scale"):
            t = torch.full(shape, 4.6052)
        elif name.endswith("position_ids"):
            t = torch.arange(shape[-1]).expand(shape).clone()
            out[name] = t
            continue
        elif len(shape) < 2:
            t = torch.zeros(shape) if name.endswith("bias") else torch.ones(shape)
        else:
            gen = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
            std = 0.02 if "embedding" in name else (shape[1:].numel()) ** -0.5
            t = torch.randn(shape, generator=gen) * std
        out[name] = t.to(dtype)
    return out


def _unet_state_dict(recipe: TinyRecipe) -> dict:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(
        image_size=32, use_checkpoint=False, use_spatial_transformer=True, legacy=False,
        dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init, **recipe.unet,
    )
    return random_state_dict(unet, SEED)


def _vae_state_dict() -> dict:
    from comfy.taesd.taesd import TAESD

    with torch.device("meta"):
        taesd = TAESD(latent_channels=4)
    return random_state_dict(taesd, SEED + 1)


def _clip_state_dict(model_config, unet_sd: dict) -> dict:
    target = model_config.clip_target(state_dict=unet_sd)
    clip = target.clip(device="meta", dtype=torch.float16, model_options={})
    return model_config.process_clip_state_dict_for_saving(random_state_dict(clip, SEED + 2, torch.float16))


def build_checkpoint(recipe: TinyRecipe) -> dict[str, torch.Tensor]:
    """The full checkpoint state dict, in the key layout ``CheckpointLoaderSimple`` reads."""
    import comfy.model_detection

    unet = {"model.diffusion_model." + k: v for k, v in _unet_state_dict(recipe).items()}
    model_config = comfy.model_detection.model_config_from_unet(unet, "model.diffusion_model.")
    found = type(model_config).__name__ if model_config is not None else None
    if found != recipe.expected_config:
        raise RuntimeError(f"tiny {recipe.family} UNet detected as {found}, expected {recipe.expected_config}")
    sd = dict(unet)
    sd.update(model_config.process_vae_state_dict_for_saving(_vae_state_dict()))
    sd.update(_clip_state_dict(model_config, unet))
    return {k: v.contiguous() for k, v in sd.items()}


def checkpoint_path(family: str) -> Path:
    """Path to the cached tiny checkpoint of ``family`` ("sd15" or "sdxl"), built if missing."""
    import safetensors.torch

    recipe = RECIPES[family]
    path = cache_dir() / recipe.filename
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("building tiny %s checkpoint at %s", family, path)
    sd = build_checkpoint(recipe)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        safetensors.torch.save_file(sd, str(tmp), metadata={"frozentune_tiny": recipe.family,
                                                            "recipe_version": str(RECIPE_VERSION)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def unet_params(family: str) -> int:
    """Parameter count of the tiny UNet (for reports that must state the model size)."""
    return sum(v.numel() for v in _unet_state_dict(RECIPES[family]).values())
