"""ControlNet-Zero end to end: the example workflow over HTTP, and the CLI under a 2-process torchrun (gloo)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from harness import comfy_env, disks

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / "workflows" / "ControlNet-Zero - train a ControlNet on a folder (SD1.5).json"


def test_example_workflow_saves_a_controlnet_the_stock_loader_uses(comfy_server):
    from harness.server import error_message

    entry = comfy_server.run(json.loads(WORKFLOW.read_text()), timeout=900)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    saved = sorted((comfy_server.base / "models" / "controlnet" / "controlnet_zero").glob("disks_demo*.safetensors"))
    assert saved, "ControlNet-Zero Save wrote no file into models/controlnet/"
    listed = comfy_server.object_info()["ControlNetLoader"]["input"]["required"]["control_net_name"][0]
    assert f"controlnet_zero/{saved[-1].name}" in listed
    assert len(comfy_server.output_files(entry)) == 2  # the sample and the loss curve
    assert "could not be applied" not in comfy_server.log_text()


def test_torchrun_two_processes_on_cpu_write_a_loadable_file_and_loss_falls(tmp_path, tiny_checkpoints, caplog):
    import comfy.controlnet

    data = disks.write_folder(tmp_path / "data", count=4, size=64)
    out = tmp_path / "controlnet" / "ddp.safetensors"
    config = tmp_path / "train.toml"
    config.write_text("\n".join([
        f'checkpoint = "{tiny_checkpoints["sd15"]}"', f'dataset = "{data}"', f'output = "{out}"',
        "steps = 4", "batch_size = 1", "resolution = 64", "learning_rate = 1e-3", "prompt_dropout = 0.5",
        "gradient_checkpointing = true", "checkpoint_every = 2", "eval_rows = 4", "log_every = 1",
        'optimizer = "adamw8bit"',  # bitsandbytes' 8-bit state under DDP, saved in the checkpoints
    ]))
    env = dict(os.environ, COMFYUI_DIR=str(comfy_env.comfyui_dir()), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "controlnet_zero.train", "--config", str(config)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "[rank 1]" in log and "rank 1 of 2 (gloo)" in log, log[-4000:]
    assert out.is_file()
    assert (out.parent / "ddp_run" / "checkpoints" / "run_001" / "step_000004" / "state.safetensors").is_file()

    with caplog.at_level(logging.DEBUG):
        loaded = comfy.controlnet.load_controlnet(str(out))
    assert "missing controlnet keys" not in caplog.text and "unexpected controlnet keys" not in caplog.text
    assert type(loaded.control_model).__name__ == "ControlNet"

    record = json.loads((out.parent / "ddp_run" / "losses.json").read_text())
    start, end = float(record["controlnet_zero.eval_loss_start"]), float(record["controlnet_zero.eval_loss_end"])
    logging.getLogger(__name__).warning("torchrun 2x gloo: fixed-draw loss %.4f -> %.4f, step losses %s",
                                        start, end, record["losses"])
    assert record["controlnet_zero.world_size"] == "2" and len(record["losses"]) == 4
    assert record["controlnet_zero.optimizer"] == "adamw8bit"
    assert end < start, (start, end)
