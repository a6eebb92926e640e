"""Seconds per sampling step: Prompt Guidance Guider vs stock CFGGuider and DualCFGGuider, one run.

Three conditionings cost 1.5x a CFG step in UNet work; the targets are <= 1.55x CFG and no slower than
DualCFGGuider (which computes the same formula), and <= 1.3x CFG with a pg window that is off for half
the steps. Rounds are interleaved (CFG, Dual, ours, ours-half, CFG, ...) so background load hits all
contenders alike; the median over rounds is reported.

Run: ``cd tests && ../.venv/bin/python ../bench/prompt_guidance_bench.py [--family sd15|sdxl] [--size 128]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # for `harness`, from any cwd
from sampling_timer import seconds_per_step  # noqa: E402 (bench/ is the script's folder)

from harness import comfy_env, tiny_models  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings stable under load)")
    args = parser.parse_args()

    comfy_env.import_comfy()
    comfy_env.import_pack()
    import folder_paths
    import nodes
    import torch
    from comfy_extras.nodes_custom_sampler import CFGGuider, DualCFGGuider

    from frozentune.nodes.guidance_nodes import PromptGuidanceGuider

    torch.set_num_threads(args.threads)

    path = tiny_models.checkpoint_path(args.family)
    folder_paths.add_model_folder_path("checkpoints", str(path.parent))
    model, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(path.name)[:3]
    enc = nodes.CLIPTextEncode()
    pos, base, neg = (enc.encode(clip, t)[0] for t in ("beikkpic a minion", "beikkpic", ""))
    cfg, pg = 7.5, 2.0
    guiders = {
        "CFGGuider (stock)": CFGGuider.execute(model, pos, neg, cfg).args[0],
        "DualCFGGuider (stock)": DualCFGGuider.execute(model, pos, base, neg, cfg + pg, cfg, "regular").args[0],
        "Prompt Guidance": PromptGuidanceGuider.execute(model, pos, base, neg, cfg, pg, 0.0, 1.0, 0.0).args[0],
        "Prompt Guidance, pg 1st half": PromptGuidanceGuider.execute(model, pos, base, neg, cfg, pg, 0.0, 0.5,
                                                                     0.0).args[0],
    }
    times = seconds_per_step(guiders, model, args.size, args.steps, args.rounds)

    unet_params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    cfg_time = statistics.median(times["CFGGuider (stock)"])
    dual_time = statistics.median(times["DualCFGGuider (stock)"])
    print(f"model: tiny {args.family} ({type(model.model.model_config).__name__}), UNet {unet_params / 1e6:.1f}M "
          f"params, {args.size}x{args.size} px, {args.steps} euler steps, median of {args.rounds} rounds, "
          f"device {model.load_device}, torch threads {torch.get_num_threads()}")
    print(f"{'guider':32} {'s/step':>9} {'x CFG':>7} {'x Dual':>7}")
    for name, values in times.items():
        t = statistics.median(values)
        print(f"{name:32} {t:9.4f} {t / cfg_time:7.3f} {t / dual_time:7.3f}")


if __name__ == "__main__":
    main()
