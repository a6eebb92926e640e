"""Issue 12, case 7: the ControlNet-Zero CLI (``python -m controlnet_zero.train``), run as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness import comfy_env, disks

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, COMFYUI_DIR=str(comfy_env.comfyui_dir()), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "controlnet_zero.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


# one spelling in CI (each is a ~40 s CLI run; the parser itself is unit-tested): the others are `long`
@pytest.mark.parametrize("value", ["false", pytest.param("0", marks=pytest.mark.long),
                                   pytest.param("no", marks=pytest.mark.long)])
def test_resume_false_parses_as_a_boolean_and_starts_over(tmp_path, tiny_checkpoints, value):
    data = disks.write_folder(tmp_path / "data", count=2, size=64)
    out = tmp_path / "controlnet" / "cli.safetensors"
    common = ["--checkpoint", str(tiny_checkpoints["sd15"]), "--dataset", str(data), "--output", str(out),
              "--batch-size", "1", "--resolution", "64", "--eval-rows", "0", "--checkpoint-every", "1",
              "--mixed-precision", "fp32", "--gradient-checkpointing", "false"]
    proc = _cli(*common, "--steps", "1", "--resume", value)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"--resume {value} did not run as 'do not resume':\n{log[-3000:]}"
    assert "not a complete checkpoint" not in log, log[-3000:]
    assert out.is_file()


def _help_blocks(text: str) -> dict[str, str]:
    """``{flag: its help text}`` from argparse's --help output."""
    blocks: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^\s{2}(--[a-z0-9-]+)(?: \S+)?(?:\s{2,}(.*))?$", line)
        if m:
            current = m.group(1)
            blocks[current] = [m.group(2) or ""]
        elif current and line.startswith(" " * 4):
            blocks[current].append(line.strip())
        elif not line.strip():
            current = None
    return {flag: " ".join(" ".join(parts).split()) for flag, parts in blocks.items()}


def test_every_flag_has_help_text_from_the_node_tooltip(hostile_server):
    proc = _cli("--help", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    blocks = _help_blocks(proc.stdout)
    blocks.pop("--help", None)
    assert len(blocks) >= 24, sorted(blocks)
    bare = sorted(flag for flag, text in blocks.items() if len(text) < 10)
    assert not bare, f"flags without help text: {bare}"
    spec = hostile_server.object_info()["FrozenTuneControlNetZeroTrain"]["input"]
    tooltips = {name: s[1]["tooltip"] for group in spec.values() for name, s in group.items()
                if len(s) > 1 and isinstance(s[1], dict) and s[1].get("tooltip")}
    shared = {name: tip for name, tip in tooltips.items() if "--" + name.replace("_", "-") in blocks}
    assert len(shared) >= 10, sorted(shared)
    differ = {name: (blocks["--" + name.replace("_", "-")][:60], tip[:60]) for name, tip in shared.items()
              if " ".join(tip.split())[:40] not in blocks["--" + name.replace("_", "-")]}
    assert not differ, f"flag help differs from the node tooltip: {differ}"
