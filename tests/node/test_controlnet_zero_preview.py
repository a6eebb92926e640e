"""ControlNet-Zero Train's previews: they never change the trained ControlNet, one is shown every N steps in the
node's progress bar, Cancel still comes first, and the last one is what ComfyUI's own KSampler draws with the
trained ControlNet applied (Euler, simple, 4 steps, cfg 1, seed 0) in its latent2rgb preview colours."""

from __future__ import annotations

import contextlib

import pytest
import torch

from harness import controlnet_zero_helpers as cz
from harness import disks
from harness.controlnet_zero_helpers import R  # training size = preview size (latent 8x8)


@pytest.fixture(scope="module")
def sd15(tiny_checkpoints, pack):
    import nodes

    with torch.inference_mode():  # loader outputs hold inference tensors, as in a real graph
        return nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoints["sd15"].name)[:3]


@pytest.fixture(autouse=True)
def folders(tmp_path, monkeypatch):
    import folder_paths

    for name in ("output", "input", "temp"):
        monkeypatch.setattr(folder_paths, f"{name}_directory", str(tmp_path / name))


@contextlib.contextmanager
def progress_hook(cancel_at: int | None = None):
    """Record every ProgressBar update (value, total, preview tuple or None); optionally Cancel at a value."""
    import comfy.model_management
    import comfy.utils

    calls = []

    def hook(value, total, preview, node_id=None):
        calls.append((value, total, preview))
        if value == cancel_at:
            raise comfy.model_management.InterruptProcessingException()

    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        yield calls
    finally:
        comfy.utils.set_progress_bar_global_hook(old)


def run(model, clip, vae, **overrides):
    """A fresh ControlNet trained 3 steps on 2 disks: the trained CONTROL_NET, the preview grid, the first hint."""
    args = {"steps": 3, "mixed_precision": "auto", "run_name": "preview", "preview_every": 0, **overrides}
    out = cz.train_node(model, clip, vae, cz.create(model), pairs=2, **args)
    return out.args[0], out.args[2], disks.disks(2, R, seed=0)[1][:1]


@pytest.fixture(scope="module")
def runs(sd15):
    """The same training with previews off and every step (checkpointing on there: it must not matter either)."""
    model, clip, vae = sd15
    out = {}
    for every in (0, 1):
        with progress_hook() as calls:
            trained, grid, hint = run(model, clip, vae, preview_every=every, gradient_checkpointing=bool(every))
        out[every] = dict(trained=trained, grid=grid, hint=hint, calls=calls)
    return out


def test_previews_leave_the_trained_controlnet_bit_identical(runs):
    a, b = (runs[every]["trained"].control_model.state_dict() for every in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        [k for k in a if not torch.equal(a[k], b[k])]


def test_one_preview_every_n_steps_in_the_progress_bar(runs):
    def shown(calls):
        return [(value, p[0], p[1].size) for value, _, p in calls if p is not None]

    off, on = runs[0], runs[1]
    assert shown(off["calls"]) == [] and torch.equal(off["grid"], torch.zeros(1, 64, 64, 3))
    assert shown(on["calls"]) == [(s, "JPEG", (R, R)) for s in (1, 2, 3)]  # steps // every, at steps 1, 2, 3
    assert [v for v, _, p in on["calls"] if p is None] == [1, 2, 3], "progress is still reported every step"
    grid = on["grid"]
    assert grid.shape == (1, R, 3 * R, 3)
    assert not torch.equal(grid[:, :, :R], grid[:, :, -R:]), "the preview does not follow the training"


def test_cancel_comes_before_the_preview(sd15):
    import comfy.model_management

    model, clip, vae = sd15
    with progress_hook(cancel_at=1) as calls, pytest.raises(comfy.model_management.InterruptProcessingException):
        run(model, clip, vae, preview_every=1)
    assert calls == [(1, 3, None)], "a preview was drawn after Cancel"


def test_last_preview_is_comfyuis_ksampler_with_the_trained_controlnet(sd15, runs):
    import nodes

    from frozentune.training import preview

    model, clip, _ = sd15
    trained, hint = runs[1]["trained"], runs[1]["hint"]
    last = runs[1]["grid"][:, :, -R:]  # drawn after the last step: the trained weights
    positive = nodes.CLIPTextEncode().encode(clip, disks.CAPTION)[0]
    positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(positive, positive, trained, hint,
                                                                          1.0, 0.0, 1.0)
    latent = {"samples": torch.zeros(1, 4, R // 8, R // 8)}
    samples = nodes.common_ksampler(model, 0, 4, 1.0, "euler", "simple", positive, negative, latent)[0]["samples"]
    expected = preview.to_image(model.model.latent_format.process_in(samples), model.model.latent_format)
    diff = (last - expected).abs()
    assert diff.max() <= 2 / 255 and diff.mean() <= 0.1 / 255, (diff.max(), diff.mean())
    assert (last - preview.to_image(torch.zeros(1, 4, 8, 8), model.model.latent_format)).abs().max() > 0.05


@pytest.mark.half
@pytest.mark.long  # ~4 min of native half on a CPU; make test-long / test-all
def test_fp16_base_bf16_compute_previews_leave_training_identical(tiny_checkpoints, pack):
    """Half precision: an fp16-stored base computing in bf16 autocast, previews off vs every step."""
    import comfy.model_management as mm

    from frozentune.controlnet_zero import cache, network
    from frozentune.controlnet_zero import training_run as trainer
    from frozentune.training import preview
    from harness.precision import load_checkpoint

    with torch.inference_mode():
        model, clip, vae = load_checkpoint(tiny_checkpoints["sd15"], torch.float16)
    targets, hints = disks.disks(2, R, seed=0)
    with torch.inference_mode(False):
        data = cache.encode(cache.Source.from_tensors(targets, hints, [disks.CAPTION] * 2), model.model, vae, clip, R)
    mm.load_models_gpu([model], force_full_load=True)
    device = model.load_device
    assert model.model.diffusion_model.input_blocks[0][0].weight.dtype == torch.float16
    settings = trainer.TrainSettings(steps=2, batch_size=2, learning_rate=1e-3, resolution=R,
                                     gradient_checkpointing=False, mixed_precision="bf16")
    images = []
    results = []
    for pv in (None, preview.Preview(every=1, show=lambda step, image: images.append(image),
                                     latent_format=model.model.latent_format, size=R)):
        with torch.inference_mode(False), torch.enable_grad():
            cn = network.trainable_copy(network.create(model.model, torch.Generator().manual_seed(0)), device)
            results.append(trainer.train(model.model, cn, data, settings, device, preview=pv).control_model)
    a, b = (r.state_dict() for r in results)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert len(images) == 2 and all(i.shape == (1, R, R, 3) and torch.isfinite(i).all() for i in images)
    assert float(images[-1].std()) > 0.01, "a flat preview: nothing was drawn"
