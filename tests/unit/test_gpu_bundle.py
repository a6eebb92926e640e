"""The offline GPU-check bundle (``make gpu-bundle``) runs the check with nothing but the GPU machine's packages.

A Python 3.12 venv stands in for the GPU machine: torch 2.11 (PyPI's build; its CUDA libraries are
packages of the machine's list too, and it runs on the CPU) and the packages of
``tests/harness/gpu_machine_packages.txt`` the check touches, from the registry. Then, as on that machine,
``bench/run_gpu_check_offline.sh`` installs the bundle's wheels ``--no-index`` into a scratch target and
runs the gpu-check CPU dry run (``--device cpu --tiny``). The run fails on any connection to a
non-loopback address (a ``sitecustomize`` in the run's path) and the venv is checked to hold only
packages of the list.

``long``: the first run downloads torch and builds the venv (``build/gpu_bundle_venv``, kept for later
runs); the dry run itself takes minutes on two cores. ``GPU_BUNDLE_TEST_SUBSET=1`` runs one load and one
workflow instead of the whole dry run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "harness"))
import gpu_bundle  # noqa: E402 - stdlib only

pytestmark = pytest.mark.long

VENV = REPO / "build" / "gpu_bundle_venv"
TORCH = ["torch==2.11.0", "torchvision==0.26.0"]
# What the check imports from the machine's list (a trace of both processes of the dry run), by name:
# the registry picks versions, their dependencies must be on the list as well (checked below).
# transformers < 5: 5.x pulls huggingface-hub 1.x/2.x, whose dependencies (pydantic, httpx2, kernels) are not
# on the list; the project's own venv runs transformers 5, so the check is exercised on both majors.
FROM_THE_LIST = ["numpy", "pillow", "scipy", "safetensors", "transformers<5", "tokenizers", "huggingface-hub",
                 "einops", "aiohttp", "yarl", "pyyaml", "psutil", "requests", "tqdm", "typing-extensions",
                 "sentencepiece", "packaging", "regex", "pathspec", "setuptools<82",
                 "typer<0.25", "rich"]  # typer 0.25+ needs pydantic (off the list); comfy-cli's workflow converter (the bundle's comfy-cli is installed --no-deps)
NO_NETWORK = '''
import socket
_connect = socket.socket.connect
def _local_only(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("/"):
        raise OSError(f"gpu-bundle test: network access to {address!r} is not allowed offline")
    return _connect(self, address)
socket.socket.connect = _local_only
'''


def python312() -> str | None:
    """A Python 3.12 that runs (pyenv's shim for ``python3.12`` exists but fails when 3.12 is not selected)."""
    pyenv = sorted(Path.home().glob(".pyenv/versions/3.12.*/bin/python"))
    for candidate in (os.environ.get("PYTHON312"), *map(str, pyenv), shutil.which("python3.12")):
        if candidate and subprocess.run([candidate, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"],
                                        capture_output=True).returncode == 0:
            return candidate
    return None


def venv_python() -> Path:
    py = python312()
    if py is None:
        pytest.skip("no Python 3.12 here (set PYTHON312): the GPU machine's Python cannot be stood in for")
    stamp = VENV / "frozentune-gpu-bundle-venv.json"
    wanted = {"torch": TORCH, "list": FROM_THE_LIST}
    vpy = VENV / "bin" / "python"
    found = json.loads(stamp.read_text()) if stamp.exists() else {}
    if found == wanted:
        return vpy
    if found.get("torch") != TORCH:  # torch is the big download: the venv is rebuilt only when it changes
        shutil.rmtree(VENV, ignore_errors=True)
        subprocess.run([py, "-m", "venv", str(VENV)], check=True)
    subprocess.run([vpy, "-m", "pip", "install", "--quiet", *TORCH, *FROM_THE_LIST], check=True)
    stamp.write_text(json.dumps(wanted))
    return vpy


def installed(vpy: Path) -> set[str]:
    out = subprocess.run([vpy, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True)
    return {gpu_bundle.normalize(d["name"]) for d in json.loads(out.stdout)}


def test_the_bundle_fits_and_skips_what_the_machine_has():
    assert gpu_bundle.main() == 0  # downloads only what is missing
    bundle = gpu_bundle.BUNDLE
    assert gpu_bundle.size_of(bundle) <= gpu_bundle.MAX_BYTES
    have = gpu_bundle.gpu_machine_packages()
    pins = (bundle / "requirements-offline.txt").read_text()
    for line in pins.splitlines():
        if line and not line.startswith("#"):
            assert gpu_bundle.normalize(line.split()[0]) not in have, line
    assert not (bundle / "comfyui" / "tests").exists() and (bundle / "comfyui" / "comfy" / "sd1_tokenizer").is_dir()


def test_the_check_runs_offline_from_the_bundle_with_only_the_machines_packages(tmp_path):
    assert gpu_bundle.main() == 0
    vpy = venv_python()
    outside = installed(vpy) - gpu_bundle.gpu_machine_packages() - {"pip"}
    assert not outside, f"the stand-in venv holds packages the GPU machine lacks: {sorted(outside)}"

    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NO_NETWORK)
    args = ["--device", "cpu", "--tiny", "--out", str(tmp_path / "report"), "--build", str(tmp_path / "models")]
    if os.environ.get("GPU_BUNDLE_TEST_SUBSET"):
        args += ["--loads", "sd15:fp16", "--workflows", "UniTune - edit a photo with a prompt (SD1.5)"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "COMFYUI_DIR"))}
    env.update(PYTHON=str(vpy), FT_SITE=str(tmp_path / "site"), PYTHONPATH=str(guard),
               PATH=f"{vpy.parent}:{env.get('PATH', '')}")
    done = subprocess.run(["sh", str(REPO / "bench" / "run_gpu_check_offline.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=3000)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["environment"]["torch"].startswith("2.11.0"), report["environment"]
    assert report["passed"] == len(report["items"]) > 0
    assert not re.search(r"network access to .* is not allowed", log), log[-6000:]
    site = tmp_path / "site"
    assert (site / "av").is_dir() and (site / "torchsde").is_dir() and not (site / "torch").exists()
