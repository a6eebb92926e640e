"""ControlNet-Zero training speed and peak memory against a minimal diffusers reference loop.

Arms (each in its own process, so peak RSS is its own; the peak is reset with /proc/self/clear_refs
right before the training loop and read from VmHWM):

- ours: ControlNet-Zero on the tiny SD1.5 checkpoint through ComfyUI (latents and text encoded once,
  the VAE and text encoder released before training);
- diffusers-cached: the same reference loop on latents and text encoded once (encoders freed), which
  isolates the training step itself;
- diffusers: ``ControlNetModel.from_unet`` on a ``UNet2DConditionModel`` of the same shape (320 channels,
  one level, cross-attention 768), an ``AutoencoderTiny`` (TAESD, as the tiny checkpoint's VAE) and a
  CLIP-L-shaped ``CLIPTextModel``, encoding each batch every step as diffusers' train_controlnet.py does.

Same batch, resolution, optimizer (AdamW, lr 1e-5, weight decay 1e-2), fp32, no gradient checkpointing.
Then the 2-process DDP speed-up of the CLI on the CPU (gloo): one process at batch B against
``torchrun --nproc_per_node 2`` at batch B/2 per process (same global batch).

Run from tests/: ``cd tests && ../.venv/bin/python ../bench/controlnet_zero_bench.py``.
Random tiny weights: these figures are about the machinery, not image quality.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"


def _reset_peak() -> int:
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _rate(times: list[float], warmup: int) -> float:
    """Steps per second from the median interval between the timed steps' ends (robust to load spikes)."""
    import statistics

    return 1.0 / statistics.median(b - a for a, b in zip(times[warmup - 1:], times[warmup:], strict=False))


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def child_ours(args) -> dict:
    import gc

    import torch

    from harness import comfy_env, disks, tiny_models

    comfy_env.import_comfy()
    comfy_env.import_pack()
    import comfy.model_management as mm
    import comfy.sd

    from frozentune.controlnet_zero import cache, dataset, network, trainer

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_models.checkpoint_path("sd15")),
                                                                 output_vae=True, output_clip=True)
    targets, hints = disks.disks(args.pairs, args.res, seed=0)
    t, h, caps = dataset.from_images(targets, hints, disks.CAPTION, args.res)
    with torch.inference_mode(False):
        data = cache.encode(cache.Source.from_tensors(t, h, caps), model.model, vae, clip, args.res)
    del clip, vae
    gc.collect()
    mm.load_models_gpu([model], force_full_load=True)
    device = model.load_device
    cn = network.trainable_copy(network.create(model.model), device)
    settings = trainer.TrainSettings(steps=args.warmup + args.steps, batch_size=args.batch, resolution=args.res,
                                     gradient_checkpointing=False, mixed_precision="fp32")
    times = []
    rss = _reset_peak()
    trainer.train(model.model, cn, data, settings, device, on_step=lambda s, n, loss: times.append(time.perf_counter()))
    return {"steps_per_s": _rate(times, args.warmup), "rss_before": rss,
            "peak": _status("VmHWM"), "controlnet_params": _params(cn),
            "unet_params": _params(model.model.diffusion_model)}


def child_diffusers(args, cached: bool = False) -> dict:
    """The reference loop; ``cached``: encode latents and text once and free the encoders, like ours."""
    import gc

    import torch
    from diffusers import AutoencoderTiny, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from harness import disks

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=args.res // 8, in_channels=4, out_channels=4, block_out_channels=(320,), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        mid_block_type="UNetMidBlock2D", cross_attention_dim=768, attention_head_dim=8)
    controlnet = ControlNetModel.from_unet(unet)
    vae = AutoencoderTiny()
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12, projection_dim=768))
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    controlnet.train()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012)
    opt = torch.optim.AdamW(controlnet.parameters(), lr=1e-5, weight_decay=1e-2)
    targets, hints = disks.disks(args.pairs, args.res, seed=0)
    pixels, cond = targets.movedim(-1, 1) * 2 - 1, hints.movedim(-1, 1)
    input_ids = torch.randint(0, 49408, (args.pairs, 77), generator=torch.Generator().manual_seed(0))
    sizes = {"text_encoder_params": _params(text_encoder), "vae_params": _params(vae)}
    if cached:
        with torch.no_grad():
            all_latents = vae.encode(pixels).latents * vae.config.scaling_factor
            all_states = text_encoder(input_ids)[0]
        del vae, text_encoder
        gc.collect()
    gen = torch.Generator().manual_seed(0)
    times = []
    rss = _reset_peak()
    for _ in range(args.warmup + args.steps):
        rows = torch.randint(0, args.pairs, (args.batch,), generator=gen)
        if cached:
            latents, states = all_latents[rows], all_states[rows]
        else:
            with torch.no_grad():
                latents = vae.encode(pixels[rows]).latents * vae.config.scaling_factor
                states = text_encoder(input_ids[rows])[0]
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        noisy = scheduler.add_noise(latents, noise, t)
        down, mid = controlnet(noisy, t, encoder_hidden_states=states, controlnet_cond=cond[rows], return_dict=False)
        pred = unet(noisy, t, encoder_hidden_states=states, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter())
    return {"steps_per_s": _rate(times, args.warmup), "rss_before": rss,
            "peak": _status("VmHWM"), "controlnet_params": _params(controlnet), "unet_params": _params(unet),
            **sizes}


def run_child(arm: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", arm, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch", str(args.batch), "--res", str(args.res), "--pairs", str(args.pairs), "--threads", str(args.threads)]
    out = subprocess.run(cmd, cwd=TESTS, env=dict(os.environ, PYTHONPATH=str(TESTS)), capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{arm} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


STEP_LINE = re.compile(r"^\[rank 0\] (\S+ \S+) controlnet_zero.train: step (\d+)/(\d+)")


def cli_rate(processes: int, threads: int, args, work: Path) -> float:
    """Optimizer steps per second of the CLI (from its per-step log timestamps), same global batch."""
    sys.path.insert(0, str(TESTS))
    from harness import comfy_env, disks, tiny_models

    comfy_env.import_comfy()

    data = work / "data"
    if not data.exists():
        disks.write_folder(data, count=args.pairs, size=args.res)
    config = work / f"train_{processes}x{threads}.toml"
    steps = args.warmup + args.steps
    config.write_text("\n".join([
        f'checkpoint = "{tiny_models.checkpoint_path("sd15")}"', f'dataset = "{data}"',
        f'output = "{work / f"out_{processes}x{threads}.safetensors"}"', f"steps = {steps}",
        f"batch_size = {args.batch // processes}", f"resolution = {args.res}", "gradient_checkpointing = false",
        'mixed_precision = "fp32"', "eval_rows = 0", "log_every = 1"]))
    env = dict(os.environ, COMFYUI_DIR=str(REPO / "build" / "comfyui"), OMP_NUM_THREADS=str(threads))
    if processes == 1:
        cmd = [sys.executable, "-m", "controlnet_zero.train", "--config", str(config)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "controlnet_zero.train", "--config", str(config)]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"CLI with {processes} process(es) failed:\n{(out.stdout + out.stderr)[-3000:]}")
    stamps: dict[int, float] = {}
    for line in (out.stdout + out.stderr).splitlines():
        m = STEP_LINE.match(line)
        if m:
            stamps[int(m.group(2))] = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return _rate([stamps[i] for i in range(1, steps + 1)], args.warmup)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (1: stable under load)")
    p.add_argument("--skip-ddp", action="store_true")
    args = p.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        result = child_ours(args) if args.child == "ours" else child_diffusers(args, args.child == "diffusers-cached")
        print(json.dumps(result))
        return
    mib = 1024 ** 2
    load = os.getloadavg()[0]
    ours, ref, ref_cached = run_child("ours", args), run_child("diffusers", args), run_child("diffusers-cached", args)
    print(f"ControlNet-Zero vs diffusers reference: batch {args.batch}, {args.res}px, {args.steps} timed steps after "
          f"{args.warmup} warm-up, fp32, CPU ({os.cpu_count()} cores, load average {load:.1f} at start)")
    print(f"  sizes: ours ControlNet {ours['controlnet_params'] / 1e6:.2f}M + frozen UNet "
          f"{ours['unet_params'] / 1e6:.2f}M; diffusers ControlNet {ref['controlnet_params'] / 1e6:.2f}M + UNet "
          f"{ref['unet_params'] / 1e6:.2f}M + text encoder {ref['text_encoder_params'] / 1e6:.1f}M + VAE "
          f"{ref['vae_params'] / 1e6:.2f}M")
    print(f"{'arm':<12}{'steps/s':>10}{'RSS before MiB':>16}{'peak RSS MiB':>14}{'peak-before MiB':>17}")
    for name, r in (("ours", ours), ("diffusers", ref), ("diff-cached", ref_cached)):
        print(f"{name:<12}{r['steps_per_s']:>10.3f}{r['rss_before'] / mib:>16.0f}{r['peak'] / mib:>14.0f}"
              f"{(r['peak'] - r['rss_before']) / mib:>17.0f}")
    print(f"ratios ours/diffusers: speed {ours['steps_per_s'] / ref['steps_per_s']:.2f}x, peak RSS "
          f"{ours['peak'] / ref['peak']:.2f}x, training growth "
          f"{(ours['peak'] - ours['rss_before']) / max(ref['peak'] - ref['rss_before'], 1):.2f}x")
    print(f"ratios ours/diffusers with cached encodings: speed {ours['steps_per_s'] / ref_cached['steps_per_s']:.2f}x, "
          f"peak RSS {ours['peak'] / ref_cached['peak']:.2f}x, training growth "
          f"{(ours['peak'] - ours['rss_before']) / max(ref_cached['peak'] - ref_cached['rss_before'], 1):.2f}x")
    if not args.skip_ddp:
        with tempfile.TemporaryDirectory() as tmp:
            one1, one2, two1 = (cli_rate(1, 1, args, Path(tmp)), cli_rate(1, 2, args, Path(tmp)),
                                cli_rate(2, 1, args, Path(tmp)))
        print(f"CLI DDP on CPU (gloo), global batch {args.batch}: 1 process x 1 thread {one1:.3f} steps/s, "
              f"1 process x 2 threads {one2:.3f}, torchrun 2 processes x 1 thread {two1:.3f} -> speed-up "
              f"{two1 / one1:.2f}x vs 1x1, {two1 / one2:.2f}x vs 1x2 (same cores)")


if __name__ == "__main__":
    main()
