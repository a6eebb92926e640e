"""Style embeds as a value: the CLIP-vision features of style images, encoded once, combined, saved, reused.

An embeds value holds the features an IP-Adapter's image projection eats, *before* the projection (as
cubiq's EMBEDS do): ``image_embeds`` [N, W] for plain adapters, penultimate tokens [N, P, W] for Plus.
So one encoding serves every adapter trained with that image encoder, the content subtraction is already
in it, and combining works on features (an average of features is one image's worth of tokens).

Files are safetensors (``features`` and, when saved with it, ``negative``) with the kind, width and the
encoding's settings in the metadata; they are written atomically (``storage.safetensors_file``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..storage import safetensors_file as weights_file

FILE_FORMAT = "frozentune.instantstyle_embeds.v1"
KINDS = ("image_embeds", "penultimate")  # plain adapters / Plus (Resampler) adapters
COMBINE_METHODS = ("concat", "average", "weighted")


@dataclass(frozen=True, eq=False)
class StyleEmbeds:
    """CLIP-vision features of N images, one row each (immutable: never changed after it is made)."""

    features: torch.Tensor  # [N, W] (image_embeds) or [N, P, W] (penultimate)
    kind: str
    source: str = ""  # how it was made (for the file's metadata and the log)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"embeds kind {self.kind!r} must be one of {', '.join(KINDS)}.")
        expected = 2 if self.kind == "image_embeds" else 3
        if self.features.ndim != expected or self.features.shape[0] < 1:
            raise ValueError(f"{self.kind} embeds need shape {'[N, W]' if expected == 2 else '[N, P, W]'}, "
                             f"got {tuple(self.features.shape)}.")

    @property
    def images(self) -> int:
        return int(self.features.shape[0])

    @property
    def width(self) -> int:
        return int(self.features.shape[-1])

    def describe(self) -> str:
        return f"{self.images} image(s) of {self.kind} {tuple(self.features.shape[1:])}" + (
            f" ({self.source})" if self.source else "")

    def __deepcopy__(self, memo):  # immutable: ComfyUI's caches may copy outputs; share the tensor
        return self


def kind_for(projection: str) -> str:
    return "penultimate" if projection == "plus" else "image_embeds"


def check_fits(embeds: StyleEmbeds, projection: str, embed_width: int, adapter_name: str, what: str = "embeds") -> None:
    """The adapter can read these features (kind and width), or a ValueError that says what to connect."""
    need = kind_for(projection)
    if embeds.kind != need:
        made = "a Plus" if embeds.kind == "penultimate" else "a plain (4-token)"
        raise ValueError(f"{what} hold {embeds.kind} features (encoded for {made} adapter) but {adapter_name} "
                         f"reads {need}: encode them again with this IP-Adapter connected to InstantStyle Encode.")
    if embeds.width != embed_width:
        raise ValueError(f"{what} are {embeds.width}-d but {adapter_name} reads {embed_width}-d features: they come "
                         "from another CLIP vision model; encode them with the image encoder this adapter was "
                         "trained with.")


def combine(items: list[StyleEmbeds], method: str, weights: list[float] | None = None) -> StyleEmbeds:
    """Several embeds as one: ``concat`` keeps every image (rows one after the other), ``average`` is one
    image (the mean over all rows), ``weighted`` one image ``sum_i w_i * mean(e_i) / sum_i w_i``."""
    if method not in COMBINE_METHODS:
        raise ValueError(f"method {method!r} must be one of {', '.join(COMBINE_METHODS)}.")
    if not items:
        raise ValueError("nothing to combine: connect at least one embeds input.")
    first = items[0]
    for i, e in enumerate(items[1:], start=2):
        if e.kind != first.kind or e.features.shape[1:] != first.features.shape[1:]:
            raise ValueError(f"embeds_{i} are {e.kind} {tuple(e.features.shape[1:])} but embeds_1 are {first.kind} "
                             f"{tuple(first.features.shape[1:])}: combine embeds made with the same image encoder "
                             "and adapter kind.")
    rows = [e.features.float() for e in items]
    if method == "concat":
        out = torch.cat(rows)
    elif method == "average":
        out = torch.cat(rows).mean(dim=0, keepdim=True)
    else:
        weights = list(weights or [])
        if len(weights) != len(items):
            raise ValueError(f"weighted needs one weight per embeds input ({len(items)}), got {len(weights)}.")
        total = sum(weights)
        if total == 0:
            raise ValueError(f"the weights {weights} sum to 0: a weighted average needs a non-zero sum.")
        out = sum(w * r.mean(dim=0, keepdim=True) for w, r in zip(weights, rows, strict=True)) / total
    return StyleEmbeds(out, first.kind, source=f"{method} of {len(items)}")


def to_rows(embeds: StyleEmbeds, rows: int) -> torch.Tensor:
    """``rows`` rows of features: row i is image min(i, N-1) (the last repeats, as cubiq's ``tensor_to_size``)."""
    index = torch.clamp(torch.arange(rows), max=embeds.images - 1)
    return embeds.features[index]


def save(path: Path, embeds: StyleEmbeds, negative: StyleEmbeds | None = None) -> Path:
    tensors = {"features": embeds.features.float()}
    if negative is not None:
        if negative.kind != embeds.kind or negative.width != embeds.width:
            raise ValueError(f"negative_embeds are {negative.kind} {negative.width}-d but embeds are {embeds.kind} "
                             f"{embeds.width}-d: connect the negative_embeds of the same Encode node.")
        tensors["negative"] = negative.features.float()
    meta = {"kind": embeds.kind, "width": str(embeds.width), "images": str(embeds.images), "source": embeds.source}
    return weights_file.save(path, tensors, meta, format=FILE_FORMAT)


def load(path: Path) -> tuple[StyleEmbeds, StyleEmbeds | None]:
    """(embeds, negative or None) from a file written by :func:`save`; errors name the file and the fix."""
    path = Path(path)
    tensors, meta = weights_file.load(path)
    if meta.get("format") != FILE_FORMAT or "features" not in tensors:
        raise ValueError(f"{path.name} is not an InstantStyle embeds file (format {meta.get('format')!r}, expected "
                         f"{FILE_FORMAT!r}): pick a file written by InstantStyle Save Embeds.")
    weights_file.check_finite(tensors, source=path.name)
    kind = meta.get("kind", "")
    try:
        embeds = StyleEmbeds(tensors["features"], kind, source=meta.get("source", "") or path.name)
        negative = StyleEmbeds(tensors["negative"], kind, source="negative") if "negative" in tensors else None
    except ValueError as err:
        raise ValueError(f"{path.name} is damaged: {err} Save the embeds again.") from err
    return embeds, negative
