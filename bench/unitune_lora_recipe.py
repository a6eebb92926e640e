"""Which LoRA steps/rank/lr/optimizer reach the reconstruction a full UniTune fine-tune reaches (issue 11).

The paper's recipe (128 steps, batch 4, Adafactor, lr 1e-4) is for a *full* fine-tune. ``train=auto``
trains a LoRA on SDXL, so this measures, on the tiny models, what a LoRA needs to match it.

Target: UniTune full mode at the paper's recipe. Arms: LoRA (rank x lr x optimizer x steps), all
through the public ``frozentune.unitune.finetune.fine_tune`` on the stock CheckpointLoaderSimple's
MODEL, batch 4, on the tests' 64x64 subject (a red disk on a blue-green gradient), caption
``beikkpic``. Pruning is staged (``plan``): lr x optimizer at rank 8 and 128 steps; ranks at the
best lr of each optimizer; more steps only for the best settings that miss the target; more training
seeds for the finalists.

Reconstruction, measured on the tuned MODEL (the patches applied with ``finetune.apply_patches``),
never from the training loss, with the same fixed draws for every arm:

- ``sdedit``: the primary oracle. Stock KSampler (euler, normal, 12 steps, cfg 3, positive
  ``beikkpic``, negative empty, denoise 0.6: SDEdit's late start from the noised image) from the
  image's latent, sampler seeds 7 and 8; the mean latent MSE to the image's latent. As in
  tests/node/test_unitune_finetune.py.
- ``heldout``: the denoising MSE with the token, in the model's own (eps) parameterization, on 16
  fixed noises (generator seed 12345, never a training seed) at 16 timesteps evenly spread over the
  schedule.
- ``gap``: the share of the base-to-full distance closed, ``(base - arm) / (base - full)`` for
  ``sdedit``, the full target being the mean over its training seeds; >= 1 reaches the target.
- ``dW``: ``||dW|| / ||W||`` summed over the attention projections (to_q/k/v/out of attn1/attn2) that
  every mode changes, from the file tensors.

Each family runs in its own process with one torch thread (a shared machine); results are appended
to a JSON-lines file and reused by a re-run with the same settings (``--fresh`` to start over).
``--pack-root`` imports the pack from another tree (e.g. a ``git archive`` snapshot), so a half-edited
working tree cannot change the figures. Run from anywhere:
``.venv/bin/python bench/unitune_lora_recipe.py [--quick]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # for `harness`, from any cwd
sys.path.insert(0, str(REPO / "bench"))
from unitune_finetune_bench import subject_image  # noqa: E402  (the tests' 64x64 subject)

MARK = "RECIPE_RESULT "
log = logging.getLogger("unitune_lora_recipe")

TOKEN = "beikkpic"
SDEDIT = dict(steps=12, cfg=3.0, sampler="euler", scheduler="normal", denoise=0.6, seeds=(7, 8))
HELDOUT_SEED, HELDOUT_N = 12345, 16
LRS = (1e-4, 3e-4, 1e-3)
RANKS = (4, 8, 16, 32)
OPTIMIZERS = ("adafactor", "adamw")
PAPER = dict(steps=128, optimizer="adafactor", lr=1e-4)


@dataclass(frozen=True)
class Arm:
    family: str
    mode: str  # "full" | "lora"
    optimizer: str
    lr: float
    rank: int  # 0 for full
    steps: int
    seed: int = 0

    @property
    def setting(self) -> tuple:
        """The arm without its training seed (what seeds are averaged over)."""
        return (self.family, self.mode, self.optimizer, self.lr, self.rank, self.steps)

    def label(self) -> str:
        what = f"lora r{self.rank}" if self.mode == "lora" else self.mode
        return f"{what} {self.optimizer} lr {self.lr:g} {self.steps} steps"


# ---------------------------------------------------------------- child: train and measure

def import_pack(root: Path):
    """Import the pack at ``root`` as package ``frozentune``, as ComfyUI would."""
    spec = importlib.util.spec_from_file_location("frozentune", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["frozentune"] = module
    spec.loader.exec_module(module)
    return module


class Oracle:
    """The reconstruction measures of one image and token on one base model (fixed draws)."""

    def __init__(self, model, latent: torch.Tensor, token_cond: list, empty_cond: list):
        self.latent, self.token, self.empty = latent, token_cond, empty_cond
        inner = model.model
        ms = inner.model_sampling
        x0 = inner.latent_format.process_in(latent.float())
        gen = torch.Generator().manual_seed(HELDOUT_SEED)
        noise = torch.randn((HELDOUT_N, *x0.shape[1:]), generator=gen)
        idx = torch.linspace(0, len(ms.sigmas) - 1, HELDOUT_N).round().long()
        self.sigma = ms.sigmas[idx].float()
        self.x0 = x0.expand(HELDOUT_N, *x0.shape[1:])
        self.x_t = ms.noise_scaling(self.sigma, noise, self.x0)
        cond, extras = token_cond[0]
        params = dict(extras, cross_attn=cond, device=torch.device("cpu"), noise=self.x_t[:1],
                      prompt_type="positive", width=latent.shape[-1] * 8, height=latent.shape[-2] * 8)
        self.conds = {k: v.cond.expand(HELDOUT_N, *v.cond.shape[1:])
                      for k, v in inner.extra_conds(**params).items()}

    def measure(self, patcher) -> dict[str, float]:
        import comfy.model_management as mm
        import nodes

        from frozentune.training import objective

        errors = []
        for seed in SDEDIT["seeds"]:
            out = nodes.common_ksampler(patcher, seed, SDEDIT["steps"], SDEDIT["cfg"], SDEDIT["sampler"],
                                        SDEDIT["scheduler"], self.token, self.empty, {"samples": self.latent},
                                        denoise=SDEDIT["denoise"])[0]["samples"]
            errors.append(torch.mean((out.float() - self.latent.float()) ** 2).item())
        mm.load_models_gpu([patcher])
        with torch.no_grad():
            inner = patcher.model
            den = inner.apply_model(self.x_t, self.sigma, **self.conds)
            heldout = objective.denoised_loss(inner.model_sampling, self.sigma, self.x_t, self.x0, den).item()
        return dict(sdedit=statistics.mean(errors), heldout=heldout)


def relative_change(base, tensors: dict[str, torch.Tensor]) -> float:
    """``||dW|| / ||W||`` over the attention projections the file changes (LoRA or ``.diff`` keys)."""
    unet = base.model.diffusion_model
    num = den = 0.0
    projections = (".to_q", ".to_k", ".to_v", ".to_out.0")
    for key, t in tensors.items():
        module = key.removeprefix("diffusion_model.")
        if module.endswith(".lora_up.weight"):
            module = module.removesuffix(".lora_up.weight")
            up = t.float().flatten(1)
            down = tensors[key.replace(".lora_up.", ".lora_down.")].float().flatten(1)
            alpha = tensors.get(key.replace(".lora_up.weight", ".alpha"))
            scale = float(alpha) / up.shape[1] if alpha is not None else 1.0
            delta = scale * (up @ down)
        elif module.endswith(".diff"):
            module = module.removesuffix(".diff")
            delta = t.float()
        else:
            continue
        if not module.endswith(projections) or (".attn1." not in module and ".attn2." not in module):
            continue
        weight = unet.get_submodule(module).weight.float()
        num += float(delta.reshape(weight.shape).pow(2).sum())
        den += float(weight.pow(2).sum())
    return math.sqrt(num / den) if den else float("nan")


def child(family: str, threads: int, pack_root: Path) -> None:
    """Load the tiny checkpoint once, then train and measure each arm read from stdin (one JSON per line).

    One result line per arm on stdout, so the parent can choose the next arms from the results.
    """
    from harness import comfy_env

    torch.set_num_threads(threads)
    comfy_env.import_comfy()
    import_pack(pack_root)
    import comfy.model_management as mm
    import folder_paths
    import nodes

    from frozentune.unitune import finetune
    from harness import tiny_models

    path = tiny_models.checkpoint_path(family)
    folder_paths.add_model_folder_path("checkpoints", str(tiny_models.cache_dir()))
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(path.name)[:3]
        latent = vae.encode(subject_image())
        token = nodes.CLIPTextEncode().encode(clip, TOKEN)[0]
        empty = nodes.CLIPTextEncode().encode(clip, "")[0]
        del clip, vae  # only the UNet is needed from here on (the tiny models carry full-size CLIPs)
        oracle = Oracle(model, latent, token, empty)
        print(MARK + json.dumps(dict(family=family, base=oracle.measure(model))), flush=True)
        for line in sys.stdin:
            arm = Arm(**json.loads(line))
            settings = finetune.FineTuneSettings(
                token=TOKEN, steps=arm.steps, batch_size=4, learning_rate=arm.lr, optimizer=arm.optimizer,
                mode=arm.mode, lora_rank=max(arm.rank, 1), seed=arm.seed)
            start, cpu = time.perf_counter(), time.process_time()
            result = finetune.fine_tune(model, latent, token, settings)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            tuned = finetune.apply_patches(model, result.tensors)
            row = dict(arm=asdict(arm), **oracle.measure(tuned), dW=relative_change(model, result.tensors),
                       train_s=seconds, train_cpu_s=cpu, last_loss=statistics.mean(result.losses[-16:]),
                       trained=sum(t.numel() for k, t in result.tensors.items() if not k.endswith(".alpha")))
            del tuned, result
            mm.load_models_gpu([model])  # unpatch the shared UNet before the next arm
            print(MARK + json.dumps(row), flush=True)


# ---------------------------------------------------------------- parent: staged plan, cache, tables

class Runner:
    """Runs arms in one child process per call and keeps every result in a JSON-lines cache."""

    def __init__(self, cfg: argparse.Namespace):
        self.cfg = cfg
        self.rows: dict[Arm, dict] = {}
        self.base: dict[str, dict] = {}
        self.compute_s = self.cpu_s = 0.0
        self.children: dict[str, subprocess.Popen] = {}
        if cfg.out.exists() and not cfg.fresh:
            for line in cfg.out.read_text().splitlines():
                rec = json.loads(line)
                if "base" in rec:
                    self.base[rec["family"]] = rec["base"]
                else:
                    self.rows[Arm(**rec["arm"])] = rec

    def _child(self, family: str) -> subprocess.Popen:
        """The family's child process (started on first use; it loads the checkpoint once)."""
        if family not in self.children:
            args = [sys.executable, __file__, "--child", family, "--threads", str(self.cfg.threads),
                    "--pack-root", str(self.cfg.pack_root)]
            env = dict(os.environ, OMP_NUM_THREADS=str(self.cfg.threads))
            self.children[family] = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                     text=True, env=env)
            self._read(self.children[family])  # the base model's measures
        return self.children[family]

    def _read(self, proc: subprocess.Popen) -> dict:
        """The next result line of a child, also appended to the cache."""
        for line in proc.stdout:
            if line.startswith(MARK):
                rec = json.loads(line[len(MARK):])
                with self.cfg.out.open("a") as cache:
                    cache.write(json.dumps(rec) + "\n")
                if "base" in rec:
                    self.base[rec["family"]] = rec["base"]
                else:
                    self.rows[Arm(**rec["arm"])] = rec
                return rec
        raise RuntimeError(f"a child process ended early with exit code {proc.wait()}")

    def run(self, arms: list[Arm]) -> None:
        for arm in [a for a in dict.fromkeys(arms) if a not in self.rows]:
            proc = self._child(arm.family)
            log.info("%s: %s seed %d ...", arm.family, arm.label(), arm.seed)
            start = time.perf_counter()
            proc.stdin.write(json.dumps(asdict(arm)) + "\n")
            proc.stdin.flush()
            rec = self._read(proc)
            self.compute_s += time.perf_counter() - start
            log.info("  sdedit %.5f heldout %.5f dW %.4f (%.0f s, %.0f s CPU)", rec["sdedit"], rec["heldout"],
                     rec["dW"], rec["train_s"], rec.get("train_cpu_s", float("nan")))

    def close(self) -> None:
        for proc in self.children.values():
            proc.stdin.close()
            proc.wait()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu_s = usage.ru_utime + usage.ru_stime

    def mean(self, arm: Arm, key: str = "sdedit") -> float:
        """The mean of ``key`` over the seeds measured for ``arm``'s setting."""
        vals = [r[key] for a, r in self.rows.items() if a.setting == arm.setting]
        return statistics.mean(vals) if vals else float("nan")

    def target(self, family: str) -> float:
        full = Arm(family, "full", PAPER["optimizer"], PAPER["lr"], 0, self.cfg.steps[0])
        return self.mean(full)

    def gap(self, arm: Arm, value: float | None = None) -> float:
        base, full = self.base[arm.family]["sdedit"], self.target(arm.family)
        return (base - (self.mean(arm) if value is None else value)) / (base - full)


def plan(runner: Runner, family: str) -> list[Arm]:
    """The staged sweep for one family; returns the finalists (measured on every seed).

    Ordered so that an interrupted run has already measured what matters most; every result is cached.
    """
    cfg = runner.cfg
    first, more, seeds = cfg.steps[0], cfg.steps[1:], cfg.seeds
    full = Arm(family, "full", PAPER["optimizer"], PAPER["lr"], 0, first)
    runner.run([full])
    # 1) lr x optimizer at the current default rank and the paper's step count
    default = Arm(family, "lora", PAPER["optimizer"], PAPER["lr"], 8, first)  # what auto trains on SDXL now
    stage1 = list(dict.fromkeys([Arm(family, "lora", o, lr, 8, first) for o in cfg.optimizers for lr in cfg.lrs]
                                + [default]))
    runner.run(stage1)
    # 2) the other ranks at the best (optimizer, lr) pairs; a pair clearly worse than the best is dropped
    pairs = sorted(stage1, key=runner.mean)
    pairs = [a for a in pairs[:cfg.pairs] if runner.mean(a) <= cfg.prune * runner.mean(pairs[0])]
    stage2 = [replace(a, rank=r) for a in pairs for r in cfg.ranks if r != a.rank]
    runner.run(stage2)
    ranked = sorted(dict.fromkeys(stage1 + stage2), key=runner.mean)
    # 3) the best setting and the best at rank 8 get more steps until they reach the target; the current
    #    default (rank 8 at the paper's recipe) is measured once at the longest step count
    picks = list(dict.fromkeys([ranked[0], min((a for a in ranked if a.rank == 8), key=runner.mean)]))
    finalists = []
    for arm in picks:
        for steps in more:
            if runner.gap(arm) >= 1.0:
                break
            arm = replace(arm, steps=steps)
            runner.run([arm])
        finalists.append(arm)
    if more and runner.gap(default) < 1.0:
        runner.run([replace(default, steps=more[-1])])
        finalists.append(replace(default, steps=more[-1]))
    # 4) the target and the best finalist on the other training seeds
    runner.run([replace(a, seed=s) for a in [full, finalists[0]] for s in seeds])
    return list(dict.fromkeys(finalists))


def confirm(runner: Runner, family: str, settings: list[str]) -> list[Arm]:
    """The target, the current default and the given settings (``[mode@]optimizer:lr:rank:steps``, mode lora
    unless given); then the
    target and the first setting on every seed.

    For the costlier family, once the staged sweep on the cheaper one has found the candidates.
    """
    first = runner.cfg.steps[0]
    full = Arm(family, "full", PAPER["optimizer"], PAPER["lr"], 0, first)
    default = Arm(family, "lora", PAPER["optimizer"], PAPER["lr"], 8, first)
    picks = []
    for text in settings:
        mode, _, rest = text.rpartition("@")  # "attention@adafactor:1e-4:0:128" trains the attention weights
        optimizer, lr, rank, steps = rest.split(":")
        picks.append(Arm(family, mode or "lora", optimizer, float(lr), int(rank), int(steps)))
    runner.run([full, default, *picks])
    runner.run([replace(a, seed=s) for a in [full, *picks[:1]] for s in runner.cfg.seeds])
    return [default, *picks]


def table(runner: Runner, family: str, finalists: list[Arm]) -> str:
    base, full = runner.base[family], runner.target(family)
    lines = [f"\n{family}: base (untuned) sdedit {base['sdedit']:.5f}, heldout {base['heldout']:.5f}; "
             f"target = full adafactor lr 1e-4 {runner.cfg.steps[0]} steps, sdedit {full:.5f} (mean over seeds)",
             "| arm | seed | sdedit | x full | gap closed | heldout | dW attn | trained params | last-16 loss | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, r in sorted(((a, r) for a, r in runner.rows.items() if a.family == family),
                         key=lambda ar: (ar[0].mode, ar[0].optimizer, ar[0].lr, ar[0].rank, ar[0].steps,
                                         ar[0].seed)):
        lines.append(f"| {arm.label()} | {arm.seed} | {r['sdedit']:.5f} | {r['sdedit'] / full:.2f} | "
                     f"{runner.gap(arm, r['sdedit']):.3f} | "
                     f"{r['heldout']:.5f} | {r['dW']:.4f} | {r['trained']:,} | {r['last_loss']:.4f} | "
                     f"{r['train_s']:.1f} |")
    lines += ["", f"{family} over training seeds (mean, min..max of sdedit):",
              "| setting | seeds | sdedit mean | min..max | x full | gap closed | heldout mean | dW attn |",
              "|---|---|---|---|---|---|---|---|"]
    full_arm = Arm(family, "full", PAPER["optimizer"], PAPER["lr"], 0, runner.cfg.steps[0])
    for arm in [full_arm, *finalists]:
        vals = [r["sdedit"] for a, r in runner.rows.items() if a.setting == arm.setting]
        lines.append(f"| {arm.label()} | {len(vals)} | {statistics.mean(vals):.5f} | {min(vals):.5f}..{max(vals):.5f} | "
                     f"{statistics.mean(vals) / full:.2f} | {runner.gap(arm):.3f} | {runner.mean(arm, 'heldout'):.5f} | "
                     f"{runner.mean(arm, 'dW'):.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small check of the whole plan: sd15, 8/16 steps, "
                        "lr 1e-3 and the paper's, ranks 8/16, one seed")
    parser.add_argument("--families", nargs="+", default=["sdxl", "sd15"], choices=["sd15", "sdxl"])
    parser.add_argument("--steps", type=int, nargs="+", default=[128, 256, 512],
                        help="the paper's step count first, then the longer runs tried for finalists")
    parser.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    parser.add_argument("--ranks", type=int, nargs="+", default=[r for r in RANKS if r != 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--pairs", type=int, default=1, help="best (optimizer, lr) pairs whose other ranks are run")
    parser.add_argument("--prune", type=float, default=1.15,
                        help="skip the other ranks of a pair whose sdedit error is above this many times the best")
    parser.add_argument("--confirm", nargs="+", metavar="[MODE@]OPT:LR:RANK:STEPS",
                        help="instead of the staged sweep: the target, the current default and these LoRA settings")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pack-root", type=Path, default=REPO)
    parser.add_argument("--out", type=Path, default=REPO / "build" / "bench" / "unitune_lora_recipe.jsonl")
    parser.add_argument("--fresh", action="store_true", help="ignore cached results")
    parser.add_argument("--report", action="store_true", help="only print the tables of the cached results")
    parser.add_argument("--child", metavar="FAMILY", help=argparse.SUPPRESS)
    cfg = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if cfg.child:
        child(cfg.child, cfg.threads, cfg.pack_root.resolve())
        return
    if cfg.quick:
        cfg.families, cfg.steps, cfg.lrs, cfg.ranks, cfg.seeds = ["sd15"], [8, 16], [1e-3], [16], [0]
        cfg.out = cfg.out.with_name(cfg.out.stem + "_quick.jsonl")
    cfg.pack_root = cfg.pack_root.resolve()
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    runner = Runner(cfg)
    load = os.getloadavg()[0]
    try:
        if cfg.report:
            finalists = {f: sorted({replace(a, seed=0) for a in runner.rows if a.family == f and a.mode == "lora"},
                                   key=runner.mean) for f in cfg.families}
        else:
            finalists = {f: confirm(runner, f, cfg.confirm) if cfg.confirm else plan(runner, f)
                         for f in cfg.families}
    finally:
        runner.close()
    print(f"UniTune LoRA recipe: batch 4, 64x64 subject, caption {TOKEN!r}, fp32 CPU, {cfg.threads} torch thread(s), "
          f"torch {torch.__version__}; pack from {cfg.pack_root}; load average {load:.1f} -> {os.getloadavg()[0]:.1f}; "
          f"this run: {runner.compute_s:.0f} s wall training and measuring, children {runner.cpu_s:.0f} s CPU in all")
    for family in cfg.families:
        print(table(runner, family, finalists[family]))


if __name__ == "__main__":
    main()
