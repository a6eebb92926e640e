"""Per-step time and peak memory of UniTune Fine-Tune against ComfyUI's TrainLoraNode and a naive loop.

Contenders, on the same tiny checkpoint, image, caption, steps, batch, learning rate and AdamW:

- ``ours lora`` / ``ours full``: the UniTune Fine-Tune node (image latent and caption encoded once).
- ``stock lora``: ComfyUI's own TrainLoraNode (LoRA of the same rank, fp32 like ours, no gradient
  checkpointing like ours), fed by the stock VAEEncode and CLIPTextEncode nodes. 0.3.75 crashes on a
  single LATENT input, and it draws each batch from distinct dataset items, so it gets the latent
  ``batch_size`` times (at least twice) to train on the same batch as the others.
- ``naive lora`` / ``naive full``: the same private-copy UNet forward/backward as ours, but the image is
  re-encoded with the VAE and the caption with CLIP on every step.

Each contender runs in a fresh subprocess with one torch thread by default (with two, idle OpenMP
threads spin while other jobs hold the cores, and time per step swelled up to 7x). Time per step is the median interval between step
timestamps (the progress-bar hook the nodes update after every optimizer step) after the warm-up;
the 1-minute load average is printed, since other jobs on a shared machine slow single steps.
Peak memory is the process RSS high-water mark during the run (Linux VmHWM, reset through
``/proc/self/clear_refs`` once the models are loaded) minus the RSS at that moment; where the reset is
not allowed, a 2 ms sampling thread of VmRSS stands in. Run from ``tests/``:
``cd tests && ../.venv/bin/python ../bench/unitune_finetune_bench.py``.

``--full-size-sd15``: seconds per step of ``ours lora`` (``unitune.finetune.fine_tune``) against stock
TrainLoraNode on the FULL-SIZE SD1.5 UNet (ComfyUI's config, 859.5M parameters, random fp32 weights, see
``full_size.py``), fed a random latent and random conditioning of the right shape (no CLIP/VAE: the UNet step
is what is timed), at equal trainable size: ours (attention projections) at ``--rank`` against stock (every
layer) at ``--stock-rank``; fp32 on the CPU, AdamW, no gradient checkpointing for either.

``--dit CASE [CASE ...]``: the same race (``unitune.finetune.fine_tune`` against stock TrainLoraNode) on the tiny
DiTs of ``tests/harness/tiny_dits.py`` (``flux1``, ``flux1_schnell``, ``sd3``: the stock-loaded tiny model, the
subject image through its tiny 16-channel VAE, the caption through its tiny text encoders), on issue 24's tiny DiTs
of ``tests/harness/tiny_dits2.py`` (``qwen_image``: 5-D latents through its tiny Wan-2.1 VAE, prompt-keyed
conditioning in place of Qwen2.5-VL; ``z_image``: its tiny Qwen3 encoder; ``chroma``: the tiny Flux's T5 and VAE) and on the real-width
one-block Flux.1-dev (``flux1-one-block``: hidden 3072, 1 double + 1 single block, ~546M parameters, through
the stock ``UNETLoader``; a random latent of ``--dit-size`` pixels and random Flux.1 conditioning of
``full_size.conditioning``: 512 T5 tokens). Equal trainable size: ours trains LoRA of rank ``--rank`` on the
family's lora targets; TrainLoraNode trains LoRA on every layer plus full bias and norm diffs, at the rank whose
count comes nearest ours (``equal_size_ranks``; both counts are printed). Each case runs without gradient
checkpointing and again with it on both sides (``--checkpointing``). The one-block Flux runs
``--one-block-steps`` steps (1 warm-up).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # for `harness`, from any cwd
MARK = "BENCH_RESULT "
CONTENDERS = ("ours lora", "stock lora", "naive lora", "ours full", "naive full")
RATIOS = (("ours lora", "stock lora"), ("ours lora", "naive lora"), ("ours full", "naive full"),
          ("ours lora gc", "stock lora gc"))
DIT_CASES = ("flux1", "flux1_schnell", "sd3", "qwen_image", "z_image", "chroma", "flux1-one-block")
TINY_DITS2 = ("qwen_image", "z_image", "chroma")  # issue 24's tiny families (tests/harness/tiny_dits2.py)
ONE_BLOCK = "flux1-one-block"


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


class PeakRss:
    """Peak RSS increase (MiB) over the ``with`` block, relative to the RSS on entry."""

    def __enter__(self) -> PeakRss:
        gc.collect()
        self.base = _status_kib("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.measure = "VmHWM (reset after load) - RSS after load"
            self._thread = None
        except OSError:
            self.measure = "max VmRSS sampled every 2 ms - RSS after load"
            self._max, self._stop = self.base, threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._max = max(self._max, _status_kib("VmRSS"))

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            peak = _status_kib("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            peak = self._max
        self.mib = (peak - self.base) / 1024


def subject_image() -> torch.Tensor:
    """The tests' 64x64 subject: a red disk on a blue-green gradient, ``[1, 64, 64, 3]``."""
    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    img = torch.stack([0.2 + 0.0 * x, 0.3 + 0.5 * x, 0.8 - 0.5 * y], dim=-1)
    img[((x - 0.4) ** 2 + (y - 0.55) ** 2) < 0.06] = torch.tensor([0.9, 0.1, 0.1])
    return img[None]


def run_ours(model, clip, vae, pixels, mode: str, cfg: argparse.Namespace) -> int:
    from frozentune.nodes.unitune_nodes import ATTACHMENT, UniTuneFineTune

    out = UniTuneFineTune.execute(
        model=model, clip=clip, vae=vae, image=pixels, token=cfg.token, class_word="", steps=cfg.steps,
        batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, optimizer="adamw", train=mode,
        lora_rank=cfg.rank, gradient_checkpointing=False, seed=0)
    tensors = out.args[0].attachments[ATTACHMENT].tensors
    return sum(t.numel() for k, t in tensors.items() if not k.endswith(".alpha"))


def run_stock(model, clip, vae, pixels, cfg: argparse.Namespace) -> int:
    import nodes
    from comfy_extras.nodes_train import TrainLoraNode

    latent = nodes.VAEEncode().encode(vae, pixels)[0]
    positive = nodes.CLIPTextEncode().encode(clip, cfg.token)[0]
    out = TrainLoraNode.execute(
        model=[model], latents=[latent] * max(2, cfg.batch_size), positive=[positive],
        batch_size=[cfg.batch_size], grad_accumulation_steps=[1], steps=[cfg.steps],
        learning_rate=[cfg.learning_rate], rank=[cfg.rank], optimizer=["AdamW"], loss_function=["MSE"], seed=[0],
        training_dtype=["fp32"], lora_dtype=["fp32"], algorithm=["LoRA"], gradient_checkpointing=[False],
        existing_lora=["[None]"])
    return sum(p.numel() for p in out.args[1].values())


def run_naive(model, clip, vae, pixels, mode: str, cfg: argparse.Namespace, on_step) -> int:
    """Our training step on a private copy, but VAE and CLIP re-encode image and caption every step."""
    import comfy.model_management as mm

    from frozentune.training import objective
    from frozentune.unitune import finetune

    settings = finetune.FineTuneSettings(token=cfg.token, steps=cfg.steps, batch_size=cfg.batch_size,
                                         learning_rate=cfg.learning_rate, optimizer="adamw", mode=mode,
                                         lora_rank=cfg.rank)
    mm.load_models_gpu([model], force_patch_weights=True)
    device = model.load_device
    with torch.inference_mode(False), torch.enable_grad():
        ft = copy.deepcopy(model.model)
        ft.to(device=device, dtype=torch.float32)
        ft.manual_cast_dtype = None
        ft.diffusion_model.dtype = torch.float32
        gen = torch.Generator().manual_seed(0)
        params, _ = finetune._trainable(ft.diffusion_model, settings, gen)
        ft.diffusion_model.train()
        opt = finetune._optimizer(params, settings)
        ms = ft.model_sampling
        for step in range(cfg.steps):
            with torch.no_grad():  # the naive part: both encoders run again on every step
                x0 = ft.latent_format.process_in(vae.encode(pixels).to(device, torch.float32))
                text = clip.encode_from_tokens_scheduled(clip.tokenize(settings.caption))
                conds = finetune.training_conds(ft, text, x0, device)
            x0 = x0.expand(cfg.batch_size, *x0.shape[1:])
            sigma = ms.sigmas[torch.randint(0, len(ms.sigmas), (cfg.batch_size,), generator=gen)].to(device)
            x_t = ms.noise_scaling(sigma, torch.randn(x0.shape, generator=gen).to(device), x0)
            batch_conds = {k: v.expand(cfg.batch_size, *v.shape[1:]) for k, v in conds.items()}
            _, b = objective.target_coefficients(ms, sigma, x_t)
            loss = (((ft.apply_model(x_t, sigma, **batch_conds) - x0) / b) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            on_step(step + 1, cfg.steps, loss.item())
    return sum(p.numel() for p in params)


def child(contender: str, family: str, cfg: argparse.Namespace) -> dict:
    """Load the tiny checkpoint, then run one contender under the step clock and the memory probe."""
    from harness import comfy_env

    torch.set_num_threads(cfg.threads)
    comfy_env.import_comfy()
    comfy_env.import_pack()
    import comfy.utils
    import folder_paths
    import nodes

    from harness import tiny_models

    path = tiny_models.checkpoint_path(family)
    folder_paths.add_model_folder_path("checkpoints", str(tiny_models.cache_dir()))
    pixels = subject_image()
    stamps: dict[int, tuple[float, float]] = {}  # step -> (wall clock, process CPU time)

    def on_step(value, total, *_, **__):
        stamps[value] = (time.perf_counter(), time.process_time())

    comfy.utils.set_progress_bar_global_hook(on_step)
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(path.name)[:3]
        unet_params = sum(p.numel() for p in model.model.diffusion_model.parameters())
        kind, _, mode = contender.partition(" ")
        start = time.perf_counter()
        with PeakRss() as mem:
            if kind == "ours":
                trained = run_ours(model, clip, vae, pixels, mode, cfg)
            elif kind == "stock":
                trained = run_stock(model, clip, vae, pixels, cfg)
            else:
                trained = run_naive(model, clip, vae, pixels, mode, cfg, on_step)
        total = time.perf_counter() - start
    wall, cpu = step_medians(stamps, contender, cfg)
    return dict(contender=contender, family=family, unet_params=unet_params, trained_params=trained,
                s_per_step=wall, cpu_s_per_step=cpu, total_s=total, peak_mib=mem.mib, memory_measure=mem.measure)


def step_medians(stamps: dict[int, tuple[float, float]], contender: str, cfg: argparse.Namespace):
    """Median (wall, CPU) seconds between step stamps after the warm-up; every step must have been stamped."""
    if sorted(stamps) != list(range(1, cfg.steps + 1)):
        raise RuntimeError(f"{contender}: saw steps {sorted(stamps)}, expected 1..{cfg.steps}")
    # medians over the timed steps: other jobs on a shared machine make single steps spike
    return tuple(statistics.median(stamps[i + 1][k] - stamps[i][k] for i in range(cfg.warmup, cfg.steps))
                 for k in (0, 1))


def lora_race(contender: str, label: str, base, latent: torch.Tensor, cond: list, cfg: argparse.Namespace,
              stock_rank: int, checkpointing: bool = False) -> dict:
    """``ours lora`` (``fine_tune`` at ``cfg.rank``) or ``stock lora`` (TrainLoraNode at ``stock_rank``) on
    ``base`` (loaded), ``latent`` ``[1, C, h, w]`` and ``cond``, under the step clock and the memory probe."""
    import comfy.utils

    stamps: dict[int, tuple[float, float]] = {}

    def on_step(value, total, *_, **__):
        stamps[value] = (time.perf_counter(), time.process_time())

    start = time.perf_counter()
    with PeakRss() as mem:
        if contender.startswith("ours lora"):
            from frozentune.unitune import finetune

            settings = finetune.FineTuneSettings(steps=cfg.steps, batch_size=cfg.batch_size, mode="lora",
                                                 lora_rank=cfg.rank, learning_rate=cfg.learning_rate,
                                                 optimizer="adamw", gradient_checkpointing=checkpointing,
                                                 precision="fp32")
            result = finetune.fine_tune(base, latent, cond, settings, on_step=on_step)
            trained = sum(t.numel() for k, t in result.tensors.items() if not k.endswith(".alpha"))
        else:
            from comfy_extras.nodes_train import TrainLoraNode

            comfy.utils.set_progress_bar_global_hook(on_step)
            with torch.inference_mode():  # as ComfyUI's executor runs every node
                out = TrainLoraNode.execute(
                    model=[base], latents=[{"samples": latent}] * max(2, cfg.batch_size), positive=[cond],
                    batch_size=[cfg.batch_size], grad_accumulation_steps=[1], steps=[cfg.steps],
                    learning_rate=[cfg.learning_rate], rank=[stock_rank], optimizer=["AdamW"],
                    loss_function=["MSE"], seed=[0], training_dtype=["fp32"], lora_dtype=["fp32"],
                    algorithm=["LoRA"], gradient_checkpointing=[checkpointing], existing_lora=["[None]"])
            # its LoRA output also holds each layer's alpha, a parameter it never trains (requires_grad False)
            trained = sum(p.numel() for k, p in out.args[1].items() if not k.endswith(".alpha"))
    total = time.perf_counter() - start
    wall, cpu = step_medians(stamps, contender, cfg)
    unet_params = sum(p.numel() for p in base.model.diffusion_model.parameters())
    return dict(contender=contender, family=label, unet_params=unet_params, trained_params=trained,
                s_per_step=wall, cpu_s_per_step=cpu, total_s=total, peak_mib=mem.mib, memory_measure=mem.measure)


def child_full_size(contender: str, cfg: argparse.Namespace) -> dict:
    """One contender on the full-size SD1.5 UNet, random weights and conditioning, under the step clock."""
    from harness import comfy_env

    torch.set_num_threads(cfg.threads)
    comfy_env.import_comfy()
    comfy_env.import_pack()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from full_size import build_base, conditioning

    with torch.inference_mode(False):
        base, _ = build_base("sd15", torch.float32, real=True)
    side = cfg.size // 8
    latent = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(2))
    return lora_race(contender, "sd15-full", base, latent, conditioning("sd15"), cfg, cfg.stock_rank)


def equal_size_ranks(base, rank: int) -> tuple[int, int, int]:
    """TrainLoraNode's rank whose trained-parameter count comes nearest ours at ``rank``; and both counts.

    Ours (``unitune.finetune._trainable``, ``unitune.lora.LoraWeight``): factors of rank min(rank, out, in) on the
    family's lora targets. Stock (TrainLoraNode 0.3.75, ``execute``): factors of its rank on every layer with a
    ``weight_function`` and a weight of 2+ dimensions, a full diff of every 1-dimensional weight and every bias.
    """
    from frozentune import families
    from frozentune.unitune import finetune

    targets = families.train_targets(finetune.family_of(base), "lora")
    ours = per_rank = fixed = 0
    for name, module in base.model.diffusion_model.named_modules():
        if not hasattr(module, "weight_function"):
            continue
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if weight is not None and weight.ndim >= 2:
            out, inp = weight.shape[0], weight.shape[1:].numel()
            per_rank += out + inp
            if targets(name):
                ours += min(rank, out, inp) * (out + inp)
        elif weight is not None:
            fixed += weight.numel()
        fixed += bias.numel() if bias is not None else 0
    stock_rank = min(range(1, 8 * rank + 1), key=lambda r: abs(r * per_rank + fixed - ours))
    return stock_rank, ours, stock_rank * per_rank + fixed


def child_dit(contender: str, case: str, cfg: argparse.Namespace) -> dict:
    """One contender on a tiny DiT (its VAE's latent of the subject, its text encoders' caption) or on the
    real-width one-block Flux (random latent and Flux.1 conditioning), under the step clock."""
    from harness import comfy_env

    torch.set_num_threads(cfg.threads)
    comfy_env.import_comfy()
    comfy_env.import_pack()
    import nodes

    from harness import tiny_dits

    # Loaded outside inference mode, unlike ComfyUI's executor: on a GPU the trainers' load_models_gpu moves the
    # weights to the device as normal tensors, but on the CPU nothing moves and the stock node stops on the
    # QK-norm scales (plain RMSNorm parameters it does not wrap): "Inference tensors cannot be saved for backward".
    with torch.inference_mode(False):
        if case == ONE_BLOCK:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from full_size import conditioning

            tiny_dits.install_detection_shim()  # answers only files with tiny metadata: this one is stock-detected
            tiny_dits.register_folders()
            base = nodes.UNETLoader().load_unet(tiny_dits.real_width_flux_one_block().name, "default")[0]
            side = cfg.dit_size // 8
            latent = torch.randn(1, 16, side, side, generator=torch.Generator().manual_seed(2))
            cond = conditioning("flux1-dev")
        else:
            if case in TINY_DITS2:
                from harness import tiny_dits2

                dit = tiny_dits2.kit(case)
            else:
                dit = tiny_dits.get(case)
            base = dit.model
            latent = nodes.VAEEncode().encode(dit.vae, subject_image())[0]["samples"]
            cond = dit.encode(cfg.token)
    stock_rank, ours, stock = equal_size_ranks(base, cfg.rank)
    result = lora_race(contender, case, base, latent, cond, cfg, stock_rank, checkpointing=contender.endswith(" gc"))
    expected = ours if contender.startswith("ours") else stock
    if result["trained_params"] != expected:
        raise RuntimeError(f"{contender}: trained {result['trained_params']:,} parameters, counted {expected:,}")
    return dict(result, rank=cfg.rank if contender.startswith("ours") else stock_rank,
                latent=list(latent.shape), context=list(cond[0][0].shape))


def run_child(contender: str, family: str, cfg: argparse.Namespace) -> dict:
    args = [sys.executable, __file__, "--child", contender, family, "--steps", str(cfg.steps),
            "--warmup", str(cfg.warmup), "--batch-size", str(cfg.batch_size), "--rank", str(cfg.rank),
            "--threads", str(cfg.threads), "--size", str(cfg.size), "--stock-rank", str(cfg.stock_rank),
            "--learning-rate", repr(cfg.learning_rate), "--token", cfg.token, "--dit-size", str(cfg.dit_size)]
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads))
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-25:])
    return dict(contender=contender, family=family, error=tail)


def report(rows: list[dict], cfg: argparse.Namespace) -> None:
    ok = [r for r in rows if "error" not in r]
    measure = ok[0]["memory_measure"] if ok else "n/a"
    if cfg.dit:
        print(f"\nUniTune LoRA vs TrainLoraNode on DiTs: {cfg.steps} steps ({cfg.warmup} warm-up) on the tiny models, "
              f"{cfg.one_block_steps} (1 warm-up) on {ONE_BLOCK}; batch {cfg.batch_size}, 64px image (tiny), "
              f"{cfg.dit_size}px latent ({ONE_BLOCK}), AdamW lr {cfg.learning_rate:g}, ours LoRA rank {cfg.rank}, "
              f"stock rank chosen per model for equal trainable size, fp32, torch {torch.__version__}, "
              f"{cfg.threads} torch thread(s) per contender; 'gc' = gradient checkpointing on")
    else:
        print(f"\nUniTune Fine-Tune bench: {cfg.steps} steps ({cfg.warmup} warm-up, {cfg.steps - cfg.warmup} timed), "
              f"batch {cfg.batch_size}, {cfg.size if cfg.full_size_sd15 else 64}px image, AdamW lr {cfg.learning_rate:g}, LoRA rank {cfg.rank}{f' (stock {cfg.stock_rank})' if cfg.full_size_sd15 else ''}, fp32, "
              f"torch {torch.__version__}, {cfg.threads} torch thread(s) per contender")
    print(f"peak memory = {measure}, in a fresh process per contender\n")
    fw, cw = max([9] + [len(r["family"]) for r in rows]), max([11] + [len(r["contender"]) for r in rows])
    ranked = any("rank" in r for r in ok)  # --dit rows carry each side's LoRA rank
    print(f"{'model':<{fw}} {'UNet params':>12} {'contender':<{cw}}{' rank' if ranked else ''} {'trained params':>14} "
          f"{'s/step':>8} {'CPU s/step':>10} {'total s':>8} {'peak MiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['family']:<{fw}} {'':>12} {r['contender']:<{cw}} FAILED:\n{r['error']}")
            continue
        rank = f" {r['rank']:>4}" if ranked else ""
        print(f"{r['family']:<{fw}} {r['unet_params'] / 1e6:>11.1f}M {r['contender']:<{cw}}{rank} "
              f"{r['trained_params']:>14,} {r['s_per_step']:>8.4f} {r['cpu_s_per_step']:>10.4f} {r['total_s']:>8.2f} "
              f"{r['peak_mib']:>9.1f}")
    print()
    by = {(r["family"], r["contender"]): r for r in ok}
    for family in cfg.families:
        for a, b in RATIOS:
            if (family, a) in by and (family, b) in by:
                ra, rb = by[family, a], by[family, b]
                mem = ra["peak_mib"] / rb["peak_mib"] if rb["peak_mib"] > 0 else float("nan")
                print(f"{family:<{fw}} {a} / {b}: trained params x{ra['trained_params'] / rb['trained_params']:.2f}, time x{ra['s_per_step'] / rb['s_per_step']:.2f}, "
                      f"CPU time x{ra['cpu_s_per_step'] / rb['cpu_s_per_step']:.2f}, peak memory x{mem:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--token", default="beikkpic")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per contender; 1 keeps CPU time "
                        "per step meaningful on a busy machine (idle OpenMP threads spin and bill CPU time)")
    parser.add_argument("--full-size-sd15", action="store_true", help="ours lora vs stock TrainLoraNode on the "
                        "full-size SD1.5 UNet (random weights) instead of the tiny checkpoints")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels for --full-size-sd15")
    parser.add_argument("--stock-rank", type=int, default=1, help="TrainLoraNode's rank for --full-size-sd15 (1: "
                        "1,502,060 trained parameters, next to ours at rank 8: 1,594,368)")
    parser.add_argument("--dit", nargs="+", choices=DIT_CASES, help="ours lora vs stock TrainLoraNode at equal "
                        f"trainable size on tiny DiTs and/or the real-width one-block Flux ({ONE_BLOCK})")
    parser.add_argument("--dit-size", type=int, default=64, help=f"latent size in pixels for {ONE_BLOCK}")
    parser.add_argument("--one-block-steps", type=int, default=3, help=f"steps for {ONE_BLOCK} (1 warm-up)")
    parser.add_argument("--checkpointing", choices=("both", "off", "on"), default="both",
                        help="--dit: runs without and/or with gradient checkpointing on both sides")
    parser.add_argument("--child", nargs=2, metavar=("CONTENDER", "FAMILY"), help=argparse.SUPPRESS)
    cfg = parser.parse_args()
    if not 1 <= cfg.warmup < cfg.steps:
        parser.error("need 1 <= --warmup < --steps")
    if cfg.child:
        contender, family = cfg.child
        if family == "sd15-full":
            result = child_full_size(contender, cfg)
        elif family in DIT_CASES:
            result = child_dit(contender, family, cfg)
        else:
            result = child(contender, family, cfg)
        print(MARK + json.dumps(result), flush=True)
        return
    if cfg.dit and cfg.one_block_steps < 2:
        parser.error("need --one-block-steps >= 2 (1 warm-up)")
    if cfg.dit:
        cfg.families = cfg.dit
        suffixes = {"off": ("",), "on": (" gc",), "both": ("", " gc")}[cfg.checkpointing]
        one_block = argparse.Namespace(**{**vars(cfg), "steps": cfg.one_block_steps, "warmup": 1})
        plan = [(case, contender + suffix, one_block if case == ONE_BLOCK else cfg)
                for case in cfg.dit for suffix in suffixes for contender in ("ours lora", "stock lora")]
    elif cfg.full_size_sd15:
        cfg.families = ["sd15-full"]
        plan = [("sd15-full", contender, cfg) for contender in ("ours lora", "stock lora")]
    else:
        plan = [(family, contender, cfg) for family in cfg.families for contender in CONTENDERS]
    rows, load_before = [], os.getloadavg()[0]
    for family, contender, run_cfg in plan:
        t0 = time.perf_counter()
        rows.append(run_child(contender, family, run_cfg))
        print(f"{family} {contender}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    report(rows, cfg)
    print(f"\n1-min load average: {load_before:.2f} at start, {os.getloadavg()[0]:.2f} at end "
          f"({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
