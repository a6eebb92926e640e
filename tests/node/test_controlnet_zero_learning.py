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

import pytest

from harness import controlnet_zero_helpers as cz

STEPS = 80


@pytest.mark.slow  # 80 training steps (~19 s idle)
def test_true_hints_beat_shuffled_hints_on_held_out_disks(tiny_checkpoints, pack):
    import nodes

    from frozentune.controlnet_zero import network

    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoints["sd15"].name)[:3]
    texts = cz.caption_texts(model.model, vae, clip)
    train_set, held_out = (cz.disk_set(count, seed, texts, cz.disk_latents, latent_hints=False)
                           for count, seed in ((32, 1), (16, 2)))
    cz.true_hints_beat_shuffled_hints(model, network.create, train_set, held_out, STEPS, 1e-3,
                                      "SD1.5-tiny, 16.2M UNet")
