"""Flux IP-Adapter files: the per-format object the Flux injection reads, and the XLabs format.

Every Flux IP-Adapter format is one immutable object with the same small interface (``FluxAdapter``):
what image features it eats, ``tokens(features)`` (its image projection), ``kv(block_type, index, tokens)``
(the image keys/values of one transformer block, every norm applied) and ``blocks()`` (which blocks it has
weights for), plus where its attention term is added (``placement``) and which query rows read it
(``query_rows``). ``instantstyle.flux_attention`` does the rest for every format.

XLabs (x-flux ``src/flux/xflux_pipeline.py`` ``set_ip`` and ``modules/layers.py`` ``IPDoubleStreamBlockProcessor``
/ ``ImageProjModel``): keys ``double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.{weight,bias}``
(Linear(4096 -> 3072) per double block, bias included) and ``ip_adapter_proj_model.{proj,norm}.*``
(Linear(768 -> 4 x 4096), reshape to 4 tokens, LayerNorm(4096)), fed CLIP ViT-L/14 ``image_embeds``. Sizes are
read from the file, so a tiny test file works the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from ..storage import safetensors_file as weights_file

# What ``tokens()`` eats: the key of ComfyUI's ``ClipVisionModel.encode_image`` output it reads.
EMBED_KINDS = ("image_embeds", "penultimate_hidden_states", "last_hidden_state")
PLACEMENTS = ("block_output", "attention_output")
QUERY_ROWS = ("image", "all")
XLABS_LAYER_KEY = re.compile(r"^double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_([kv])_proj\.(weight|bias)$")
XLABS_PROJ_PREFIX = "ip_adapter_proj_model."
XLABS_EXPECTED = ("XLabs Flux IP-Adapter (keys double_blocks.N.processor.ip_adapter_double_stream_k_proj/v_proj and "
                  "ip_adapter_proj_model.*, e.g. XLabs-AI/flux-ip-adapter flux-ip-adapter.safetensors)")


class FluxAdapterFileError(ValueError):
    pass


@runtime_checkable
class FluxAdapter(Protocol):
    """One Flux IP-Adapter, whatever its file format (immutable; ``deepcopy`` shares it)."""

    name: str  # the file name, for messages
    format: str  # "xlabs" | "instantx"
    label: str  # "XLabs Flux IP-Adapter"
    hidden: int  # the model width its keys/values are made for (3072: Flux.1)
    embed_kind: str  # one of EMBED_KINDS
    embed_width: int  # width of those features
    encoder: str  # the image encoder, for messages

    def blocks(self) -> tuple[tuple[str, int], ...]: ...

    def tokens(self, features: torch.Tensor) -> torch.Tensor: ...

    def kv(self, block_type: str, block_index: int,
           tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None: ...

    def placement(self, block_type: str) -> str: ...

    def query_rows(self, block_type: str) -> str: ...


def is_flux_adapter(obj) -> bool:
    return isinstance(obj, FluxAdapter) and getattr(obj, "format", None) is not None


def describe(adapter: FluxAdapter) -> str:
    if hasattr(adapter, "describe"):  # a format that knows its blocks only once fitted to a model (InstantX)
        return adapter.describe()
    counts = {}
    for block_type, _ in adapter.blocks():
        counts[block_type] = counts.get(block_type, 0) + 1
    blocks = " + ".join(f"{n} {t}" for t, n in counts.items())
    return (f"{adapter.name}: {adapter.label}, {adapter.hidden}-wide, {blocks} blocks, {adapter.encoder} "
            f"{adapter.embed_kind} ({adapter.embed_width}-d)")


@dataclass(frozen=True, eq=False)
class XLabsAdapter:
    """An XLabs Flux IP-Adapter: 4 image tokens from CLIP ViT-L image embeds, image k/v in the double blocks."""

    name: str
    hidden: int
    context: int  # image-token width (4096)
    embed_width: int  # 768: CLIP ViT-L/14 image_embeds
    n_tokens: int
    image_proj: dict[str, torch.Tensor]
    layers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]  # i -> (k_w, k_b, v_w, v_b)

    format = "xlabs"
    label = "XLabs Flux IP-Adapter"
    embed_kind = "image_embeds"

    @property
    def encoder(self) -> str:
        return "CLIP ViT-L/14" if self.embed_width == 768 else f"a {self.embed_width}-d CLIP vision model"

    def __deepcopy__(self, memo):
        return self

    def blocks(self) -> tuple[tuple[str, int], ...]:
        return tuple(("double", i) for i in sorted(self.layers))

    def tokens(self, features: torch.Tensor) -> torch.Tensor:
        """[B, E] image embeds -> [B, n_tokens, context] (x-flux ``ImageProjModel``: Linear, reshape, LayerNorm)."""
        if features.ndim != 2 or features.shape[-1] != self.embed_width:
            raise ValueError(f"{self.name} expects image embeds [B, {self.embed_width}] from {self.encoder}; got "
                             f"shape {tuple(features.shape)}: load the CLIP vision model it was trained with "
                             "(clip_vision ViT-L/14, e.g. clip-vit-large-patch14).")
        sd = {k: v.to(device=features.device, dtype=torch.float32) for k, v in self.image_proj.items()}
        with torch.no_grad():
            x = torch.nn.functional.linear(features.float(), sd["proj.weight"], sd.get("proj.bias"))
            x = x.reshape(features.shape[0], -1, self.context)
            return torch.nn.functional.layer_norm(x, (self.context,), sd["norm.weight"], sd.get("norm.bias"))

    def kv(self, block_type: str, block_index: int, tokens: torch.Tensor):
        if block_type != "double" or block_index not in self.layers:
            return None
        k_w, k_b, v_w, v_b = (t.to(device=tokens.device, dtype=tokens.dtype) for t in self.layers[block_index])
        with torch.no_grad():
            return torch.nn.functional.linear(tokens, k_w, k_b), torch.nn.functional.linear(tokens, v_w, v_b)

    def placement(self, block_type: str) -> str:
        return "block_output"  # x-flux: img = img + ip_scale * ip_attention, after the whole block

    def query_rows(self, block_type: str) -> str:
        return "image"  # x-flux: ip_query = img_q (the image stream's query, QK-normed, before RoPE)


def read_flat(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` (or weights-only ``.bin``) file; errors name the file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        flat, _ = weights_file.load(path)
    elif suffix in (".bin", ".pt", ".pth", ".ckpt"):
        from .adapter_file import _load_legacy

        flat = _load_legacy(path)
        if not isinstance(flat, dict):
            raise FluxAdapterFileError(f"{path.name} does not hold a state dict.")
    else:
        raise FluxAdapterFileError(f"{path.name}: unsupported file type {suffix!r}; use .safetensors or .bin.")
    return flat


def looks_xlabs(flat: dict) -> bool:
    return any(XLABS_LAYER_KEY.match(k) for k in flat) or any(k.startswith(XLABS_PROJ_PREFIX) for k in flat)


def load_xlabs(flat: dict[str, torch.Tensor], name: str) -> XLabsAdapter:
    """An XLabs adapter from its flat state dict, every key and shape checked (errors name the file)."""
    proj: dict[str, torch.Tensor] = {}
    found: dict[int, dict[str, torch.Tensor]] = {}
    unexpected = []
    for key, value in flat.items():
        m = XLABS_LAYER_KEY.match(key)
        if m:
            found.setdefault(int(m.group(1)), {})[f"{m.group(2)}_{m.group(3)}"] = value
        elif key.startswith(XLABS_PROJ_PREFIX):
            proj[key[len(XLABS_PROJ_PREFIX):]] = value
        else:
            unexpected.append(key)
    if unexpected or not found or not {"proj.weight", "norm.weight"} <= set(proj):
        what = f"unexpected keys such as {', '.join(sorted(unexpected)[:3])}" if unexpected else (
            "no ip_adapter_double_stream k/v weights" if not found else "no ip_adapter_proj_model.proj/norm weights")
        raise FluxAdapterFileError(f"{name} is not a complete {XLABS_EXPECTED}: {what}.")
    context = int(proj["norm.weight"].shape[0])
    pw = proj["proj.weight"]
    if pw.ndim != 2 or pw.shape[0] % context:
        raise FluxAdapterFileError(f"{name}: ip_adapter_proj_model.proj.weight {tuple(pw.shape)} is not "
                                   f"[tokens x {context}, embed width].")
    layers = {}
    hidden = None
    for i in sorted(found):
        parts = found[i]
        missing = [p for p in ("k_weight", "k_bias", "v_weight", "v_bias") if p not in parts]
        if missing:
            raise FluxAdapterFileError(f"{name}: double block {i} lacks ip_adapter_double_stream "
                                       f"{', '.join(missing)}; the file is damaged or not an XLabs adapter.")
        k_w, v_w = parts["k_weight"], parts["v_weight"]
        hidden = hidden or int(k_w.shape[0])
        if k_w.shape != (hidden, context) or v_w.shape != (hidden, context) or parts["k_bias"].shape != (hidden,) \
                or parts["v_bias"].shape != (hidden,):
            raise FluxAdapterFileError(f"{name}: double block {i} k/v are {tuple(k_w.shape)} / {tuple(v_w.shape)}, "
                                       f"expected [{hidden}, {context}] with [{hidden}] biases.")
        layers[i] = (k_w, parts["k_bias"], v_w, parts["v_bias"])
    weights_file.check_finite({**{f"proj.{k}": v for k, v in proj.items()},
                               **{f"block {i} {n}": t for i, ts in layers.items() for n, t in zip(("k_w", "k_b", "v_w", "v_b"), ts, strict=True)}},
                              source=name)
    return XLabsAdapter(name=name, hidden=int(hidden), context=context, embed_width=int(pw.shape[1]),
                        n_tokens=int(pw.shape[0] // context), image_proj=dict(proj), layers=layers)


def _instantx_loader():
    """InstantX's loader (``flux_instantx.load_sections``) when that module exists, else None."""
    try:
        from . import flux_instantx
    except ImportError:
        return None
    return getattr(flux_instantx, "load_sections", None)


def _sd_adapter_hint(flat: dict, name: str) -> str | None:
    """A sentence when ``flat`` is an SD1.5/SDXL IP-Adapter (the other loader's format), else None."""
    from . import adapter_file

    try:
        sd = adapter_file.from_sections(adapter_file.split_sections(flat, name), name)
    except (adapter_file.IPAdapterFileError, KeyError, IndexError):
        return None
    return (f"{name} is an {sd.family} IP-Adapter (for SD1.5/SDXL UNets), not a Flux one: load it with IP-Adapter "
            "Loader and use InstantStyle Apply on an SD1.5/SDXL model.")


def from_flat(flat: dict[str, torch.Tensor], name: str) -> FluxAdapter:
    """The Flux adapter in ``flat`` (XLabs, or InstantX when its module is present); foreign files refused."""
    if not isinstance(flat, dict) or not flat:
        raise FluxAdapterFileError(f"{name} holds no tensors: expected an {XLABS_EXPECTED}.")
    if looks_xlabs(flat):
        return load_xlabs(flat, name)
    instantx = _instantx_loader()
    instantx_error = None
    if instantx is not None:
        try:
            return instantx(flat, name)
        except FluxAdapterFileError as err:
            instantx_error = err
    hint = _sd_adapter_hint(flat, name)
    if hint:
        raise FluxAdapterFileError(hint)
    if instantx_error is not None and "instantx" in str(instantx_error).lower() and any(
            k.startswith(("image_proj.", "ip_adapter.")) for k in flat):
        raise instantx_error
    sample = ", ".join(sorted(flat)[:3])
    formats = XLABS_EXPECTED + (" or an InstantX FLUX.1-dev IP-Adapter (image_proj.* + ip_adapter.N.to_k_ip/to_v_ip)"
                                if instantx is not None else "")
    raise FluxAdapterFileError(f"{name} is not a Flux IP-Adapter: expected an {formats}; found keys such as {sample}.")


def load(path: Path) -> FluxAdapter:
    path = Path(path)
    return from_flat(read_flat(path), path.name)
