"""The ControlNet-Zero CLI (``python -m controlnet_zero.train``) on split base files, as Flux.1 and SD3.5 ship (issue 23).

``diffusion_model`` (+ ``weight_dtype``, UNETLoader's) + ``text_encoders`` + ``vae`` instead of ``checkpoint``:
the settings are checked before anything loads; a run on the tiny Flux.1 dev writes an XLabs-layout file the stock
``ControlNetLoader`` reads whole (under the tiny-Flux shape shim, ``harness.cli_runner_dit``); resuming from the
run's checkpoint gives the weights of one uninterrupted run; ``torchrun --nproc_per_node 2`` (gloo, CPU) trains
the tiny Flux in either layout (XLabs', InstantX's) through the shim-installing runner.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness import comfy_env, disks

R = 64  # image / hint size: 8x8 latents, 4x4 Flux tokens
REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "tests" / "harness" / "cli_runner_dit.py"
log = logging.getLogger(__name__)


# --- the settings ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_module():
    comfy_env.import_pack()
    from frozentune.controlnet_zero import train

    return train


def config(tmp_path, *lines: str) -> Path:
    path = tmp_path / "train.toml"
    path.write_text("\n".join(['dataset = "set"', 'output = "out/cn.safetensors"', *lines]))
    return path


SPLIT = ['diffusion_model = "flux1-dev.safetensors"', 'text_encoders = ["clip_l.safetensors", "t5xxl.safetensors"]',
         'vae = "ae.safetensors"']


def test_split_files_from_toml_and_flags(train_module, tmp_path):
    opts, _ = train_module.options(["--config", str(config(tmp_path, *SPLIT, 'weight_dtype = "fp8_e4m3fn"'))])
    assert opts["text_encoders"] == ["clip_l.safetensors", "t5xxl.safetensors"]
    assert (opts["diffusion_model"], opts["vae"], opts["weight_dtype"]) == ("flux1-dev.safetensors", "ae.safetensors",
                                                                          "fp8_e4m3fn")
    opts, _ = train_module.options(["--config", str(config(tmp_path)), "--diffusion-model", "sd3.5.safetensors",
                                    "--text-encoders", "l.safetensors", "g.safetensors", "t5.safetensors",
                                    "--vae", "v.safetensors"])
    assert opts["text_encoders"] == ["l.safetensors", "g.safetensors", "t5.safetensors"]
    opts, _ = train_module.options(["--config", str(config(tmp_path, *SPLIT[:1], 'text_encoders = "one.safetensors"',
                                                           *SPLIT[2:]))])
    assert opts["text_encoders"] == ["one.safetensors"]  # one file may be a plain string


@pytest.mark.parametrize("lines, message", [
    ([], r"missing setting 'checkpoint': give the base model either as checkpoint .* or as "
         r"diffusion_model \+ text_encoders \+ vae"),
    (['checkpoint = "sd15.safetensors"', SPLIT[2]], r"checkpoint and vae are both set: give the base model either"),
    (['checkpoint = "sd15.safetensors"', *SPLIT], r"checkpoint and diffusion_model \+ text_encoders \+ vae are both set"),
    (SPLIT[:1], r"diffusion_model set without text_encoders and vae: give the base model either as checkpoint"),
    (SPLIT[:2], r"diffusion_model \+ text_encoders set without vae"),
    (SPLIT[1:], r"text_encoders \+ vae set without diffusion_model"),
    ([*SPLIT, 'weight_dtype = "fp4"'], r"weight_dtype 'fp4' is unknown: use one of default, fp8_e4m3fn, "
                                       r"fp8_e4m3fn_fast, fp8_e5m2"),
    ([SPLIT[0], "text_encoders = [1, 2]", SPLIT[2]], r"text_encoders must be a list of text-encoder files"),
])
def test_the_base_is_given_one_way_or_refused_naming_the_keys(train_module, tmp_path, lines, message):
    with pytest.raises(SystemExit, match=message):
        train_module.options(["--config", str(config(tmp_path, *lines))])


def test_weight_dtype_flag_offers_unetloaders_choices(train_module, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train_module.options(["--config", str(config(tmp_path, *SPLIT)), "--weight-dtype", "fp4"])
    assert stop.value.code == 2 and "fp8_e4m3fn_fast" in capsys.readouterr().err


# --- runs on the tiny DiTs ---------------------------------------------------------------------------

@pytest.fixture()
def shims(tiny_dit, pack):
    """The tiny DiTs' detection shim (``tiny_dit``) and text-encoder shim, as the CLI runner installs them."""
    from harness import tiny_dits

    had = tiny_dits.uninstall_text_encoder_shim()
    tiny_dits.install_text_encoder_shim()
    yield tiny_dits
    if not had:
        tiny_dits.uninstall_text_encoder_shim()


def split_files(tiny_dits, family: str) -> dict:
    return {"diffusion_model": str(tiny_dits.diffusion_model_path(family)), "vae": str(tiny_dits.vae_path()),
            "text_encoders": [str(tiny_dits.text_encoder_path(n)) for n in tiny_dits.RECIPES[family].text_encoders]}


def stock_load(path: Path, caplog):
    """The file through the stock loader (``comfy.controlnet.load_controlnet``, what ControlNetLoader calls), with
    the tiny-Flux shape shim; fails on any key the loader leaves missing or unexpected."""
    import comfy.controlnet
    import safetensors

    from harness.tiny_dits import flux_controlnet_detection

    caplog.clear()
    with flux_controlnet_detection(), caplog.at_level(logging.DEBUG):
        loaded = comfy.controlnet.load_controlnet(str(path))
    assert loaded is not None
    assert "missing controlnet keys" not in caplog.text and "unexpected controlnet keys" not in caplog.text, caplog.text
    with safetensors.safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    return loaded, keys, meta


def flux_settings(steps: int):
    from frozentune.controlnet_zero import training_run

    return training_run.TrainSettings(steps=steps, batch_size=2, resolution=R, learning_rate=1e-3, prompt_dropout=0.5,
                                       checkpoint_every=1, mixed_precision="fp32", gradient_checkpointing=False, seed=3)


def test_flux_split_files_train_a_file_the_stock_loader_reads_and_resume_continues_exactly(shims, tmp_path, caplog):
    import safetensors.torch

    from frozentune.controlnet_zero import train, training_run

    data = disks.write_folder(tmp_path / "data", count=4, size=R)
    base = {**split_files(shims, "flux1"), "dataset": str(data), "eval_rows": 0, "resume": False}
    start = time.perf_counter()
    interrupted = tmp_path / "cn" / "interrupted.safetensors"
    work = tmp_path / "work"
    assert train.run({**base, "output": str(interrupted), "work_dir": str(work)}, flux_settings(2)) \
        == interrupted.resolve()
    first = time.perf_counter() - start

    loaded, keys, meta = stock_load(interrupted, caplog)
    module = loaded.control_model
    assert type(module).__name__ == "ControlNetFlux" and not module.latent_input
    assert keys == set(module.state_dict()), "the stock loader left keys missing or unexpected"
    assert meta["controlnet_zero.base_checkpoint"] == Path(base["diffusion_model"]).name
    assert meta["controlnet_zero.depth"] == "2" and meta[training_run.GUIDANCE_KEY] == "4"
    written = safetensors.torch.load_file(str(interrupted))
    assert written["controlnet_blocks.0.weight"].any(), "the zero-initialized blocks did not train"

    resumed = tmp_path / "cn" / "resumed.safetensors"
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train.run({**base, "output": str(resumed), "work_dir": str(work), "resume": True}, flux_settings(3))
    assert "resumed from" in caplog.text and "at step 2" in caplog.text, caplog.text
    straight = tmp_path / "cn" / "straight.safetensors"
    train.run({**base, "output": str(straight)}, flux_settings(3))
    a, b = safetensors.torch.load_file(str(resumed)), safetensors.torch.load_file(str(straight))
    assert a.keys() == b.keys() == written.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    assert not torch.equal(a["controlnet_blocks.0.weight"], written["controlnet_blocks.0.weight"])
    record = json.loads((work / "losses.json").read_text())
    assert len(record["losses"]) == 3 and record["controlnet_zero.steps_done"] == "3"
    log.warning("CLI on tiny Flux split files: first 2-step run %.1f s, whole test %.1f s",
                first, time.perf_counter() - start)


def test_sd3_split_files_train_a_diffusers_layout_file_the_stock_loader_reads(shims, tmp_path, caplog):
    from frozentune.controlnet_zero import train, training_run

    data = disks.write_folder(tmp_path / "data", count=2, size=R)
    out = tmp_path / "cn" / "sd3.safetensors"
    opts = {**split_files(shims, "sd3"), "dataset": str(data), "output": str(out), "eval_rows": 0, "depth": 1}
    settings = training_run.TrainSettings(steps=1, batch_size=1, resolution=R, learning_rate=1e-3,
                                          mixed_precision="fp32", gradient_checkpointing=False)
    train.run(opts, settings)
    loaded, keys, meta = stock_load(out, caplog)
    assert len(loaded.control_model.joint_blocks) == 1 and "controlnet_blocks.0.weight" in keys
    assert meta["controlnet_zero.base_checkpoint"] == Path(opts["diffusion_model"]).name


@pytest.mark.half  # the base stored in fp8 (a 1-step run, ~2 s)
def test_weight_dtype_stores_the_flux_base_in_fp8(shims, tmp_path, monkeypatch):
    from frozentune.controlnet_zero import train, training_run

    seen = {}
    plain = train.load_base

    def spy(opts):
        model, clip, vae, name = plain(opts)
        seen["dtypes"] = {p.dtype for p in model.model.diffusion_model.double_blocks.parameters()}
        return model, clip, vae, name

    monkeypatch.setattr(train, "load_base", spy)
    data = disks.write_folder(tmp_path / "data", count=2, size=R)
    out = tmp_path / "cn" / "fp8.safetensors"
    opts = {**split_files(shims, "flux1"), "weight_dtype": "fp8_e4m3fn", "dataset": str(data), "output": str(out),
            "eval_rows": 0}
    train.run(opts, training_run.TrainSettings(steps=1, batch_size=1, resolution=R, mixed_precision="fp32",
                                               gradient_checkpointing=False))
    assert seen["dtypes"] == {torch.float8_e4m3fn}
    assert out.is_file()


@pytest.mark.slow  # torchrun, 2 gloo processes on the CPU, tiny Flux: ~10 s a layout on 2 idle cores (29 s busy)
@pytest.mark.parametrize("layout", ["flux_xlabs", "flux_instantx"])
def test_torchrun_two_processes_train_the_tiny_flux_from_split_files(layout, shims, tmp_path, caplog):
    """Either Flux.1 layout (XLabs' pixel hints; InstantX's latent hints, each rank encoding its share through the
    VAE) trains under DDP into a file the stock loader reads whole."""
    files = split_files(shims, "flux1")
    data = disks.write_folder(tmp_path / "data", count=4, size=R)
    out = tmp_path / "controlnet" / "ddp_flux.safetensors"
    cfg = tmp_path / "train.toml"
    cfg.write_text("\n".join([
        f'diffusion_model = "{files["diffusion_model"]}"', f"text_encoders = {json.dumps(files['text_encoders'])}",
        f'vae = "{files["vae"]}"', f'dataset = "{data}"', f'output = "{out}"', f'layout = "{layout}"',
        "steps = 2", "batch_size = 1", "resolution = 64", "learning_rate = 1e-3", "prompt_dropout = 0.5",
        "gradient_checkpointing = true", "checkpoint_every = 2", "eval_rows = 2", "log_every = 1",
        'mixed_precision = "fp32"',
    ]))
    env = dict(os.environ, COMFYUI_DIR=str(comfy_env.comfyui_dir()), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(RUNNER),
           "--config", str(cfg)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "rank 1 of 2 (gloo)" in text and "[rank 0]" in text, text[-4000:]
    assert "step 2/2 loss" in text, text[-4000:]
    assert (out.parent / "ddp_flux_run" / "checkpoints" / "run_001" / "step_000002" / "state.safetensors").is_file()

    from frozentune.controlnet_zero import layouts

    loaded, keys, meta = stock_load(out, caplog)
    assert layouts.for_module(loaded.control_model).NAME == layout, "the file is not in the layout asked for"
    if layout == "flux_xlabs":  # XLabs' file keys are the module's own names
        assert keys == set(loaded.control_model.state_dict())
    else:  # diffusers' names, which the stock loader converts
        assert "controlnet_x_embedder.weight" in keys and loaded.control_model.latent_input
    record = json.loads((out.parent / "ddp_flux_run" / "losses.json").read_text())
    assert record["controlnet_zero.world_size"] == "2" and len(record["losses"]) == 2
    assert all(math.isfinite(v) for v in record["losses"]), record["losses"]
    assert meta["controlnet_zero.world_size"] == "2"
    start, end = float(record["controlnet_zero.eval_loss_start"]), float(record["controlnet_zero.eval_loss_end"])
    assert end < start, (start, end)
    log.warning("torchrun 2x gloo, tiny Flux split files, %s layout: %.1f s, step losses %s, fixed-draw loss %s -> %s",
                layout, seconds, record["losses"], record["controlnet_zero.eval_loss_start"],
                record["controlnet_zero.eval_loss_end"])
