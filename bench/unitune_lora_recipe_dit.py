"""UniTune's LoRA recipe on the tiny flow DiTs (Flux.1 dev, SD3) against full mode's reconstruction (issue 22).

The DiT counterpart of ``bench/unitune_lora_recipe.py`` (which measured the SD1.5/SDXL recipe), reduced to
the arms that decide whether the LoRA defaults carry over: the base, full mode at the paper's recipe (128
steps, Adafactor, lr 1e-4), the current LoRA recipe (rank 32, lr 1e-3, 256 steps), the same at 128 steps,
and rank 8 at the paper's lr. Batch 4, Adafactor, the tests' 64x64 subject, caption ``beikkpic``, one
training seed, through the public ``finetune.fine_tune`` on the stock-loaded tiny model
(``harness.tiny_dits``); Flux.1 dev trains at ``flux_guidance``'s default.

Measures, on the tuned MODEL (patches applied with ``finetune.apply_patches``):

- ``sdedit``: the stock KSampler from the image's latent (euler, normal, 12 steps, denoise 0.6, positive
  ``beikkpic``, negative empty; cfg 1 for the guidance-distilled Flux, 3 for SD3), sampler seeds 7 and 8:
  the mean latent MSE to the image's latent.
- ``heldout``: the flow loss with the token on 16 fixed noises (seed 12345) at 16 noise levels evenly
  spread over the model's schedule.
- ``gap``: ``(base - arm) / (base - full)`` for ``sdedit``; 1 reaches full mode's reconstruction.

Random tiny weights: this says whether the LoRA can follow full mode on these architectures, not image quality.
Run: ``OMP_NUM_THREADS=1 .venv/bin/python bench/unitune_lora_recipe_dit.py [flux1 sd3]`` (minutes per family).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # for `harness`, from any cwd

ARMS = {
    "base": None,
    "full adafactor 1e-4 128": dict(mode="full", steps=128, learning_rate=1e-4),
    "lora r32 1e-3 256 (recipe)": dict(mode="lora", steps=256, learning_rate=1e-3, lora_rank=32),
    "lora r32 1e-3 128": dict(mode="lora", steps=128, learning_rate=1e-3, lora_rank=32),
    "lora r8 1e-4 128": dict(mode="lora", steps=128, learning_rate=1e-4, lora_rank=8),
}


def measure(family: str) -> list[dict]:
    import comfy.model_management as mm
    import nodes

    from frozentune.training import objective
    from frozentune.unitune import finetune
    from harness import tiny_dits
    from harness.images import subject_image

    dit = tiny_dits.get(family)
    latent = dit.vae.encode(subject_image())
    cond, empty = dit.encode("beikkpic"), dit.encode("")
    cfg = 1.0 if family.startswith("flux") else 3.0

    def sdedit(model) -> float:
        errors = []
        for seed in (7, 8):
            out = nodes.common_ksampler(model, seed, 12, cfg, "euler", "normal", cond, empty, {"samples": latent},
                                        denoise=0.6)[0]["samples"]
            errors.append(torch.mean((out - latent) ** 2).item())
        return sum(errors) / len(errors)

    @torch.inference_mode()
    def heldout(model) -> float:
        mm.load_models_gpu([model])
        inner = model.model
        ms, gen = inner.model_sampling, torch.Generator().manual_seed(12345)
        x0 = inner.latent_format.process_in(latent).expand(16, -1, -1, -1)
        conditioning = finetune.with_guidance(finetune.family_of(model), cond, finetune.TRAIN_GUIDANCE)
        conds = finetune.batched(finetune.training_conds(inner, conditioning, x0[:1], model.load_device), 16)
        total = 0.0
        for sigma in ms.sigmas[torch.linspace(0, len(ms.sigmas) - 1, 16).round().long()]:
            s = sigma.expand(16)
            x_t = objective.noised(ms, s, torch.randn(x0.shape, generator=gen), x0)
            total += objective.denoised_loss(ms, s, x_t, x0, inner.apply_model(x_t, s, **conds)).item()
        return total / 16

    rows = []
    for name, arm in ARMS.items():
        start = time.time()
        model = dit.model
        if arm is not None:
            settings = finetune.FineTuneSettings(batch_size=4, optimizer="adafactor", **arm)
            result = finetune.fine_tune(dit.model, latent, cond, settings)
            model = finetune.apply_patches(dit.model, result.tensors)
        rows.append(dict(family=family, arm=name, sdedit=sdedit(model), heldout=heldout(model),
                         seconds=round(time.time() - start, 1)))
        print(json.dumps(rows[-1]), flush=True)
    base, full = rows[0]["sdedit"], rows[1]["sdedit"]
    for row in rows:
        row["gap"] = (base - row["sdedit"]) / (base - full)
    return rows


def main() -> None:
    from harness import comfy_env

    comfy_env.import_comfy(cpu=True)
    comfy_env.import_pack()
    torch.set_num_threads(1)
    for family in sys.argv[1:] or ["flux1", "sd3"]:
        rows = measure(family)
        print(f"\n{family}: {'arm':28} {'sdedit':>8} {'heldout':>8} {'gap':>6}")
        for row in rows:
            print(f"{'':{len(family) + 2}}{row['arm']:28} {row['sdedit']:8.4f} {row['heldout']:8.4f} {row['gap']:6.2f}")


if __name__ == "__main__":
    main()
