"""Images in a folder a user names: listing, opening and confinement shared by the trainers' folder inputs.

A trainer node's folder is confined by ``storage.user_paths`` (ComfyUI's input folder and the admin's
``FROZENTUNE_DATA_DIRS``), checked on the text before the file system is touched, and every file is checked
again after listing (a link in the folder may point elsewhere). ``read_views`` opens images the way the
stock ``LoadImage`` node does (EXIF orientation applied, 16-bit 'I' scaled, converted to RGB, float 0..1),
so a folder and the same files loaded one by one in the graph train the same.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ..storage import user_paths

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(folder: Path) -> dict[str, Path]:
    """The image files directly in ``folder`` by file stem (sorted); two images with one stem are refused."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if path.stem in found:
            raise ValueError(f"{folder} holds two images named {path.stem!r} ({found[path.stem].name} and "
                             f"{path.name}): keep one, names must be unique by stem.")
        found[path.stem] = path
    return found


def names(items: Iterable[str], limit: int = 5) -> str:
    """Up to ``limit`` names for an error message, then how many more."""
    items = sorted(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def open_image(path: Path, fix: str = "replace the file or remove the pair"):
    """``path`` opened and decoded with PIL; an unreadable file is named with ``fix``."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
        img.load()
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise ValueError(f"cannot read {path} ({err}): {fix}.") from err
    return img


def to_uint8(img) -> torch.Tensor:
    """A PIL image -> ``[H, W, C]`` uint8 tensor (its own memory)."""
    import numpy as np

    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())


def as_loaded(img) -> torch.Tensor:
    """A PIL image -> IMAGE row ``[H, W, 3]`` float32 0..1 exactly as stock ``LoadImage`` makes its first frame."""
    import numpy as np
    from PIL import ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode == "I":
        img = img.point(lambda v: v * (1 / 255))
    return torch.from_numpy(np.array(img.convert("RGB")).astype(np.float32) / 255.0)


def confined_folder(folder: str, *, input_name: str, roots: Sequence[Path]) -> Path:
    """``folder`` inside ``roots`` (relative to the first), checked on the text first; it must be a folder."""
    root = user_paths.resolve(folder, input_name=input_name, roots=roots)
    if not root.is_dir():
        raise ValueError(f"{input_name} {folder!r} is not a folder: give a folder of images inside ComfyUI's "
                         "input folder (relative to it, e.g. 'my_concept') or leave it empty.")
    return root


def read_views(folder: str, *, input_name: str, roots: Sequence[Path]) -> list[torch.Tensor]:
    """The images directly in ``folder`` (by name; other files and subfolders ignored) as IMAGE rows.

    They are views of one concept at one size: different sizes are refused with each size's files, so
    nothing is silently resized or cropped.
    """
    root = confined_folder(folder, input_name=input_name, roots=roots)
    found = list_images(root)
    if not found:
        raise ValueError(f"{input_name} {root} holds no images ({', '.join(IMAGE_SUFFIXES)}): put the views of the "
                         "concept directly in it.")
    views, sizes = [], {}
    for path in found.values():
        path = user_paths.resolve(str(path), input_name=f"{input_name} image {path.name}", roots=roots)
        view = as_loaded(open_image(path, fix="replace the file or remove it from the folder"))
        sizes.setdefault(f"{view.shape[1]}x{view.shape[0]}", []).append(path.name)
        views.append(view)
    if len(sizes) > 1:
        shown = "; ".join(f"{size}: {names(files, 3)}" for size, files in sorted(sizes.items()))
        raise ValueError(f"the images in {input_name} {root} have different sizes ({shown}): resize or crop them "
                         "to one size first (e.g. all 512x512), or keep only the images of one size there.")
    return views


def signature(folder: str, *, input_name: str, roots: Sequence[Path]) -> str:
    """A digest of the folder's image names, sizes and modification times ('' if refused or missing).

    For a node's ``fingerprint_inputs``: ComfyUI runs the node again when images are added, removed or
    replaced, as the stock LoadImage re-runs when its file changes.
    """
    try:
        root = confined_folder(folder, input_name=input_name, roots=roots)
        digest = hashlib.sha256()
        for path in list_images(root).values():
            path = user_paths.resolve(str(path), input_name=input_name, roots=roots)
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        return digest.hexdigest()
    except (ValueError, OSError):
        return ""  # execute reports the problem


def prepare_images(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack ComfyUI images ``[H, W, 3]`` into ``[B, H, W, 3]``, center-cropped to multiples of 8.

    All images must share one size (they are views of one subject at one resolution).
    """
    if not images:
        raise ValueError("no image given: connect the image to tune on.")
    sizes = sorted({tuple(img.shape[:2]) for img in images})
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h}" for h, w in sizes)
        raise ValueError(f"the images have different sizes ({shown}): resize them to one size first, "
                         "e.g. with the stock ImageScale node.")
    h, w = sizes[0]
    h8, w8 = h - h % 8, w - w % 8
    if h8 < 8 or w8 < 8:
        raise ValueError(f"image is {w}x{h}: it must be at least 8x8 pixels.")
    batch = torch.stack([img[..., :3] for img in images])
    if (h8, w8) != (h, w):
        top, left = (h - h8) // 2, (w - w8) // 2
        log.info("Training image %dx%d is not a multiple of 8; center-cropped to %dx%d", w, h, w8, h8)
        batch = batch[:, top:top + h8, left:left + w8]
    return batch
