"""ControlNet-Zero with 8-bit AdamW (bitsandbytes, via training.optimizers) on the tiny SD1.5 (16.2M UNet).

The option is tested by its effect: the optimizer state the trainer builds is 8-bit (uint8 moments for
every weight of 4096 values or more) and a fraction of AdamW's bytes, training still lowers the loss,
and a checkpoint stores that state and resumes it exactly; a checkpoint of the other optimizer is refused.
"""

from __future__ import annotations

import logging

import pytest
import torch

from harness import disks

R = 64
log = logging.getLogger(__name__)
pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def sd15(tiny_checkpoints, pack):
    import comfy.model_management as mm
    import nodes

    from frozentune.controlnet_zero import cache

    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoints["sd15"].name)[:3]
    targets, hints = disks.disks(4, R, seed=0)
    with torch.inference_mode(False):
        data = cache.encode(cache.Source.from_tensors(targets, hints, [disks.CAPTION] * 4), model.model, vae, clip, R)
    mm.load_models_gpu([model], force_full_load=True)
    return model, data


def fresh(model):
    from frozentune.controlnet_zero import network

    with torch.inference_mode(False):
        return network.trainable_copy(network.create(model.model), model.load_device)


def run(model, data, cn, **kw):
    from frozentune.controlnet_zero import training_run as trainer

    opts = dict(steps=2, batch_size=2, learning_rate=1e-3, resolution=R, gradient_checkpointing=False,
                mixed_precision="fp32", optimizer="adamw8bit")
    root = kw.pop("root", None)
    resume = kw.pop("resume", False)
    opts.update(kw)
    with torch.inference_mode(False), torch.enable_grad():
        return trainer.train(model.model, cn, data, trainer.TrainSettings(**opts), model.load_device,
                             checkpoint_root=root, resume=resume)


@pytest.fixture()
def built(monkeypatch):
    """The optimizers the trainer builds, by name."""
    from frozentune.training import optimizers

    made = {}
    stock = optimizers.make

    def make(name, params, *args, **kwargs):
        made[name] = stock(name, params, *args, **kwargs)
        return made[name]

    monkeypatch.setattr(optimizers, "make", make)
    return made


def test_adamw8bit_state_is_8bit_and_training_lowers_the_loss(sd15, built):
    from frozentune.controlnet_zero import training_run as trainer
    from frozentune.training.optimizers import MIN_8BIT_SIZE, state_bytes

    model, data = sd15
    device = model.load_device
    rows = list(range(len(data)))
    cn8 = fresh(model)
    before = trainer.evaluate(model.model, cn8, data, device, rows)
    run(model, data, cn8, steps=12)
    after8 = trainer.evaluate(model.model, cn8, data, device, rows)
    run(model, data, fresh(model), steps=12, optimizer="adamw")
    opt8, opt32 = built["adamw8bit"], built["adamw"]
    big = [p for p in cn8.parameters() if p.numel() >= MIN_8BIT_SIZE]
    assert big, "the ControlNet has no weight large enough for 8-bit state"
    for p in big:
        state = opt8.state[p]
        assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8, \
            {k: v.dtype for k, v in state.items() if torch.is_tensor(v)}
    ratio = state_bytes(opt8) / state_bytes(opt32)
    log.warning("ControlNet-Zero 8-bit AdamW (SD1.5-tiny ControlNet, %.1fM weights): state %.1f MiB vs AdamW "
                "%.1f MiB (ratio %.3f); fixed-draw loss %.5f -> %.5f after 12 steps", sum(p.numel() for p in
                cn8.parameters()) / 1e6, state_bytes(opt8) / 2**20, state_bytes(opt32) / 2**20, ratio, before, after8)
    assert ratio < 0.3, ratio
    assert after8 < before, (before, after8)


def test_adamw8bit_checkpoint_resumes_exactly_and_the_other_optimizer_is_refused(sd15, tmp_path):
    import safetensors

    model, data = sd15
    whole = run(model, data, fresh(model), steps=4, checkpoint_every=2, root=tmp_path / "whole")
    run(model, data, fresh(model), steps=2, checkpoint_every=2, root=tmp_path / "cut")
    state = tmp_path / "cut" / "step_000002" / "state.safetensors"
    with safetensors.safe_open(str(state), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if k.endswith((".state1", ".state2"))}
    assert "U8" in dtypes, dtypes

    with pytest.raises(ValueError, match="holds adamw8bit optimizer state.*set optimizer to 'adamw8bit'"):
        run(model, data, fresh(model), steps=4, checkpoint_every=2, root=tmp_path / "cut", resume=True,
            optimizer="adamw")
    resumed = run(model, data, fresh(model), steps=4, checkpoint_every=2, root=tmp_path / "cut", resume=True)
    a, b = whole.control_model.state_dict(), resumed.control_model.state_dict()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    assert resumed.losses[:2] == whole.losses[:2] and len(resumed.losses) == 4
