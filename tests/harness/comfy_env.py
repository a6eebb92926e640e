"""Make the ComfyUI source importable in this process (for the `node` tier, bench and tools).

ComfyUI decides the device at import time from its command-line args, so the flags are set
here before anything imports ``comfy.model_management``. The pack root itself never goes on
``sys.path``: its ``nodes/`` package would shadow ComfyUI's ``nodes`` module.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "frozentune"


def comfyui_dir() -> Path:
    """COMFYUI_DIR if set, else the pinned copy that `make setup` builds."""
    path = Path(os.environ.get("COMFYUI_DIR") or REPO_ROOT / "build" / "comfyui").resolve()
    if not (path / "main.py").exists():
        raise RuntimeError(f"no ComfyUI at {path}: run `make setup` (or set COMFYUI_DIR to a ComfyUI tree)")
    return path


def import_comfy(cpu: bool | None = None) -> Path:
    """Put ComfyUI first on sys.path and set its device flags; returns the ComfyUI folder.

    ``cpu=None`` picks the CPU when no CUDA device is present.
    """
    root = comfyui_dir()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if "comfy.model_management" not in sys.modules:
        from comfy.cli_args import args

        if cpu is None:
            import torch

            cpu = not torch.cuda.is_available()
        args.cpu = cpu
    return root


def import_pack() -> ModuleType:
    """Import the pack as the package ``frozentune`` from the repo root, as ComfyUI would."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module
