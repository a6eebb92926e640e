"""The ControlNet-Zero CLI's run (``controlnet_zero.train.run``) in-process on the tiny SD1.5 (issue 12, items 1, 6, 7).

Two runs into the same work_dir keep their own ``checkpoints/run_NNN/`` folders, ``resume = "false"`` (the
CLI's words) starts over, and the encoding cache is removed when each run ends.
"""

from __future__ import annotations

import pytest

from harness import disks


@pytest.fixture()
def shards(pack, monkeypatch):
    """Every cache shard the runs write."""
    from frozentune.controlnet_zero import cache

    written = []
    plain = cache._write_shard
    monkeypatch.setattr(cache, "_write_shard", lambda path, rows: (written.append(path), plain(path, rows)))
    return written


def test_cli_runs_keep_their_own_checkpoints_and_remove_the_cache(tiny_checkpoints, shards, tmp_path):
    from frozentune.controlnet_zero import resume_state as checkpoints
    from frozentune.controlnet_zero import train
    from frozentune.controlnet_zero import training_run as trainer

    data = disks.write_folder(tmp_path / "data", count=2, size=64)
    opts = {"checkpoint": str(tiny_checkpoints["sd15"]), "dataset": str(data),
            "output": str(tmp_path / "cn.safetensors"), "eval_rows": 0, "resume": False}
    settings = trainer.TrainSettings(steps=1, batch_size=1, resolution=64, checkpoint_every=1,
                                     mixed_precision="fp32", gradient_checkpointing=False)
    train.run(opts, settings)
    train.run(dict(opts, resume="false"), settings)

    work = tmp_path / "cn_run"
    runs = checkpoints.run_folders(work / "checkpoints")
    assert [p.name for p in runs] == ["run_002", "run_001"]
    assert all([p.name for p in checkpoints.complete(run)] == ["step_000001"] for run in runs)
    assert shards and all(work / "cache_64" in p.parents for p in shards), shards
    assert not (work / "cache_64").exists(), "the encoding cache must be removed after the run"
    assert (tmp_path / "cn.safetensors").is_file()
