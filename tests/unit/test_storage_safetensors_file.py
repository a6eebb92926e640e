"""Result files: mode follows the umask, stale temp files go, reads fail with the file's name."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from harness.comfy_env import import_pack

import_pack()  # the pack as package `frozentune`; training/ needs no ComfyUI
from frozentune.storage import safetensors_file as files  # noqa: E402


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_mode_follows_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = files.save(tmp_path / "a.safetensors", {"x": torch.ones(2)}, {}, format="test")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == mode


def test_stale_temp_files_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".a.safetensors.{int(dead.stdout)}.tmp"
    live = tmp_path / f".b.safetensors.{os.getppid()}.tmp"  # a writer that is still running
    foreign = tmp_path / ".c.123.tmp"  # not our naming
    for p in (stale, live, foreign):
        p.write_bytes(b"x" * 10)
    files.save(tmp_path / "a.safetensors", {"x": torch.ones(2)}, {}, format="test")
    assert not stale.exists() and live.exists() and foreign.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == sorted([live.name, foreign.name])


def test_unreadable_files_name_the_file(tmp_path):
    good = files.save(tmp_path / "good.safetensors", {"x": torch.ones(4096)}, {}, format="test")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:100])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    for path in (truncated, garbage):
        with pytest.raises(ValueError, match=f"{path.name} could not be read as a safetensors file.*again"):
            files.load(path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        files.load(tmp_path / "missing.safetensors")
    (tmp_path / "x.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .safetensors file"):
        files.load(tmp_path / "x.ckpt")
    tensors, meta = files.load(good)
    assert torch.equal(tensors["x"], torch.ones(4096)) and meta["format"] == "test"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e5m2])
def test_check_finite(dtype):
    good = {"a": torch.ones(3, dtype=dtype), "i": torch.arange(3)}
    files.check_finite(good, "f.safetensors")
    for bad in (float("nan"), float("inf")):
        value = torch.tensor([1.0, bad, 2.0]).to(dtype)
        with pytest.raises(ValueError, match=r"f.safetensors: tensor 'b' holds 1 NaN"):
            files.check_finite({**good, "b": value}, "f.safetensors")
