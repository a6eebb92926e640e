"""Seconds per sampling step: unpatched SDXL-family model vs InstantStyle style / style+layout / all blocks.

Targets (issue 5): ``style`` adds <= 3% over the unpatched model and less than a quarter of the ``all blocks``
overhead. The model is built from random weights: ``--model tiny`` is the harness's tiny ``sdxl_blocks``
checkpoint (SDXL's block ids at width 320, 16 attn2 layers); ``--model sdxl`` is ComfyUI's real SDXL UNet
config (2.6B parameters, 70 attn2 layers) with random weights, no text encoders (random conditioning).
The IP-Adapter is random too, in the real key layout (4 bigG tokens). Rounds are interleaved (unpatched,
style, style+layout, all blocks, unpatched, ...) so background load hits every contender alike; the median
over rounds is reported. A second pass clocks only the added image attention inside the patches (its
seconds per step, and as a share of ``all blocks``), since the whole-step figures carry more noise than the
IP-Adapter costs on a CPU. Random weights say nothing about image quality, only about cost.

Run: ``cd tests && ../.venv/bin/python ../bench/instantstyle_bench.py [--model tiny|sdxl] [--size 512]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # for `harness`, from any cwd
from full_size import SDXL_FULL  # noqa: E402 (bench/ is the script's folder)
from sampling_timer import seconds_per_step  # noqa: E402

from harness import comfy_env, tiny_ipadapter, tiny_models  # noqa: E402


def load_model(kind: str):
    import comfy.sd
    import comfy.utils

    if kind == "tiny":
        sd = comfy.utils.load_torch_file(str(tiny_models.checkpoint_path("sdxl_blocks")))
        sd = {k[len("model.diffusion_model."):]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    else:
        import comfy.ops
        import torch
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

        unet = UNetModel(dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init, **SDXL_FULL)
        sd = tiny_models.random_state_dict(unet, tiny_models.SEED)
    return comfy.sd.load_diffusion_model_state_dict(sd)


def image_attention_seconds(guiders: dict, model, size: int, steps: int) -> dict[str, float]:
    """Seconds per step spent inside the patches' image attention, the work InstantStyle adds to a step.

    Whole-step times carry a few percent of noise on a shared CPU, more than the whole IP-Adapter costs;
    this clock runs only while the added attention runs, so the presets' shares can be told apart.
    """
    import time

    import torch

    from frozentune.instantstyle import attention

    plain = attention.IPAttention.image_attention
    spent = [0.0]

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def timed(self, q, extra):
        sync()
        start = time.perf_counter()
        out = plain(self, q, extra)
        sync()
        spent[0] += time.perf_counter() - start
        return out

    attention.IPAttention.image_attention = timed
    try:
        result = {}
        for name, guider in guiders.items():
            spent[0] = 0.0
            seconds_per_step({name: guider}, model, size, steps, rounds=1)  # a warm-up run, then a timed one
            result[name] = spent[0] / (2 * steps)
        return result
    finally:
        attention.IPAttention.image_attention = plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "sdxl"], default="tiny")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    comfy_env.import_comfy()
    comfy_env.import_pack()
    import torch
    from comfy_extras.nodes_custom_sampler import CFGGuider

    from frozentune.instantstyle import adapter_file, apply, blocks

    model = load_model(args.model)
    layers = blocks.attention_layers(model.model.diffusion_model)
    flat = tiny_ipadapter.ipadapter_state_dict([(la.inner_dim, la.context_dim) for la in layers], 1280)
    adapter = adapter_file.from_sections(adapter_file.split_sections(flat), "random ip-adapter_sdxl layout")
    gen = torch.Generator().manual_seed(0)
    cond, uncond = apply.build_tokens(adapter, torch.randn(1, 1280, generator=gen), torch.zeros(1, 1280),
                                      apply.StyleSettings(), None)
    models = {"unpatched": model}
    for preset in ("style", "style+layout", "all blocks"):
        settings = apply.StyleSettings(preset=preset)
        chosen = apply.select_layers(model, adapter, settings)
        models[f"{preset} ({len(chosen)} layers)"] = apply.patch_model(model, adapter, chosen, cond, uncond, settings)

    def conditioning(seed: int):
        g = torch.Generator().manual_seed(seed)
        return [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]

    pos, neg = conditioning(1), conditioning(2)
    guiders = {name: CFGGuider.execute(m, pos, neg, 5.0).args[0] for name, m in models.items()}
    times = seconds_per_step(guiders, model, args.size, args.steps, args.rounds)

    added = image_attention_seconds(guiders, model, args.size, args.steps)
    unet_params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    base = statistics.median(times["unpatched"])
    all_key = next(k for k in times if k.startswith("all blocks"))
    all_overhead = statistics.median(times[all_key]) - base
    print(f"model: {args.model} ({type(model.model.model_config).__name__}), UNet {unet_params / 1e6:.1f}M params, "
          f"{len(layers)} attn2 layers, {args.size}x{args.size} px, {args.steps} euler steps with CFG, median of "
          f"{args.rounds} rounds, device {model.load_device}, torch threads {torch.get_num_threads()}")
    print(f"{'model':28} {'s/step':>9} {'x unpatched':>12} {'overhead / all-blocks overhead':>31} "
          f"{'image attn s/step':>18} {'/ all blocks':>13} {'/ step':>8}")
    for name, values in times.items():
        t = statistics.median(values)
        share = (t - base) / all_overhead if all_overhead > 0 else float("nan")
        print(f"{name:28} {t:9.4f} {t / base:12.3f} {share:31.3f} {added[name]:18.4f} "
              f"{added[name] / added[all_key]:13.3f} {added[name] / base:8.4f}")


if __name__ == "__main__":
    main()
