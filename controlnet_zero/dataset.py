"""Training pairs (target image, RGB hint, caption) from a folder on disk or from IMAGE batches.

Folder layout (the layout of public ControlNet datasets such as fill50k):

    root/images/<name>.png          targets
    root/conditioning/<name>.png    hints, RGB, same size as the target, matched by file stem
    root/images/<name>.txt          captions (one text file per image), or instead
    root/<any>.jsonl                a manifest: {"image": ..., "conditioning_image": ..., "text": ...} per line,
                                    paths relative to root

Every problem is reported with the file and the fix, before any training starts. Given ``roots``
(the node: ComfyUI's input folder and the admin's ``FROZENTUNE_DATA_DIRS``), the folder, the manifest's
paths and every file read (links followed) must lie inside them, checked by ``storage.user_paths``
before the file system is touched, so a refusal tells nothing about what exists elsewhere. The CLI
passes no roots: it is run by the machine's owner, on paths the owner gives.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..storage import user_paths
from ..training.image_folder import IMAGE_SUFFIXES
from ..training.image_folder import list_images as _list_images
from ..training.image_folder import names as _names
from ..training.image_folder import open_image as _open
from ..training.image_folder import to_uint8 as _to_tensor

log = logging.getLogger(__name__)

MANIFEST_KEYS = ("image", "conditioning_image", "text")


@dataclass(frozen=True)
class Pair:
    image: Path
    hint: Path
    caption: str


class _Confined:
    """Where reads may go: anywhere (``roots`` None, the CLI) or inside ``roots`` (the node)."""

    def __init__(self, roots: Sequence[Path] | None):
        self.roots = roots

    def __call__(self, value: str | Path, input_name: str, base: Path | None = None) -> Path:
        if self.roots is None:
            path = Path(value).expanduser()
            return path if base is None or path.is_absolute() else base / path
        return user_paths.resolve(str(value), input_name=input_name, roots=self.roots, base=base)


def scan_folder(root: str | Path, *, roots: Sequence[Path] | None = None) -> list[Pair]:
    """The pairs in a dataset folder, checked for completeness (not yet opened).

    ``roots``: the folders reads must stay inside (relative ``root`` starts at the first), or None.
    """
    confine = _Confined(roots)
    root = confine(root, "dataset_folder")
    if not root.is_dir():
        raise ValueError(f"dataset folder {str(root)!r} does not exist: give a folder holding images/ and "
                         "conditioning/ (or a .jsonl manifest).")
    manifests = sorted(root.glob("*.jsonl"))
    if len(manifests) > 1:
        raise ValueError(f"dataset folder {root} holds several manifests ({_names(p.name for p in manifests)}): "
                         "keep exactly one .jsonl file there.")
    if manifests:
        return _scan_manifest(root, confine(manifests[0], "manifest"), confine)
    images_dir, hints_dir = root / "images", root / "conditioning"
    for d in (images_dir, hints_dir):
        if not d.is_dir():
            raise ValueError(f"dataset folder {root} has no {d.name}/ folder: put targets in images/ and the "
                             "matching hints (same file names) in conditioning/, or add a .jsonl manifest.")
    images, hints = _list_images(images_dir), _list_images(hints_dir)
    no_hint = set(images) - set(hints)
    no_image = set(hints) - set(images)
    if no_hint:
        raise ValueError(f"{len(no_hint)} image(s) in {images_dir} have no hint of the same name in {hints_dir}: "
                         f"{_names(no_hint)}. Add the hints or remove these images.")
    if no_image:
        raise ValueError(f"{len(no_image)} hint(s) in {hints_dir} have no image of the same name in {images_dir}: "
                         f"{_names(no_image)}. Add the images or remove these hints.")
    if not images:
        raise ValueError(f"{images_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    no_caption = [s for s in images if not (images_dir / f"{s}.txt").is_file()]
    if no_caption:
        raise ValueError(f"{len(no_caption)} image(s) have no caption file next to them in {images_dir}: "
                         f"{_names(s + '.txt' for s in no_caption)}. Add one .txt per image (it may be empty).")
    pairs = []
    for s in sorted(images):  # each file checked again: a link in the folder may point elsewhere
        image, hint = confine(images[s], f"image {images[s].name}"), confine(hints[s], f"hint {hints[s].name}")
        caption = confine(images_dir / f"{s}.txt", f"caption {s}.txt").read_text(encoding="utf-8").strip()
        pairs.append(Pair(image, hint, caption))
    return pairs


def _scan_manifest(root: Path, manifest: Path, confine: _Confined) -> list[Pair]:
    pairs = []
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{manifest.name} line {number} is not valid JSON ({err.msg}): each line must be "
                             '{"image": ..., "conditioning_image": ..., "text": ...}.') from err
        missing = [k for k in MANIFEST_KEYS if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"{manifest.name} line {number} lacks {', '.join(missing)}: each line needs "
                             f"{', '.join(MANIFEST_KEYS)}.")
        where = f"{manifest.name} line {number}"
        image = confine(str(row["image"]), f"{where} image", base=root)
        hint = confine(str(row["conditioning_image"]), f"{where} conditioning_image", base=root)
        for label, path in (("image", image), ("conditioning_image", hint)):
            if not path.is_file():
                raise ValueError(f"{manifest.name} line {number}: {label} {str(path)!r} does not exist. Fix the "
                                 "path (relative to the dataset folder) or remove the line.")
        pairs.append(Pair(image, hint, str(row["text"]).strip()))
    if not pairs:
        raise ValueError(f"manifest {manifest} lists no pairs.")
    return pairs


def fingerprint(pairs: list[Pair]) -> str:
    """A digest of the dataset: every pair's file names and bytes and its caption, in order.

    Content, not dates: a copied or moved dataset matches, a changed, added or removed file does not.
    """
    digest = hashlib.sha256()
    for pair in pairs:
        for path in (pair.image, pair.hint):
            with open(path, "rb") as f:
                digest.update(f"{path.name}\0".encode() + hashlib.file_digest(f, "sha256").digest())
        digest.update(pair.caption.encode("utf-8") + b"\0")
    return digest.hexdigest()


def fit(images: torch.Tensor, resolution: int, method: str) -> torch.Tensor:
    """``[B, H, W, 3]`` -> ``[B, R, R, 3]``: scale the short side to R and center-crop (ComfyUI's upscale)."""
    if tuple(images.shape[1:3]) == (resolution, resolution):
        return images
    import comfy.utils

    nchw = images.movedim(-1, 1)
    was_uint8 = nchw.dtype == torch.uint8
    out = comfy.utils.common_upscale(nchw.float() / 255.0 if was_uint8 else nchw, resolution, resolution,
                                     method, "center").movedim(1, -1)
    return (out.clamp(0, 1) * 255).round().to(torch.uint8) if was_uint8 else out.clamp(0, 1)


def load_pairs(pairs: list[Pair], resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Open, check and fit ``pairs``: (targets, hints), both ``[B, R, R, 3]`` uint8.

    Targets are converted to RGB; hints must already be RGB (a grayscale or RGBA hint is a mistake
    in most datasets, so it is refused rather than silently converted).
    """
    targets, hints = [], []
    for pair in pairs:
        image, hint = _open(pair.image), _open(pair.hint)
        if hint.mode != "RGB":
            raise ValueError(f"hint {pair.hint} is {hint.mode}, not RGB: ControlNet hints are 3-channel RGB. "
                             "Convert it (e.g. PIL: Image.open(p).convert('RGB').save(p)).")
        if image.size != hint.size:
            raise ValueError(f"image {pair.image.name} is {image.size[0]}x{image.size[1]} but its hint "
                             f"{pair.hint.name} is {hint.size[0]}x{hint.size[1]}: a hint must have its image's size.")
        targets.append(fit(_to_tensor(image.convert("RGB"))[None], resolution, "lanczos")[0])
        hints.append(fit(_to_tensor(hint)[None], resolution, "nearest-exact")[0])
    return torch.stack(targets), torch.stack(hints)


def check_resolution(resolution: int) -> None:
    if resolution < 64 or resolution % 64:
        raise ValueError(f"resolution {resolution} must be a multiple of 64 (e.g. 512 for SD1.5, 1024 for SDXL).")


def split_captions(text: str, count: int) -> list[str]:
    """One caption for all (one line) or one per image (``count`` lines)."""
    lines = [line.strip() for line in text.strip().splitlines()] if text.strip() else [""]
    if len(lines) == 1:
        return lines * count
    if len(lines) != count:
        raise ValueError(f"captions has {len(lines)} lines for {count} images: give one line for all images "
                         "or exactly one line per image.")
    return lines


def from_images(images: torch.Tensor, hints: torch.Tensor, captions: str,
                resolution: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """IMAGE batches from the graph -> (targets, hints, captions); targets/hints ``[B, R, R, 3]`` float."""
    if images.ndim != 4 or hints.ndim != 4:
        raise ValueError(f"images {tuple(images.shape)} and hints {tuple(hints.shape)} must be IMAGE batches "
                         "[B, H, W, C].")
    if images.shape[0] != hints.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {hints.shape[0]} hints: give one hint per image.")
    if hints.shape[-1] != 3:
        raise ValueError(f"the hints have {hints.shape[-1]} channels, not RGB: ControlNet hints are 3-channel "
                         "(drop alpha, or expand a mask to RGB).")
    if images.shape[1:3] != hints.shape[1:3]:
        raise ValueError(f"images are {images.shape[2]}x{images.shape[1]} but hints are "
                         f"{hints.shape[2]}x{hints.shape[1]}: a hint must have its image's size.")
    caps = split_captions(captions, images.shape[0])
    targets = fit(images[..., :3].detach().float().clone(), resolution, "lanczos")
    return targets, fit(hints.detach().float().clone(), resolution, "nearest-exact"), caps


def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
