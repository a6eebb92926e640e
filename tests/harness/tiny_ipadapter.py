"""Tiny random stand-ins for InstantStyle: IP-Adapter files, a CLIP vision model and a ControlNet.

Built at run time, seeded, cached next to the tiny checkpoints (never committed):

- IP-Adapter files in the public key layout (``image_proj.*`` / ``ip_adapter.{1,3,...}.to_{k,v}_ip.weight``),
  plain (4 tokens) or Plus (Resampler), with one cross-attention pair per attn2 layer of a tiny checkpoint.
- A 2-layer, 64-wide CLIP vision transformer whose projection is 1280-d (the width of ViT-bigG's
  ``image_embeds``, so the SDXL clip_g pooled text subtraction type-checks). ComfyUI's stock loader picks
  an architecture by layer count (48/32/24 layers: full-size only), so the e2e server gets a one-function
  shim (``tiny_clip_vision_node``) that builds this config when the stock detection finds nothing; the
  result is a stock ``ClipVisionModel`` and flows through the stock CLIP_VISION type and nodes.
- A ControlNet in ComfyUI's ldm layout for a tiny checkpoint (encoder copied from its UNet, small random
  zero-convs so the control visibly acts).

Import it only after ComfyUI is importable (see ``harness.comfy_env``).
"""

from __future__ import annotations

import json
import os
import re
import zlib
from pathlib import Path

import torch

from . import tiny_models

SEED = 20261123
CLIP_VISION_CONFIG_PATH = Path(__file__).resolve().parent / "tiny_clip_vision_node" / "tiny_clip_vision_config.json"
CLIP_VISION_FILE = "frozentune_tiny_clip_vision_v1.safetensors"
_ATTN2 = re.compile(r"^model\.diffusion_model\.(input_blocks|middle_block|output_blocks)\.(?:(\d+)\.)?"
                    r"\d+\.transformer_blocks\.(\d+)\.attn2\.to_k\.weight$")
_KIND_ORDER = {"input_blocks": 0, "output_blocks": 1, "middle_block": 2}  # diffusers: down, up, mid


def _randn(shape, name: str, seed: int, std: float | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
    if std is None:
        std = shape[-1] ** -0.5 if len(shape) > 1 else 1.0
    return torch.randn(shape, generator=gen) * std


def attn2_shapes(checkpoint: Path) -> list[tuple[int, int]]:
    """(inner, context) of every attn2 layer of a checkpoint, in the order IP-Adapter files number them."""
    import safetensors

    found = []
    with safetensors.safe_open(str(checkpoint), framework="pt", device="cpu") as f:
        for key in f.keys():
            m = _ATTN2.match(key)
            if m:
                kind, block, t = m.group(1), int(m.group(2) or 0), int(m.group(3))
                found.append(((_KIND_ORDER[kind], block, t), tuple(f.get_slice(key).get_shape())))
    return [(shape[0], shape[1]) for _, shape in sorted(found)]


def _norm(sd: dict, prefix: str, dim: int, seed: int, random_norms: bool) -> None:
    if random_norms:
        sd[prefix + "weight"] = 1 + _randn((dim,), prefix + "weight", seed, 0.1)
        sd[prefix + "bias"] = _randn((dim,), prefix + "bias", seed, 0.1)
    else:
        sd[prefix + "weight"], sd[prefix + "bias"] = torch.ones(dim), torch.zeros(dim)


def plain_projection_sd(cross_dim: int, embed_width: int, tokens: int = 4, seed: int = SEED,
                        random_norms: bool = False) -> dict[str, torch.Tensor]:
    sd = {"proj.weight": _randn((tokens * cross_dim, embed_width), "proj.weight", seed),
          "proj.bias": _randn((tokens * cross_dim,), "proj.bias", seed, 0.02)}
    _norm(sd, "norm.", cross_dim, seed, random_norms)
    return sd


def resampler_sd(cross_dim: int, embed_width: int, hidden: int = 128, heads: int = 2, depth: int = 2,
                 queries: int = 16, seed: int = SEED, random_norms: bool = True) -> dict[str, torch.Tensor]:
    """IP-Adapter Plus ``Resampler`` weights in the original layout (dim_head 64)."""
    inner = heads * 64
    sd = {"latents": _randn((1, queries, hidden), "latents", seed, hidden ** -0.5),
          "proj_in.weight": _randn((hidden, embed_width), "proj_in.weight", seed),
          "proj_in.bias": _randn((hidden,), "proj_in.bias", seed, 0.02),
          "proj_out.weight": _randn((cross_dim, hidden), "proj_out.weight", seed),
          "proj_out.bias": _randn((cross_dim,), "proj_out.bias", seed, 0.02)}
    _norm(sd, "norm_out.", cross_dim, seed, random_norms)
    for i in range(depth):
        p = f"layers.{i}."
        _norm(sd, p + "0.norm1.", hidden, seed, random_norms)
        _norm(sd, p + "0.norm2.", hidden, seed, random_norms)
        sd[p + "0.to_q.weight"] = _randn((inner, hidden), p + "0.to_q.weight", seed)
        sd[p + "0.to_kv.weight"] = _randn((2 * inner, hidden), p + "0.to_kv.weight", seed)
        sd[p + "0.to_out.weight"] = _randn((hidden, inner), p + "0.to_out.weight", seed)
        _norm(sd, p + "1.0.", hidden, seed, random_norms)
        sd[p + "1.1.weight"] = _randn((4 * hidden, hidden), p + "1.1.weight", seed)
        sd[p + "1.3.weight"] = _randn((hidden, 4 * hidden), p + "1.3.weight", seed)
    return sd


def ipadapter_state_dict(layers: list[tuple[int, int]], embed_width: int, projection: str = "plain",
                         seed: int = SEED, random_norms: bool = False) -> dict[str, torch.Tensor]:
    """A flat IP-Adapter state dict (``image_proj.*`` + ``ip_adapter.*``) for attn2 layers of these shapes."""
    cross_dim = layers[0][1]
    proj = (plain_projection_sd(cross_dim, embed_width, seed=seed, random_norms=random_norms)
            if projection == "plain" else resampler_sd(cross_dim, embed_width, seed=seed, random_norms=random_norms))
    sd = {"image_proj." + k: v for k, v in proj.items()}
    for n, (inner, context) in enumerate(layers):
        for which in ("k", "v"):
            key = f"{2 * n + 1}.to_{which}_ip.weight"
            sd["ip_adapter." + key] = _randn((inner, context), key, seed)
    return sd


def _save(path: Path, sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    import safetensors.torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def ipadapter_path(family: str, projection: str = "plain", embed_width: int | None = None) -> Path:
    """A cached tiny IP-Adapter file fitting the tiny checkpoint ``family`` (bigG widths by default)."""
    width = embed_width or (1280 if projection == "plain" else 1664)
    path = tiny_models.cache_dir() / f"frozentune_tiny_ipadapter_{family}_{projection}_{width}_v1.safetensors"
    if not path.exists():
        layers = attn2_shapes(tiny_models.checkpoint_path(family))
        _save(path, ipadapter_state_dict(layers, width, projection), {"frozentune_tiny": f"ipadapter {family}"})
    return path


def clip_vision_config() -> dict:
    return json.loads(CLIP_VISION_CONFIG_PATH.read_text())


def clip_vision_state_dict() -> dict[str, torch.Tensor]:
    import comfy.clip_model
    import comfy.ops

    model = comfy.clip_model.CLIPVisionModelProjection(clip_vision_config(), torch.float32, "meta",
                                                       comfy.ops.disable_weight_init)
    return tiny_models.random_state_dict(model, SEED + 7)


def clip_vision_path() -> Path:
    path = tiny_models.cache_dir() / CLIP_VISION_FILE
    if not path.exists():
        _save(path, clip_vision_state_dict(), {"frozentune_tiny": "clip_vision"})
    return path


def clip_vision_model():
    """The tiny CLIP vision as the stock ``comfy.clip_vision.ClipVisionModel`` (what CLIPVisionLoader returns)."""
    import comfy.clip_vision
    import comfy.utils

    model = comfy.clip_vision.ClipVisionModel(str(CLIP_VISION_CONFIG_PATH))
    model.load_sd(comfy.utils.load_torch_file(str(clip_vision_path())))
    return model


def controlnet_state_dict(family: str) -> dict[str, torch.Tensor]:
    import comfy.cldm.cldm
    import comfy.model_detection
    import comfy.ops
    import comfy.utils

    unet = comfy.utils.load_torch_file(str(tiny_models.checkpoint_path(family)))
    unet = {k[len("model.diffusion_model."):]: v for k, v in unet.items() if k.startswith("model.diffusion_model.")}
    config = dict(comfy.model_detection.model_config_from_unet(unet, "").unet_config)
    config.pop("out_channels", None)
    with torch.device("meta"):
        cn = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init,
                                        dtype=torch.float32, **config)
    sd = {}
    for k, ref in cn.state_dict().items():
        if k in unet:
            sd[k] = unet[k].float().clone()
        elif k.endswith("bias") or ref.ndim < 2:
            sd[k] = torch.zeros(ref.shape)
        else:
            sd[k] = _randn(tuple(ref.shape), k, SEED + 11, 0.02 if k.startswith(("zero_convs", "middle_block_out"))
                           else ref.shape[1:].numel() ** -0.5)
    return sd


def controlnet_path(family: str) -> Path:
    path = tiny_models.cache_dir() / f"frozentune_tiny_controlnet_{family}_v1.safetensors"
    if not path.exists():
        _save(path, {k: v.half() for k, v in controlnet_state_dict(family).items()},
              {"frozentune_tiny": f"controlnet {family}"})
    return path


def stand_in_path(folder: str, family: str) -> Path:
    """The tiny file standing in for a model of ComfyUI folder ``folder`` ("ipadapter", "clip_vision", "controlnet")."""
    if folder == "ipadapter":
        return ipadapter_path(family)
    if folder == "clip_vision":
        return clip_vision_path()
    if folder == "controlnet":
        return controlnet_path(family)
    raise KeyError(f"no tiny stand-in for model folder {folder!r}")


def style_image() -> torch.Tensor:
    """A smooth 64 px test image (a ComfyUI IMAGE, batch 1) for the InstantStyle node tests."""
    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    return torch.stack([0.5 + 0.4 * torch.sin(12 * x), 0.3 + 0.5 * y, 0.6 - 0.4 * x * y], dim=-1)[None]


def apply_style(model, adapter, clip_vision, image, **kw):
    """InstantStyle Apply with the tests' defaults (preset style, subtract 0.5); ``kw`` overrides any input."""
    from frozentune.nodes.instantstyle_nodes import InstantStyleApply

    args = dict(weight=1.0, preset="style", custom_blocks="", combine_images="average", content_text="", subtract=0.5,
                start_at=0.0, end_at=1.0)
    args.update(kw)
    return InstantStyleApply.execute(model=model, ipadapter=adapter, clip_vision=clip_vision, image=image,
                                     **args).args[0]
