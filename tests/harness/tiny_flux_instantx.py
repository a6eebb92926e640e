"""Tiny random stand-ins for InstantX's Flux IP-Adapter: adapter files sized for the tiny Flux, and a tiny SigLIP.

- Adapter files in InstantX's published layout (``ip-adapter.bin``: a pickled ``{"image_proj": {...},
  "ip_adapter": {...}}``; or flat ``.safetensors`` with the same names): ``image_proj`` an ``MLPProjModel``
  (proj.0 [2E, E], proj.2 [T*C, 2E], norm [C]) and ``ip_adapter.{i}.to_{k,v}_ip.weight`` [hidden, C], i over the
  model's double then single blocks. Real: E 1152, T 128, C 4096, hidden 3072, 19 + 38 blocks; tiny: E 144, T 8,
  C 64, the tiny Flux's hidden 64 and 2 + 2 blocks. InstantX's k/v start from no special init, so random.
- A 2-layer SigLIP vision tower in the HF layout of google/siglip-so400m-patch14-384's
  ``model.safetensors`` (``vision_model.*`` keys, pooling head ``vision_model.head.*`` included), 144 wide in 2 heads
  of 72 (so400m: 16 of 72), 56-pixel
  images in 14-pixel patches (16 tokens; real: 384, 729). ComfyUI's stock detection picks SigLIP configs by
  width and position count (full size only), so tests build the stock ``ClipVisionModel`` from
  ``siglip_config_path()`` and load these weights into it; the HF config (``hf_siglip_config``) is the reference.

Built at run time, seeded, cached next to the other tiny models (never committed).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

from . import tiny_models

SEED = 20261206
VERSION = 2
EMBED, TOKENS, CROSS = 144, 8, 64
# 2 heads of 72, as so400m's 16 of 72 (the pooling head's count is read as width // 72)
SIGLIP = {"hidden_size": 144, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 56, "patch_size": 14}
# ComfyUI's clip_vision json for that tower (as comfy/clip_vision_siglip_384.json, tiny widths).
COMFY_SIGLIP_CONFIG = {"num_channels": 3, "hidden_act": "gelu_pytorch_tanh", "model_type": "siglip_vision_model",
                       "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], **SIGLIP}


def _randn(shape, name: str, seed: int, std: float | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
    if std is None:
        std = shape[-1] ** -0.5 if len(shape) > 1 else 1.0
    return torch.randn(shape, generator=gen) * std


def instantx_state_dict(double: int = 2, single: int = 2, hidden: int = 64, cross: int = CROSS, embed: int = EMBED,
                        tokens: int = TOKENS, seed: int = SEED, kv_std: float | None = None) -> dict:
    """The nested ``{"image_proj": ..., "ip_adapter": ...}`` dict of InstantX's ``ip-adapter.bin``, tiny widths."""
    proj = {
        "proj.0.weight": _randn((2 * embed, embed), "proj.0.weight", seed),
        "proj.0.bias": _randn((2 * embed,), "proj.0.bias", seed, 0.1),
        "proj.2.weight": _randn((tokens * cross, 2 * embed), "proj.2.weight", seed),
        "proj.2.bias": _randn((tokens * cross,), "proj.2.bias", seed, 0.1),
        "norm.weight": 1 + _randn((cross,), "norm.weight", seed, 0.1),
        "norm.bias": _randn((cross,), "norm.bias", seed, 0.1),
    }
    ip = {}
    for i in range(double + single):
        for kv in ("k", "v"):
            name = f"{i}.to_{kv}_ip.weight"
            ip[name] = _randn((hidden, cross), name, seed, kv_std)
    return {"image_proj": proj, "ip_adapter": ip}


def flat(sd: dict) -> dict[str, torch.Tensor]:
    return {f"{section}.{k}": v for section, tensors in sd.items() for k, v in tensors.items()}


def instantx_path(kind: str = "bin") -> Path:
    """A cached tiny InstantX adapter for the tiny Flux (2 double + 2 single, 64 wide): ``bin`` or ``safetensors``."""
    path = tiny_models.cache_dir() / f"frozentune_tiny_instantx_flux_v{VERSION}.{kind}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        sd = instantx_state_dict()
        tmp = path.with_name(path.name + ".tmp")
        if kind == "bin":
            torch.save(sd, tmp)
        else:
            import safetensors.torch

            safetensors.torch.save_file(flat(sd), str(tmp))
        tmp.replace(path)
    return path


def hf_siglip_config():
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_act="gelu_pytorch_tanh", **SIGLIP)


def siglip_state_dict(seed: int = SEED) -> dict[str, torch.Tensor]:
    """The tiny SigLIP's tensors with the ``vision_model.`` prefix of the published file, head included."""
    from transformers import SiglipVisionModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SiglipVisionModel(hf_siglip_config())
    out = {}
    for k, v in model.state_dict().items():  # perturb every tensor so norms and biases are not trivial
        out[f"vision_model.{k}"] = (v + _randn(tuple(v.shape), k, seed, 0.05)).contiguous()
    return out


def siglip_path() -> Path:
    path = tiny_models.cache_dir() / f"frozentune_tiny_siglip_v{VERSION}.safetensors"
    if not path.exists():
        import safetensors.torch

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        safetensors.torch.save_file(siglip_state_dict(), str(tmp))
        tmp.replace(path)
    return path


def siglip_config_path() -> Path:
    path = tiny_models.cache_dir() / f"frozentune_tiny_siglip_config_v{VERSION}.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(COMFY_SIGLIP_CONFIG, indent=1))
    return path


def clip_vision_model():
    """The tiny SigLIP as a stock ``comfy.clip_vision.ClipVisionModel`` (the stock loader drops the head, as here)."""
    import comfy.clip_vision
    import comfy.utils

    model = comfy.clip_vision.ClipVisionModel(str(siglip_config_path()))
    model.load_sd(comfy.utils.load_torch_file(str(siglip_path())))
    return model


def hf_siglip():
    """The same weights in transformers' ``SiglipVisionModel`` (the reference InstantX calls), float32, eval."""
    from transformers import SiglipVisionModel

    model = SiglipVisionModel(hf_siglip_config()).eval()
    sd = {k[len("vision_model."):]: v for k, v in siglip_state_dict().items()}
    model.load_state_dict(sd, strict=True)
    return model


# --- references written from InstantX's source (attention_processor.py, infer_flux_ipa_siglip.py) and Shakker-Labs'
# ComfyUI port (flux/layers.py DoubleStreamBlockIPA / SingleStreamBlockIPA), for the tests to compare against --------

class MLPProjModel(torch.nn.Module):
    """InstantX's image projection (infer_flux_ipa_siglip.py; the same class in Shakker's ipadapter_flux.py)."""

    def __init__(self, cross_attention_dim: int, id_embeddings_dim: int, num_tokens: int):
        super().__init__()
        self.cross_attention_dim, self.num_tokens = cross_attention_dim, num_tokens
        self.proj = torch.nn.Sequential(torch.nn.Linear(id_embeddings_dim, id_embeddings_dim * 2), torch.nn.GELU(),
                                        torch.nn.Linear(id_embeddings_dim * 2, cross_attention_dim * num_tokens))
        self.norm = torch.nn.LayerNorm(cross_attention_dim)

    def forward(self, id_embeds):
        x = self.proj(id_embeds)
        return self.norm(x.reshape(-1, self.num_tokens, self.cross_attention_dim))


class IPAFluxAttnProcessorIP(torch.nn.Module):
    """The image-attention part of InstantX's ``IPAFluxAttnProcessor2_0.__call__``: ``query`` [B, H, L, D] is the
    block's query after ``attn.norm_q`` and before ``apply_rotary_emb``; the caller adds ``scale * ip``."""

    def __init__(self, hidden_size: int, cross_attention_dim: int, head_dim: int):
        from diffusers.models.normalization import RMSNorm

        super().__init__()
        self.to_k_ip = torch.nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = torch.nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.norm_added_k = RMSNorm(head_dim, eps=1e-5, elementwise_affine=False)

    def forward(self, query, image_emb):
        batch_size, heads, _, head_dim = query.shape
        k = self.to_k_ip(image_emb).view(batch_size, -1, heads, head_dim).transpose(1, 2)
        v = self.to_v_ip(image_emb).view(batch_size, -1, heads, head_dim).transpose(1, 2)
        k = self.norm_added_k(k)
        ip = torch.nn.functional.scaled_dot_product_attention(query, k, v, dropout_p=0.0, is_causal=False)
        return ip.transpose(1, 2).reshape(batch_size, -1, heads * head_dim).to(query.dtype)


def reference_processors(sd: dict, head_dim: int) -> list[IPAFluxAttnProcessorIP]:
    """One processor per file layer, loaded strictly from the nested state dict (InstantX's ``ip_layers.load_state_dict``)."""
    ip = sd["ip_adapter"]
    n = len(ip) // 2
    hidden, cross = ip["0.to_k_ip.weight"].shape
    procs = torch.nn.ModuleList(IPAFluxAttnProcessorIP(hidden, cross, head_dim) for _ in range(n))
    procs.load_state_dict(ip, strict=True)
    return list(procs)


def reference_double(block, proc: IPAFluxAttnProcessorIP, image_emb: torch.Tensor, scale: float):
    """A ``patches_replace["dit"]`` double-block replace computing Shakker's ``DoubleStreamBlockIPA.forward``."""
    from comfy.ldm.flux.math import attention

    def run(args, extra):
        img, txt, vec, pe = args["img"], args["txt"], args["vec"], args["pe"]
        heads = block.num_heads
        img_mod1, img_mod2 = block.img_mod(vec)
        txt_mod1, txt_mod2 = block.txt_mod(vec)
        img_qkv = block.img_attn.qkv((1 + img_mod1.scale) * block.img_norm1(img) + img_mod1.shift)
        img_q, img_k, img_v = img_qkv.view(img_qkv.shape[0], img_qkv.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
        img_q, img_k = block.img_attn.norm(img_q, img_k, img_v)
        txt_qkv = block.txt_attn.qkv((1 + txt_mod1.scale) * block.txt_norm1(txt) + txt_mod1.shift)
        txt_q, txt_k, txt_v = txt_qkv.view(txt_qkv.shape[0], txt_qkv.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
        txt_q, txt_k = block.txt_attn.norm(txt_q, txt_k, txt_v)
        attn = attention(torch.cat((txt_q, img_q), dim=2), torch.cat((txt_k, img_k), dim=2),
                         torch.cat((txt_v, img_v), dim=2), pe=pe)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]
        img_attn = img_attn + scale * proc(img_q, image_emb.to(img_q.dtype))
        img = img + img_mod1.gate * block.img_attn.proj(img_attn)
        img = img + img_mod2.gate * block.img_mlp((1 + img_mod2.scale) * block.img_norm2(img) + img_mod2.shift)
        txt = txt + txt_mod1.gate * block.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * block.txt_mlp((1 + txt_mod2.scale) * block.txt_norm2(txt) + txt_mod2.shift)
        return {"img": img, "txt": txt}

    return run


def reference_single(block, proc: IPAFluxAttnProcessorIP, image_emb: torch.Tensor, scale: float):
    """A single-block replace computing Shakker's ``SingleStreamBlockIPA.forward`` (query: every txt + img row)."""
    from comfy.ldm.flux.math import attention

    def run(args, extra):
        x, vec, pe = args["img"], args["vec"], args["pe"]
        mod, _ = block.modulation(vec)
        qkv, mlp = torch.split(block.linear1((1 + mod.scale) * block.pre_norm(x) + mod.shift),
                               [3 * block.hidden_size, block.mlp_hidden_dim_first], dim=-1)
        q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = block.norm(q, k, v)
        attn = attention(q, k, v, pe=pe)
        attn = attn + scale * proc(q, image_emb.to(q.dtype))
        return {"img": x + mod.gate * block.linear2(torch.cat((attn, block.mlp_act(mlp)), 2))}

    return run
