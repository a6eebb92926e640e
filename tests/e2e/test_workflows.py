"""Every example workflow in workflows/ runs end to end through the HTTP API (shrunk for tiny models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "workflows").glob("*.json"))


def test_there_are_example_workflows():
    assert WORKFLOWS, "workflows/ holds no example workflow"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_runs_through_http_api(path, comfy_server):
    from harness.server import error_message

    workflow = json.loads(path.read_text())
    entry = comfy_server.run(workflow, timeout=900)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    pngs = comfy_server.output_files(entry)
    assert pngs, "the workflow saved no image"
    for png in pngs:
        with Image.open(png) as img:
            assert img.size[0] > 0
    types = {n["type"] for n in workflow["nodes"]}
    if "FrozenTuneUniTuneSave" in types:
        saved = list((comfy_server.base / "models" / "unitune").glob("*.safetensors"))
        assert saved, "UniTune Save wrote no file into models/unitune/"
