"""The model families FrozenTune knows: one vocabulary every capability and node uses.

A family is data: its id (``"sd15"``, ``"sdxl"``), a readable label for messages, and the facts the
capabilities read off a loaded model (today the text-context width of the cross-attention). A new
family is an entry here plus its tests; ``fingerprint`` identifies the exact base checkpoint.

Nothing heavy is imported here: ``comfy`` only inside ``model_family``.
"""

from __future__ import annotations

from dataclasses import dataclass

SD15 = "sd15"
SDXL = "sdxl"


@dataclass(frozen=True)
class Family:
    id: str
    label: str  # for messages: "SD1.x", "SDXL family"
    context_dim: int  # width of the text context the cross-attention reads
    pooled: bool  # whether the UNet also takes pooled text/size conditioning (adm)


FAMILIES: dict[str, Family] = {
    SD15: Family(SD15, "SD1.x", 768, pooled=False),
    SDXL: Family(SDXL, "SDXL family", 2048, pooled=True),
}


def model_family(model) -> str:
    """'sdxl' for the SDXL family (SDXL, SSD-1B, Vega, KOALA), 'sd15' for SD1.x, else the config class name.

    ``model`` is a ``comfy.model_base.BaseModel`` (a MODEL's ``.model``).
    """
    import comfy.model_base

    if isinstance(model, comfy.model_base.SDXL):
        return SDXL
    name = type(model.model_config).__name__.lower()
    return SD15 if name in ("sd15", "sd15_instructpix2pix") else name


def by_context(context_dims: set[int]) -> str:
    """The family id whose text context all these cross-attention layers read, else a readable description."""
    for family in FAMILIES.values():
        if context_dims == {family.context_dim}:
            return family.id
    return f"{'/'.join(str(d) for d in sorted(context_dims))}-d context"


def describe_unet(context_dim: int | None, adm_channels: int | None) -> str:
    """A readable name for a UNet configuration, for error messages."""
    for family in FAMILIES.values():
        if context_dim == family.context_dim and bool(adm_channels) == family.pooled:
            return f"{family.label} ({context_dim}-d text context)"
    if context_dim == 1024:
        return "SD2.x (1024-d text context)"
    if context_dim == 2048:
        return "SDXL family (2048-d text context)"
    return f"a UNet with {context_dim}-d text context" + (f" and {adm_channels}-d size/pooled conditioning"
                                                           if adm_channels else "")
