"""Names users type for files we write: one validator for every Save node.

A save name is relative to the node's own model folder and may start with one of the folder words
the node accepts (``unitune/alice``, ``loras/alice``) or name sub-folders of its default folder
(``people/alice``). Everything else — absolute paths, ``..``, hidden or empty names, another model
folder such as ``checkpoints/x`` (which would put our file in the Load Checkpoint list) — is refused
with a message that says what is allowed, before anything is written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

SUFFIX = ".safetensors"
MAX_COMPONENT = 120  # leaves room for "_00001", the suffix and the temp-file prefix under 255 bytes
BAD_CHARACTERS = set('<>:"|?*')
# ComfyUI's model folder names (folder_paths.py, 0.3.75): a save name must not start with one it does
# not own, or the file lands in another loader's list.
MODEL_FOLDERS = frozenset({
    "checkpoints", "configs", "loras", "vae", "vae_approx", "text_encoders", "clip", "diffusion_models",
    "unet", "clip_vision", "style_models", "embeddings", "diffusers", "controlnet", "t2i_adapter", "gligen",
    "upscale_models", "latent_upscale_models", "custom_nodes", "hypernetworks", "photomaker", "classifiers",
    "model_patches", "audio_encoders", "ipadapter", "unitune",
})


def _component_problem(part: str) -> str | None:
    if part in ("", ".", ".."):
        return f"{part!r} is not a file or folder name"
    if part.startswith("."):
        return f"{part!r} starts with '.' (a hidden name no loader lists)"
    if part != part.strip():
        return f"{part!r} starts or ends with a space"
    if len(part) > MAX_COMPONENT:
        return f"a part is {len(part)} characters long (at most {MAX_COMPONENT})"
    bad = sorted({c for c in part if c in BAD_CHARACTERS or ord(c) < 32 or ord(c) == 127})
    if bad:
        return f"{part!r} contains {', '.join(repr(c) for c in bad)}"
    return None


def plain_name(value: str, *, input_name: str, example: str) -> str:
    """``value`` as one plain name (no folders), e.g. a run name; ValueError otherwise."""
    name = str(value).strip()
    problem = _component_problem(name) if "/" not in name and "\\" not in name else "it contains a '/'"
    if problem:
        raise ValueError(f"{input_name} {value!r} is refused: {problem}. Use one plain name of letters, digits, "
                         f"'-' and '_' (up to {MAX_COMPONENT} characters), e.g. {example!r}.")
    return name


def save_target(value: str, *, input_name: str, folders: Mapping[str, Path], default: str) -> tuple[Path, str]:
    """The folder and stem (may hold sub-folders, no suffix) ``value`` names inside one of ``folders``."""
    allowed = ", ".join(f"'{word}/...'" for word in folders)
    hint = (f"Give a relative name such as 'my_subject' (saved in models/{default}/), "
            f"'people/my_subject' (a sub-folder), or one starting with {allowed}.")
    text = str(value)
    name = text.strip().replace("\\", "/")
    if name.lower().endswith(SUFFIX):
        name = name[: -len(SUFFIX)]
    problem = None
    if "\x00" in name:
        problem = "it contains a NUL byte"
    elif not name:
        problem = "it is empty"
    elif name.startswith("/") or (len(name) > 1 and name[1] == ":") or name.startswith("~"):
        problem = "absolute paths are not allowed (files are written only inside ComfyUI's model folders)"
    parts = name.split("/") if problem is None else []
    for part in parts:
        problem = problem or _component_problem(part)
    if problem is None and len(parts) > 1 and parts[0] not in folders and parts[0] in MODEL_FOLDERS:
        problem = f"'{parts[0]}/' is another loader's folder, not one this node saves into"
    if problem:
        raise ValueError(f"{input_name} {text!r} is refused: {problem}. {hint}")
    word = parts[0] if len(parts) > 1 and parts[0] in folders else default
    if word == parts[0] and len(parts) > 1:
        parts = parts[1:]
    folder = Path(folders[word])
    stem = "/".join(parts)
    target = os.path.realpath(folder / f"{stem}{SUFFIX}")
    if os.path.commonpath([target, os.path.realpath(folder)]) != os.path.realpath(folder):
        raise ValueError(f"{input_name} {text!r} is refused: it leads outside models/{word}/ (a link). {hint}")
    return folder, stem
