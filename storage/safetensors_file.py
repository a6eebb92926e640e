"""Result files: safetensors with settings in the metadata, written atomically and durably.

A file is written to a hidden temporary name beside its target, flushed to disk, renamed over
the target and the folder entry synced, so a crash or Cancel never leaves a half-written model
where ComfyUI would list it. The file mode follows the umask as ComfyUI's own saves do (0644 on
the usual 022), so a shared install can load them. Temporary files a killed process left behind
(our own ``.<name>.<pid>.tmp`` naming, pid no longer alive) are removed on the next save there.

Reads fail with a message that names the file and says what to do, never a bare deserializer error
(as ComfyUI's ``comfy.utils.load_torch_file`` does for its two commonest errors; this module stays
importable without ComfyUI, for the unit tests and the torchrun trainer).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FILE_MODE = 0o666  # before the umask, as open() creates files
_TEMP = re.compile(r"^\..+\.safetensors\.(\d+)\.tmp$")


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], format: str) -> Path:
    """Write ``tensors`` to ``path`` atomically; ``format`` tags the file's kind in the metadata."""
    import safetensors.torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta["format"] = format
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    remove_stale_temp_files(path.parent)
    try:
        data = safetensors.torch.save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=meta)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
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


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: leave it
    return True


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete ``.<name>.safetensors.<pid>.tmp`` files in ``folder`` whose writer process is gone."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match and entry.is_file(follow_symlinks=False) and not _alive(int(match.group(1))):
            try:
                os.unlink(entry.path)
            except OSError:
                continue
            removed.append(Path(entry.path))
            log.info("removed %s, left by a save that did not finish", entry.path)
    return removed


def open_lazy(path: Path):
    """A ``safetensors.safe_open`` handle (CPU) with ``load``'s checks and errors, for reading the metadata or
    single tensors of a large file without loading all of it (checkpoint headers, cache shards)."""
    import safetensors

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (or is not a file): pick a file from the list again, "
                                "or refresh the page if it was removed.")
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise ValueError(f"{path.name} is not a .safetensors file: only safetensors files are read here.")
    try:
        return safetensors.safe_open(str(path), framework="pt", device="cpu")
    except Exception as error:
        raise _unreadable(path, error) from error


def _unreadable(path: Path, error: Exception) -> ValueError:
    """The deserializer's errors say neither which file nor what to do."""
    reason = str(error).split("\n", 1)[0] or type(error).__name__
    return ValueError(f"{path} could not be read as a safetensors file ({reason}): it is truncated, corrupt "
                      "or not a safetensors file. Save, copy or download it again.")


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a safetensors file (on the CPU) and its metadata; errors name the file and the fix."""
    handle = open_lazy(path)
    try:
        with handle as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as error:
        raise _unreadable(Path(path), error) from error
    return tensors, dict(metadata)


def check_finite(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse tensors holding NaN or infinity (they would turn every image black), naming the first."""
    for key, value in tensors.items():
        if not value.is_floating_point():
            continue
        finite = torch.isfinite(value if value.element_size() > 1 else value.to(torch.float16))
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ValueError(f"{source}: tensor {key!r} holds {bad} NaN or infinite value(s) of {value.numel()}; "
                             "the file is damaged or was trained with a diverging loss. Train or save it again.")


def unused_path(folder: Path, name: str) -> Path:
    """``folder/name.safetensors``, or ``name_00001.safetensors`` (next free counter) if taken."""
    stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
    candidate = folder / f"{stem}.safetensors"
    counter = 1
    while candidate.exists():
        candidate = folder / f"{stem}_{counter:05d}.safetensors"
        counter += 1
    return candidate
