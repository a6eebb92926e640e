"""Train a ControlNet outside the UI: ``python -m controlnet_zero.train --config train.toml`` (or flags).

Run it from the pack's root folder with ComfyUI importable: ``COMFYUI_DIR=/path/to/ComfyUI`` (default:
the pack's pinned ``build/comfyui``). Multi-process: ``torchrun --nproc_per_node N -m controlnet_zero.train
--config train.toml`` (DistributedDataParallel; gloo on the CPU, nccl on GPUs). The output is the same
ControlNet file the ControlNet-Zero Save node writes for the base's family (``layouts``: SD1.5/SDXL ldm,
Flux.1 XLabs, SD3 diffusers, Qwen-Image InstantX); put it in ``models/controlnet/``.

Config (TOML; every key is also a flag, e.g. ``--learning-rate 2e-5``; flags win)::

    checkpoint = "models/checkpoints/v1-5-pruned-emaonly.safetensors"   # the frozen base model, all in one file
    # or, instead of checkpoint, the split files Flux.1, SD3.5 and Qwen-Image ship as (UNETLoader / CLIPLoader /
    # VAELoader's; Qwen-Image: qwen_image_fp8_e4m3fn + qwen_2.5_vl_7b_fp8_scaled + qwen_image_vae):
    # diffusion_model = "models/diffusion_models/flux1-dev.safetensors"
    # weight_dtype = "fp8_e4m3fn"         # UNETLoader's: default, fp8_e4m3fn, fp8_e4m3fn_fast, fp8_e5m2 (either way)
    # text_encoders = ["models/text_encoders/clip_l.safetensors", "models/text_encoders/t5xxl_fp16.safetensors"]
    # vae = "models/vae/ae.safetensors"
    dataset = "data/fill50k"              # images/ + conditioning/ + captions, or a .jsonl manifest
    output = "models/controlnet/my_controlnet.safetensors"
    controlnet = ""                       # optional: a ControlNet file to continue from
    work_dir = ""                         # checkpoints + encoded cache (default: <output>_run/)
    resume = false                        # true: continue the newest matching run in work_dir, or a folder
    steps = 1000
    batch_size = 4                        # per process
    learning_rate = 1e-5
    optimizer = "adamw"                   # or "adamw8bit" (bitsandbytes' 8-bit AdamW state)
    mixed_precision = "auto"              # bf16 autocast on CUDA where supported, else fp16; fp32 on the CPU
    checkpoint_every = 500
    depth = 0                             # Flux.1/SD3: blocks a new ControlNet copies (0: the reference default)
    flux_guidance = 4.0                   # Flux.1 dev: the guidance it trains at (x-flux's ControlNet trainer: 4)

Every flag's help is the node's tooltip for the same setting (``controlnet_zero.texts``). Booleans
read true/false, 1/0, yes/no, on/off; anything else is refused. Paths are used as given: the CLI is
run by the machine's owner, so unlike the node's ``dataset_folder`` they are not confined to ComfyUI's
input folder. Each run's checkpoints go to ``<work_dir>/checkpoints/run_NNN/``; the encoding cache in
``<work_dir>/cache_<resolution>/`` is removed when the run ends.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from .texts import cli_text

log = logging.getLogger("controlnet_zero.train")
PACKAGE = "frozentune"
RUN_KEYS = {"checkpoint": str, "dataset": str, "output": str, "controlnet": str, "work_dir": str, "resume": bool,
            "save_dtype": str, "eval_rows": int, "log_every": int, "depth": int, "layout": str, "flux_guidance": float,
            "diffusion_model": str, "weight_dtype": str, "text_encoders": list, "vae": str}
SPLIT_KEYS = ("diffusion_model", "text_encoders", "vae")  # the base as split files, instead of ``checkpoint``
# UNETLoader's weight_dtype choices -> the load's model_options (nodes.py UNETLoader.load_unet)
WEIGHT_DTYPES = {"default": {}, "fp8_e4m3fn": {"dtype": "float8_e4m3fn"},
                 "fp8_e4m3fn_fast": {"dtype": "float8_e4m3fn", "fp8_optimizations": True},
                 "fp8_e5m2": {"dtype": "float8_e5m2"}}
# The text-encoder type each family's files load as (CLIPLoader / DualCLIPLoader's "type"; comfy.sd.CLIPType names)
CLIP_TYPES = {"sd15": "STABLE_DIFFUSION", "sdxl": "STABLE_DIFFUSION", "flux1": "FLUX", "flux1_schnell": "FLUX",
              "sd3": "SD3", "qwen_image": "QWEN_IMAGE"}
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def boolean(value, name: str) -> bool:
    """``value`` (a TOML bool or a word) as a bool; anything but the usual words is refused."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE or word in FALSE:
        return word in TRUE
    raise ValueError(f"--{name.replace('_', '-')} {value!r} is not a boolean: use one of "
                     f"{'/'.join(TRUE)} or {'/'.join(FALSE)}.")


def resume_value(value) -> bool | Path:
    """``resume``: a boolean, or an existing checkpoint folder (a step_* folder or one holding them)."""
    try:
        return boolean(value, "resume")
    except ValueError:
        if Path(str(value)).expanduser().is_dir():
            return Path(str(value)).expanduser()
        raise ValueError(f"--resume {value!r} is neither a boolean ({'/'.join(TRUE)} or {'/'.join(FALSE)}) nor an "
                         "existing checkpoint folder.") from None


def _argument(convert):
    """An argparse ``type`` that turns the converter's ValueError into argparse's own error (exit code 2)."""
    def parse(value):
        try:
            return convert(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return parse


def _bootstrap():
    """Import the pack as the package ``frozentune`` (as ComfyUI does) with ComfyUI on ``sys.path``.

    The pack root must not stay on ``sys.path``: its ``nodes/`` package would shadow ComfyUI's ``nodes``.
    """
    repo = Path(__file__).resolve().parents[1]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != repo]
    comfy_dir = Path(os.environ.get("COMFYUI_DIR") or repo / "build" / "comfyui").resolve()
    if not (comfy_dir / "comfy" / "model_management.py").is_file():
        raise SystemExit(f"ComfyUI not found at {comfy_dir}: set COMFYUI_DIR to your ComfyUI folder "
                         "(or run `make setup` for the pinned copy).")
    sys.path.insert(0, str(comfy_dir))
    if "comfy.model_management" not in sys.modules:
        import torch
        from comfy.cli_args import args

        args.cpu = not torch.cuda.is_available()
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, repo / "__init__.py",
                                                      submodule_search_locations=[str(repo)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{PACKAGE}.controlnet_zero.train")


def _settings_fields() -> dict[str, type]:
    from .training_run import TrainSettings

    return {f.name: type(f.default) for f in dataclasses.fields(TrainSettings)}


def _parser(fields: dict[str, type]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m controlnet_zero.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, help=cli_text("config"))
    for name, kind in {**RUN_KEYS, **fields}.items():
        flag = "--" + name.replace("_", "-")
        if name == "resume":
            p.add_argument(flag, type=_argument(resume_value), metavar="BOOL|FOLDER", help=cli_text(name))
        elif kind is bool:
            p.add_argument(flag, type=_argument(lambda v, name=name: boolean(v, name)), metavar="BOOL",
                           help=cli_text(name))
        elif kind is list:
            p.add_argument(flag, nargs="+", metavar="FILE", help=cli_text(name))
        elif name == "weight_dtype":
            p.add_argument(flag, choices=list(WEIGHT_DTYPES), help=cli_text(name))
        else:
            p.add_argument(flag, type=kind, help=cli_text(name))
    return p


def _read_config(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    with open(path, "rb") as f:
        data = tomllib.load(f)
    return {**{k: v for k, v in data.items() if not isinstance(v, dict)}, **data.get("train", {})}


def options(argv: list[str] | None = None) -> tuple[dict, object]:
    """(run options, TrainSettings) from the config file and flags."""
    from .training_run import TrainSettings

    fields = _settings_fields()
    args = _parser(fields).parse_args(argv)
    merged = _read_config(args.config)
    unknown = sorted(set(merged) - set(RUN_KEYS) - set(fields))
    if unknown:
        raise SystemExit(f"unknown setting(s) in {args.config}: {', '.join(unknown)}; known: "
                         f"{', '.join(sorted({**RUN_KEYS, **fields}))}")
    merged.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    try:  # the config file's values are checked as the flags are
        for key, kind in fields.items():
            if kind is bool and key in merged:
                merged[key] = boolean(merged[key], key)
        if "resume" in merged:
            merged["resume"] = resume_value(merged["resume"])
    except ValueError as error:
        raise SystemExit(str(error)) from None
    base_source(merged)
    for key in ("dataset", "output"):
        if not merged.get(key):
            raise SystemExit(f"missing setting {key!r}: give it in the config file or as --{key}")
    from .controlnet_file import check_stem

    try:
        check_stem(Path(merged["output"]))  # before training, not after it
    except ValueError as error:
        raise SystemExit(f"output: {error}") from None
    settings = TrainSettings(**{k: merged[k] for k in fields if k in merged})
    settings.check()
    return merged, settings


def base_source(merged: dict) -> None:
    """Check the base model is given one way: ``checkpoint``, or ``diffusion_model`` + ``text_encoders`` + ``vae``.

    Normalises ``text_encoders`` to a list of paths (a TOML string is one file) and checks ``weight_dtype``;
    anything else stops with the keys named, before any file is read.
    """
    encoders = merged.get("text_encoders")
    if isinstance(encoders, str):
        encoders = [encoders]
    if encoders is not None:
        if not isinstance(encoders, list) or not all(isinstance(e, str) and e for e in encoders):
            raise SystemExit(f"text_encoders must be a list of text-encoder files, not {encoders!r}")
        merged["text_encoders"] = encoders
    dtype = merged.get("weight_dtype") or "default"
    if dtype not in WEIGHT_DTYPES:
        raise SystemExit(f"weight_dtype {dtype!r} is unknown: use one of {', '.join(WEIGHT_DTYPES)} "
                         "(UNETLoader's choices).")
    split = [k for k in SPLIT_KEYS if merged.get(k)]
    how = ("give the base model either as checkpoint (one file with the model, text encoders and VAE) or as "
           "diffusion_model + text_encoders + vae (the split files Flux.1, SD3.5 and Qwen-Image ship as)")
    if merged.get("checkpoint"):
        if split:
            raise SystemExit(f"checkpoint and {' + '.join(split)} are both set: {how}, not both.")
        return
    if not split:
        raise SystemExit(f"missing setting 'checkpoint': {how}; in the config file or as --checkpoint, or "
                         "--diffusion-model, --text-encoders and --vae.")
    if len(split) < len(SPLIT_KEYS):
        missing = [k for k in SPLIT_KEYS if k not in split]
        raise SystemExit(f"{' + '.join(split)} set without {' and '.join(missing)}: {how}.")


def load_base(opts: dict):
    """(MODEL, CLIP, VAE, base file name) from ``checkpoint`` or from the split files, as ComfyUI's loaders read them.

    Split files load as UNETLoader (``weight_dtype``), CLIPLoader/DualCLIPLoader/TripleCLIPLoader (with the
    diffusion model's family's text-encoder type: Flux.1 FLUX, SD3/SD3.5 SD3) and VAELoader do.
    """
    import comfy.sd
    import comfy.utils
    import torch

    from .. import families

    options = {k: getattr(torch, v) if k == "dtype" else v
               for k, v in WEIGHT_DTYPES[opts.get("weight_dtype") or "default"].items()}
    if opts.get("checkpoint"):
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(opts["checkpoint"], output_vae=True,
                                                                      output_clip=True, model_options=options)
        return model, clip, vae, Path(opts["checkpoint"]).name
    model = comfy.sd.load_diffusion_model(opts["diffusion_model"], model_options=options)
    family = families.family_of(model.model)
    if family.id not in CLIP_TYPES:
        raise ValueError(f"diffusion_model {opts['diffusion_model']} is a {family.label} model, which ControlNet-Zero "
                         f"does not train (supported: {', '.join(families.FAMILIES[f].label for f in CLIP_TYPES)}).")
    clip_type = getattr(comfy.sd.CLIPType, CLIP_TYPES[family.id])
    clip = comfy.sd.load_clip([str(p) for p in opts["text_encoders"]], clip_type=clip_type)
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(opts["vae"])))
    vae.throw_exception_if_invalid()
    return model, clip, vae, Path(opts["diffusion_model"]).name


def load_controlnet_file(path: Path, base_model):
    """A ControlNet module for ``base_model`` from a file in one of its family's layouts (``layouts.load_file``)."""
    from ..storage import safetensors_file as weights_file
    from . import layouts

    tensors, _ = weights_file.load(path)
    weights_file.check_finite(tensors, f"ControlNet file {path}")
    try:
        return layouts.load_file(tensors, base_model)
    except ValueError as error:  # the layouts say "not a ..." / "does not match ..." of the file
        text = str(error)
        joined = f"{path} is {text}" if text.startswith("not ") else f"{path} {text}" if text.startswith("does ") \
            else f"{path}: {text}"
        raise ValueError(joined) from None


def run(opts: dict, settings) -> Path | None:
    """Encode, train, save; returns the written file on rank 0."""
    import gc

    import comfy.model_management as mm
    import torch

    from . import cache, controlnet_file, dataset, distributed, flux_xlabs, layouts, network, training_run

    dist = distributed.from_environment()
    cache_dir = None
    try:
        output = Path(opts["output"]).resolve()
        work = Path(opts.get("work_dir") or output.with_name(output.stem + "_run")).resolve()
        cache_dir = work / f"cache_{settings.resolution}"
        pairs = dataset.scan_folder(opts["dataset"])  # not confined: the CLI is run by the machine's owner
        model, clip, vae, base_name = load_base(opts)
        # the ControlNet first: a file of another model family fails before the slow encoding
        layout = layouts.for_model(model.model, opts.get("layout"))
        if opts.get("controlnet"):
            start = load_controlnet_file(Path(opts["controlnet"]), model.model)
            layout = layouts.for_module(start)  # the file's layout (Flux.1: XLabs' or InstantX's)
        else:
            start = layout.create(model.model, torch.Generator().manual_seed(settings.seed),
                                  depth=int(opts.get("depth") or 0))
        guidance = training_run.training_guidance(model.model, float(opts.get("flux_guidance",
                                                                             flux_xlabs.TRAIN_GUIDANCE)))
        with torch.inference_mode(False):
            data = cache.encode(cache.Source.from_pairs(pairs, settings.resolution), model.model, vae, clip,
                                settings.resolution, cache_dir=cache_dir, dist=dist, guidance=guidance,
                                hint_input=layout.hint_input)
        del clip, vae
        gc.collect()
        mm.load_models_gpu([model], force_full_load=True)
        device = model.load_device
        control_model = network.trainable_copy(start, device)
        del start
        eval_rows = list(range(min(int(opts.get("eval_rows", 8)), len(data))))
        before = training_run.evaluate(model.model, control_model, data, device, eval_rows) if eval_rows else None
        every = int(opts.get("log_every", 10))

        def on_step(step: int, total: int, loss: float) -> None:
            if dist.is_main and (step == 1 or step % every == 0 or step == total):
                log.info("step %d/%d loss %.5f", step, total, loss)

        meta = {"controlnet_zero.base_checkpoint": base_name,
                **training_run.guidance_metadata(guidance)}
        if hasattr(layout, "depth_of"):
            meta["controlnet_zero.depth"] = str(layout.depth_of(control_model))
        result = training_run.train(model.model, control_model, data, settings, device,
                               checkpoint_root=work / "checkpoints", resume=resume_value(opts.get("resume", False)),
                               dist=dist, metadata=meta, on_step=on_step, run_folders=True)
        if eval_rows:
            after = training_run.evaluate(model.model, control_model, data, device, eval_rows)
            result.metadata.update({"controlnet_zero.eval_loss_start": f"{before:.6g}",
                                    "controlnet_zero.eval_loss_end": f"{after:.6g}"})
            log.info("fixed-draw loss on %d training pairs: %.5f -> %.5f", len(eval_rows), before, after)
        if dist.is_main:
            controlnet_file.save(output, result.control_model, result.metadata, opts.get("save_dtype", "fp32"))
            (work / "losses.json").parent.mkdir(parents=True, exist_ok=True)
            (work / "losses.json").write_text(json.dumps({"losses": result.losses, **result.metadata}))
            log.info("saved %s (%d steps)", output, result.step)
        dist.barrier()
        return output if dist.is_main else None
    finally:
        if cache_dir is not None and dist.is_main:  # the cache is not reused: removed after the run
            shutil.rmtree(cache_dir, ignore_errors=True)
        dist.close()


def main(argv: list[str] | None = None) -> int:
    if __package__ != f"{PACKAGE}.controlnet_zero":
        return _bootstrap().main(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(asctime)s %(name)s: %(message)s")
    try:
        opts, settings = options(argv)
        run(opts, settings)
    except ValueError as err:  # bad input: say what and how to fix it, no traceback
        log.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
