"""Training checkpoints: everything needed to resume exactly, as safetensors (no pickle).

A checkpoint is a folder ``step_000100/`` holding ``controlnet.safetensors`` (the weights, in the
same ldm layout the final file has, so any checkpoint also loads in ComfyUI) and
``state.safetensors`` (the optimizer's state as plain tensors, ``training.optimizers.state_tensors``:
AdamW's fp32 moments or 8-bit AdamW's uint8 codes and scales; the sampling generator's state, the global
RNG state; the step, the optimizer's hyperparameters and the loss history in the metadata). The state file is
written last, so a folder without it (a crash mid-save) is ignored on resume.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..training import files as weights_file
from ..training import optimizers
from . import files

log = logging.getLogger(__name__)

WEIGHTS, STATE = "controlnet.safetensors", "state.safetensors"
FORMAT = "frozentune.controlnet_zero.state/1"


@dataclass
class Resumed:
    step: int
    losses: list[float]
    metadata: dict[str, str]


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint folder under ``root``, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step_*") if (p / STATE).is_file())
    return done[-1] if done else None


def _legacy_optimizer_info(meta: dict[str, str]) -> str:
    """The optimizer info of a checkpoint written before ``training.optimizers.state_tensors`` (AdamW only)."""
    return json.dumps({"param_groups": json.loads(meta["param_groups"]), "numbers": []})


def read_metadata(folder: Path) -> dict[str, str]:
    """A checkpoint's metadata (its settings and base fingerprint), read without loading its tensors."""
    import safetensors

    folder = Path(folder)
    if not (folder / STATE).is_file():
        raise ValueError(f"{folder} is not a complete ControlNet-Zero checkpoint (no {STATE}): give a step_* "
                         "folder written by a training run, or its parent folder to take the newest.")
    with safetensors.safe_open(str(folder / STATE), framework="pt", device="cpu") as f:
        return f.metadata() or {}


def save(root: Path, step: int, control_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         generator: torch.Generator, losses: list[float], metadata: dict[str, str], keep: int = 2,
         scaler=None) -> Path:
    """Write checkpoint ``step`` under ``root`` and drop all but the newest ``keep`` complete ones."""
    folder = step_dir(root, step)
    files.save(folder / WEIGHTS, control_model, metadata)
    tensors, info = optimizers.state_tensors(optimizer)
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = dict(metadata)
    meta.update({"step": str(step), "optimizer_state": info, "losses": json.dumps(losses)})
    if scaler is not None and scaler.is_enabled():
        meta["grad_scaler"] = json.dumps(scaler.state_dict())
    weights_file.save(folder / STATE, tensors, meta, format=FORMAT)
    done = sorted(p for p in Path(root).glob("step_*") if (p / STATE).is_file())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def load(folder: Path, control_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         generator: torch.Generator, scaler=None) -> Resumed:
    """Restore weights, optimizer, RNG states from ``folder``; returns the step reached and the losses."""
    folder = Path(folder)
    read_metadata(folder)  # a clear error for an incomplete folder
    weights, _ = weights_file.load(folder / WEIGHTS)
    with torch.no_grad():
        control_model.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()}, strict=True)
    tensors, meta = weights_file.load(folder / STATE)
    optimizers.load_state_tensors(optimizer, tensors, meta.get("optimizer_state") or _legacy_optimizer_info(meta))
    generator.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    if scaler is not None and "grad_scaler" in meta:
        scaler.load_state_dict(json.loads(meta["grad_scaler"]))
    return Resumed(int(meta["step"]), json.loads(meta["losses"]), meta)
