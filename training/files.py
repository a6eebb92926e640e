"""Result files: safetensors with settings in the metadata, written atomically and durably.

A file is written to a hidden temporary name beside its target, flushed to disk, renamed over
the target and the folder entry synced, so a crash or Cancel never leaves a half-written model
where ComfyUI would list it. Files are made readable by everyone (mode 0644, as ComfyUI's own
saves are on a default umask), so a shared install can load them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

FILE_MODE = 0o644


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], format: str) -> Path:
    """Write ``tensors`` to ``path`` atomically; ``format`` tags the file's kind in the metadata."""
    import safetensors.torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta["format"] = format
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        data = safetensors.torch.save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=meta)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
        _sync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a safetensors file (on the CPU) and its metadata."""
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
