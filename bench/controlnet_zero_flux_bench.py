"""ControlNet-Zero on Flux.1 against diffusers' ``FluxControlNetModel`` loop: speed and live memory, one run.

All arms train a 2-double-block ControlNet around the same small Flux.1-dev-shaped transformer (``--width``,
default 256, in heads of 64; 2 double + 4 single blocks; guidance embedding), on the same cached encodings (random latents,
T5-shaped context, pooled vector), batch, resolution, optimizer (AdamW, lr 1e-5, weight decay 1e-2), fp32,
no gradient checkpointing, PyTorch SDPA attention on both sides:

- ``ours``: ControlNet-Zero's trainer (``controlnet_zero.training_run.train``) with the XLabs-layout
  ControlNet its Create node makes (``layouts.for_model(base).create``): pixel hints through the layout's
  hint convolutions, as x-flux trains it.
- ``ours-instantx``: the same trainer with the InstantX / diffusers layout (Create's ``layout`` flux_instantx:
  ``ControlNetFlux(latent_input=True)``), fed the SAME cached hint latents as the diffusers arm: the like-for-like
  comparison (one zero-initialized Linear on the hint latent on both sides).
- ``diffusers``: ``FluxControlNetModel.from_transformer(num_layers=2, num_single_layers=0)`` on a
  ``FluxTransformer2DModel`` of the same shape, the step of diffusers' ``train_controlnet_flux.py``
  (packed latents, latent hints, flow target noise - latents, guidance vector) with its defaults: after backward
  the NaN check of every ControlNet gradient, then clipping, ``optimizer.step()``, the constant
  ``lr_scheduler.step()`` and ``optimizer.zero_grad(set_to_none=False)`` (``--set_grads_to_none`` is off by
  default), on cached latents and hint latents (the script VAE-encodes both every step) and uniform sigmas (its
  logit-normal draw costs the same).
- ``diffusers-lean`` (``--lean-diffusers``): that step without the NaN check and scheduler, gradients set to
  None: what the script does with ``--set_grads_to_none`` and its check removed.

Each arm runs in its own process; timing rounds alternate the arms; a separate short run per arm counts live
tensor bytes over the loop (``live_bytes.LiveBytes``, the analogue of ``torch.cuda.max_memory_allocated``).
The two layouts differ in one place: XLabs' hint is pixels through a stack of 3x3 convolutions at full resolution,
diffusers' (InstantX's) a VAE latent through one linear layer; at a small width that stack is a visible share of
the step. Run from tests/: ``cd tests && ../.venv/bin/python ../bench/controlnet_zero_flux_bench.py [--width 768]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from controlnet_zero_bench import _params, _rate, _reset_peak, _status, _tracker  # noqa: E402

TESTS = Path(__file__).resolve().parents[1] / "tests"
CONTEXT, POOLED, TOKENS, HEAD = 256, 128, 64, 64
AXES = (16, 24, 24)  # RoPE axes, summing to the head width 64
GUIDANCE = 4.0


def comfy_config(args) -> dict:
    """The small Flux in ComfyUI's ``detect_unet_config`` vocabulary (matched to ``supported_models.Flux``)."""
    return dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=POOLED, context_in_dim=CONTEXT,
                hidden_size=args.width, mlp_ratio=4.0, num_heads=args.width // HEAD, depth=args.double,
                depth_single_blocks=args.single,
                axes_dim=list(AXES), theta=10000, qkv_bias=True, guidance_embed=True, patch_size=2)


def encodings(args):
    """The shared dataset: latents [N, 16, h, w], hint pixels [N, R, R, 3] uint8, hint latents, context, pooled."""
    import torch

    gen = torch.Generator().manual_seed(0)
    n, h = args.pairs, args.res // 8
    return {"latents": torch.randn(n, 16, h, h, generator=gen),
            "hints": (torch.rand(n, args.res, args.res, 3, generator=gen) * 255).to(torch.uint8),
            "hint_latents": torch.randn(n, 16, h, h, generator=gen),
            "context": torch.randn(n, TOKENS, CONTEXT, generator=gen),
            "pooled": torch.randn(n, POOLED, generator=gen)}


def _use_sdpa() -> None:
    from memory_bench import use_sdpa

    use_sdpa()


def child_ours(args, layout: str | None = None) -> dict:
    """Our trainer; ``layout`` None: the family default (XLabs, pixel hints), "flux_instantx": latent hints."""
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import torch

    from frozentune.controlnet_zero import cache, layouts, network
    from frozentune.controlnet_zero import training_run as trainer
    from frozentune.training.conditioning import training_conds

    _use_sdpa()
    torch.manual_seed(0)
    config = comfy.model_detection.model_config_from_unet_config(comfy_config(args))
    config.set_inference_dtype(torch.float32, None)
    cpu = torch.device("cpu")
    model = config.get_model({}, "", device=cpu)  # ComfyUI's ops leave weights uninitialized: fill them
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    base = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    data_in = encodings(args)
    latent_like = data_in["latents"][:1]
    texts = {j: training_conds(base.model, [[data_in["context"][j:j + 1],
                                             {"pooled_output": data_in["pooled"][j:j + 1], "guidance": GUIDANCE}]],
                               latent_like, cpu) for j in range(args.pairs)}
    hints = data_in["hints"] if layout is None else data_in["hint_latents"]  # uint8 pixels, or the cached latents
    images = cache.Rows(memory={i: {"latent": data_in["latents"][i], "hint": hints[i]} for i in range(args.pairs)})
    # caption j + 1 for row j; row 0 is the dropout caption (never drawn: dropout 0)
    data = cache.TrainingData(images, cache.Rows(memory={0: texts[0], **{j + 1: texts[j] for j in range(args.pairs)}}),
                              torch.arange(1, args.pairs + 1), args.res)
    mm.load_models_gpu([base], force_full_load=True)
    device = base.load_device
    with torch.inference_mode(False):
        cn = network.trainable_copy(layouts.for_model(base.model, layout).create(base.model, depth=args.control_depth),
                                    device)
    # ComfyUI's ControlNetFlux spreads its outputs over Flux.1's 19 double blocks (``main_model_double``, fixed); on
    # this small base the InstantX layout would then feed both base blocks from ControlNet block 0 and leave block 1
    # idle (no backward), where diffusers spreads over the base's own blocks. The base's counts give both arms the
    # mapping they share at Flux.1's real depth: every ControlNet block reaches the loss.
    cn.main_model_double, cn.main_model_single = args.double, args.single
    settings = trainer.TrainSettings(steps=args.warmup + args.steps, batch_size=args.batch, resolution=args.res,
                                     gradient_checkpointing=False, mixed_precision="fp32", prompt_dropout=0.0)
    times = []
    tracker = _tracker(args, base.model, cn)
    rss = _reset_peak()
    with tracker:
        tracker.reset_peak()
        start = tracker.current
        trainer.train(base.model, cn, data, settings, device, on_step=lambda s, n, loss: times.append(time.perf_counter()))
    return {"steps_per_s": _rate(times, args.warmup), "rss_before": rss, "peak": _status("VmHWM"),
            "controlnet_params": _params(cn), "base_params": _params(base.model.diffusion_model),
            "live_growth": tracker.peak - start}


def _pack(x):
    """[B, C, H, W] -> [B, H/2 * W/2, C * 4], as diffusers' FluxPipeline._pack_latents."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def child_diffusers(args, lean: bool = False) -> dict:
    import torch
    from diffusers import FluxControlNetModel, FluxTransformer2DModel
    from diffusers.optimization import get_scheduler

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=args.double, num_single_layers=args.single,
                                         attention_head_dim=HEAD, num_attention_heads=args.width // HEAD,
                                         joint_attention_dim=CONTEXT, pooled_projection_dim=POOLED,
                                         guidance_embeds=True, axes_dims_rope=AXES)
    controlnet = FluxControlNetModel.from_transformer(transformer, num_layers=args.control_depth, num_single_layers=0,
                                                      attention_head_dim=HEAD, num_attention_heads=args.width // HEAD)
    transformer.requires_grad_(False)
    controlnet.train()
    opt = torch.optim.AdamW(controlnet.parameters(), lr=1e-5, weight_decay=1e-2)
    lr_scheduler = get_scheduler("constant", optimizer=opt)  # the script's --lr_scheduler default
    data = encodings(args)
    h = args.res // 16
    img_ids = torch.zeros(h, h, 3)
    img_ids[..., 1] += torch.arange(h)[:, None]
    img_ids[..., 2] += torch.arange(h)[None, :]
    img_ids = img_ids.reshape(h * h, 3)
    txt_ids = torch.zeros(TOKENS, 3)
    gen = torch.Generator().manual_seed(0)
    times = []
    tracker = _tracker(args, transformer, controlnet)
    rss = _reset_peak()
    tracker.__enter__()
    tracker.reset_peak()
    start = tracker.current
    for _ in range(args.warmup + args.steps):
        rows = torch.randint(0, args.pairs, (args.batch,), generator=gen)
        latents = data["latents"][rows]
        noise = torch.randn(latents.shape, generator=gen)
        sigmas = torch.rand(args.batch, generator=gen)
        noisy = _pack((1 - sigmas[:, None, None, None]) * latents + sigmas[:, None, None, None] * noise)
        guidance = torch.full((args.batch,), GUIDANCE)
        common = dict(timestep=sigmas, guidance=guidance, pooled_projections=data["pooled"][rows],
                      encoder_hidden_states=data["context"][rows], txt_ids=txt_ids, img_ids=img_ids, return_dict=False)
        blocks, singles = controlnet(hidden_states=noisy, controlnet_cond=_pack(data["hint_latents"][rows]), **common)
        pred = transformer(hidden_states=noisy, controlnet_block_samples=blocks,
                           controlnet_single_block_samples=singles, **common)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), _pack(noise - latents).float())
        loss.backward()
        if not lean:  # the script checks every gradient for NaN after backward
            for name, param in controlnet.named_parameters():
                if param.grad is not None and torch.isnan(param.grad).any():
                    raise FloatingPointError(f"gradient of {name} contains NaN")
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        opt.step()
        if not lean:
            lr_scheduler.step()
        opt.zero_grad(set_to_none=lean)  # the script's default: --set_grads_to_none off
        times.append(time.perf_counter())
    tracker.__exit__(None, None, None)
    return {"steps_per_s": _rate(times, args.warmup), "rss_before": rss, "peak": _status("VmHWM"),
            "controlnet_params": _params(controlnet), "base_params": _params(transformer),
            "live_growth": tracker.peak - start}


def run_child(arm: str, args, track: bool = False, steps: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", arm, "--steps", str(steps or args.steps), "--warmup",
           str(args.warmup), "--batch", str(args.batch), "--res", str(args.res), "--pairs", str(args.pairs),
           "--threads", str(args.threads), "--width", str(args.width), "--double", str(args.double), "--single",
           str(args.single), "--control-depth", str(args.control_depth)] + (["--track"] if track else [])
    out = subprocess.run(cmd, cwd=TESTS, env=dict(os.environ, PYTHONPATH=str(TESTS)), capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{arm} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--res", type=int, default=256)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (1: stable under load)")
    p.add_argument("--rounds", type=int, default=2, help="alternating timing rounds")
    p.add_argument("--width", type=int, default=256, help="transformer width (heads of 64)")
    p.add_argument("--double", type=int, default=2, help="the transformer's double blocks")
    p.add_argument("--single", type=int, default=4, help="the transformer's single blocks")
    p.add_argument("--control-depth", type=int, default=2, help="double blocks the ControlNet copies (x-flux: 2)")
    p.add_argument("--lean-diffusers", action="store_true",
                   help="add the diffusers-lean arm (gradients set to None, no NaN check)")
    p.add_argument("--track", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        if args.child in ("ours", "ours-instantx"):
            from harness import comfy_env

            comfy_env.import_comfy()
            comfy_env.import_pack()
            result = child_ours(args, None if args.child == "ours" else "flux_instantx")
        else:
            result = child_diffusers(args, lean=args.child == "diffusers-lean")
        print(json.dumps(result))
        return
    arms = ["ours", "ours-instantx", "diffusers"] + (["diffusers-lean"] if args.lean_diffusers else [])
    rates: dict[str, list[float]] = {arm: [] for arm in arms}
    peaks: dict[str, int] = {}
    for _ in range(args.rounds):
        for arm in rates:
            r = run_child(arm, args)
            rates[arm].append(r["steps_per_s"])
            peaks[arm] = max(peaks.get(arm, 0), r["peak"] - r["rss_before"])
    live = {arm: run_child(arm, args, track=True, steps=2) for arm in rates}
    best = {arm: max(v) for arm, v in rates.items()}
    print(f"Flux ControlNet training step, width {args.width}, {args.double}+{args.single} blocks, ControlNet "
          f"{args.control_depth} "
          f"double blocks, {args.res}px, batch {args.batch}, fp32, {args.threads} thread(s), best of {args.rounds}")
    for arm in rates:
        print(f"- {arm}: {best[arm]:.3f} steps/s; live growth {live[arm]['live_growth'] / 2**20:.1f} MiB; "
              f"RSS growth {peaks[arm] / 2**20:.1f} MiB; ControlNet {live[arm]['controlnet_params'] / 1e6:.2f}M, "
              f"base {live[arm]['base_params'] / 1e6:.2f}M params")
    for other in arms[2:]:
        for arm in ("ours", "ours-instantx"):
            print(f"{arm} / {other}: speed x{best[arm] / best[other]:.3f}, live memory "
                  f"x{live[arm]['live_growth'] / live[other]['live_growth']:.3f}")


if __name__ == "__main__":
    main()
