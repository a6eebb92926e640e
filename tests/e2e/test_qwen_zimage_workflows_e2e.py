"""The UniTune Edit example workflows on Qwen-Image and Z-Image Turbo over HTTP (issue 24), beyond "it runs"
(test_workflows): the stock loader nodes read the stand-ins under the template names as the right family, the
saved widget values land on the inputs they are meant for, and the edit is two images of the input's size plus
a loss curve. The stand-ins (harness.tiny_stand_ins2) load through the test-only shims of tiny_dit_node."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from harness.server import TINY_RUN_OVERRIDES, error_message

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
QWEN = WORKFLOWS / "UniTune - edit a photo with a prompt (Qwen-Image).json"
ZIMAGE = WORKFLOWS / "UniTune - edit a photo with a prompt (Z-Image Turbo).json"
# workflow -> (CLIPLoader file and type, the model class ComfyUI logs loading (Z-Image's is Lumina2's), Edit's cfg / sampler / steps, AuraFlow shift)
EXPECTED = {
    QWEN: (("qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_image"), "QwenImage", (2.5, "euler", 20), 3.1),
    ZIMAGE: (("qwen_3_4b.safetensors", "lumina2"), "Lumina2", (1.0, "res_multistep", 9), 3.0),
}


@pytest.mark.parametrize("path", list(EXPECTED), ids=lambda p: p.stem.rsplit("(", 1)[-1].rstrip(")"))
def test_unitune_edit_workflow_runs_on_the_family_stand_ins(comfy_server, path):
    (clip_file, clip_type), model_class, (cfg, sampler, steps), shift = EXPECTED[path]
    workflow = json.loads(path.read_text())
    api = {n["class_type"]: n["inputs"] for n in comfy_server.to_api(workflow).values()}
    assert (api["CLIPLoader"]["clip_name"], api["CLIPLoader"]["type"]) == (clip_file, clip_type)
    assert api["ModelSamplingAuraFlow"]["shift"] == shift
    edit = api["FrozenTuneUniTuneEdit"]
    assert (edit["cfg"], edit["sampler_name"], edit["steps"], edit["pg"]) == (cfg, sampler, steps, 2.0)
    assert (edit["start"], edit["batch"], edit["blend_unchanged"]) == (0.9, 2, 0.3)
    tune = api["FrozenTuneUniTuneFineTune"]
    assert (tune["train"], tune["gradient_checkpointing"]) == ("auto", True)

    before = len(comfy_server.log_text())
    entry = comfy_server.run(workflow, timeout=900)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    log = comfy_server.log_text()[before:]
    # the diffusion model came through the stock UNETLoader whole, as the family's model class
    assert f"Requested to load {model_class}" in log
    assert "unet missing" not in log and "unet unexpected" not in log
    files = comfy_server.output_files(entry)
    edits = [f for f in files if f.name.startswith("edit")]
    losses = [f for f in files if f.name.startswith("loss")]
    assert len(edits) == 2 and len(losses) == 1, files
    side = TINY_RUN_OVERRIDES["ImageScale"]["width"]
    for png in edits:
        with Image.open(png) as img:
            assert img.size == (side, side)
            assert max(ImageStat.Stat(img.convert("RGB")).stddev) > 0, "one flat colour (NaN?)"

