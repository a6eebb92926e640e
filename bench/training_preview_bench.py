"""What a ControlNet-Zero training preview costs: seconds per preview against seconds per training step, same run.

ControlNet-Zero trains on the tiny SD1.5 checkpoint (random weights) with ``preview_every`` 2; the preview
(the first hint -> image, 4 Euler steps through the frozen base + the ControlNet, at the node's size: the
training resolution, at most 256 px) is timed around ``render``, a training step as the time between two
``on_step`` calls minus the preview drawn in between. Medians, so load spikes on a shared machine count less.
fp32 on the CPU, no gradient checkpointing, AdamW.

Run from tests/: ``cd tests && ../.venv/bin/python ../bench/training_preview_bench.py [--resolution 64 256]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def measure(checkpoint: str, resolution: int, batch: int, steps: int, every: int) -> dict:
    import nodes
    import torch

    from frozentune.controlnet_zero import cache, network
    from frozentune.controlnet_zero import training_run as trainer
    from frozentune.nodes.controlnet_zero_nodes import PREVIEW_SIZE
    from frozentune.training import preview as previews
    from harness import disks

    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(checkpoint)[:3]
    targets, hints = disks.disks(4, resolution, seed=0)
    with torch.inference_mode(False), torch.enable_grad():
        data = cache.encode(cache.Source.from_tensors(targets, hints, [disks.CAPTION] * 4), model.model, vae, clip,
                            resolution)
        cn = network.trainable_copy(network.create(model.model, torch.Generator().manual_seed(0)), torch.device("cpu"))
        ends: list[float] = []
        drawn: list[float] = []
        pv = previews.Preview(every=every, show=lambda step, image: None, latent_format=model.model.latent_format,
                              size=min(PREVIEW_SIZE, resolution))
        real_maybe = previews.Preview.maybe

        def timed_maybe(self, step, render, modules=()):
            started = time.perf_counter()
            out = real_maybe(self, step, render, modules)
            if out is not None:
                drawn.append(time.perf_counter() - started)
            return out

        previews.Preview.maybe = timed_maybe
        try:
            settings = trainer.TrainSettings(steps=steps, batch_size=batch, learning_rate=1e-5, resolution=resolution,
                                             gradient_checkpointing=False, mixed_precision="fp32")
            trainer.train(model.model, cn, data, settings, torch.device("cpu"), preview=pv,
                          on_step=lambda step, total, loss: ends.append(time.perf_counter()))
        finally:
            previews.Preview.maybe = real_maybe
    # the interval ending at step s holds step s's training and, when s-1 drew one, the preview after s-1
    intervals = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    pure = [dt - (drawn[(i + 1) // every - 1] if (i + 1) % every == 0 else 0.0) for i, dt in enumerate(intervals)]
    step_s, preview_s = statistics.median(pure[1:]), statistics.median(drawn[1:] or drawn)
    return {"resolution": resolution, "batch": batch, "preview_px": min(PREVIEW_SIZE, resolution),
            "step_s": round(step_s, 4), "preview_s": round(preview_s, 4), "preview_over_step": round(preview_s / step_s, 3),
            "previews": len(drawn), "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--resolution", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=13)
    args = parser.parse_args()
    from harness import comfy_env, tiny_models

    comfy_env.import_comfy(cpu=True)
    comfy_env.import_pack()
    import folder_paths

    checkpoint = tiny_models.checkpoint_path("sd15").name
    folder_paths.add_model_folder_path("checkpoints", str(tiny_models.cache_dir()))
    for resolution in args.resolution:
        print(json.dumps(measure(checkpoint, resolution, args.batch, args.steps, every=2)), flush=True)


if __name__ == "__main__":
    main()
