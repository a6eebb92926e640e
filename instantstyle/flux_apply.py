"""InstantStyle on Flux.1: image features -> (minus content text) -> adapter tokens -> per-block k/v -> patched clone.

The input MODEL and its patches are never changed: the result is a ``clone()`` whose ``patches_replace["dit"]``
dict is new (``set_model_patch_replace`` copies it) and whose patches wrap whatever replace was on a block.
An SD1.5/SDXL IP-Adapter, or a model that is not Flux.1, is refused here with both names, whatever sent it
(socket types do not protect prompts sent through the HTTP API).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .. import families
from ..sampling import cond_chunks
from . import flux_attention, flux_blocks
from .embeds import StyleEmbeds
from .flux_adapter_file import FluxAdapter, is_flux_adapter

log = logging.getLogger(__name__)
FLUX_FAMILIES = (families.FLUX1, families.FLUX1_SCHNELL)
COMBINE_MODES = ("average", "concat")
# StyleEmbeds kinds (instantstyle.embeds) for the encode_image outputs Flux adapters read.
EMBEDS_KIND = {"image_embeds": "image_embeds", "penultimate_hidden_states": "penultimate"}


@dataclass(frozen=True)
class FluxStyleSettings:
    weight: float = 1.0
    preset: str = "all"
    custom_blocks: str = ""
    combine: str = "average"
    subtract: float = 0.0
    start: float = 0.0
    end: float = 1.0

    def check(self) -> None:
        if not -1.0 <= self.weight <= 5.0:
            raise ValueError(f"weight {self.weight} is outside -1..5.")
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"combine {self.combine!r} must be one of {', '.join(COMBINE_MODES)}.")
        if self.preset not in flux_blocks.PRESETS:
            raise ValueError(f"preset {self.preset!r} must be one of {', '.join(flux_blocks.PRESETS)}.")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"start {self.start} / end {self.end} must satisfy 0 <= start < end <= 1.")


def adapter_label(adapter) -> str:
    if is_flux_adapter(adapter):
        return f"the {adapter.label} {adapter.name}"
    family = getattr(adapter, "family", None)
    if family is not None:
        return f"the {family} IP-Adapter {getattr(adapter, 'name', '')}".rstrip()
    return f"a {type(adapter).__name__}"


def check_adapter(adapter, model=None) -> FluxAdapter:
    """``adapter`` if it is a Flux IP-Adapter, else a ValueError naming what it is (e.g. an SD adapter) and the model."""
    if not is_flux_adapter(adapter):
        on = f" for MODEL {families.family_of(model).label}" if model is not None else ""
        raise ValueError(f"InstantStyle (Flux) got {adapter_label(adapter)}{on}, which is not a Flux IP-Adapter: "
                         "load an XLabs or InstantX Flux IP-Adapter with Flux IP-Adapter Loader, or use InstantStyle "
                         "Apply for SD1.5/SDXL adapters and models.")
    return adapter


def check_model(model, adapter: FluxAdapter) -> dict[str, int]:
    """The model's block depths, after checking the adapter fits it (family, width, block count)."""
    family = families.family_of(model)
    if family.id not in FLUX_FAMILIES:
        raise ValueError(f"{adapter_label(adapter)} is for Flux.1 but MODEL is {family.label}: connect a Flux.1 "
                         "model, or use an IP-Adapter made for this family (InstantStyle Apply for SD1.5/SDXL).")
    dm = model.model.diffusion_model
    hidden = int(getattr(dm, "hidden_size", 0))
    if hidden != adapter.hidden:
        raise ValueError(f"{adapter_label(adapter)} is made for a {adapter.hidden}-wide Flux but MODEL ({family.label}) "
                         f"is {hidden}-wide.")
    depths = flux_blocks.model_depths(dm)
    beyond = [b for b in adapter.blocks() if b[1] >= depths.get(b[0], 0)]
    if beyond:
        raise ValueError(f"{adapter_label(adapter)} has weights for {flux_blocks.describe(dict.fromkeys(beyond))}, "
                         f"but MODEL has {depths['double']} double and {depths['single']} single blocks.")
    return depths


def prepare(model, adapter, settings: FluxStyleSettings) -> tuple[FluxAdapter, dict[tuple[str, int], float]]:
    """(the adapter bound to this model, ``{block: factor}`` the preset patches); cheap: run before encoding."""
    settings.check()
    adapter = check_adapter(adapter, model)
    if family_id(model) in FLUX_FAMILIES and hasattr(adapter, "fit_model"):  # InstantX: head count, layer split
        adapter = adapter.fit_model(model.model.diffusion_model)
    depths = check_model(model, adapter)
    chosen = flux_blocks.plan(settings.preset, settings.custom_blocks, depths, adapter.blocks(), adapter.name)
    log.info("InstantStyle Flux: %s, preset %r -> %s", adapter.name, settings.preset, flux_blocks.describe(chosen))
    return adapter, chosen


def family_id(model) -> str:
    return families.family_of(model).id


def image_features(clip_vision, images: torch.Tensor, kind: str, crop: bool = True) -> torch.Tensor:
    out = clip_vision.encode_image(images, crop=crop)
    return out[kind].float()


def black_image_features(clip_vision, kind: str, crop: bool = True) -> torch.Tensor:
    """Features of an all-black image: x-flux's unconditional image prompt (``np.zeros`` through its CLIP
    processor) when no negative image is given (``XFluxPipeline.__call__``)."""
    size = getattr(clip_vision, "image_size", 224)
    return image_features(clip_vision, torch.zeros(1, size, size, 3), kind, crop)


def content_embedding(clip, content_text: str, adapter: FluxAdapter) -> torch.Tensor:
    """CLIP-L's projected text embedding of ``content_text`` [1, 768], in CLIP ViT-L's image-embedding space.

    Flux's CLIP-L is built with ``return_projected_pooled=False`` (``text_encoders/flux.py``), so its pooled
    output is the final-norm EOS state; the text projection (``text_projection.weight`` of the CLIP-L file) is
    applied here, as CLIPTextModelWithProjection's ``text_embeds`` are made.
    """
    if adapter.embed_kind != "image_embeds":
        raise ValueError(f"{adapter_label(adapter)} reads {adapter.embed_kind} of {adapter.encoder}: the content "
                         "subtraction works on a global image embedding with a text tower in the same space (XLabs, "
                         "CLIP ViT-L). Set subtract to 0 or empty content_text.")
    clip_l = getattr(getattr(clip, "cond_stage_model", None), "clip_l", None)
    projection = getattr(getattr(clip_l, "transformer", None), "text_projection", None)
    if projection is None:
        raise ValueError("content_text needs a CLIP with a CLIP-L text encoder (the Flux DualCLIPLoader output: "
                         "clip_l + t5xxl), to embed the text in CLIP ViT-L space.")
    _, pooled = clip.encode_from_tokens(clip.tokenize(content_text), return_pooled="unprojected")
    weight = projection.weight
    if pooled is None or pooled.shape[-1] != weight.shape[1]:
        raise ValueError(f"the CLIP's pooled output is {None if pooled is None else pooled.shape[-1]}-d, not CLIP-L's "
                         f"{weight.shape[1]}: connect the Flux CLIP (clip_l + t5xxl) for content_text.")
    weight = weight.to(device=pooled.device, dtype=torch.float32)
    if not bool(torch.isfinite(weight).all()) or not bool(weight.abs().sum() > 0):
        raise ValueError("the CLIP-L text projection is missing or damaged (all zero or not finite): use a clip_l "
                         "file that includes text_projection.weight (ComfyUI logs 'clip missing: "
                         "[...text_projection.weight]' when it is absent), or set subtract to 0.")
    embedded = torch.nn.functional.linear(pooled.float(), weight)
    if embedded.shape[-1] != adapter.embed_width:
        raise ValueError(f"the content text embedding is {embedded.shape[-1]}-d but {adapter_label(adapter)} reads "
                         f"{adapter.embed_width}-d image embeds: they are not in the same space.")
    return embedded[:1]


def tokens(adapter: FluxAdapter, features: torch.Tensor, combine: str) -> torch.Tensor:
    """[1, T, C] (average of the images' features) or [1, N*T, C] (concat: their tokens side by side)."""
    if combine == "average" and features.shape[0] > 1:
        features = features.mean(dim=0, keepdim=True)
    out = adapter.tokens(features)
    return out.reshape(1, -1, out.shape[-1])


def encode_embeds(adapter: FluxAdapter, clip_vision, images: torch.Tensor, subtract: float = 0.0,
                  content: torch.Tensor | None = None,
                  negative_images: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, negative features): the style images' features minus ``subtract`` x content text (cond side
    only), and the negative images' features, else a black image's (x-flux)."""
    kind, crop = adapter.embed_kind, getattr(adapter, "crop", True)
    features = image_features(clip_vision, images, kind, crop)
    if features.shape[-1] != adapter.embed_width:
        raise ValueError(f"the CLIP vision model gives {features.shape[-1]}-d {kind} but {adapter_label(adapter)} "
                         f"reads {adapter.embed_width}-d ones from {adapter.encoder}: load that image encoder.")
    negative = (image_features(clip_vision, negative_images, kind, crop) if negative_images is not None
                else black_image_features(clip_vision, kind, crop))
    if content is not None and subtract != 0:
        features = features - content.to(features) * subtract
    return features, negative


def as_style_embeds(adapter: FluxAdapter, features: torch.Tensor, source: str) -> StyleEmbeds:
    kind = EMBEDS_KIND.get(adapter.embed_kind)
    if kind is None:
        raise ValueError(f"{adapter_label(adapter)} reads {adapter.embed_kind}, which embeds files cannot hold yet.")
    return StyleEmbeds(features, kind, source)


def check_embeds(adapter: FluxAdapter, embeds: StyleEmbeds, what: str = "embeds") -> None:
    kind = EMBEDS_KIND.get(adapter.embed_kind)
    if embeds.kind != kind or embeds.width != adapter.embed_width:
        raise ValueError(f"{what} hold {embeds.width}-d {embeds.kind} features but {adapter_label(adapter)} reads "
                         f"{adapter.embed_width}-d {adapter.embed_kind} from {adapter.encoder}: encode them with "
                         "InstantStyle Encode (Flux) and this adapter.")


def sigma_range(model, start: float, end: float) -> tuple[float, float]:
    ms = model.get_model_object("model_sampling")
    return (math.inf if start <= 0 else float(ms.percent_to_sigma(start)),
            0.0 if end >= 1 else float(ms.percent_to_sigma(end)))


def patch_model(model, adapter: FluxAdapter, chosen: dict[tuple[str, int], float], cond: torch.Tensor,
                uncond: torch.Tensor, settings: FluxStyleSettings):
    """A clone of ``model`` with the image attention in the ``chosen`` blocks only (``cond``/``uncond``: tokens)."""
    sigma_start, sigma_end = sigma_range(model, settings.start, settings.end)
    clone = model.clone()
    needs_txt_len = False
    for (block_type, index), factor in chosen.items():
        cond_kv = adapter.kv(block_type, index, cond.float())
        uncond_kv = adapter.kv(block_type, index, uncond.float())
        if cond_kv is None or uncond_kv is None:
            raise ValueError(f"{adapter_label(adapter)} has no weights for {block_type} block {index}.")
        patch = flux_attention.FluxIPBlock(
            block_type=block_type, index=index, cond_kv=tuple(t.detach().float() for t in cond_kv),
            uncond_kv=tuple(t.detach().float() for t in uncond_kv), weight=float(settings.weight) * factor,
            placement=adapter.placement(block_type), query_rows=adapter.query_rows(block_type),
            sigma_start=sigma_start, sigma_end=sigma_end,
            prev=flux_attention.existing_patch(model, block_type, index))
        flux_attention.set_block_patch(clone, patch)
        needs_txt_len |= block_type == "single" and patch.query_rows == "image"
    if needs_txt_len:
        flux_attention.add_txt_len_wrapper(clone)
    cond_chunks.add_guider_wrapper(clone)
    return clone
