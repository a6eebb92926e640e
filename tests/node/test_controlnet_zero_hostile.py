"""ControlNet-Zero nodes on hostile and careless input (issue 12): NaN numbers, bad save names, deleted saves,
a reused run name, resume with nothing to resume, dataset folders outside input/.

Each case is checked where it matters: nothing written outside models/controlnet/, the earlier run's
checkpoints kept, the refusal naming what differs.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

from harness import controlnet_zero_helpers as cz
from harness import disks
from harness.controlnet_zero_helpers import R


@pytest.fixture(scope="module")
def sd15(tiny_checkpoints, pack):
    import nodes

    with torch.inference_mode():
        return nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoints["sd15"].name)[:3]


@pytest.fixture()
def comfy_dirs(tmp_path, monkeypatch):
    """ComfyUI's controlnet, output, input and temp folders in a temp tree (listed before and after)."""
    import folder_paths

    folder = tmp_path / "models" / "controlnet"
    folder.mkdir(parents=True)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "controlnet", ([str(folder)], {".safetensors"}))
    for name in ("output", "input", "temp"):
        monkeypatch.setattr(folder_paths, f"{name}_directory", str(tmp_path / name))
    return tmp_path


def tree(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


@pytest.fixture(scope="module")
def control_net(sd15):
    return cz.create(sd15[0])


def save(control_net, filename, dtype="fp16"):
    from frozentune.nodes.controlnet_zero_nodes import ControlNetZeroSave

    return ControlNetZeroSave.execute(control_net=control_net, filename=filename, dtype=dtype).args[0]


def train(model, clip, vae, control_net, **overrides):
    """Train on 2 disks, batch 1, a checkpoint every step, run name "reused"."""
    args = {"batch_size": 1, "checkpoint_every": 1, "run_name": "reused", **overrides}
    return cz.train_node(model, clip, vae, control_net, pairs=2, **args).args[0]


@pytest.mark.parametrize("name, value", [("learning_rate", float("nan")), ("prompt_dropout", float("nan")),
                                         ("learning_rate", float("inf"))])
def test_non_finite_numbers_are_refused_before_any_work(pack, name, value):
    from frozentune.nodes.controlnet_zero_nodes import ControlNetZeroTrain

    args = dict(model=None, clip=None, vae=None, control_net=None, dataset_folder="", steps=1, batch_size=1,
                gradient_accumulation=1, learning_rate=1e-5, prompt_dropout=0.5, resolution=R,
                gradient_checkpointing=False, mixed_precision="fp32", seed=0, checkpoint_every=0, run_name="x",
                resume=False)
    args[name] = value
    with pytest.raises(ValueError, match=rf"{name} is {value!r}: give a finite number"):
        ControlNetZeroTrain.execute(**args)  # no model at all: the check must come first


@pytest.mark.parametrize("filename, message", [
    (".", "is not a file or folder name"), ("", "it is empty"), ("/abs/path", "absolute paths are not allowed"),
    ("../x", "is not a file or folder name"), ("checkpoints/x", "another loader's folder"),
    ("a\x00b", "NUL"), ("x" * 300, "characters long"), ("edges_shuffle", "ends in _shuffle"),
])
def test_bad_save_names_are_refused_and_nothing_is_written(control_net, comfy_dirs, filename, message):
    before = tree(comfy_dirs)
    with pytest.raises(ValueError, match=message):
        save(control_net, filename)
    assert tree(comfy_dirs) == before


def test_save_names_stay_in_models_controlnet(control_net, comfy_dirs):
    assert save(control_net, "controlnet/cz/edges") == "cz/edges.safetensors"
    assert save(control_net, "cz/edges.safetensors") == "cz/edges_00001.safetensors"
    assert tree(comfy_dirs) == ["models/controlnet/cz/edges.safetensors", "models/controlnet/cz/edges_00001.safetensors"]


def test_requeue_after_the_saved_file_was_deleted_writes_it_again(control_net, comfy_dirs):
    from frozentune.nodes.controlnet_zero_nodes import ControlNetZeroSave

    inputs = dict(filename="requeue/cn", dtype="fp16")
    name = save(control_net, **inputs)
    path = comfy_dirs / "models" / "controlnet" / name
    first = ControlNetZeroSave.fingerprint_inputs(control_net=None, **inputs)
    assert ControlNetZeroSave.fingerprint_inputs(control_net=None, **inputs) == first, "unchanged: ComfyUI's cache"
    path.unlink()
    assert ControlNetZeroSave.fingerprint_inputs(control_net=None, **inputs) != first, "gone: ComfyUI must re-run it"
    assert save(control_net, **inputs) == name and path.is_file()


def test_dataset_folder_outside_input_is_refused_by_the_node(sd15, control_net, comfy_dirs, tmp_path):
    root = disks.write_folder(tmp_path / "elsewhere", count=2, size=R)
    for value in (str(root), "/etc", "../elsewhere"):
        with pytest.raises(ValueError, match=r"is refused: datasets are read only from ComfyUI's input folder"):
            train(*sd15, control_net, dataset_folder=value, images=None, hints=None)


def test_reused_run_name_keeps_both_runs_and_resume_continues_only_a_matching_one(sd15, control_net, comfy_dirs,
                                                                                  caplog):
    """The issue's case: an earlier run's later steps must not prune a new run's checkpoints, and resume must not
    continue the earlier run when this one's settings differ."""
    from frozentune.controlnet_zero import resume_state as checkpoints

    run_root = comfy_dirs / "output" / "controlnet_zero" / "reused"
    with caplog.at_level(logging.WARNING):
        first = train(*sd15, control_net, steps=2, resume=True)  # nothing to resume yet
    assert f"resume is on but {run_root} holds no checkpoint: nothing to resume" in caplog.text
    assert [p.name for p in checkpoints.complete(run_root / "run_001")] == ["step_000001", "step_000002"]

    # a new run on the same name (other learning rate, one step): its own folder, the first run's checkpoints kept
    train(*sd15, control_net, steps=1, learning_rate=5e-4)
    assert [p.name for p in checkpoints.complete(run_root / "run_002")] == ["step_000001"]
    assert [p.name for p in checkpoints.complete(run_root / "run_001")] == ["step_000001", "step_000002"]

    # resume with the first run's settings continues the first run, not the newer one
    resumed = train(*sd15, control_net, steps=3, resume=True)
    meta, first_meta = resumed.frozentune_metadata, first.frozentune_metadata
    assert meta[checkpoints.RUN_ID] == first_meta[checkpoints.RUN_ID] and meta["controlnet_zero.steps_done"] == "3"
    assert [p.name for p in checkpoints.complete(run_root / "run_001")] == ["step_000002", "step_000003"]
    assert [p.name for p in checkpoints.complete(run_root / "run_002")] == ["step_000001"]

    # settings no run has: refused, naming stored and requested
    with pytest.raises(ValueError, match=r"no run under .*learning_rate: stored 0.0005, requested 0.0002"):
        train(*sd15, control_net, steps=3, resume=True, learning_rate=2e-4)
