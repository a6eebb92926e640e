"""Which Flux transformer blocks InstantStyle feeds the image, and with what weight factor.

Blocks are ComfyUI's ``("double", i)`` / ``("single", i)`` (``transformer_options["block_type"]`` and
``["block_index"]``; the ``patches_replace["dit"]`` keys are ``("double_block", i)`` / ``("single_block", i)``).

Presets (PROVISIONAL until tried on real weights: nobody has published which Flux blocks carry style and which
layout, as the InstantStyle paper did for SDXL):

- ``all``: every block the adapter has weights for, factor 1: the adapter's own reference behaviour.
- ``style`` / ``layout``: the family table's ``style_blocks`` map for Flux.1 (``families.table``), written in the
  real model's numbering (19 double + 38 single blocks). Single stream: SplitFlux (arXiv 2511.15258, prompt
  replacement per block) finds the early single blocks (their blocks 20-29 = single 0-9) carry content, the
  later ones (30-57 = single 10-37) style, and injection into the double blocks has little effect on either.
  Double stream: no evidence; the map extends the same early-layout / late-style order (double 0-9 layout,
  10-18 style). XLabs adapters have double-block weights only, so for them the split rests on that
  extension alone. Then each preset keeps only the blocks the adapter covers.
- ``custom``: a list such as ``double 10-18:1.0, single 10-37:0.8`` (``double_blocks.3`` also accepted).

A model of another depth (tiny test models) maps block i of n onto the reference depth at its midpoint,
``floor((i + 0.5) * N / n)``, so the same fraction of the stack gets the same role.
"""

from __future__ import annotations

import re

from .. import families

BLOCK_TYPES = ("double", "single")
PRESETS = ("all", "style", "layout", "custom")
REFERENCE_DEPTHS = {"double": 19, "single": 38}  # Flux.1 dev / schnell
_NAME = re.compile(r"^(double|single)(?:_blocks\.|\s+|_|\.)?(\d+)(?:\s*-\s*(\d+))?$")
_ITEM = re.compile(r"^(?P<name>[a-z_.]+\s*\d+(?:\s*-\s*\d+)?)\s*(?::\s*(?P<w>[-+0-9.eE]+))?$")

Block = tuple[str, int]


def parse_names(names, depths: dict[str, int] | None = None) -> dict[Block, float]:
    """``{block: factor}`` from block names with optional ranges and weights (``double 0-9:0.5``)."""
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names)]
    out: dict[Block, float] = {}
    for item in filter(None, items):
        m = _ITEM.match(item.lower())
        name = _NAME.match(re.sub(r"\s+", " ", m.group("name")).replace(" - ", "-")) if m else None
        if name is None:
            raise ValueError(f"block {item!r} is not understood: write e.g. 'double 3', 'single 10-37:0.8' or "
                             "'double_blocks.3'.")
        kind, first = name.group(1), int(name.group(2))
        last = int(name.group(3)) if name.group(3) is not None else first
        try:
            factor = float(m.group("w")) if m.group("w") is not None else 1.0
        except ValueError as err:
            raise ValueError(f"block {item!r}: the weight after ':' is not a number.") from err
        if last < first:
            raise ValueError(f"block {item!r}: the range runs backwards.")
        if depths is not None and last >= depths.get(kind, 0):
            raise ValueError(f"block {item!r} is outside the model, which has {depths.get('double', 0)} double "
                             f"blocks (0-{depths.get('double', 0) - 1}) and {depths.get('single', 0)} single blocks.")
        for i in range(first, last + 1):
            out[(kind, i)] = factor
    return out


def reference_roles() -> dict[str, set[Block]]:
    """Role -> blocks in the real Flux.1 numbering, from the family table."""
    slot = families.FAMILIES[families.FLUX1].style_blocks or ()
    return {role: set(parse_names(names, REFERENCE_DEPTHS)) for role, names in slot}


def reference_index(index: int, depth: int, reference: int) -> int:
    return index if depth == reference else int((index + 0.5) * reference / depth)


def model_depths(diffusion_model) -> dict[str, int]:
    return {"double": len(getattr(diffusion_model, "double_blocks", ())),
            "single": len(getattr(diffusion_model, "single_blocks", ()))}


def role_blocks(role: str, depths: dict[str, int]) -> set[Block]:
    ref = reference_roles().get(role)
    if ref is None:
        raise ValueError(f"no {role!r} blocks are defined for Flux.1 (families.table style_blocks).")
    return {(kind, i) for kind in BLOCK_TYPES for i in range(depths.get(kind, 0))
            if (kind, reference_index(i, depths[kind], REFERENCE_DEPTHS[kind])) in ref}


def _fmt(blocks) -> str:
    """'double 0-9, single 3' for a set of blocks."""
    parts = []
    for kind in BLOCK_TYPES:
        ids = sorted(i for k, i in blocks if k == kind)
        runs, start = [], None
        for n, i in enumerate(ids):
            if start is None:
                start = i
            if n + 1 == len(ids) or ids[n + 1] != i + 1:
                runs.append(f"{start}" if start == i else f"{start}-{i}")
                start = None
        if runs:
            parts.append(f"{kind} {', '.join(runs)}")
    return "; ".join(parts) or "none"


def plan(preset: str, custom_blocks: str, depths: dict[str, int], covered, adapter_name: str) -> dict[Block, float]:
    """``{block: weight factor}`` the preset selects among the blocks the adapter covers."""
    covered = set(covered)
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} must be one of {', '.join(PRESETS)}.")
    if preset == "custom":
        chosen = parse_names(custom_blocks, depths)
        if not chosen:
            raise ValueError("preset 'custom' needs custom_blocks, e.g. 'double 10-18:1.0'.")
        outside = set(chosen) - covered
        if outside:
            raise ValueError(f"{adapter_name} has no weights for {_fmt(outside)}: it covers {_fmt(covered)}.")
        return chosen
    blocks = covered if preset == "all" else role_blocks(preset, depths) & covered
    if not blocks:
        raise ValueError(f"preset {preset!r} selects no block {adapter_name} covers (it covers {_fmt(covered)}; "
                         f"{preset} = {_fmt(role_blocks(preset, depths))}): use 'all' or 'custom'.")
    return {b: 1.0 for b in sorted(blocks)}


def describe(chosen: dict[Block, float]) -> str:
    return _fmt(chosen)
