"""Training checkpoints: everything needed to resume exactly, as safetensors (no pickle).

A checkpoint is a folder ``step_000100/`` holding ``controlnet.safetensors`` (the weights, in the
same layout the final file has, so any checkpoint also loads in ComfyUI) and
``state.safetensors`` (the optimizer's state as plain tensors, ``training.optimizers.state_tensors``:
AdamW's fp32 moments or 8-bit AdamW's uint8 codes and scales; the sampling generator's state, the global
RNG state; the step, the optimizer's hyperparameters and the loss history in the metadata). The state file is
written last, so a folder without it (a crash mid-save) is ignored on resume.

A checkpoint belongs to one run. Its metadata holds the run's identity: a run id, the base model's
fingerprint, the dataset's fingerprint and the settings a continuation must share (``IDENTITY``).
Pruning touches only the current run's checkpoints, and a resume continues only a run whose identity
matches; otherwise it is refused with the settings that differ, stored against requested. With
``plan(..., sub_folders=True)`` (the node and the CLI) every new run gets its own ``run_NNN/`` folder
under the run name, so a reused name never mixes or prunes another run's checkpoints. Checkpoints
written before run identities existed (no run id, no dataset fingerprint) still resume when the
settings in their metadata match; the continued run then starts a new ``run_NNN/`` folder.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..storage import safetensors_file as weights_file
from ..training import optimizers
from . import controlnet_file

log = logging.getLogger(__name__)

WEIGHTS, STATE = "controlnet.safetensors", "state.safetensors"
FORMAT = "frozentune.controlnet_zero.state/1"
RUN_ID = "controlnet_zero.run_id"
DATASET = "controlnet_zero.dataset_fingerprint"
BASE = "controlnet_zero.base_fingerprint"
OPTIMIZER = "controlnet_zero.optimizer"
# What a run is: a checkpoint continues only a run with the same values (besides the base and the optimizer).
IDENTITY = tuple(f"controlnet_zero.{name}" for name in (
    "dataset_size", "dataset_fingerprint", "resolution", "learning_rate", "weight_decay", "max_grad_norm",
    "prompt_dropout", "batch_size", "gradient_accumulation", "seed", "flux_guidance"))
# These may change on resume (other hardware); the result then differs from an uninterrupted run, so it warns.
WARN_ONLY = ("controlnet_zero.world_size", "controlnet_zero.mixed_precision")
_RUN_FOLDER = re.compile(r"^run_(\d+)$")
LEGACY_FOLDER = "checkpoints"  # the node's layout before run folders: <run_name>/checkpoints/step_*


@dataclass
class Resumed:
    step: int
    losses: list[float]
    metadata: dict[str, str]


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def complete(root: Path) -> list[Path]:
    """The complete checkpoint folders directly under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / STATE).is_file())


def latest(root: Path, run_id: str | None = None) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (of run ``run_id`` if given), or None."""
    done = [p for p in complete(root) if run_id is None or read_metadata(p).get(RUN_ID, "") == run_id]
    return done[-1] if done else None


def _legacy_optimizer_info(meta: dict[str, str]) -> str:
    """The optimizer info of a checkpoint written before ``training.optimizers.state_tensors`` (AdamW only)."""
    return json.dumps({"param_groups": json.loads(meta["param_groups"]), "numbers": []})


def read_metadata(folder: Path) -> dict[str, str]:
    """A checkpoint's metadata (its settings and base fingerprint), read without loading its tensors."""
    folder = Path(folder)
    if not (folder / STATE).is_file():
        raise ValueError(f"{folder} is not a complete ControlNet-Zero checkpoint (no {STATE}): give a step_* "
                         "folder written by a training run, or its parent folder to take the newest.")
    with weights_file.open_lazy(folder / STATE) as f:
        return dict(f.metadata() or {})


def save(root: Path, step: int, control_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         generator: torch.Generator, losses: list[float], metadata: dict[str, str], keep: int = 2,
         scaler=None) -> Path:
    """Write checkpoint ``step`` under ``root`` and drop all but the newest ``keep`` complete ones of this run.

    This run is ``metadata[RUN_ID]``; checkpoints of other runs in ``root`` are never removed.
    """
    folder = step_dir(root, step)
    controlnet_file.save(folder / WEIGHTS, control_model, metadata)
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
    done = [p for p in complete(root) if read_metadata(p).get(RUN_ID, "") == meta.get(RUN_ID, "")]
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def load(folder: Path, control_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         generator: torch.Generator, scaler=None,
         to_module: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> Resumed:
    """Restore weights, optimizer, RNG states from ``folder``; returns the step reached and the losses.

    ``to_module`` maps the checkpoint's file tensors (the layout's file names) to ``control_model``'s state dict
    names (a layout's ``module_tensors``, ``layouts``); None: they are the same names.
    """
    folder = Path(folder)
    read_metadata(folder)  # a clear error for an incomplete folder
    weights, _ = weights_file.load(folder / WEIGHTS)
    weights_file.check_finite(weights, f"checkpoint {folder / WEIGHTS}")
    if to_module is not None:
        weights = to_module(weights)
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


def differences(saved: dict[str, str], now: dict[str, str],
                same_base: Callable[[str], tuple[bool, str]]) -> list[str]:
    """What keeps checkpoint metadata ``saved`` from continuing the run ``now`` describes (empty: it may).

    A key missing on either side (a checkpoint written before it existed) is not compared.
    ``same_base(stored_fingerprint) -> (same, actual)`` compares the base model in any load dtype.
    """
    from ..families import fingerprint

    found = []
    if BASE in saved:
        same, actual = same_base(saved[BASE])
        if not same:
            found.append(f"it was trained with another base model (fingerprint {fingerprint.short(saved[BASE])}, this "
                         f"MODEL's {fingerprint.short(actual)})")
    was = saved.get(OPTIMIZER, "adamw")  # checkpoints from before the optimizer choice are AdamW's
    if was != now.get(OPTIMIZER, "adamw"):
        found.append(f"it holds {was} optimizer state, this run asks for optimizer {now.get(OPTIMIZER)!r} "
                     f"(set optimizer to {was!r} to resume)")
    for key in IDENTITY:
        if key in saved and key in now and saved[key] != now[key]:
            name = key.removeprefix("controlnet_zero.")
            if key == DATASET:
                found.append(f"dataset: stored fingerprint {saved[key][:12]}, requested {now[key][:12]} (the "
                             "dataset's files or captions differ)")
            else:
                found.append(f"{name}: stored {saved[key]}, requested {now[key]}")
    return found


def check(saved: dict[str, str], now: dict[str, str], folder, same_base: Callable[[str], tuple[bool, str]]) -> None:
    """Refuse to continue checkpoint ``folder`` in the run ``now`` unless its identity matches; warn on WARN_ONLY."""
    found = differences(saved, now, same_base)
    if found:
        raise ValueError(f"checkpoint {folder} (step {saved.get('step', '?')}, run {saved.get(RUN_ID) or 'unnamed'}) "
                         f"is not this run: {'; '.join(found)}. Set these settings back to resume it, or turn resume "
                         "off to start a new run (it gets its own folder; the old checkpoints stay).")
    for key in WARN_ONLY:
        if key in saved and key in now and saved[key] != now[key]:
            log.warning("ControlNet-Zero: %s was %s in the checkpoint and is %s now; the resumed run will not "
                        "match an uninterrupted one exactly", key, saved[key], now[key])


@dataclass
class Run:
    """Where this run's checkpoints go, its id, and the checkpoint it continues (if any)."""

    folder: Path | None
    run_id: str
    resume_from: Path | None = None


def run_folders(root: Path) -> list[Path]:
    """``root``'s ``run_NNN`` folders, newest (highest number) first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _RUN_FOLDER.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def _new_run_folder(root: Path) -> Path:
    """Reserve the next ``run_NNN`` folder under ``root`` (created here, so two runs never share one)."""
    root.mkdir(parents=True, exist_ok=True)
    number = max((int(_RUN_FOLDER.match(p.name).group(1)) for p in run_folders(root)), default=0) + 1
    while True:
        folder = root / f"run_{number:03d}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            number += 1


def _candidates(root: Path, sub_folders: bool) -> list[Path]:
    """The newest checkpoint of every run found under ``root``, newest run first."""
    folders = [*run_folders(root), root / LEGACY_FOLDER, root] if sub_folders else [root]
    found = []
    for folder in folders:
        newest: dict[str, Path] = {}
        for step in complete(folder):  # oldest first: the last one of each run id wins
            newest[read_metadata(step).get(RUN_ID, "")] = step
        found.extend(sorted(newest.values(), key=lambda p: p.name, reverse=True))
    return found


def plan(root: Path | None, now: dict[str, str], resume: bool | Path,
         same_base: Callable[[str], tuple[bool, str]], *, sub_folders: bool = False,
         checkpointing: bool = True) -> Run:
    """Decide where this run's checkpoints go and which checkpoint it continues (``resume``), or refuse.

    ``root``: the run name's folder (``sub_folders``: runs in ``run_NNN/`` below it) or, without
    ``sub_folders``, the one folder the checkpoints go to. ``resume`` True continues the newest run
    whose identity matches ``now``; a Path continues that checkpoint (or the newest one in that folder).
    ``checkpointing`` False (no checkpoints written): a new run reserves no folder.
    """
    if resume is not False and resume is not True:  # an explicit checkpoint folder (the CLI)
        step = latest(Path(resume)) or Path(resume)
        saved = read_metadata(step)
        check(saved, now, step, same_base)
        if saved.get(RUN_ID):
            return Run(step.parent, saved[RUN_ID], step)
        return Run(_new_folder(root, sub_folders, checkpointing), uuid.uuid4().hex, step)
    if root is None:
        return Run(None, uuid.uuid4().hex)
    root = Path(root)
    if resume:
        found = _candidates(root, sub_folders)
        refusals = []
        for step in found:
            saved = read_metadata(step)
            if not differences(saved, now, same_base):
                check(saved, now, step, same_base)  # the warnings
                if saved.get(RUN_ID):
                    return Run(step.parent, saved[RUN_ID], step)
                log.warning("ControlNet-Zero: %s was written before checkpoints had run identities: its settings "
                            "match, its dataset cannot be checked beyond its size (%s pairs)", step,
                            saved.get("controlnet_zero.dataset_size", "?"))
                return Run(_new_folder(root, sub_folders, checkpointing), uuid.uuid4().hex, step)
            refusals.append(step)
        if refusals:
            others = f" ({len(refusals) - 1} other run(s) there differ too)" if len(refusals) > 1 else ""
            try:
                check(read_metadata(refusals[0]), now, refusals[0], same_base)
            except ValueError as error:
                raise ValueError(f"resume is on, but no run under {root} matches this one{others}: {error}") from None
        folder = _new_folder(root, sub_folders, checkpointing)
        log.warning("ControlNet-Zero: resume is on but %s holds no checkpoint: nothing to resume, starting a new "
                    "run%s", root, f" in {folder}" if folder else "")
        return Run(folder, uuid.uuid4().hex)
    if not sub_folders:
        if not checkpointing:
            return Run(None, uuid.uuid4().hex)
        if complete(root):
            raise ValueError(f"{root} already holds checkpoints of another run ({complete(root)[-1].name}): resume "
                             "it, or give an empty folder for a new run.")
        return Run(root, uuid.uuid4().hex)
    earlier = [p.name for p in run_folders(root)] + ([LEGACY_FOLDER] if complete(root / LEGACY_FOLDER) else [])
    folder = _new_folder(root, sub_folders, checkpointing)
    if earlier and folder is not None:
        log.info("ControlNet-Zero: %s already holds run(s) %s; this new run writes its checkpoints to %s (the "
                 "earlier ones are kept)", root, ", ".join(sorted(earlier)), folder)
    return Run(folder, uuid.uuid4().hex)


def _new_folder(root: Path | None, sub_folders: bool, checkpointing: bool) -> Path | None:
    if root is None or not checkpointing:
        return None
    return _new_run_folder(Path(root)) if sub_folders else Path(root)
