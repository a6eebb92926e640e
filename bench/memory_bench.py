"""Peak training memory against its floor (frozen weights + trainable state), at full size, in the same run.

Each case runs the real trainer entry point (``unitune.finetune.fine_tune``, ``controlnet_zero.training_run.train``)
on a UNet built from ComfyUI's own full-size config (``comfy.model_detection``'s SD1.5 / SDXL lists, matched to
``comfy.supported_models`` by ``model_config_from_unet_config``), random weights, random conditioning of the right
shape (no text encoder or VAE: training never runs them). Counted as on a GPU user's machine: UNet weights stored
in fp16 (what ComfyUI loads SD1.5/SDXL in on CUDA), compute under bf16 autocast (``precision="bf16"``), fp32
trainable state.

Memory is live tensor bytes at peak (``live_bytes.LiveBytes``), the analogue of ``torch.cuda.max_memory_allocated``.
At full size the run is under ``FakeTensorMode`` (shapes only, nothing allocated); ComfyUI's attention is set to
``attention_pytorch`` (SDPA), what it picks on a GPU. The floor is read in the same run from the optimizer the
trainer built (``training.optimizers.make`` is wrapped to see it): frozen weights + fp32 trainable weights + their
gradients + optimizer state. ``--validate`` (the default, tiny and small models) runs each case for real and under
FakeTensorMode in separate processes: tracker peak real vs fake, and the real run's tracker against the process's
measured peak (VmHWM growth) and torch's profiler (``profile_memory``, peak of the cumulative allocations; in a
third process, so the profiler's own memory stays out of VmHWM).

Run from ``tests/``: ``../.venv/bin/python ../bench/memory_bench.py`` (the tracker check, 7-15 minutes
here) or ``../.venv/bin/python ../bench/memory_bench.py --full`` (full-size figures, about 12 minutes; nothing
full-size is allocated).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
import weakref
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # for `harness`, from any cwd
sys.path.insert(0, str(Path(__file__).resolve().parent))
from full_size import build_base, conditioning, latent_shape  # noqa: E402 (bench/ is the script's folder)

MARK = "MEMORY_RESULT "
GIB = 1024 ** 3

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": "float8_e4m3fn"}


@dataclass(frozen=True)
class Case:
    name: str
    trainer: str  # "unitune" | "controlnet_zero"
    model: str  # "sd15" | "sdxl" | "flux1-dev" | "sd3.5-large" | "qwen-image" | "z-image" (full size) | "tiny-sd15" | ...
    size: int  # image pixels (square)
    batch: int
    mode: str = "lora"  # UniTune train mode
    optimizer: str = ""  # "" = the trainer's default
    checkpointing: bool = True
    weights: str = "fp16"  # storage dtype of the frozen UNet ("fp8": e4m3fn, cast to the compute dtype at each use)
    precision: str = "bf16"  # compute dtype (autocast)
    steps: int = 2
    target_gib: float = 0.0
    lora_rank: int = 0  # 0 = the trainer's default


FULL = (
    Case("UniTune SDXL LoRA", "unitune", "sdxl", 1024, 1, "lora", target_gib=8.0),
    Case("UniTune SD1.5 full", "unitune", "sd15", 512, 4, "full", target_gib=10.0),
    Case("ControlNet-Zero SDXL", "controlnet_zero", "sdxl", 1024, 1, optimizer="adamw8bit", target_gib=20.0),
    # issue 22: rank 16 (the issue's case), fp8 weight storage, bf16 compute, checkpointing
    Case("UniTune Flux.1-dev LoRA", "unitune", "flux1-dev", 1024, 1, "lora", weights="fp8", lora_rank=16,
         target_gib=16.0),
    Case("UniTune SD3.5 Large LoRA", "unitune", "sd3.5-large", 1024, 1, "lora", weights="fp8", target_gib=12.0),
    # issue 23: XLabs-layout ControlNet (2 double blocks, the layout's default), fp8 base, 8-bit AdamW, checkpointing
    Case("ControlNet-Zero Flux.1-dev", "controlnet_zero", "flux1-dev", 1024, 1, optimizer="adamw8bit", weights="fp8",
         target_gib=20.0),
    # issue 24: the default LoRA (rank 32), fp8 weight storage, bf16 compute, checkpointing (musubi-tuner documents
    # Qwen-Image LoRA at 1024^2 in 30 GB with an fp8 base, 24 GB only with block swapping)
    Case("UniTune Qwen-Image LoRA", "unitune", "qwen-image", 1024, 1, "lora", weights="fp8", target_gib=24.0),
    Case("UniTune Z-Image LoRA", "unitune", "z-image", 1024, 1, "lora", weights="fp8", target_gib=10.0),
)
# Real runs on this CPU compute in fp32 (bf16 matmuls and convs run ~100x slower here without native
# bf16), with the weights stored in fp16 and cast at each use as in the full-size runs; one case checks
# the bf16 autocast path itself at a size the CPU can do.
VALIDATE = (
    Case("UniTune tiny SD1.5 LoRA", "unitune", "tiny-sd15", 256, 2, "lora", precision="fp32"),
    Case("UniTune tiny SD1.5 full", "unitune", "tiny-sd15", 128, 2, "full", optimizer="adamw", precision="fp32"),
    Case("UniTune tiny SDXL LoRA", "unitune", "tiny-sdxl", 128, 1, "lora", precision="fp32"),
    Case("UniTune tiny SD1.5 LoRA bf16", "unitune", "tiny-sd15", 32, 1, "lora", precision="bf16"),
    Case("ControlNet-Zero tiny SD1.5", "controlnet_zero", "tiny-sd15", 128, 2, optimizer="adamw8bit",
         precision="fp32"),
    Case("UniTune SD1.5 LoRA (full-size UNet)", "unitune", "sd15", 128, 1, "lora", precision="fp32"),
)


def tensor_bytes(t) -> int:
    """Bytes of a tensor's data, including the inner tensors of a wrapper subclass (8-bit optimizer state)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        return sum(tensor_bytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


class Floor:
    """Frozen weight bytes + the trainable state of the optimizer(s) the trainer builds, read after each step."""

    def __init__(self, frozen: int) -> None:
        self.frozen = frozen
        self.optimizers = []
        self.parts = {}

    @contextlib.contextmanager
    def capture(self):
        from frozentune.training import optimizers

        stock = optimizers.make

        def make(*args, **kwargs):
            opt = stock(*args, **kwargs)
            self.optimizers.append(weakref.ref(opt))  # a strong reference would keep its state alive
            return opt

        optimizers.make = make
        try:
            yield self
        finally:
            optimizers.make = stock

    def read(self) -> None:
        import torch

        optimizers = [o for o in (ref() for ref in self.optimizers) if o is not None]
        if not optimizers:
            return
        params = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
        weights = sum(tensor_bytes(p) for p in params)
        # one gradient per trainable weight, same dtype -- unless each parameter steps during backward
        # (training.optimizers.StepInBackward: its hooks free every gradient at once), then no buffer is held
        in_backward = any(getattr(p, "_post_accumulate_grad_hooks", None) for p in params)
        grads = 0 if in_backward else sum(tensor_bytes(p) for p in params)
        state = sum(tensor_bytes(v) for opt in optimizers for s in opt.state.values() for v in s.values()
                    if isinstance(v, torch.Tensor))
        self.parts = dict(frozen=self.frozen, trainable=weights, grads=grads, optimizer_state=max(
            state, self.parts.get("optimizer_state", 0)), trainable_params=sum(p.numel() for p in params),
            optimizer=type(optimizers[-1]).__name__)

    @property
    def total(self) -> int:
        p = self.parts
        return p["frozen"] + p["trainable"] + p["grads"] + p["optimizer_state"]


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _profiler_peak(prof) -> int:
    """Peak of the cumulative CPU allocations the profiler recorded (every alloc/free event, in time order)."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    level = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        level += e.nbytes()
        peak = max(peak, level)
    return peak


def use_sdpa() -> None:
    """ComfyUI's attention as on a GPU (PyTorch SDPA) instead of the CPU's sub-quadratic default."""
    import comfy.ldm.modules.attention as attention

    attention.optimized_attention = attention.attention_pytorch
    attention.optimized_attention_masked = attention.attention_pytorch
    # modules that imported the name already (e.g. comfy.ldm.flux.math) keep their own binding: rebind it
    for name, module in list(sys.modules.items()):
        if name.startswith("comfy.ldm.") and module is not attention:
            for attr in ("optimized_attention", "optimized_attention_masked"):
                if getattr(module, attr, None) in (attention.attention_sub_quad, attention.attention_split,
                                                   attention.attention_basic):
                    setattr(module, attr, attention.attention_pytorch)


def run_case(case: Case, fake: bool, profile: bool) -> dict:
    import torch
    from live_bytes import LiveBytes, fake_mode

    from harness import comfy_env

    comfy_env.import_comfy()
    comfy_env.import_pack()
    use_sdpa()
    dtype = getattr(torch, DTYPES[case.weights])
    compute = getattr(torch, DTYPES[case.precision]) if case.weights == "fp8" else None
    ctx = fake_mode() if fake else contextlib.nullcontext()
    stamps = []
    with ctx:
        with torch.inference_mode(False):
            base, config_name = build_base(case.model, dtype, real=not fake, compute_dtype=compute)
        unet_params = sum(p.numel() for p in base.model.diffusion_model.parameters())
        tracker = LiveBytes(fake_scalars=fake)
        tracker.track_module(base.model)
        floor = Floor(tracker.current)
        gen = torch.Generator().manual_seed(2)
        latent = torch.randn(latent_shape(case.model, case.size), generator=gen)  # 5-D for Qwen-Image
        train = _unitune(case, base, latent) if case.trainer == "unitune" else _controlnet_zero(case, base, latent)

        def on_step(step, total, loss):
            floor.read()
            stamps.append((time.perf_counter(), tracker.peak))

        if not fake:  # warm-up: lazy imports, allocator and oneDNN caches stay out of the measured VmHWM
            train(lambda *a: None, LiveBytes())
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give the freed heap back, or VmHWM would not see it reused
        prof_ctx = contextlib.nullcontext()
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            prof_ctx = torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        start = time.perf_counter()
        Path("/proc/self/clear_refs").write_text("5")
        rss0 = _status("VmRSS")
        with floor.capture(), prof_ctx as prof, tracker:
            tracker.reset_peak()
            start_bytes = tracker.current
            train(on_step, tracker)
        hwm = _status("VmHWM")
    result = dict(case=asdict(case), fake=fake, config=config_name, unet_params=unet_params,
                  start_bytes=start_bytes, peak_bytes=tracker.peak, step_peak_bytes=stamps[-1][1],
                  floor_bytes=floor.total, floor_parts=floor.parts, seconds=time.perf_counter() - start,
                  rss_growth=hwm - rss0, rss_start=rss0, torch=torch.__version__)
    if profile and prof is not None:
        result["profiler_peak_bytes"] = _profiler_peak(prof)
    return result


def _unitune(case: Case, base, latent):
    from frozentune.unitune import finetune

    kw = dict(steps=case.steps, batch_size=case.batch, mode=case.mode, gradient_checkpointing=case.checkpointing,
              precision=case.precision)
    if case.optimizer:
        kw["optimizer"] = case.optimizer
    if case.lora_rank:
        kw["lora_rank"] = case.lora_rank
    settings = finetune.FineTuneSettings(**kw)
    cond = conditioning(case.model)

    def train(on_step, tracker):
        finetune.fine_tune(base, latent, cond, settings, on_step=on_step)

    return train


def _controlnet_zero(case: Case, base, latent):
    import comfy.model_management as mm
    import torch

    from frozentune.controlnet_zero import cache, layouts, network
    from frozentune.controlnet_zero import training_run as trainer

    res = case.size
    hint = (torch.rand(res, res, 3, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8)
    cond, extras = conditioning(case.model)[0]
    from frozentune.training.conditioning import training_conds

    texts = training_conds(base.model, [[cond, extras]], latent, torch.device("cpu"))
    images = cache.Rows(memory={i: {"latent": latent[0].clone(), "hint": hint} for i in range(2)})
    data = cache.TrainingData(images, cache.Rows(memory={0: texts, 1: texts}), torch.tensor([1, 1]), res)
    kw = dict(steps=case.steps, batch_size=case.batch, resolution=res, gradient_checkpointing=case.checkpointing,
              mixed_precision=case.precision)
    if case.optimizer:
        kw["optimizer"] = case.optimizer
    settings = trainer.TrainSettings(**kw)
    mm.load_models_gpu([base], force_full_load=True)
    device = base.load_device
    with torch.inference_mode(False):
        control = network.trainable_copy(layouts.for_model(base.model).create(base.model), device)

    def train(on_step, tracker):
        control.zero_grad(set_to_none=True)  # gradients a warm-up run left would be freed, untracked, inside this one
        tracker.track_module(control)  # the fp32 ControlNet on the device is trainable state (in the floor)
        tracker.reset_peak()
        trainer.train(base.model, control, data, settings, device, on_step=on_step)

    return train


def child(case: Case, fake: bool, profile: bool) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    print(MARK + json.dumps(run_case(case, fake, profile)), flush=True)


def run_child(case: Case, fake: bool, profile: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(asdict(case))] + (["--fake"] if fake else []) + \
        (["--profile"] if profile else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-30:])
    raise RuntimeError(f"{case.name} ({'fake' if fake else 'real'}) failed:\n{tail}")


def gib(n: float) -> str:
    return f"{n / GIB:.3f}"


def describe(r: dict) -> str:
    c = r["case"]
    return (f"{r['config']} diffusion model {r['unet_params'] / 1e6:.1f}M params, {c['size']}x{c['size']} px, batch {c['batch']}, "
            f"{c['mode'] + ' ' if c['trainer'] == 'unitune' else ''}{r['floor_parts']['optimizer']}, "
            f"checkpointing {'on' if c['checkpointing'] else 'off'}, weights {c['weights']}, compute {c['precision']}, "
            f"{r['floor_parts']['trainable_params'] / 1e6:.2f}M trainable")


def report_full(rows: list[dict]) -> None:
    print("\nFull size under FakeTensorMode (live tensor bytes, as torch.cuda.max_memory_allocated counts them):")
    for r in rows:
        c, p = r["case"], r["floor_parts"]
        verdict = "" if not c["target_gib"] else \
            f"; target <= {c['target_gib']:g} GiB: {'met' if r['peak_bytes'] / GIB <= c['target_gib'] else 'NOT met'}"
        print(f"- {c['name']}: measured {gib(r['peak_bytes'])} GiB vs floor {gib(r['floor_bytes'])} GiB "
              f"(ratio {r['peak_bytes'] / r['floor_bytes']:.2f}){verdict}")
        print(f"    {describe(r)}; peak within the steps {gib(r['step_peak_bytes'])} GiB; floor = frozen "
              f"{gib(p['frozen'])} + trainable {gib(p['trainable'])} + grads {gib(p['grads'])} + optimizer state "
              f"{gib(p['optimizer_state'])} GiB; {c['steps']} steps, {r['seconds']:.0f} s")


def report_validation(pairs: list[tuple[dict, dict]]) -> None:
    print("\nTracker check: each case run for real and under FakeTensorMode (growth = peak - live bytes at start):")
    print(f"{'case':<38}{'real tracker':>13}{'fake tracker':>13}{'fake/real':>10}{'VmHWM growth':>14}"
          f"{'profiler':>10}{'tracker/VmHWM':>14}")
    for real, fake in pairs:
        growth = real["peak_bytes"] - real["start_bytes"]
        fgrowth = fake["peak_bytes"] - fake["start_bytes"]
        prof = real.get("profiler_peak_bytes")
        print(f"{real['case']['name']:<38}{growth / 2**20:>10.1f} MiB{fgrowth / 2**20:>9.1f} MiB"
              f"{fgrowth / growth:>10.3f}{real['rss_growth'] / 2**20:>10.1f} MiB"
              f"{(prof or 0) / 2**20:>6.1f} MiB{growth / max(real['rss_growth'], 1):>14.3f}")
        print(f"    {describe(real)}; whole peak real {gib(real['peak_bytes'])} / fake {gib(fake['peak_bytes'])} GiB, "
              f"floor {gib(real['floor_bytes'])} / {gib(fake['floor_bytes'])} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the full-size figures (FakeTensorMode)")
    parser.add_argument("--only", nargs="*", default=None, help="case names (substring) to run")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--no-checkpointing", action="store_true", help="also run the full cases without it")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--fake", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Case(**json.loads(args.child)), args.fake, args.profile)
        return
    cases = FULL if args.full else VALIDATE
    if args.only:
        cases = tuple(c for c in cases if any(s.lower() in c.name.lower() for s in args.only))
    if args.steps:
        cases = tuple(replace(c, steps=args.steps) for c in cases)
    if args.full and args.no_checkpointing:
        cases = cases + tuple(replace(c, name=c.name + " (no checkpointing)", checkpointing=False) for c in cases)
    print(f"memory bench: torch {__import__('torch').__version__}, load average {os.getloadavg()[0]:.1f}", flush=True)
    if args.full:
        rows = []
        for case in cases:
            rows.append(run_child(case, fake=True))
            print(f"  {case.name}: done in {rows[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
        report_full(rows)
        return
    pairs = []
    for case in cases:
        real = run_child(case, fake=False)
        real["profiler_peak_bytes"] = run_child(case, fake=False, profile=True)["profiler_peak_bytes"]
        pairs.append((real, run_child(case, fake=True)))
        print(f"  {case.name}: real {pairs[-1][0]['seconds']:.0f} s, fake {pairs[-1][1]['seconds']:.0f} s",
              file=sys.stderr, flush=True)
    report_validation(pairs)


if __name__ == "__main__":
    main()
