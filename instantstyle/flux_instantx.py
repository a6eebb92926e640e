"""InstantX's Flux.1 IP-Adapter (``InstantX/FLUX.1-dev-IP-Adapter``): file, image tokens, per-block keys and values.

The maths, from InstantX's ``attention_processor.py`` (``IPAFluxAttnProcessor2_0``) and ``infer_flux_ipa_siglip.py``,
as Shakker-Labs' ComfyUI-IPAdapter-Flux (``flux/layers.py``, ``utils.py``) places them in ComfyUI's Flux blocks:

- Image encoder: SigLIP so400m-patch14-384; InstantX feeds its ``pooler_output`` (the attention-pooling "MAP" head
  over the 729 post-layernorm patch tokens) [B, 1152]. ComfyUI's SigLIP (``clip_model.CLIPVision``) has no head:
  its ``last_hidden_state`` is those 729 tokens and the file's ``vision_model.head.*`` weights are dropped, so
  ``SiglipHead`` reads them from the same file and applies them here.
- ``image_proj`` is an ``MLPProjModel``: Linear(1152, 2304) -> GELU (exact) -> Linear(2304, 128 * 4096) ->
  reshape [B, 128, 4096] -> LayerNorm(4096).
- ``ip_adapter.{i}.to_{k,v}_ip.weight`` [3072, 4096] (no bias), i = 0..56: 0..18 the double blocks, 19..56 the
  single blocks (InstantX builds ``double_blocks.{i}`` then ``single_blocks.{i}``, 19 and 38, hard-coded).
- Per block: ``k = RMSNorm(to_k_ip(tokens))`` per head (no weight, eps 1e-5, diffusers' ``RMSNorm``),
  ``v = to_v_ip(tokens)`` (InstantX norms k only; Shakker's ComfyUI port also norms v -- not followed here),
  ``ip = SDPA(q, k, v)`` with the block's query after its QK-norm and BEFORE RoPE, and ``attn += scale * ip``
  before the output projection: in a double block on the image stream's attention output; in a single block on
  the whole (text + image) sequence's attention output, before ``linear2``.

This module holds the weights and the per-format object (``flux_adapter_file.FluxAdapter``) the Flux injection
(``flux_attention``, ``flux_apply``) calls: ``fit_model``, ``blocks()``, ``tokens(features)``, ``kv(block_type,
block_index, tokens)``, ``placement`` ("attention_output") and ``query_rows`` ("image" double, "all" single).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..storage import safetensors_file as weights_file
from .flux_adapter_file import FluxAdapterFileError

FORMAT = "InstantX Flux IP-Adapter"
EXPECTED = ("an InstantX Flux.1 IP-Adapter (InstantX/FLUX.1-dev-IP-Adapter ip-adapter.bin): 'image_proj.*' "
            "(MLPProjModel: proj.0, proj.2, norm) and 'ip_adapter.{0..56}.to_k_ip/to_v_ip.weight'")
# InstantX's Flux.1-dev file: 19 double + 38 single blocks, 3072 wide, 128 tokens of 4096 from SigLIP's 1152.
FLUX_DEV_SPLIT = {57: (19, 38)}
KV_NORM_EPS = 1e-5  # RMSNorm(128, eps=1e-5, elementwise_affine=False) on the keys
SIGLIP_HEAD_LN_EPS = 1e-6  # HF SiglipVisionConfig.layer_norm_eps default (so400m-patch14-384 keeps it)
SECTIONS = {"image_proj.": "image_proj", "ip_adapter.": "ip_adapter",
            "ipadapter_modules.": "ip_adapter"}  # DiffSynth-Studio names its trained copies' layers so
PROJ_KEYS = frozenset({"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias", "norm.weight", "norm.bias"})
LAYER_KEY = re.compile(r"^(\d+)\.to_([kv])_ip\.weight$")
DOUBLE, SINGLE = "double", "single"  # ComfyUI's transformer_options["block_type"]
BLOCK_TYPE_ALIASES = {"double": DOUBLE, "double_block": DOUBLE, "single": SINGLE, "single_block": SINGLE}
FLUX_HEAD_DIM = 128  # every Flux.1 (24 heads of 128); InstantX's RMSNorm(128) on the keys is per head
ENCODER = "SigLIP so400m-patch14-384"
SIGLIP_HEAD_DIM = 72  # so400m: 1152 = 16 heads of 72; the pooling head's MultiheadAttention has the tower's heads


class InstantXFileError(FluxAdapterFileError):
    pass


# --- reading and recognising files ------------------------------------------------------------------------------

def _read_flat(path: Path) -> dict:
    """The file's tensors: ``.safetensors`` flat, or a weights-only ``.bin`` (InstantX ships a pickled dict)."""
    suffix = path.suffix.lower()
    if suffix in (".safetensors", ".sft"):
        return weights_file.load(path)[0]
    if suffix not in (".bin", ".pt", ".pth", ".ckpt"):
        raise InstantXFileError(f"{path.name}: unsupported file type {suffix!r}; use .safetensors or .bin.")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (or is not a file): pick a file from the list again, "
                                "or refresh the page if it was removed.")
    try:  # memory-mapped where the format allows (InstantX's ip-adapter.bin is 5.3 GB)
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # the legacy (non-zip) format cannot be mapped; any other error recurs just below
        pass
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt, or objects beyond plain tensors (refused by weights_only)
        reason = str(err).strip().split("\n", 1)[0] or type(err).__name__
        raise InstantXFileError(f"{path} could not be read as a weights-only torch file ({reason}): it is "
                                "truncated, corrupt or holds more than plain tensors. Download it again, or "
                                "convert it to .safetensors.") from err


def _flatten(obj: dict) -> dict[str, torch.Tensor]:
    """``{"image_proj": {...}, "ip_adapter": {...}}`` (the .bin layout) -> ``image_proj.x`` / ``ip_adapter.x`` keys."""
    flat: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in _flatten(value).items()})
        elif isinstance(value, torch.Tensor):
            flat[str(key)] = value
    return flat


def recognise(keys) -> str | None:
    """The name of a known adapter/model format these keys belong to, when it is not InstantX Flux."""
    keys = list(keys)
    if any("ip_adapter_double_stream_k_proj" in k for k in keys) or any(
            k.startswith("ip_adapter_proj_model.") for k in keys):
        return "an XLabs Flux IP-Adapter (load it with the XLabs Flux IP-Adapter format)"
    if any(".norm_ip." in k for k in keys) or any(k.startswith("image_proj.time_embedding") for k in keys):
        return "an InstantX SD3.5 IP-Adapter (time-conditioned resampler), which is for SD3.5, not Flux"
    if any("lora" in k.lower() for k in keys if k.startswith(("ip_adapter.", "adapter_modules."))):
        return "an SD IP-Adapter FaceID (LoRA) file"
    if any(k.startswith(("image_proj.latents", "image_proj.proj.weight", "image_proj_model.")) for k in keys):
        return "an SD1.5/SDXL IP-Adapter (h94/IP-Adapter layout); use FrozenTune's SD IP-Adapter loader"
    if any(k.startswith(("double_blocks.", "model.diffusion_model.", "diffusion_model.", "transformer.")) for k in keys):
        return "a Flux/DiT model or ControlNet file, not an IP-Adapter"
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_" in k for k in keys):
        return "a LoRA file, not an IP-Adapter"
    if any(k.startswith("vision_model.") for k in keys):
        return "a CLIP/SigLIP vision model, not an IP-Adapter"
    return None


def _sections(flat: dict[str, torch.Tensor], name: str) -> tuple[dict, dict]:
    proj: dict[str, torch.Tensor] = {}
    ip: dict[str, torch.Tensor] = {}
    other = []
    for key, value in flat.items():
        for prefix, section in SECTIONS.items():
            if key.startswith(prefix):
                (proj if section == "image_proj" else ip)[key[len(prefix):]] = value
                break
        else:
            other.append(key)
    known = recognise(flat)
    if known is not None:
        raise InstantXFileError(f"{name} is {known}; expected {EXPECTED}.")
    if not proj or not ip or other:
        sample = ", ".join(sorted(other or flat)[:4])
        raise InstantXFileError(f"{name} is not an {FORMAT} file: expected {EXPECTED}; found e.g. {sample}.")
    return proj, ip


def _check_projection(proj: dict[str, torch.Tensor], name: str) -> tuple[int, int, int]:
    """(embed_width, cross_dim, tokens) of the MLPProjModel, or a refusal naming what is wrong."""
    if set(proj) != PROJ_KEYS:
        missing, extra = sorted(PROJ_KEYS - set(proj)), sorted(set(proj) - PROJ_KEYS)
        raise InstantXFileError(f"{name}: its image projection is not InstantX's MLPProjModel (missing {missing}, "
                                f"unexpected {extra[:4]}); expected {EXPECTED}.")
    w0, w2, norm = proj["proj.0.weight"], proj["proj.2.weight"], proj["norm.weight"]
    if w0.ndim != 2 or w2.ndim != 2 or norm.ndim != 1:
        raise InstantXFileError(f"{name}: image_proj weights have the wrong rank; the file is damaged.")
    embed, cross = w0.shape[1], norm.shape[0]
    if (w0.shape[0] != 2 * embed or tuple(proj["proj.0.bias"].shape) != (2 * embed,) or w2.shape[1] != 2 * embed
            or w2.shape[0] % cross or tuple(proj["proj.2.bias"].shape) != (w2.shape[0],)
            or tuple(proj["norm.bias"].shape) != (cross,)):
        raise InstantXFileError(
            f"{name}: image_proj shapes do not chain (proj.0 {tuple(w0.shape)}, proj.2 {tuple(w2.shape)}, norm "
            f"{tuple(norm.shape)}); expected proj.0 [2E, E], proj.2 [T*C, 2E], norm [C] (InstantX: E 1152, T 128, "
            "C 4096).")
    return int(embed), int(cross), int(w2.shape[0] // cross)


def _check_layers(ip: dict[str, torch.Tensor], cross: int, name: str) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    found: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in ip.items():
        m = LAYER_KEY.match(key)
        if m is None:
            raise InstantXFileError(f"{name}: unexpected key 'ip_adapter.{key}'; expected {EXPECTED}.")
        found.setdefault(int(m.group(1)), {})[m.group(2)] = value
    ids = sorted(found)
    if ids != list(range(len(ids))) or any(len(found[i]) != 2 for i in ids):
        hint = " (numbered 1, 3, 5, ...: an SD IP-Adapter)" if ids and ids[0] == 1 else ""
        raise InstantXFileError(f"{name}: layers must be numbered 0..N-1 with to_k_ip and to_v_ip each; found ids "
                                f"{ids[:6]}{'...' if len(ids) > 6 else ''}{hint}. Expected {EXPECTED}.")
    hidden = found[0]["k"].shape[0]
    layers = []
    for i in ids:
        k, v = found[i]["k"], found[i]["v"]
        if k.ndim != 2 or k.shape != v.shape or tuple(k.shape) != (hidden, cross):
            raise InstantXFileError(f"{name}: layer {i} has to_k_ip {tuple(k.shape)} / to_v_ip {tuple(v.shape)}, "
                                    f"expected [{hidden}, {cross}] for both (the model width x the token width).")
        layers.append((k, v))
    return tuple(layers)


def from_state_dict(obj: dict, name: str = FORMAT) -> InstantXAdapter:
    """Check an InstantX Flux IP-Adapter state dict (nested .bin layout or flat keys) and wrap it."""
    if not isinstance(obj, dict):
        raise InstantXFileError(f"{name} does not hold a state dict; expected {EXPECTED}.")
    flat = _flatten(obj)
    proj, ip = _sections(flat, name)
    embed, cross, tokens = _check_projection(proj, name)
    layers = _check_layers(ip, cross, name)
    weights_file.check_finite({f"image_proj.{k}": v for k, v in proj.items()}, source=name)
    weights_file.check_finite({f"ip_adapter.{i}.to_k_ip.weight": kv[0] for i, kv in enumerate(layers)}, source=name)
    weights_file.check_finite({f"ip_adapter.{i}.to_v_ip.weight": kv[1] for i, kv in enumerate(layers)}, source=name)
    double, single = FLUX_DEV_SPLIT.get(len(layers), (None, None))
    return InstantXAdapter(name=name, image_proj=dict(proj), layers=layers, embed_width=embed, cross_dim=cross,
                           tokens_per_image=tokens, hidden=int(layers[0][0].shape[0]), double_count=double,
                           single_count=single)


def load_sections(flat: dict, name: str) -> InstantXAdapter:
    """The Flux loader's entry (``flux_adapter_file.from_flat``): refuses with ``InstantXFileError``."""
    return from_state_dict(flat, name)


def load(path: Path) -> InstantXAdapter:
    """An InstantX Flux IP-Adapter file (``.bin`` as published, or ``.safetensors``); foreign files are refused."""
    path = Path(path)
    return from_state_dict(_read_flat(path), path.name)


# --- the adapter ------------------------------------------------------------------------------------------------

def _linear_f32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, rows: int = 16384) -> torch.Tensor:
    """``F.linear`` in float32 without a float32 copy of the whole weight: InstantX's proj.2 is [524288, 2304]
    (1.2G parameters, 2.4 GB in the fp16 file, 4.8 GB in float32), so it is cast ``rows`` output rows at a time."""
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    for start in range(0, weight.shape[0], rows):
        w = weight[start:start + rows].to(device=x.device, dtype=torch.float32)
        out[..., start:start + rows] = F.linear(x, w, bias[start:start + rows].to(x))
    return out


def rms_norm_heads(x: torch.Tensor, heads: int, eps: float = KV_NORM_EPS) -> torch.Tensor:
    """diffusers' weightless ``RMSNorm`` over each head's channels of [B, T, H*D] (variance in float32)."""
    b, t, c = x.shape
    h = x.reshape(b, t, heads, c // heads)
    var = h.float().pow(2).mean(-1, keepdim=True)
    return (h * torch.rsqrt(var + eps)).to(x.dtype).reshape(b, t, c)


@dataclass(frozen=True, eq=False)
class InstantXAdapter:
    """An InstantX Flux IP-Adapter's weights (never modified) and the per-format calls of the Flux injection
    (``flux_adapter_file.FluxAdapter``)."""

    name: str
    image_proj: dict[str, torch.Tensor]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # (to_k_ip, to_v_ip) [hidden, cross] per file index
    embed_width: int  # SigLIP width (1152): pooled vector, or the patch tokens the head pools
    cross_dim: int  # token width (4096)
    tokens_per_image: int  # 128
    hidden: int  # the Flux width it fits (3072)
    double_count: int | None = None  # how the layers split over the model's blocks (19 + 38), known once fitted
    single_count: int | None = None
    heads: int | None = None
    head: SiglipHead | None = field(default=None, repr=False)  # SigLIP's pooling head, from the SigLIP file

    format = "instantx"
    label = FORMAT
    embed_kind = "last_hidden_state"  # ComfyUI's SigLIP output the head pools (or pooled [B, W] directly)
    crop = False  # InstantX's SiglipImageProcessor resizes the whole image to 384x384, no center crop
    encoder = ENCODER

    def __deepcopy__(self, memo):  # immutable: ModelPatcher.clone() must share, not copy, the weights
        return self

    def describe(self) -> str:
        split = (f"{self.double_count} double + {self.single_count} single blocks" if self.double_count is not None
                 else f"{len(self.layers)} blocks")
        return (f"{self.name}: {FORMAT}, {self.tokens_per_image} tokens of {self.cross_dim} from {ENCODER} pooled "
                f"{self.embed_width}-d image embeds, {split}, {self.hidden}-wide Flux")

    def fit(self, double_count: int, single_count: int, hidden: int, heads: int) -> InstantXAdapter:
        """This adapter bound to a Flux model's block counts and heads, or a refusal naming both sides."""
        if hidden != self.hidden:
            raise InstantXFileError(f"{self.name} ({FORMAT}) is for a {self.hidden}-wide Flux; the model is "
                                    f"{hidden}-wide ({double_count} double + {single_count} single blocks).")
        if self.double_count is not None and (double_count, single_count) != (self.double_count, self.single_count):
            raise InstantXFileError(f"{self.name} ({FORMAT}) covers {self.double_count} double + {self.single_count} "
                                    f"single blocks; the model has {double_count} + {single_count}.")
        if double_count + single_count != len(self.layers):
            raise InstantXFileError(f"{self.name} ({FORMAT}) has {len(self.layers)} block layers; the model has "
                                    f"{double_count} double + {single_count} single blocks.")
        if heads <= 0 or hidden % heads:
            raise InstantXFileError(f"{self.name}: {hidden} channels do not split into {heads} heads.")
        return replace(self, double_count=double_count, single_count=single_count, heads=heads)

    def fit_model(self, diffusion_model) -> InstantXAdapter:
        """``fit`` from a ComfyUI Flux diffusion model (``comfy.ldm.flux.model.Flux``): block lists and params."""
        params = diffusion_model.params
        return self.fit(len(diffusion_model.double_blocks), len(diffusion_model.single_blocks),
                        int(params.hidden_size), int(params.num_heads))

    def with_siglip_head(self, head: SiglipHead | Path | str, heads: int | None = None) -> InstantXAdapter:
        """This adapter with SigLIP's pooling head (a ``SiglipHead``, or read from the SigLIP file at ``head``)."""
        if not isinstance(head, SiglipHead):
            head = load_siglip_head(Path(head), heads=heads)
        if head.width != self.embed_width:
            raise InstantXFileError(f"{self.name} ({FORMAT}) takes {self.embed_width}-d SigLIP features; the SigLIP "
                                    f"pooling head is {head.width}-wide: use {ENCODER}.")
        return replace(self, head=head)

    def blocks(self) -> tuple[tuple[str, int], ...]:
        """The (block_type, index) pairs this file has keys and values for, in file order."""
        if self.double_count is None:
            raise InstantXFileError(f"{self.name}: {len(self.layers)} block layers cannot be split into double and "
                                    "single blocks before the adapter is fitted to a model (call fit_model).")
        return tuple([(DOUBLE, i) for i in range(self.double_count)]
                     + [(SINGLE, j) for j in range(self.single_count)])

    def layer_index(self, block_type: str, block_index: int) -> int | None:
        blocks = self.blocks()
        key = (BLOCK_TYPE_ALIASES.get(block_type, block_type), int(block_index))
        return blocks.index(key) if key in blocks else None

    def placement(self, block_type: str) -> str:
        return "attention_output"  # InstantX: hidden_states + scale * ip, before to_out (double) / proj_out (single)

    def query_rows(self, block_type: str) -> str:
        # double: the image stream's query; single: diffusers' single block runs attention over txt + img
        return "image" if BLOCK_TYPE_ALIASES.get(block_type, block_type) == DOUBLE else "all"

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """SigLIP's pooled vector [B, E] (InstantX's ``pooler_output``): the head over patch tokens [B, P, E] (ComfyUI's
        ``last_hidden_state``); pooled input is returned as it is. Average several images here, after pooling."""
        if features.ndim == 3 and features.shape[-1] == self.embed_width:
            if self.head is None:
                raise ValueError(f"{self.name} ({FORMAT}) needs SigLIP's pooled output, and ComfyUI's CLIP vision "
                                 "model has no pooling head: choose the SigLIP file (the one CLIP Vision Loader "
                                 "loads) in the Flux IP-Adapter loader's SigLIP input.")
            return self.head(features)
        return features

    def tokens(self, features: torch.Tensor) -> torch.Tensor:
        """SigLIP features -> image tokens [B, T, C] in float32: pooled [B, E] through ``MLPProjModel``, or the
        post-layernorm patch tokens [B, P, E] (ComfyUI's ``last_hidden_state``) pooled by the head first."""
        features = self.pooled(features)
        if features.ndim != 2 or features.shape[-1] != self.embed_width:
            raise ValueError(f"{self.name} ({FORMAT}) takes {ENCODER} features ({self.embed_width}-d); got shape "
                             f"{tuple(features.shape)}: load the CLIP vision model it was trained with.")
        sd = self.image_proj
        with torch.no_grad():
            x = _linear_f32(features.float(), sd["proj.0.weight"], sd["proj.0.bias"])
            x = _linear_f32(F.gelu(x), sd["proj.2.weight"], sd["proj.2.bias"])
            x = x.reshape(features.shape[0], self.tokens_per_image, self.cross_dim)
            return F.layer_norm(x, (self.cross_dim,), sd["norm.weight"].to(x), sd["norm.bias"].to(x))

    def kv(self, block_type: str, block_index: int, tokens: torch.Tensor,
           heads: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(k, v) [B, T, hidden] for one block in ``tokens``' dtype and device (k RMS-normed per head), or None
        for a block the file does not cover."""
        i = self.layer_index(block_type, block_index)
        if i is None:
            return None
        heads = heads or self.heads or (self.hidden // FLUX_HEAD_DIM if self.hidden % FLUX_HEAD_DIM == 0 else None)
        if heads is None:
            raise InstantXFileError(f"{self.name}: the number of attention heads is unknown (call fit_model).")
        k_w, v_w = (w.to(device=tokens.device, dtype=tokens.dtype) for w in self.layers[i])
        with torch.no_grad():
            return rms_norm_heads(F.linear(tokens, k_w), heads), F.linear(tokens, v_w)


def ip_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """InstantX's image attention for one block: q [B, H, L, D] (after QK-norm, before RoPE), k/v [B, T, H*D]
    -> [B, L, H*D] (to be added, times the scale, to the attention output before the output projection)."""
    b, h, length, d = q.shape
    k = k.to(q.dtype).reshape(k.shape[0], -1, h, d).transpose(1, 2)
    v = v.to(q.dtype).reshape(v.shape[0], -1, h, d).transpose(1, 2)
    if k.shape[0] != b:
        k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, length, h * d)


# --- the image encoder: SigLIP's pooling head ------------------------------------------------------------------

HEAD_KEYS = ("probe", "attention.in_proj_weight", "attention.in_proj_bias", "attention.out_proj.weight",
             "attention.out_proj.bias", "layernorm.weight", "layernorm.bias", "mlp.fc1.weight", "mlp.fc1.bias",
             "mlp.fc2.weight", "mlp.fc2.bias")


@dataclass(frozen=True, eq=False)
class SiglipHead:
    """SigLIP's multihead attention pooling head (HF ``SiglipMultiheadAttentionPoolingHead``): a learned probe
    attends over the post-layernorm patch tokens, then a pre-norm MLP with a residual; gives ``pooler_output``."""

    weights: dict[str, torch.Tensor]
    heads: int
    eps: float = SIGLIP_HEAD_LN_EPS

    def __deepcopy__(self, memo):
        return self

    @property
    def width(self) -> int:
        return int(self.weights["probe"].shape[-1])

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, P, W] post-layernorm patch tokens -> [B, W] pooled, in float32."""
        if hidden.ndim != 3 or hidden.shape[-1] != self.width:
            raise ValueError(f"SigLIP pooling head ({self.width}-wide) got tokens of shape {tuple(hidden.shape)}.")
        w = {k: v.to(device=hidden.device, dtype=torch.float32) for k, v in self.weights.items()}
        x = hidden.float()
        b, width = x.shape[0], self.width
        with torch.no_grad():
            wq, wk, wv = w["attention.in_proj_weight"].chunk(3)
            bq, bk, bv = w["attention.in_proj_bias"].chunk(3)

            def split(t: torch.Tensor) -> torch.Tensor:
                return t.reshape(b, -1, self.heads, width // self.heads).transpose(1, 2)

            q = split(F.linear(w["probe"].expand(b, -1, -1), wq, bq))
            att = F.scaled_dot_product_attention(q, split(F.linear(x, wk, bk)), split(F.linear(x, wv, bv)))
            att = F.linear(att.transpose(1, 2).reshape(b, -1, width), w["attention.out_proj.weight"],
                           w["attention.out_proj.bias"])
            y = F.layer_norm(att, (width,), w["layernorm.weight"], w["layernorm.bias"], self.eps)
            y = F.linear(F.gelu(F.linear(y, w["mlp.fc1.weight"], w["mlp.fc1.bias"]), approximate="tanh"),
                         w["mlp.fc2.weight"], w["mlp.fc2.bias"])
            return (att + y)[:, 0]


def siglip_head_from_tensors(tensors: dict[str, torch.Tensor], heads: int | None = None,
                             name: str = "SigLIP") -> SiglipHead:
    """The pooling head from a SigLIP vision file's tensors (``vision_model.head.*``, or ``head.*``)."""
    for prefix in ("vision_model.head.", "head.", "model.vision_model.head."):
        found = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if found:
            break
    missing = [k for k in HEAD_KEYS if k not in found]
    if missing:
        raise InstantXFileError(
            f"{name} has no complete SigLIP pooling head (missing vision_model.head.{missing[0]}"
            f"{' and others' if len(missing) > 1 else ''}); {FORMAT} needs SigLIP's pooled output: use the full "
            "vision tower file of google/siglip-so400m-patch14-384 (model.safetensors), which keeps the head.")
    width = int(found["probe"].shape[-1])
    heads = heads or (width // SIGLIP_HEAD_DIM if width % SIGLIP_HEAD_DIM == 0 else None)
    if heads is None:
        raise InstantXFileError(f"{name}: the head count of a {width}-wide SigLIP pooling head is unknown.")
    if heads <= 0 or width % heads or tuple(found["attention.in_proj_weight"].shape) != (3 * width, width):
        raise InstantXFileError(f"{name}: pooling head shapes do not fit {heads} heads of a {width}-wide SigLIP.")
    weights_file.check_finite(found, source=name)
    return SiglipHead(weights=found, heads=int(heads))


def clip_vision_heads(clip_vision) -> int:
    """The attention head count of a stock ``comfy.clip_vision.ClipVisionModel`` (the head uses the same)."""
    return int(clip_vision.model.vision_model.encoder.layers[0].self_attn.heads)


def load_siglip_head(path: Path, heads: int | None = None, clip_vision=None) -> SiglipHead:
    """The pooling head from a SigLIP vision file (the one the stock CLIPVisionLoader loads); the head count from
    ``heads``, else the loaded ``clip_vision``, else so400m's 72-wide heads."""
    path = Path(path)
    if path.suffix.lower() in (".safetensors", ".sft"):
        handle = weights_file.open_lazy(path)
        with handle as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if ".head." in f".{k}"}
    else:
        tensors = _flatten(_read_flat(path))
    if heads is None and clip_vision is not None:
        heads = clip_vision_heads(clip_vision)
    return siglip_head_from_tensors(tensors, heads, path.name)


def pooled_embeds(clip_vision, image: torch.Tensor, head: SiglipHead, crop: bool = False) -> torch.Tensor:
    """SigLIP ``pooler_output`` [B, W] of ComfyUI IMAGEs through a stock ClipVisionModel and the head.

    ``crop=False`` resizes the whole image to the encoder's square (384), as InstantX's SigLIP processor does.
    """
    out = clip_vision.encode_image(image, crop=crop)
    hidden = out["last_hidden_state"]
    if hidden.shape[-1] != head.width:
        raise ValueError(f"the CLIP vision model gives {hidden.shape[-1]}-wide tokens; the SigLIP head is "
                         f"{head.width}-wide: load the SigLIP the head came from (siglip-so400m-patch14-384).")
    return head(hidden)
