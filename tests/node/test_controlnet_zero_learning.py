"""Learning, measured: a short ControlNet-Zero run on synthetic disks uses the hint.

The tiny random VAE maps every disk image to almost the same latent (sample-to-sample std about
0.006 against 0.04 overall), so no hint could lower the loss through it. The check therefore feeds
the trainer latents in which the disk is visible: each target image 8x8 average-pooled to the latent
grid, RGB + mean as the 4 channels, standardized. Everything else is the real pipeline: the tiny SD1.5
UNet frozen, ComfyUI's cldm ControlNet built by ControlNet-Zero, the RGB disk masks as hints, the
text conditioning from the real CLIP, the training loop and its eps loss. The learning rate is 1e-3,
not the paper's 1e-5: at 1e-5 the zero-initialized path takes thousands of steps to open ("sudden
convergence"), too long for a test. Measured here (held-out loss, true / shuffled hints): 1.000 after 30
steps, 0.991 after 50, 0.903 after 70, 0.717 after 80, 0.724 after 100; the test trains 80 and asks for < 0.85.
The zero-initialized ControlNet's indifference to the hint is exact, so 4 held-out rows check it.
"""

from __future__ import annotations

import logging

import pytest
import torch

from harness import disks

R = 64
STEPS = 80
log = logging.getLogger(__name__)


def pooled_latents(targets: torch.Tensor) -> torch.Tensor:
    """``[N, R, R, 3]`` images -> ``[N, 4, R/8, R/8]`` latents that show the disk (a stand-in for a trained VAE)."""
    pooled = torch.nn.functional.avg_pool2d(targets.movedim(-1, 1), 8)
    lat = torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)
    return (lat - lat.mean()) / lat.std()


def dataset(clip, base_model, count: int, seed: int):
    from frozentune.controlnet_zero import cache

    targets, hints = disks.disks(count, R, seed=seed)
    latents = pooled_latents(targets)
    u8 = (hints * 255).round().to(torch.uint8)
    texts = cache.encode(cache.Source.from_tensors(targets[:1], hints[:1], [disks.CAPTION]), base_model,
                         _NoVae(latents[:1]), clip, R).texts
    images = cache.Rows({i: {"latent": latents[i], "hint": u8[i]} for i in range(count)})
    return cache.TrainingData(images, texts, torch.ones(count, dtype=torch.long), R)


class _NoVae:
    """Hands back prepared latents where cache.encode would run the VAE (only its text part is used here)."""

    def __init__(self, latents):
        self.latents = latents

    def encode(self, pixels):
        return self.latents[: pixels.shape[0]]


@pytest.mark.slow  # 80 training steps (~19 s idle)
def test_true_hints_beat_shuffled_hints_on_held_out_disks(tiny_checkpoints, pack):
    import comfy.model_management as mm
    import nodes

    from frozentune.controlnet_zero import network
    from frozentune.controlnet_zero import training_run as trainer

    model, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoints["sd15"].name)[:3]
    train_set = dataset(clip, model.model, 32, seed=1)
    held_out = dataset(clip, model.model, 16, seed=2)
    rows = list(range(16))
    mm.load_models_gpu([model], force_full_load=True)
    device = model.load_device
    with torch.inference_mode(False):
        cn = network.trainable_copy(network.create(model.model), device)
        start = trainer.evaluate(model.model, cn, held_out, device, rows[:4], repeats=1)
        assert trainer.evaluate(model.model, cn, held_out, device, rows[:4], repeats=1, shuffle_hints=True) == start
        settings = trainer.TrainSettings(steps=STEPS, batch_size=4, learning_rate=1e-3, resolution=R,
                                         gradient_checkpointing=False)
        result = trainer.train(model.model, cn, train_set, settings, device)
        true = trainer.evaluate(model.model, cn, held_out, device, rows)
        shuffled = trainer.evaluate(model.model, cn, held_out, device, rows, shuffle_hints=True)
    log.warning("ControlNet-Zero learning check (SD1.5-tiny, 16.2M UNet, %d steps x batch 4, lr 1e-3): held-out "
                "loss before (4 rows) %.4f; after: true hints %.4f, shuffled hints %.4f (ratio %.3f); train loss "
                "%.4f -> %.4f", STEPS, start, true, shuffled, true / shuffled, sum(result.losses[:10]) / 10,
                sum(result.losses[-10:]) / 10)
    assert true < 0.85 * shuffled, (true, shuffled)
