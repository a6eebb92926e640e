"""UniTune Fine-Tune's training previews: shown in the node every N steps, and no effect on what is tuned."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from harness.images import subject_image

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def sd15(tiny_checkpoints, pack):
    import comfy.sd

    return comfy.sd.load_checkpoint_guess_config(
        str(tiny_checkpoints["sd15"]), te_model_options={"clip_l_model_config": {"num_hidden_layers": 2}})[:3]


def tune(sd15, monkeypatch, **overrides):
    """Run the node; returns (trained tensors, previews output, previews the progress bar received, seconds)."""
    import comfy.utils

    from frozentune.nodes.unitune_nodes import ATTACHMENT, UniTuneFineTune

    sent = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda value, total, preview, node_id=None: sent.append((value, total, preview)))
    model, clip, vae = sd15
    args = dict(token="beikkpic", class_word="", steps=3, batch_size=1, learning_rate=1e-3, optimizer="adamw",
                train="lora", lora_rank=4, gradient_checkpointing=False, seed=0)
    args.update(overrides)
    started = time.perf_counter()
    out = UniTuneFineTune.execute(model=model, clip=clip, vae=vae, image=subject_image(32), **args).args
    seconds = time.perf_counter() - started
    shown = [(value, total, preview) for value, total, preview in sent if preview is not None]
    return out[0].attachments[ATTACHMENT].tensors, out[4], shown, seconds


@pytest.mark.parametrize("train,optimizer", [("lora", "adamw"), ("full", "adafactor")])
def test_previews_do_not_change_the_result(train, optimizer, sd15, monkeypatch):
    """Same seed, previews off vs every step: the trained patches are bitwise equal (full + Adafactor steps
    each weight inside backward; lora keeps the plain optimizer step)."""
    off, grid_off, shown_off, t_off = tune(sd15, monkeypatch, train=train, optimizer=optimizer)
    on, grid_on, shown_on, t_on = tune(sd15, monkeypatch, train=train, optimizer=optimizer, preview_every=1)
    log.info("UniTune %s, 3 steps on the tiny SD1.5 at 32 px: %.2f s without previews, %.2f s with 3", train,
             t_off, t_on)
    assert set(on) == set(off) and all(torch.equal(on[k], off[k]) for k in off)
    assert not shown_off and grid_off.shape == (1, 64, 64, 3) and not grid_off.any()
    # One preview per step: a JPEG in the progress bar at that step (64 px: the 32 px image rounded up to 64, not
    # the 256 px of larger images), and the row of them as the output.
    assert [(value, total) for value, total, _ in shown_on] == [(1, 3), (2, 3), (3, 3)]
    assert all(kind == "JPEG" and image.size == (64, 64) for _, _, (kind, image, _) in shown_on)
    assert grid_on.shape == (1, 64, 3 * 64, 3) and grid_on.dtype == torch.float32
    first, last = grid_on[:, :, :64], grid_on[:, :, -64:]
    assert not torch.equal(first, last), "the previews did not follow the training"


def test_every_n_steps_and_after_the_pivotal_steps(sd15, monkeypatch, tmp_path):
    """preview_every 2 over 5 steps: 2 previews; with pivotal steps first, the bar counts on from them."""
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "embeddings", ([str(tmp_path)], {".safetensors"}))
    _, grid, shown, _ = tune(sd15, monkeypatch, steps=5, preview_every=2, pivotal_steps=1)
    assert [(value, total) for value, total, _ in shown] == [(3, 6), (5, 6)]
    assert grid.shape == (1, 64, 2 * 64, 3)
    with pytest.raises(ValueError, match="preview_every=-1 must be 0"):
        tune(sd15, monkeypatch, preview_every=-1)
