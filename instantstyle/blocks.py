"""Which cross-attention layers a preset selects, in ComfyUI's attn2 patch keys.

ComfyUI keys an attn2 replace by ``(kind, block id, transformer index)`` with kind ``input`` / ``middle``
/ ``output`` (the middle block is ``("middle", 0)``). The presets are defined on diffusers' names, which
is how InstantStyle names them, and mapped through the model's own layout; block ids are never assumed,
since SDXL variants (KOALA, SSD-1B, Vega) and tiny test models have other layouts.

SDXL (the paper's finding): style = ``up_blocks.0.attentions.1`` = ComfyUI ``("output", 1)``;
layout = ``down_blocks.2.attentions.1`` = ``("input", 8)``.
SD1.5 (experimental; the official code's choice, ``infer_style_sd15``/``README``): style = ``up_blocks.1``
(= output 3, 4, 5); layout = ``down_blocks.2`` + ``mid_block`` (= input 7, 8, middle 0). No separation of
style and layout has been shown for SD1.5 (B-LoRA #8); cubiq's SD1.5 "style transfer" uses another set.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .. import families

# The style and the layout block of each family (diffusers names); a preset is a choice of them.
BLOCK_ROLES: dict[str, dict[str, tuple[str, ...]]] = {
    "sdxl": {"style": ("up_blocks.0.attentions.1",), "layout": ("down_blocks.2.attentions.1",)},
    "sd15": {"style": ("up_blocks.1",), "layout": ("down_blocks.2", "mid_block")},
}
# preset -> the roles it patches. "precise style" (cubiq's "style transfer precise", CrossAttentionPatch.py
# at f204d6f): the style block as "style", and the layout block with the image tokens given to the
# unconditional chunks and zero tokens to the conditional ones, so CFG steers away from the reference's
# layout (see apply.plan_layers).
PRESET_ROLES: dict[str, tuple[str, ...]] = {
    "style": ("style",), "layout": ("layout",), "style+layout": ("style", "layout"),
    "precise style": ("style", "layout"),
}
PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    family: {preset: tuple(p for role in roles for p in blocks[role]) for preset, roles in PRESET_ROLES.items()}
    for family, blocks in BLOCK_ROLES.items()
}
PRESET_NAMES = ("style", "layout", "style+layout", "all blocks", "custom", "precise style")
KINDS = ("input", "middle", "output")
_COMFY_KEY = re.compile(r"\b(input|middle|output)\b\W{0,4}?(\d+)(?:\W{1,4}(\d+))?", re.IGNORECASE)
_DIFFUSERS_NAME = re.compile(r"\b((?:down|up)_blocks\.\d+(?:\.attentions\.\d+)?|mid_block(?:\.attentions\.0)?)\b")
_WEIGHT = re.compile(r"(.*?)\s*[:=]\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")


@dataclass(frozen=True)
class AttnLayer:
    """One cross-attention layer of the model, in the order the IP-Adapter file numbers them."""

    index: int  # position in diffusers' processor order (down, up, mid): the file's key id is 2 * index + 1
    key: tuple[str, int, int]  # ComfyUI attn2 patch key
    diffusers_name: str  # e.g. "up_blocks.0.attentions.1" (the transformer index is not part of it)
    inner_dim: int
    context_dim: int
    heads: int

    @property
    def block(self) -> tuple[str, int]:
        return self.key[0], self.key[1]


def _diffusers_names(unet) -> dict[tuple[str, int], str]:
    """ComfyUI (kind, id) -> diffusers attention name, from the UNet's own level layout."""
    nrb = list(unet.num_res_blocks)
    levels = len(nrb)
    names = {("middle", 0): "mid_block.attentions.0"}
    block = 0
    for level in range(levels):
        for j in range(nrb[level]):
            block += 1
            names[("input", block)] = f"down_blocks.{level}.attentions.{j}"
        block += 1  # the downsample (or nothing after the last level)
    block = 0
    for up, level in enumerate(reversed(range(levels))):
        for j in range(nrb[level] + 1):
            names[("output", block)] = f"up_blocks.{up}.attentions.{j}"
            block += 1
    return names


def attention_layers(unet) -> list[AttnLayer]:
    """Every cross-attention layer of a ComfyUI ``UNetModel``, numbered as IP-Adapter files number them."""
    from comfy.ldm.modules.attention import SpatialTransformer

    names = _diffusers_names(unet)
    found: dict[str, list[tuple[tuple[str, int, int], torch.nn.Module]]] = {k: [] for k in KINDS}
    groups = (("input", list(unet.input_blocks)), ("middle", [unet.middle_block]), ("output", list(unet.output_blocks)))
    for kind, blocks in groups:
        for block_id, block in enumerate(blocks):
            for module in block or ():
                if isinstance(module, SpatialTransformer):
                    for t, tb in enumerate(module.transformer_blocks):
                        if getattr(tb, "attn2", None) is not None:
                            found[kind].append(((kind, block_id, t), tb.attn2))
    layers = []
    for kind in ("input", "output", "middle"):  # diffusers registers down_blocks, up_blocks, then mid_block
        for key, attn2 in found[kind]:
            layers.append(AttnLayer(index=len(layers), key=key, diffusers_name=names.get(key[:2], "?"),
                                    inner_dim=attn2.to_q.weight.shape[0], context_dim=attn2.to_k.weight.shape[1],
                                    heads=attn2.heads))
    return layers


def model_family(layers: list[AttnLayer]) -> str:
    """The family id (``families``) whose text context these layers read, else a readable description."""
    return families.by_context({layer.context_dim for layer in layers})


def _block_label(block: tuple[str, int]) -> str:
    return f"{block[0]} {block[1]}"


def available_blocks(layers: list[AttnLayer]) -> str:
    seen: dict[tuple[str, int], str] = {}
    for layer in layers:
        seen.setdefault(layer.block, layer.diffusers_name)
    return ", ".join(f"{_block_label(b)} ({n})" for b, n in seen.items())


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def select_by_names(layers: list[AttnLayer], prefixes: tuple[str, ...], what: str) -> list[AttnLayer]:
    chosen = []
    for prefix in prefixes:
        hit = [layer for layer in layers if _matches(layer.diffusers_name, prefix)]
        if not hit:
            raise ValueError(f"{what} selects {prefix}, which this model does not have (its cross-attention blocks: "
                             f"{available_blocks(layers)}); use preset 'custom' with blocks it has.")
        chosen += [layer for layer in hit if layer not in chosen]
    return sorted(chosen, key=lambda layer: layer.index)


Spec = tuple[str, int, "int | None"] | str


def _clean(entry: str) -> str:
    return entry.strip().strip("()[]\"' ")


def _spec(entry: str) -> Spec | None:
    m = _COMFY_KEY.fullmatch(entry.replace('"', "").replace("'", "").strip("()[] "))
    if m:
        return m.group(1).lower(), int(m.group(2)), None if m.group(3) is None else int(m.group(3))
    d = _DIFFUSERS_NAME.fullmatch(entry)
    return d.group(1) if d else None


def parse_weighted(text: str) -> list[tuple[Spec, float]]:
    """``"output 1:1.0, input 8:0.5"`` -> [(block spec, weight)]; an entry without ``:w`` has weight 1.

    A block is a ComfyUI key (``output 1``, ``output:1``, ``('output', 1)``, ``output 1 3`` for one
    transformer index) or a diffusers name (``up_blocks.0.attentions.1``); ``:w`` (or ``=w``) after a
    complete block gives its weight, a factor on the node's weight (cubiq's ``layer_weights`` idea).
    """
    specs: list[tuple[Spec, float]] = []
    for raw in re.split(r"[;,\n]\s*(?=[A-Za-z(\[\"']|$)", text):
        entry = raw.strip()
        if not entry.strip("()[]\"' "):
            continue
        weight, w = 1.0, _WEIGHT.fullmatch(entry)
        spec = _spec(_clean(w.group(1))) if w else None
        if spec is not None:
            weight = float(w.group(2))
        else:
            spec = _spec(_clean(entry))
        if spec is None:
            raise ValueError(f"custom block {entry!r} is not a block key: write e.g. 'output 1, input 8:0.5, "
                             "middle 0' (ComfyUI keys, ':weight' optional) or 'up_blocks.0.attentions.1' "
                             "(diffusers names).")
        if not math.isfinite(weight):
            raise ValueError(f"custom block {entry!r} has weight {weight}: give a finite number.")
        specs.append((spec, weight))
    if not specs:
        raise ValueError("preset 'custom' needs at least one block in custom_blocks, e.g. 'output 1'.")
    return specs


def parse_custom(text: str) -> list[Spec]:
    """The block specs of ``custom_blocks`` (weights dropped); see :func:`parse_weighted`."""
    return [spec for spec, _ in parse_weighted(text)]


def _hit(layers: list[AttnLayer], spec: Spec) -> list[AttnLayer]:
    if isinstance(spec, str):
        return select_by_names(layers, (spec,), f"custom block {spec!r}")
    kind, block_id, t = spec
    hit = [layer for layer in layers if layer.block == (kind, block_id) and (t is None or layer.key[2] == t)]
    if not hit:
        label = f"{kind} {block_id}" + ("" if t is None else f" {t}")
        raise ValueError(f"custom block '{label}' does not exist in this model; its cross-attention blocks "
                         f"are: {available_blocks(layers)}.")
    return hit


def weighted_custom(layers: list[AttnLayer], text: str) -> list[tuple[AttnLayer, float]]:
    """(layer, weight factor) for every layer ``custom_blocks`` names; a later entry overrides an earlier one."""
    chosen: dict[int, tuple[AttnLayer, float]] = {}
    for spec, weight in parse_weighted(text):
        for layer in _hit(layers, spec):
            chosen[layer.index] = (layer, weight)
    return [chosen[i] for i in sorted(chosen)]


def select_custom(layers: list[AttnLayer], text: str) -> list[AttnLayer]:
    return [layer for layer, _ in weighted_custom(layers, text)]


@dataclass(frozen=True)
class Planned:
    """A layer a preset patches, its weight factor, and its role ("style", "layout", or "" for others)."""

    layer: AttnLayer
    factor: float = 1.0
    role: str = ""


def plan(layers: list[AttnLayer], preset: str, custom: str = "") -> list[Planned]:
    """The layers a preset patches, with their weight factors and roles (validated against the model)."""
    if preset == "all blocks":
        return [Planned(layer) for layer in layers]
    if preset == "custom":
        return [Planned(layer, factor) for layer, factor in weighted_custom(layers, custom)]
    if preset not in PRESET_NAMES:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}.")
    family = model_family(layers)
    if family not in BLOCK_ROLES:
        raise ValueError(f"preset {preset!r} is defined for SDXL and SD1.5 models, not for this {family} model: "
                         "use 'all blocks' or 'custom'.")
    planned: dict[int, Planned] = {}
    for role in PRESET_ROLES[preset]:
        for layer in select_by_names(layers, BLOCK_ROLES[family][role], f"preset {preset!r} ({family})"):
            planned.setdefault(layer.index, Planned(layer, 1.0, role))
    return [planned[i] for i in sorted(planned)]


def select(layers: list[AttnLayer], preset: str, custom: str = "") -> list[AttnLayer]:
    """The layers a preset patches on this model (validated: a missing block is an error, never skipped)."""
    return [p.layer for p in plan(layers, preset, custom)]
