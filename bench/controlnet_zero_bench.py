"""ControlNet-Zero training speed and peak memory against a minimal diffusers reference loop.

Arms (each in its own process, so peak RSS is its own; the peak is reset with /proc/self/clear_refs
right before the training loop and read from VmHWM):

- like for like, on cached encodings: ``encode-ours`` (ControlNet-Zero's ``cache.encode`` with a cache
  folder) and ``encode-diffusers`` (the reference VAE and text encoder, once) each run in a process of
  their own and write the encodings to disk; ``ours-disk`` then trains ControlNet-Zero on the tiny SD1.5
  checkpoint's UNet alone (loaded without CLIP/VAE, the cache shards read as the node's disk cache reads
  them) and ``diffusers-disk`` trains the reference loop on the file it reads. No encoder ever lives in a
  training process, so neither reuses memory freed by encoders. Timing rounds alternate the two arms;
  a separate short run per arm counts live tensor bytes (``live_bytes.LiveBytes``) over the loop.
- whole pipelines: ``ours`` = ControlNet-Zero through ComfyUI (latents and text encoded once, the VAE and
  text encoder released before training); ``diffusers`` = ``ControlNetModel.from_unet`` on a
  ``UNet2DConditionModel`` of the same shape (320 channels, one level, cross-attention 768), an
  ``AutoencoderTiny`` (TAESD, as the tiny checkpoint's VAE) and a CLIP-L-shaped ``CLIPTextModel``,
  encoding each batch every step as diffusers' train_controlnet.py does.

Same batch, resolution, optimizer (AdamW, lr 1e-5, weight decay 1e-2), fp32, no gradient checkpointing.
Then the 2-process DDP speed-up of the CLI on the CPU (gloo): one process at batch B against
``torchrun --nproc_per_node 2`` at batch B/2 per process (same global batch); ``--skip-ddp`` leaves it out.

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


def _ours_encoded(args, cache_dir: Path | None = None):
    """The tiny SD1.5 checkpoint and the disks dataset encoded by ControlNet-Zero's ``cache.encode`` (CLIP/VAE freed)."""
    import gc

    import torch

    from harness import comfy_env, disks, tiny_models

    comfy_env.import_comfy()
    comfy_env.import_pack()
    import comfy.sd

    from frozentune.controlnet_zero import cache, dataset

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_models.checkpoint_path("sd15")),
                                                                 output_vae=True, output_clip=True)
    targets, hints = disks.disks(args.pairs, args.res, seed=0)
    t, h, caps = dataset.from_images(targets, hints, disks.CAPTION, args.res)
    with torch.inference_mode(False):
        data = cache.encode(cache.Source.from_tensors(t, h, caps), model.model, vae, clip, args.res,
                            cache_dir=cache_dir)
    del clip, vae
    gc.collect()
    return model, data


def _ours_train(args, model, data) -> dict:
    """ControlNet-Zero's training loop on ``data`` around ``model``, clocked (and its live bytes if ``--track``)."""
    import comfy.model_management as mm

    from frozentune.controlnet_zero import network
    from frozentune.controlnet_zero import training_run as trainer

    mm.load_models_gpu([model], force_full_load=True)
    device = model.load_device
    cn = network.trainable_copy(network.create(model.model), device)
    settings = trainer.TrainSettings(steps=args.warmup + args.steps, batch_size=args.batch, resolution=args.res,
                                     gradient_checkpointing=False, mixed_precision="fp32")
    times = []
    tracker = _tracker(args, model.model, cn)
    rss = _reset_peak()
    with tracker:
        tracker.reset_peak()
        start_bytes = tracker.current
        trainer.train(model.model, cn, data, settings, device,
                      on_step=lambda s, n, loss: times.append(time.perf_counter()))
    return {"steps_per_s": _rate(times, args.warmup), "rss_before": rss, "peak": _status("VmHWM"),
            "controlnet_params": _params(cn), "unet_params": _params(model.model.diffusion_model),
            "live_growth": tracker.peak - start_bytes}


def child_ours(args) -> dict:
    return _ours_train(args, *_ours_encoded(args))


def _reference_encoders(args):
    """The reference loop's VAE (TAESD-shaped AutoencoderTiny) and CLIP-L-shaped text encoder, and its inputs."""
    import torch
    from diffusers import AutoencoderTiny
    from transformers import CLIPTextConfig, CLIPTextModel

    from harness import disks

    torch.manual_seed(1)
    vae = AutoencoderTiny()
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12, projection_dim=768))
    for m in (vae, text_encoder):
        m.requires_grad_(False)
    targets, hints = disks.disks(args.pairs, args.res, seed=0)
    pixels, cond = targets.movedim(-1, 1) * 2 - 1, hints.movedim(-1, 1)
    input_ids = torch.randint(0, 49408, (args.pairs, 77), generator=torch.Generator().manual_seed(0))
    return vae, text_encoder, pixels, cond, input_ids


def child_diffusers(args, folder: Path | None = None) -> dict:
    """The reference loop, encoding each batch every step; with ``folder``, on the encodings another process
    wrote there instead (no encoder in this process at all)."""
    import torch
    from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel

    from harness import disks

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=args.res // 8, in_channels=4, out_channels=4, block_out_channels=(320,), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        mid_block_type="UNetMidBlock2D", cross_attention_dim=768, attention_head_dim=8)
    controlnet = ControlNetModel.from_unet(unet)
    unet.requires_grad_(False)
    controlnet.train()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012)
    opt = torch.optim.AdamW(controlnet.parameters(), lr=1e-5, weight_decay=1e-2)
    sizes = {}
    if folder is not None:
        import safetensors.torch

        stored = safetensors.torch.load_file(str(folder / "diffusers.safetensors"))
        all_latents, all_states = stored["latents"], stored["states"]
        cond = disks.disks(args.pairs, args.res, seed=0)[1].movedim(-1, 1)
    else:
        vae, text_encoder, pixels, cond, input_ids = _reference_encoders(args)
        sizes = {"text_encoder_params": _params(text_encoder), "vae_params": _params(vae)}
    cached = folder is not None
    gen = torch.Generator().manual_seed(0)
    times = []
    tracker = _tracker(args, unet, controlnet)
    rss = _reset_peak()
    tracker.__enter__()
    tracker.reset_peak()
    start_bytes = tracker.current
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
    tracker.__exit__(None, None, None)
    return {"steps_per_s": _rate(times, args.warmup), "rss_before": rss,
            "peak": _status("VmHWM"), "controlnet_params": _params(controlnet), "unet_params": _params(unet),
            "live_growth": tracker.peak - start_bytes, **sizes}


def encode_ours(args, folder: Path) -> dict:
    """In its own process: ControlNet-Zero's encoder pass (cache.encode with a cache folder), written to disk."""
    import safetensors.torch

    _, data = _ours_encoded(args, folder / "ours")
    safetensors.torch.save_file({"caption_ids": data.caption_ids}, str(folder / "ours" / "caption_ids.safetensors"))
    return {"rows": len(data)}


def encode_diffusers(args, folder: Path) -> dict:
    """In its own process: the reference loop's latents and text states, encoded once and written to disk."""
    import safetensors.torch
    import torch

    vae, text_encoder, pixels, _, input_ids = _reference_encoders(args)
    with torch.no_grad():
        latents = vae.encode(pixels).latents * vae.config.scaling_factor
        states = text_encoder(input_ids)[0]
    safetensors.torch.save_file({"latents": latents.contiguous(), "states": states.contiguous()},
                                str(folder / "diffusers.safetensors"))
    return {"rows": int(latents.shape[0])}


def child_ours_disk(args, folder: Path) -> dict:
    """ControlNet-Zero training on encodings another process wrote: only the UNet is loaded (no CLIP, no VAE)."""
    import safetensors.torch

    from harness import comfy_env, tiny_models

    comfy_env.import_comfy()
    comfy_env.import_pack()
    import comfy.sd

    from frozentune.controlnet_zero import cache

    model = comfy.sd.load_checkpoint_guess_config(str(tiny_models.checkpoint_path("sd15")), output_vae=False,
                                                  output_clip=False)[0]
    shards = folder / "ours"
    ids = safetensors.torch.load_file(str(shards / "caption_ids.safetensors"))["caption_ids"]
    data = cache.TrainingData(cache.Rows(files=cache.shard_files(shards, "images")),
                              cache.Rows(files=cache.shard_files(shards, "texts")), ids, args.res)
    return _ours_train(args, model, data)


def _tracker(args, *modules):
    """The live-tensor-bytes tracker (``live_bytes.LiveBytes``) when ``--track``; a no-op context otherwise."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from live_bytes import LiveBytes

    tracker = LiveBytes()
    for m in modules:
        tracker.track_module(m)
    if not args.track:
        import contextlib

        class Off(contextlib.nullcontext):
            current = peak = 0

            def reset_peak(self):
                pass

        return Off()
    return tracker


def run_child(arm: str, args, folder: Path | None = None, track: bool = False, steps: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", arm, "--steps", str(steps or args.steps), "--warmup",
           str(args.warmup), "--batch", str(args.batch), "--res", str(args.res), "--pairs", str(args.pairs),
           "--threads", str(args.threads)] + (["--folder", str(folder)] if folder else []) + (["--track"] if track else [])
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
    p.add_argument("--rounds", type=int, default=2, help="alternating timing rounds of the disk-cached pair")
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--track", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        folder = Path(args.folder) if args.folder else None
        arms = {"ours": lambda: child_ours(args), "diffusers": lambda: child_diffusers(args),
                "encode-ours": lambda: encode_ours(args, folder), "encode-diffusers": lambda: encode_diffusers(args, folder),
                "ours-disk": lambda: child_ours_disk(args, folder), "diffusers-disk": lambda: child_diffusers(args, folder)}
        print(json.dumps(arms[args.child]()))
        return
    import statistics

    mib = 1024 ** 2
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        run_child("encode-ours", args, folder)
        run_child("encode-diffusers", args, folder)
        timed = {"ours-disk": [], "diffusers-disk": []}
        for _ in range(args.rounds):
            for arm in timed:
                timed[arm].append(run_child(arm, args, folder))
        tracked = {arm: run_child(arm, args, folder, track=True, steps=3) for arm in timed}
    ours, ref = run_child("ours", args), run_child("diffusers", args)
    print(f"ControlNet-Zero vs diffusers reference: batch {args.batch}, {args.res}px, {args.steps} timed steps after "
          f"{args.warmup} warm-up, fp32, no checkpointing, AdamW, CPU ({os.cpu_count()} cores, {args.threads} torch "
          f"thread(s) per process, load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end)")
    print(f"  sizes: ours ControlNet {ours['controlnet_params'] / 1e6:.2f}M + frozen UNet "
          f"{ours['unet_params'] / 1e6:.2f}M; diffusers ControlNet {ref['controlnet_params'] / 1e6:.2f}M + UNet "
          f"{ref['unet_params'] / 1e6:.2f}M + text encoder {ref['text_encoder_params'] / 1e6:.1f}M + VAE "
          f"{ref['vae_params'] / 1e6:.2f}M")
    print("\nLike for like, encodings made in another process and read from disk (no encoder in the training process):")
    print(f"{'arm':<16}{'steps/s per round':>26}{'median':>8}{'RSS before MiB':>16}{'peak-before MiB':>17}"
          f"{'live tensor growth MiB':>24}")
    rate, growth, live = {}, {}, {}
    for arm, rounds in timed.items():
        rate[arm] = statistics.median(r["steps_per_s"] for r in rounds)
        growth[arm] = statistics.median(r["peak"] - r["rss_before"] for r in rounds)
        live[arm] = tracked[arm]["live_growth"]
        per_round = " ".join(f"{r['steps_per_s']:.3f}" for r in rounds)
        print(f"{arm:<16}{per_round:>26}{rate[arm]:>8.3f}"
              f"{rounds[0]['rss_before'] / mib:>16.0f}{growth[arm] / mib:>17.1f}{live[arm] / mib:>24.1f}")
    print(f"ratios ours-disk/diffusers-disk: speed {rate['ours-disk'] / rate['diffusers-disk']:.2f}x, training RSS "
          f"growth {growth['ours-disk'] / max(growth['diffusers-disk'], 1):.2f}x, live tensor growth "
          f"{live['ours-disk'] / max(live['diffusers-disk'], 1):.2f}x (targets: speed >= 1, memory <= 1)")
    print("\nWhole pipelines, one process each (ours encodes once and frees CLIP/VAE; diffusers encodes every step):")
    print(f"{'arm':<12}{'steps/s':>10}{'RSS before MiB':>16}{'peak RSS MiB':>14}{'peak-before MiB':>17}")
    for name, r in (("ours", ours), ("diffusers", ref)):
        print(f"{name:<12}{r['steps_per_s']:>10.3f}{r['rss_before'] / mib:>16.0f}{r['peak'] / mib:>14.0f}"
              f"{(r['peak'] - r['rss_before']) / mib:>17.0f}")
    print(f"ratios ours/diffusers: speed {ours['steps_per_s'] / ref['steps_per_s']:.2f}x, peak RSS "
          f"{ours['peak'] / ref['peak']:.2f}x")
    if not args.skip_ddp:
        with tempfile.TemporaryDirectory() as tmp:
            one1, one2, two1 = (cli_rate(1, 1, args, Path(tmp)), cli_rate(1, 2, args, Path(tmp)),
                                cli_rate(2, 1, args, Path(tmp)))
        print(f"CLI DDP on CPU (gloo), global batch {args.batch}: 1 process x 1 thread {one1:.3f} steps/s, "
              f"1 process x 2 threads {one2:.3f}, torchrun 2 processes x 1 thread {two1:.3f} -> speed-up "
              f"{two1 / one1:.2f}x vs 1x1, {two1 / one2:.2f}x vs 1x2 (same cores)")


if __name__ == "__main__":
    main()
