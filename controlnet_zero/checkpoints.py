"""Training checkpoints: everything needed to resume exactly, as safetensors (no pickle).

A checkpoint is a folder ``step_000100/`` holding ``controlnet.safetensors`` (the weights, in the
same ldm layout the final file has, so any checkpoint also loads in ComfyUI) and
``state.safetensors`` (AdamW moments, the sampling generator's state, the global RNG state; the
step, the optimizer's hyperparameters and the loss history in the metadata). The state file is
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


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    sd = optimizer.state_dict()
    tensors = {}
    for pid, state in sd["state"].items():
        for name, value in state.items():
            tensors[f"optim.{pid}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, json.dumps(groups)


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups_json: str) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    groups = json.loads(groups_json)
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save(root: Path, step: int, control_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         generator: torch.Generator, losses: list[float], metadata: dict[str, str], keep: int = 2,
         scaler=None) -> Path:
    """Write checkpoint ``step`` under ``root`` and drop all but the newest ``keep`` complete ones."""
    folder = step_dir(root, step)
    files.save(folder / WEIGHTS, control_model, metadata)
    tensors, groups = _optimizer_tensors(optimizer)
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = dict(metadata)
    meta.update({"step": str(step), "param_groups": groups, "losses": json.dumps(losses)})
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
    if not (folder / STATE).is_file():
        raise ValueError(f"{folder} is not a complete ControlNet-Zero checkpoint (no {STATE}): give a step_* "
                         "folder written by a training run, or its parent folder to take the newest.")
    weights, _ = weights_file.load(folder / WEIGHTS)
    with torch.no_grad():
        control_model.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()}, strict=True)
    tensors, meta = weights_file.load(folder / STATE)
    _load_optimizer(optimizer, tensors, meta["param_groups"])
    generator.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    if scaler is not None and "grad_scaler" in meta:
        scaler.load_state_dict(json.loads(meta["grad_scaler"]))
    return Resumed(int(meta["step"]), json.loads(meta["losses"]), meta)
