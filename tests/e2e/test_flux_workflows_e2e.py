"""The Flux.1 dev ControlNet-Zero and InstantStyle example workflows over HTTP, beyond "it runs" (test_workflows):
the trained ControlNet is an XLabs-layout file the stock loader reads whole, and the IP-Adapter visibly acts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
CONTROLNET = REPO / "workflows" / "ControlNet-Zero - train a ControlNet on a folder (Flux.1 dev).json"
INSTANTSTYLE = REPO / "workflows" / "InstantStyle - style transfer from an image (Flux.1 dev).json"


def run_ok(srv, workflow: dict) -> dict:
    from harness.server import error_message

    entry = srv.run(workflow, timeout=900)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    return entry


def pixels(srv, entry: dict) -> np.ndarray:
    (png,) = srv.output_files(entry)
    with Image.open(png) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def tiny_width_detection(monkeypatch) -> None:
    """What the server's tiny_dit_node shim does for ControlNetLoader, in this process: Flux detection fixes 24
    heads of 128, so a Flux state dict of the tiny width gets the tiny heads and RoPE axes."""
    import comfy.model_detection as md

    from harness.tiny_dits import RECIPES

    tiny, stock = RECIPES["flux1"].unet, md.detect_unet_config

    def detect_unet_config(state_dict, key_prefix, metadata=None):
        cfg = stock(state_dict, key_prefix, metadata=metadata)
        if cfg and cfg.get("image_model") == "flux" and cfg.get("hidden_size") == tiny["hidden_size"]:
            cfg = {**cfg, "num_heads": tiny["num_heads"], "axes_dim": list(tiny["axes_dim"])}
        return cfg

    monkeypatch.setattr(md, "detect_unet_config", detect_unet_config)


def test_flux_controlnet_workflow_saves_an_xlabs_controlnet_the_stock_loader_reads(comfy_server, caplog, monkeypatch):
    import comfy.controlnet
    import safetensors

    workflow = json.loads(CONTROLNET.read_text())
    # the saved widget values land on the inputs they are meant for (seed's control_after_generate companion)
    api = {n["class_type"]: n["inputs"] for n in comfy_server.to_api(workflow).values()}
    assert api["FrozenTuneControlNetZeroCreate"]["depth"] == 2 and api["FrozenTuneControlNetZeroCreate"]["seed"] == 0
    train = api["FrozenTuneControlNetZeroTrain"]
    assert (train["optimizer"], train["flux_guidance"], train["dataset_folder"]) == ("adamw8bit", 4.0,
                                                                                      "controlnet_zero_disks")
    entry = run_ok(comfy_server, workflow)
    saved = comfy_server.base / "models" / "controlnet" / "controlnet_zero" / "disks_flux_demo.safetensors"
    assert saved.is_file(), "ControlNet-Zero Save wrote no file into models/controlnet/controlnet_zero/"
    listed = comfy_server.object_info()["ControlNetLoader"]["input"]["required"]["control_net_name"][0]
    assert "controlnet_zero/disks_flux_demo.safetensors" in listed
    assert len(comfy_server.output_files(entry)) == 2  # the sample and the loss curve
    assert "could not be applied" not in comfy_server.log_text()

    tiny_width_detection(monkeypatch)
    with caplog.at_level(logging.DEBUG):
        loaded = comfy.controlnet.load_controlnet(str(saved))
    assert "missing controlnet keys" not in caplog.text and "unexpected controlnet keys" not in caplog.text
    assert type(loaded.control_model).__name__ == "ControlNetFlux" and not loaded.control_model.latent_input
    with safetensors.safe_open(str(saved), framework="pt") as f:
        assert set(f.keys()) == set(loaded.control_model.state_dict())  # XLabs' keys, every one consumed
    assert len(loaded.control_model.double_blocks) == 2  # Create's depth 2, as in the workflow


def test_flux_instantstyle_workflow_changes_the_sample_against_the_plain_model(comfy_server):
    workflow = json.loads(INSTANTSTYLE.read_text())
    styled = pixels(comfy_server, run_ok(comfy_server, workflow))
    assert "Flux IP-Adapter:" in comfy_server.log_text()  # the loader logs what it detected

    # the same graph with KSampler's model taken straight from Load Diffusion Model (InstantStyle left out)
    nodes = {n["type"]: n for n in workflow["nodes"]}
    sampler, unet = nodes["KSampler"]["id"], nodes["UNETLoader"]["id"]
    (link,) = [lk for lk in workflow["links"] if lk[3] == sampler and lk[5] == "MODEL"]
    link[1], link[2] = unet, 0
    plain = pixels(comfy_server, run_ok(comfy_server, workflow))
    assert np.abs(styled - plain).max() > 0, "the Flux IP-Adapter did not change the sample"
