"""Where a learned word is saved: ComfyUI's embeddings folder, under a name the stock ``embedding:`` syntax reads.

Shared by Textual Inversion Train and pivotal UniTune Save, so both pick free names the same way.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..storage import names
from .word_trainer import check_name

log = logging.getLogger(__name__)

FOLDER = "embeddings"
EMBEDDING_SUFFIXES = ("", ".safetensors", ".pt", ".bin")  # what comfy.sd1_clip.load_embed tries for a name


def _taken(stem: str) -> bool:
    """Whether the stock loader would find a file for ``embedding:<stem>`` in any embeddings folder."""
    import comfy.sd1_clip
    import folder_paths

    for folder in comfy.sd1_clip.expand_directory_list(folder_paths.get_folder_paths(FOLDER)):
        if any(Path(folder, stem + suffix).is_file() for suffix in EMBEDDING_SUFFIXES):
            return True
    return False


def embedding_target(name: str) -> tuple[Path, str]:
    """Where the file goes and the word prompts use; a taken word gets the next free ``_00001`` counter.

    Never overwrites: the counter is checked against every embeddings folder, so the returned word
    resolves to the new file in a stock prompt.
    """
    import folder_paths

    folder, stem = names.save_target(name, input_name="name", folders={FOLDER: Path(folder_paths.get_folder_paths(
        FOLDER)[0])}, default=FOLDER)
    check_name(stem)
    word, counter = stem, 0
    while _taken(word):
        counter += 1
        word = f"{stem}_{counter:05d}"
    if counter:
        log.warning("Textual inversion: embedding:%s exists; this one is saved as embedding:%s", stem, word)
    return folder / f"{word}.safetensors", word
