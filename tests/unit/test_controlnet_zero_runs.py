"""ControlNet-Zero run identity: a checkpoint belongs to one run (issue 12, item 1).

Pruning touches only the current run's checkpoints; a new run on a used run name gets its own
``run_NNN/`` folder; ``resume`` continues only a run whose settings, base and dataset match and
otherwise refuses naming what differs (stored against requested); nothing to resume says so;
checkpoints written before run identities resume when their stored settings match.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from harness.comfy_env import import_pack

import_pack()  # the pack as package `frozentune`
from frozentune.controlnet_zero import resume_state as checkpoints  # noqa: E402
from frozentune.controlnet_zero import training_run as trainer  # noqa: E402
from frozentune.families import fingerprint as family  # noqa: E402
from frozentune.storage import safetensors_file as weights_file  # noqa: E402

BASE = torch.nn.Linear(4, 4)
# the metadata keys, as stored in the files (spelled out so the checks also run against older code)
RUN_ID, DATASET = "controlnet_zero.run_id", "controlnet_zero.dataset_fingerprint"


def same_base(stored: str) -> tuple[bool, str]:
    return family.same_base(stored, BASE)


def identity(**changes) -> dict[str, str]:
    """The metadata trainer.train gives a run (settings + base + dataset), with ``changes``."""
    settings = trainer.TrainSettings(steps=4, batch_size=1, learning_rate=1e-3, resolution=64)
    meta = settings.metadata()
    meta.update({trainer.FINGERPRINT_KEY: family.fingerprint(BASE), "controlnet_zero.dataset_size": "4",
                 DATASET: "d" * 64, "controlnet_zero.world_size": "1"})
    meta.update({f"controlnet_zero.{k}": str(v) for k, v in changes.items()})
    return meta


def write(folder, step: int, meta: dict[str, str], keep: int = 2):
    """A real checkpoint of a tiny module (the trainer's own save)."""
    module = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    return checkpoints.save(folder, step, module, opt, torch.Generator().manual_seed(0), [0.1] * step, meta,
                            keep=keep)


def steps(folder) -> list[str]:
    return sorted(p.parent.name for p in folder.glob("step_*/state.safetensors"))


def test_pruning_keeps_other_runs_checkpoints(tmp_path):
    """The issue's case: an earlier run left step 35/40; a new run's step 5/10 must survive its own pruning."""
    old = {**identity(), RUN_ID: "old"}
    for step in (35, 40):
        write(tmp_path, step, old)
    new = {**identity(), RUN_ID: "new"}
    for step in (5, 10, 15):
        write(tmp_path, step, new)
    assert steps(tmp_path) == ["step_000010", "step_000015", "step_000035", "step_000040"]


def test_a_new_run_on_a_used_name_gets_its_own_folder_and_says_so(tmp_path, caplog):
    first = checkpoints.plan(tmp_path, identity(), False, same_base, sub_folders=True)
    assert first.folder == tmp_path / "run_001" and first.resume_from is None
    write(first.folder, 2, {**identity(), RUN_ID: first.run_id})
    with caplog.at_level(logging.INFO):
        second = checkpoints.plan(tmp_path, identity(), False, same_base, sub_folders=True)
    assert second.folder == tmp_path / "run_002" and second.run_id != first.run_id
    assert f"writes its checkpoints to {tmp_path / 'run_002'}" in caplog.text and "run_001" in caplog.text
    assert steps(first.folder) == ["step_000002"]
    # no checkpoints asked for: no folder is reserved
    assert checkpoints.plan(tmp_path, identity(), False, same_base, sub_folders=True, checkpointing=False).folder is None
    assert [p.name for p in checkpoints.run_folders(tmp_path)] == ["run_002", "run_001"]


def test_resume_continues_the_newest_matching_run_in_its_own_folder(tmp_path):
    a = checkpoints.plan(tmp_path, identity(), False, same_base, sub_folders=True)
    write(a.folder, 4, {**identity(), RUN_ID: a.run_id})
    b = checkpoints.plan(tmp_path, identity(learning_rate=1e-4), False, same_base, sub_folders=True)
    write(b.folder, 2, {**identity(learning_rate=1e-4), RUN_ID: b.run_id})

    run = checkpoints.plan(tmp_path, identity(), True, same_base, sub_folders=True)
    assert (run.folder, run.run_id, run.resume_from) == (a.folder, a.run_id, a.folder / "step_000004")
    run = checkpoints.plan(tmp_path, identity(learning_rate=1e-4), True, same_base, sub_folders=True)
    assert (run.folder, run.run_id, run.resume_from) == (b.folder, b.run_id, b.folder / "step_000002")


def test_resume_of_another_run_is_refused_naming_stored_and_requested(tmp_path):
    a = checkpoints.plan(tmp_path, identity(), False, same_base, sub_folders=True)
    write(a.folder, 40, {**identity(), RUN_ID: a.run_id})
    other = identity(learning_rate=1e-4, seed=3)
    other[DATASET] = "e" * 64
    with pytest.raises(ValueError) as refused:
        checkpoints.plan(tmp_path, other, True, same_base, sub_folders=True)
    message = str(refused.value)
    assert "no run under" in message and "step_000040" in message
    assert "learning_rate: stored 0.001, requested 0.0001" in message and "seed: stored 0, requested 3" in message
    assert "dataset: stored fingerprint dddddddddddd, requested eeeeeeeeeeee" in message
    assert "turn resume off to start a new run" in message
    assert [p.name for p in checkpoints.run_folders(tmp_path)] == ["run_001"], "a refusal must create nothing"
    with pytest.raises(ValueError, match="another base model"):
        checkpoints.plan(tmp_path, identity(), True, lambda stored: (False, "f" * 64), sub_folders=True)


@pytest.mark.parametrize("sub_folders", [True, False])
def test_resume_with_nothing_to_resume_warns_naming_the_folder(tmp_path, caplog, sub_folders):
    root = tmp_path / "fresh"
    with caplog.at_level(logging.WARNING):
        run = checkpoints.plan(root, identity(), True, same_base, sub_folders=sub_folders)
    assert run.resume_from is None
    assert f"resume is on but {root} holds no checkpoint: nothing to resume" in caplog.text


def legacy(folder, step: int, meta: dict[str, str]):
    """A checkpoint as written before run identities: no run id, no dataset fingerprint."""
    meta = {k: v for k, v in meta.items() if k not in (RUN_ID, DATASET)}
    return write(folder, step, meta)


def test_a_checkpoint_without_run_identity_resumes_when_its_settings_match(tmp_path, caplog):
    old = legacy(tmp_path / checkpoints.LEGACY_FOLDER, 6, identity())  # the node's old <run_name>/checkpoints/
    with caplog.at_level(logging.WARNING):
        run = checkpoints.plan(tmp_path, identity(), True, same_base, sub_folders=True)
    assert run.resume_from == old and run.folder == tmp_path / "run_001", "the continuation gets a run folder"
    assert "before checkpoints had run identities" in caplog.text
    with pytest.raises(ValueError, match="batch_size: stored 1, requested 2"):
        checkpoints.plan(tmp_path, identity(batch_size=2), True, same_base, sub_folders=True)
    with pytest.raises(ValueError, match="dataset_size: stored 4, requested 5"):
        checkpoints.plan(tmp_path, identity(dataset_size=5), True, same_base, sub_folders=True)


def test_flat_folder_refuses_a_new_run_over_another_runs_checkpoints(tmp_path):
    write(tmp_path, 2, {**identity(), RUN_ID: "x"})
    with pytest.raises(ValueError, match="already holds checkpoints of another run"):
        checkpoints.plan(tmp_path, identity(), False, same_base)
    assert checkpoints.plan(tmp_path, identity(), False, same_base, checkpointing=False).folder is None


def test_trainer_check_resume_still_reads_old_metadata():
    base = SimpleNamespace(diffusion_model=BASE)
    trainer._check_resume({}, identity(), "ck", base)  # nothing stored: nothing to compare
    with pytest.raises(ValueError, match="prompt_dropout: stored 0.5, requested 0.25"):
        trainer._check_resume(identity(), identity(prompt_dropout=0.25), "ck", base)


def test_a_damaged_checkpoint_is_named_with_the_fix(tmp_path):
    folder = write(tmp_path, 1, {**identity(), RUN_ID: "x"})
    state = folder / checkpoints.STATE
    state.write_bytes(state.read_bytes()[:40])  # truncated
    with pytest.raises(ValueError, match=rf"{state}.*could not be read.*truncated.*copy or download it again"):
        checkpoints.read_metadata(folder)
    with pytest.raises(ValueError, match=rf"{state}.*could not be read"):
        weights_file.load(state)


def test_a_checkpoint_with_non_finite_weights_is_refused_by_name(tmp_path):
    folder = write(tmp_path, 1, {**identity(), RUN_ID: "x"})
    weights, meta = weights_file.load(folder / checkpoints.WEIGHTS)
    weights["weight"][0, 0] = float("nan")
    weights_file.save(folder / checkpoints.WEIGHTS, weights, meta, format="t")
    module = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=rf"checkpoint {folder / checkpoints.WEIGHTS}: tensor 'weight' holds 1 NaN"):
        checkpoints.load(folder, module, torch.optim.AdamW(module.parameters()), torch.Generator())
