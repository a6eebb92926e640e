"""InstantStyle end to end: CLIP-vision features -> (minus content text) -> image tokens -> patched model clone.

Only the selected layers get an attn2 replace; every other layer keeps ComfyUI's stock attention path.
The input MODEL and its patch objects are never changed: the result is a ``clone()`` whose patch dicts
are new (``set_model_attn2_replace`` copies them) and whose new patches wrap whatever replace was there.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..sampling import cond_chunks
from . import blocks, projection
from .adapter_file import IPAdapter
from .attention import ORDER_HINT, SCALING_MODES, IPAttention
from .embeds import StyleEmbeds, check_fits, kind_for
from .subtraction import check_subtraction, subtract_content

log = logging.getLogger(__name__)
# Several style images: average their features (one image's tokens), concatenate their tokens (all attended
# to at once), or batch: one image per latent of the batch (cubiq's "unfold"; the last image repeats).
COMBINE_MODES = ("average", "concat", "batch")
# Plus adapters' unconditional features when no negative image is given. The official IP-Adapter and diffusers
# encode zero *normalised* pixels (a mean-grey image); cubiq's IPAdapter_plus encodes an all-black image
# (IPAdapterPlus.py:380-383 at 9d076a3), which is about -1.8 after CLIP's normalisation: a different uncond.
# Plain adapters use zero image embeds under both choices (so does cubiq: IPAdapterPlus.py:391).
PLUS_NEGATIVE_ZEROS = "zeros (official IP-Adapter)"
PLUS_NEGATIVE_BLACK = "black image (IPAdapter_plus)"
PLUS_NEGATIVES = (PLUS_NEGATIVE_ZEROS, PLUS_NEGATIVE_BLACK)


@dataclass(frozen=True)
class StyleSettings:
    weight: float = 1.0
    preset: str = "style"
    custom_blocks: str = ""
    combine: str = "average"  # several style images: average their embeddings, or concatenate their tokens
    subtract: float = 0.0
    start: float = 0.0
    end: float = 1.0
    scaling: str = "V only"  # embeds_scaling, see attention.SCALING_MODES
    composition_weight: float | None = None  # layout block's weight in style+layout / precise style (None: weight)
    plus_negative: str = PLUS_NEGATIVE_ZEROS  # see PLUS_NEGATIVES

    def check(self) -> None:
        if not -1.0 <= self.weight <= 5.0:
            raise ValueError(f"weight {self.weight} is outside -1..5.")
        if self.composition_weight is not None and not -1.0 <= self.composition_weight <= 5.0:
            raise ValueError(f"composition_weight {self.composition_weight} is outside -1..5.")
        if self.scaling not in SCALING_MODES:
            raise ValueError(f"embeds_scaling {self.scaling!r} must be one of {', '.join(SCALING_MODES)}.")
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"combine {self.combine!r} must be one of {', '.join(COMBINE_MODES)}.")
        check_plus_negative(self.plus_negative)
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"start {self.start} / end {self.end} must satisfy 0 <= start < end <= 1 "
                             "(fractions of the sampling schedule).")


def image_features(clip_vision, images: torch.Tensor, plus: bool) -> torch.Tensor:
    """CLIP-vision features an adapter eats: ``image_embeds`` [N, E], or penultimate tokens [N, P, H] for Plus."""
    out = clip_vision.encode_image(images, crop=True)
    return (out["penultimate_hidden_states"] if plus else out["image_embeds"]).float()


def zero_image_features(clip_vision, plus: bool, like: torch.Tensor) -> torch.Tensor:
    """Unconditional features as the reference makes them: zero embeds (plain), or the penultimate tokens
    of an all-zero *normalised* pixel tensor (Plus; diffusers' ``encode_image``), not of a black image."""
    if not plus:
        return torch.zeros_like(like[:1])
    import comfy.model_management

    comfy.model_management.load_model_gpu(clip_vision.patcher)
    size = clip_vision.image_size
    pixels = torch.zeros(1, 3, size, size, device=clip_vision.load_device)
    out = clip_vision.model(pixel_values=pixels, intermediate_output=-2)
    return out[1].to(like.device).float()


def check_plus_negative(plus_negative: str) -> None:
    if plus_negative not in PLUS_NEGATIVES:
        raise ValueError(f"plus_negative {plus_negative!r} must be one of {', '.join(map(repr, PLUS_NEGATIVES))}.")


def black_image_features(clip_vision, like: torch.Tensor) -> torch.Tensor:
    """Penultimate tokens of an all-black image at the encoder's size through the stock ``encode_image`` (its
    CLIP normalisation included): cubiq's Plus unconditional features."""
    size = clip_vision.image_size
    black = torch.zeros(1, size, size, 3)
    return image_features(clip_vision, black, plus=True).to(like.device)


def unconditional_features(clip_vision, plus: bool, like: torch.Tensor,
                           plus_negative: str = PLUS_NEGATIVE_ZEROS) -> torch.Tensor:
    """Unconditional features when no negative image is given; ``plus_negative`` only matters for Plus."""
    check_plus_negative(plus_negative)
    if plus and plus_negative == PLUS_NEGATIVE_BLACK:
        return black_image_features(clip_vision, like)
    return zero_image_features(clip_vision, plus, like)


def style_tokens(adapter: IPAdapter, features: torch.Tensor, combine: str) -> torch.Tensor:
    """Image tokens for one or several images' features: [1, T, C] (average: mean of the features),
    [1, N*T, C] (concat: their tokens side by side) or [N, T, C] (batch: one row per image)."""
    if combine == "average" and features.shape[0] > 1:
        features = features.mean(dim=0, keepdim=True)
    tokens = projection.project(adapter, features)
    return tokens if combine == "batch" else tokens.reshape(1, -1, tokens.shape[-1])


def uncond_tokens(adapter: IPAdapter, features: torch.Tensor, combine: str) -> torch.Tensor:
    """Unconditional tokens: one row (the mean of the negative images' features), or one per image in batch mode."""
    if combine == "batch":
        return projection.project(adapter, features)
    return style_tokens(adapter, features, "average")


def encode_embeds(adapter: IPAdapter, clip_vision, images: torch.Tensor, subtract: float = 0.0,
                  content_pooled: torch.Tensor | None = None,
                  negative_images: torch.Tensor | None = None,
                  plus_negative: str = PLUS_NEGATIVE_ZEROS) -> tuple[StyleEmbeds, StyleEmbeds]:
    """(embeds, negative embeds) of the style image(s): CLIP-vision features, minus ``subtract`` times the
    content text embedding (cond side only), and the negative image(s)' features, else the reference zeros
    (or, for Plus with ``plus_negative`` black, cubiq's black image)."""
    check_plus_negative(plus_negative)
    subtracting = content_pooled is not None and subtract != 0
    if subtracting:  # fail before the (slow) image encoding
        check_subtraction(adapter.projection, adapter.embed_width, content_pooled.shape[-1], adapter.name)
    plus = adapter.projection == "plus"
    features = image_features(clip_vision, images, plus)
    if negative_images is not None:
        negative = image_features(clip_vision, negative_images, plus)
        negative_source = "negative image"
    else:
        negative = unconditional_features(clip_vision, plus, features, plus_negative)
        negative_source = "black image" if plus and plus_negative == PLUS_NEGATIVE_BLACK else "zeros"
    source = "image"
    if subtracting:
        features = subtract_content(features, content_pooled, subtract)
        source = f"image minus {subtract:g} x content text"
    kind = kind_for(adapter.projection)
    return StyleEmbeds(features, kind, source), StyleEmbeds(negative, kind, negative_source)


def zero_negative(adapter: IPAdapter, embeds: StyleEmbeds) -> StyleEmbeds:
    """The reference unconditional features when no negative embeds are connected (plain adapters only: the
    Plus ones are the encoder's output for zero pixels, so they need the encoder)."""
    if adapter.projection == "plus":
        raise ValueError(f"{adapter.name} is a Plus adapter: its unconditional features come from the image "
                         "encoder; connect the negative_embeds output of InstantStyle Encode (or Load Embeds).")
    return StyleEmbeds(torch.zeros_like(embeds.features[:1]), embeds.kind, "zeros")


def tokens_from_embeds(adapter: IPAdapter, embeds: StyleEmbeds, negative: StyleEmbeds | None,
                       combine: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) image tokens from embeds, checked against the adapter."""
    check_fits(embeds, adapter.projection, adapter.embed_width, adapter.name)
    negative = negative if negative is not None else zero_negative(adapter, embeds)
    check_fits(negative, adapter.projection, adapter.embed_width, adapter.name, "negative_embeds")
    return style_tokens(adapter, embeds.features, combine), uncond_tokens(adapter, negative.features, combine)


def build_tokens(adapter: IPAdapter, cond_features: torch.Tensor, uncond_features: torch.Tensor,
                 settings: StyleSettings, content_pooled: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) image tokens; the content subtraction changes the cond side only."""
    if content_pooled is not None and settings.subtract != 0:
        check_subtraction(adapter.projection, adapter.embed_width, content_pooled.shape[-1], adapter.name)
        cond_features = subtract_content(cond_features, content_pooled, settings.subtract)
    return (style_tokens(adapter, cond_features, settings.combine),
            uncond_tokens(adapter, uncond_features, settings.combine))


def encode_tokens(adapter: IPAdapter, clip_vision, images: torch.Tensor, settings: StyleSettings,
                  negative_images: torch.Tensor | None = None,
                  content_pooled: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) image tokens from the style image(s), the optional negative image(s) and content text."""
    embeds, negative = encode_embeds(adapter, clip_vision, images, settings.subtract, content_pooled, negative_images,
                                     settings.plus_negative)
    return style_tokens(adapter, embeds.features, settings.combine), uncond_tokens(adapter, negative.features,
                                                                                  settings.combine)


def check_fit(adapter: IPAdapter, layers: list[blocks.AttnLayer]) -> None:
    family = blocks.model_family(layers)
    if adapter.cross_dim != layers[0].context_dim or adapter.family != family:
        raise ValueError(f"the IP-Adapter is {adapter.family} ({adapter.cross_dim}-d context) but MODEL is {family} "
                         f"({layers[0].context_dim}-d): load an IP-Adapter made for this model family.")
    if len(adapter.layers) != len(layers):
        raise ValueError(f"{adapter.name} has {len(adapter.layers)} cross-attention layers but MODEL has "
                         f"{len(layers)}: it was made for another UNet layout (e.g. SDXL base vs a distilled "
                         "SDXL such as KOALA or SSD-1B).")
    for layer in layers:
        k, _ = adapter.layers[layer.index]
        if tuple(k.shape) != (layer.inner_dim, layer.context_dim):
            raise ValueError(f"{adapter.name} layer {2 * layer.index + 1} is {tuple(k.shape)} but MODEL layer "
                             f"{layer.key} needs ({layer.inner_dim}, {layer.context_dim}).")


def sigma_range(model, start: float, end: float) -> tuple[float, float]:
    """(sigma_start, sigma_end) of a schedule fraction, from the model's own sampling (gated by sigma)."""
    ms = model.get_model_object("model_sampling")
    sigma_start = math.inf if start <= 0 else float(ms.percent_to_sigma(start))
    sigma_end = 0.0 if end >= 1 else float(ms.percent_to_sigma(end))
    return sigma_start, sigma_end


def select_layers(model, adapter: IPAdapter, settings: StyleSettings) -> list[blocks.Planned]:
    """The layers the preset patches (with weight factors and roles), after checking the adapter fits the
    model (cheap: run it first)."""
    settings.check()
    layers = blocks.attention_layers(model.model.diffusion_model)
    if not layers:
        raise ValueError("MODEL has no cross-attention layers: InstantStyle needs an SD1.5 or SDXL-family UNet.")
    check_fit(adapter, layers)
    chosen = blocks.plan(layers, settings.preset, settings.custom_blocks)
    log.info("InstantStyle: %s, preset %r -> %d of %d cross-attention layers (%s)", adapter.name, settings.preset,
             len(chosen), len(layers), ", ".join(dict.fromkeys(f"{c.layer.key[0]} {c.layer.key[1]}" for c in chosen)))
    return chosen


def layer_weight(planned: blocks.Planned, settings: StyleSettings) -> float:
    """weight x the block's factor; the layout block of style+layout / precise style gets composition_weight
    when it is set (cubiq's ``weight_composition`` / ``style_boost``: the value itself, not a factor)."""
    if (planned.role == "layout" and settings.composition_weight is not None
            and settings.preset in ("style+layout", "precise style")):
        return float(settings.composition_weight)
    return float(settings.weight) * planned.factor


SHADOW_WRAPPER_KEY = "frozentune_instantstyle_shadowed_blocks"


@dataclass(frozen=True)
class BlockShadowCheck:
    """OUTER_SAMPLE wrapper that stops sampling when a whole-block attn2 replace (key ``(block, id)``) was added
    after our per-layer patches in that block.

    ComfyUI runs a layer's ``(block, id, index)`` replace when there is one, else its block's, so such a replace
    added after ours never runs on our layers: cubiq's IPAdapter on SD1.5 patches ``(block, id)`` keys, finds no
    patch of ours there to ``.add`` to (``IPAttention.add``), and would be skipped silently. ``blocks`` are the
    block keys that were free when our node patched them (one that was taken, we wrapped). Identity cannot tell
    (ModelPatcher.clone deep-copies other packs' patches), so a block replace already there is not re-checked.
    """

    blocks: frozenset

    def __call__(self, executor, *args, **kwargs):
        options = executor.class_obj.model_options
        attn2 = options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
        hidden = sorted(b for b in self.blocks if b in attn2)
        if hidden:
            raise ValueError(
                f"an attention patch on the whole block(s) {', '.join(map(str, hidden))} was added after FrozenTune "
                "InstantStyle patched layers in them (e.g. by cubiq's IPAdapter node, ComfyUI_IPAdapter_plus, on an "
                "SD1.5 model): ComfyUI would run only InstantStyle's patch there and silently skip it. " + ORDER_HINT)
        return executor(*args, **kwargs)


def add_shadow_check(model_patcher, free_blocks) -> None:
    """Make sampling ``model_patcher`` (a clone we own) refuse block-wide replaces added later over ``free_blocks``."""
    import comfy.patcher_extension

    if free_blocks:
        model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, SHADOW_WRAPPER_KEY,
                                           BlockShadowCheck(frozenset(free_blocks)))


def patch_model(model, adapter: IPAdapter, chosen: list[blocks.Planned], cond: torch.Tensor,
                uncond: torch.Tensor, settings: StyleSettings, mask: torch.Tensor | None = None,
                composition_cond: torch.Tensor | None = None):
    """A clone of ``model`` with the IP attention added in the ``chosen`` layers only.

    Layout-block layers read ``composition_cond`` when given (style from one image, composition from
    another). In preset "precise style" they get the image tokens on the unconditional chunks and zero
    tokens on the conditional ones (cubiq's swap), so guidance pushes away from the reference's layout.
    """
    if composition_cond is not None and not any(p.role == "layout" for p in chosen):
        raise ValueError(f"composition_embeds need a preset with the layout block (style+layout, layout or precise "
                         f"style), not {settings.preset!r}: change the preset or disconnect composition_embeds.")
    sigma_start, sigma_end = sigma_range(model, settings.start, settings.end)
    if mask is not None:
        mask = mask.reshape(-1, mask.shape[-2], mask.shape[-1]).float().clamp(0, 1)
    existing = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    clone = model.clone()
    zeros: dict[int, torch.Tensor] = {}
    for planned in chosen:
        layer = planned.layer
        k_w, v_w = adapter.layers[layer.index]
        prev = existing.get(layer.key, existing.get(layer.block))
        layer_cond, layer_uncond = cond, uncond
        if planned.role == "layout" and composition_cond is not None:
            layer_cond = composition_cond
        if planned.role == "layout" and settings.preset == "precise style":
            key = id(layer_cond)
            zeros.setdefault(key, torch.zeros_like(layer_cond))
            layer_cond, layer_uncond = zeros[key], layer_cond
        patch = IPAttention(to_k_ip=k_w, to_v_ip=v_w, cond=layer_cond, uncond=layer_uncond,
                            weight=layer_weight(planned, settings), sigma_start=sigma_start, sigma_end=sigma_end,
                            mask=mask, prev=prev, key=layer.key, scaling=settings.scaling)
        clone.set_model_attn2_replace(patch, *layer.key)
    cond_chunks.add_guider_wrapper(clone)  # stock guiders (PerpNeg, DualCFG) say which chunks are unconditional
    add_shadow_check(clone, {p.layer.block for p in chosen if p.layer.block not in existing})
    return clone
