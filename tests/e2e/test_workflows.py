"""Every example workflow in workflows/ runs end to end through the HTTP API (shrunk for tiny models), once on
the fp32 server and once on the half-precision one (UNets in bf16 computing natively in bf16)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageStat

WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "workflows").glob("*.json"))
# Workflows that fail in half precision because of code being reworked elsewhere: stem -> the exact error.
HALF_XFAIL: dict[str, str] = {}
# The half-precision server runs one workflow per capability in `make test` (CI, under 30 min); every other
# workflow's half run is a `long` test (make test-long / test-all). The four together use every FrozenTune
# trainer and sampler node family: Pivotal UniTune (TI + Fine-Tune + Edit), InstantStyle embeds, ControlNet-Zero, TI.
HALF_IN_CI = ("Pivotal UniTune - learn a word then tune and edit (SD1.5)",
              "InstantStyle - style and composition from two images with saved embeds (SDXL)",
              "ControlNet-Zero - train a ControlNet on a folder (SD1.5)",
              "Textual Inversion - learn a word for a subject (SD1.5)")


def half_param(path: Path):
    marks = [pytest.mark.xfail(reason=HALF_XFAIL[path.stem], strict=True)] if path.stem in HALF_XFAIL else []
    if path.stem not in HALF_IN_CI:
        marks.append(pytest.mark.long)
    return pytest.param(path, marks=marks)


def test_there_are_example_workflows():
    assert WORKFLOWS, "workflows/ holds no example workflow"
    missing = set(HALF_IN_CI) - {p.stem for p in WORKFLOWS}
    assert not missing, f"HALF_IN_CI names workflows that are gone (renamed?): {sorted(missing)}"


def run_and_check(srv, path: Path) -> None:
    """Run a workflow; it must succeed and save images that are not blank (a NaN latent saves as one colour)."""
    from harness.server import error_message

    workflow = json.loads(path.read_text())
    entry = srv.run(workflow, timeout=900)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    pngs = srv.output_files(entry)
    assert pngs, "the workflow saved no image"
    for png in pngs:
        with Image.open(png) as img:
            assert img.size[0] > 0
            assert max(ImageStat.Stat(img.convert("RGB")).stddev) > 0, f"{png.name} is one flat colour (NaN?)"
    types = {n["type"] for n in workflow["nodes"]}
    if "FrozenTuneUniTuneSave" in types:
        saved = list((srv.base / "models" / "unitune").glob("*.safetensors"))
        assert saved, "UniTune Save wrote no file into models/unitune/"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_runs_through_http_api(path, comfy_server):
    run_and_check(comfy_server, path)


def test_half_server_computes_natively_in_bf16(comfy_server_half):
    from harness import native_half_node
    from harness.server import NATIVE_HALF_ENV

    assert native_half_node.LOG_LINE in comfy_server_half.log_text(), f"the {NATIVE_HALF_ENV} shim did not run"


@pytest.mark.parametrize("path", [half_param(p) for p in WORKFLOWS], ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_runs_in_half_precision(path, comfy_server_half):
    run_and_check(comfy_server_half, path)
    # ComfyUI logs every UNet it loads: all of them bf16 weights with no manual cast (computed in bf16)
    loaded = comfy_server_half.model_dtypes()
    assert loaded and set(loaded) == {("torch.bfloat16", "None")}, loaded
