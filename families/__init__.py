"""The model families FrozenTune knows: one vocabulary every capability and node uses.

A family is data (``families.table``): its id (``"sd15"``, ``"sdxl"``, ``"flux1"``, ``"flux1_schnell"``,
``"sd3"``, ``"qwen_image"``, ``"z_image"``, ``"chroma"``), a readable label for messages, the ComfyUI config classes it covers, its latents, text
encoders, guidance, and the modules each UniTune train mode trains. ``family_of`` names a loaded
model's family, ``require`` refuses one a capability does not support, ``train_targets`` is the train
rule for a mode. A new family is a record in the table plus its tests; ``fingerprint`` identifies the
exact base checkpoint.

Nothing heavy is imported here: neither torch nor ComfyUI at import time.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from . import table
from .table import (
    CHROMA,
    FAMILIES,
    FLUX1,
    FLUX1_SCHNELL,
    QWEN_IMAGE,
    SD3,
    SD15,
    SDXL,
    TRAIN_MODES,
    Z_IMAGE,
    Family,
    TextEncoder,
    TrainTargets,
)

__all__ = [
    "CHROMA", "FAMILIES", "FLUX1", "FLUX1_SCHNELL", "QWEN_IMAGE", "SD3", "SD15", "SDXL", "TRAIN_MODES", "Z_IMAGE", "Family", "TextEncoder",
    "TrainTargets", "by_context", "default_guidance", "describe_unet", "family_of", "model_family", "require",
    "train_targets",
]


def _base_model(model):
    """The ``comfy.model_base.BaseModel`` of a MODEL (``ModelPatcher``) or of a BaseModel itself."""
    return model if hasattr(model, "model_config") else model.model


def _is_sdxl_model(base) -> bool:
    """``isinstance(base, comfy.model_base.SDXL)`` without importing ComfyUI (the check ``model_family`` made)."""
    return any(c.__name__ == "SDXL" and c.__module__ == "comfy.model_base" for c in type(base).__mro__)


def family_of(model) -> Family:
    """The family of a MODEL (``ModelPatcher``) or ``comfy.model_base.BaseModel``, by its config class.

    A config class the table lists gives its family; any other whose model is a ``model_base.SDXL``
    (SDXL variants) is the SDXL family; the rest get an unknown record (``known`` False) with a
    readable name.
    """
    base = _base_model(model)
    name = type(base.model_config).__name__
    if name in table.BY_CONFIG_CLASS:
        return table.BY_CONFIG_CLASS[name]
    if _is_sdxl_model(base):
        return FAMILIES[SDXL]
    return table.other(name)


def require(model, capability: str, supported: tuple[str, ...]) -> Family:
    """The model's family if it is one of ``supported`` (family ids), else a ValueError that names both."""
    unknown = [s for s in supported if s not in FAMILIES]
    if unknown:
        raise KeyError(f"no family {unknown[0]!r} in families.FAMILIES")
    family = family_of(model)
    if not family.known or family.id not in supported:  # known: a config class named like an id is no family
        labels = ", ".join(FAMILIES[s].label for s in supported)
        raise ValueError(f"{capability} does not support {family.label} yet (supported: {labels}): connect a "
                         "MODEL of one of those families.")
    return family


def train_targets(family: Family | str, mode: str) -> Callable[[str], bool]:
    """Whether a module (by its name in ``diffusion_model.named_modules()``) trains in UniTune mode ``mode``.

    ``full``/``attention``: the module's own parameters train; ``lora``: the module (a Linear) gets a LoRA.
    """
    family = FAMILIES[family] if isinstance(family, str) else family
    if family.targets is None:
        raise ValueError(f"UniTune has no train targets for {family.label}.")
    rule = re.compile(family.targets.pattern(mode))
    return lambda name: rule.fullmatch(name) is not None


def default_guidance(model) -> float | None:
    """The guidance strength a guidance-embedding model (Flux.1 dev) samples with when the conditioning
    sets none, read from the model's own ``extra_conds`` (ComfyUI's default); None for other families."""
    if not family_of(model).guidance_embed:
        return None
    import torch

    base = _base_model(model)
    channels = base.latent_format.latent_channels
    conds = base.extra_conds(pooled_output=None, noise=torch.zeros(1, channels, 2, 2), device="cpu")
    guidance = conds.get("guidance")
    return None if guidance is None else float(guidance.cond.reshape(-1)[0])


def model_family(model) -> str:
    """The family id of ``model`` (a MODEL or a ``comfy.model_base.BaseModel``); for a family FrozenTune does
    not know, its config class name in lower case ('sdxl' for SSD-1B, Vega and KOALA, 'sd15' for SD1.x)."""
    return family_of(model).id


def _unet_families() -> list[Family]:
    return [f for f in FAMILIES.values() if f.arch == "unet"]


def by_context(context_dims: set[int]) -> str:
    """The UNet family id whose text context all these cross-attention layers read, else a readable description."""
    for family in _unet_families():
        if context_dims == {family.context_dim}:
            return family.id
    return f"{'/'.join(str(d) for d in sorted(context_dims))}-d context"


def describe_unet(context_dim: int | None, adm_channels: int | None) -> str:
    """A readable name for a UNet configuration, for error messages."""
    for family in _unet_families():
        if context_dim == family.context_dim and bool(adm_channels) == family.pooled:
            return f"{family.label} ({context_dim}-d text context)"
    if context_dim == 1024:
        return "SD2.x (1024-d text context)"
    if context_dim == 2048:
        return "SDXL family (2048-d text context)"
    return f"a UNet with {context_dim}-d text context" + (f" and {adm_channels}-d size/pooled conditioning"
                                                           if adm_channels else "")
