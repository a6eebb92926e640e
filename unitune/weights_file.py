"""UniTune result files: ComfyUI LoRA-format safetensors with the settings and base identity in metadata.

Files are written atomically (temporary file, then rename), so a crash or Cancel never leaves a
half-written model where ComfyUI would list it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

FORMAT = "frozentune.unitune/1"


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], format: str = FORMAT) -> Path:
    """Write ``tensors`` to ``path`` atomically; ``format`` tags the file's kind in the metadata."""
    import safetensors.torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta["format"] = format
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        safetensors.torch.save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                                    metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    import safetensors

    with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, metadata


def unused_path(folder: Path, name: str) -> Path:
    """``folder/name.safetensors``, or ``name_00001.safetensors`` (next free counter) if taken."""
    stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
    candidate = folder / f"{stem}.safetensors"
    counter = 1
    while candidate.exists():
        candidate = folder / f"{stem}_{counter:05d}.safetensors"
        counter += 1
    return candidate
