"""Paths users type for files we read (dataset folders, manifests, the paths inside a manifest).

A ComfyUI server is often shared or listening on a network, and stock nodes read user-named files
only from their own folders. So a path a node is given must lie inside ComfyUI's input folder, or
inside a folder the server's admin lists in the environment variable ``FROZENTUNE_DATA_DIRS``
(absolute folders separated by ``os.pathsep``, e.g. ``/data/sets:/mnt/photos``). The check is made
on the text first, before the file system is touched, and the refusal reads the same whether the
path exists or not, so it tells nothing about the host.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "FROZENTUNE_DATA_DIRS"
NAME_MAX = 255  # bytes per file or folder name on Linux, macOS and Windows file systems


def roots(input_dir: Path) -> list[Path]:
    """ComfyUI's input folder, then the admin's extra folders from ``FROZENTUNE_DATA_DIRS``."""
    found = [Path(os.path.abspath(input_dir))]
    for entry in os.environ.get(ENV, "").split(os.pathsep):
        entry = entry.strip()
        if not entry:
            continue
        if not os.path.isabs(entry):
            log.warning("%s entry %r is not an absolute folder; ignored", ENV, entry)
            continue
        found.append(Path(os.path.normpath(entry)))
    return found


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def resolve(value: str, *, input_name: str, roots: Sequence[Path], base: Path | None = None) -> Path:
    """``value`` as a path inside one of ``roots`` (relative paths start at ``base``, default the first)."""
    refusal = ValueError(
        f"{input_name} {value!r} is refused: datasets are read only from ComfyUI's input folder (give a path "
        f"relative to it, e.g. 'my_dataset') or from folders the server's admin lists in {ENV}.")
    text = str(value).strip()
    if not text or "\x00" in text or text.startswith("~"):
        raise refusal
    if any(len(part.encode("utf-8", "surrogatepass")) > NAME_MAX for part in text.replace("\\", "/").split("/")):
        raise ValueError(f"{input_name} {value!r} is refused: a file or folder name in it is longer than "
                         f"{NAME_MAX} bytes, which no file system allows. Give the dataset a shorter name.")
    start = str(base if base is not None else roots[0])
    lexical = os.path.normpath(text if os.path.isabs(text) else os.path.join(start, text))
    root_texts = [os.path.normpath(str(r)) for r in roots]
    if not any(_inside(lexical, r) for r in root_texts):
        raise refusal
    real = os.path.realpath(lexical)
    if not any(_inside(real, os.path.realpath(r)) for r in root_texts):
        raise refusal
    return Path(lexical)
