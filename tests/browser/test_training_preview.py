"""A training node shows its progress and a preview image in the page while it trains (ControlNet-Zero Train,
preview_every=2): the previews reach the page for that node at steps 2 and 4 only, and decode as images."""

from __future__ import annotations

import json
from pathlib import Path

from harness.comfy_env import PACK_NAME
from harness.server import TINY_RUN_OVERRIDES, error_message

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "out" / "browser"
TRAIN_NODE = "FrozenTuneControlNetZeroTrain"
STEPS, EVERY = 4, 2
OVERRIDES = {**TINY_RUN_OVERRIDES, "KSampler": {"steps": 2},
             TRAIN_NODE: {"steps": STEPS, "batch_size": 1, "resolution": 64, "checkpoint_every": 0,
                          "preview_every": EVERY}}
# Every preview the page receives ("b_preview_with_metadata", as a sampler's), with the node's progress then,
# and whether the image decodes.
RECORD_JS = """(nodeId) => {
  window.__previews = [];
  window.__done = false;  // the prompt ended (success or error): stop waiting for a preview
  for (const ev of ['execution_success', 'execution_error', 'execution_interrupted'])
    window.comfyAPI.api.api.addEventListener(ev, () => { window.__done = true; });
  window.comfyAPI.api.api.addEventListener('b_preview_with_metadata', ({ detail }) => {
    const entry = { node: String(detail.displayNodeId), running: String(window.app.runningNodeId),
                    value: window.app.progress?.value, max: window.app.progress?.max, width: 0 };
    window.__previews.push(entry);
    const img = new Image();
    img.onload = () => { entry.width = img.naturalWidth; entry.height = img.naturalHeight; };
    img.src = URL.createObjectURL(detail.blob);
  });
}"""


def training_workflow() -> Path:
    """The example workflow that trains a ControlNet-Zero (found by its node types: file names change)."""
    found = [p for p in sorted((ROOT / "workflows").glob("*.json"))
             if TRAIN_NODE in {n.get("type") for n in json.loads(p.read_text()).get("nodes", [])}]
    assert found, f"no example workflow contains {TRAIN_NODE}"
    return found[0]


def test_training_node_shows_progress_and_previews_while_it_runs(comfy_page, comfy_server):
    workflow = training_workflow()
    comfy_page.load_template(PACK_NAME, workflow.stem)
    comfy_page.errors.clear()  # loading is test_templates.py's; from here on the page must log no error
    assert comfy_page.set_widgets(OVERRIDES) > 0
    page = comfy_page.page
    train_id = page.evaluate(f"() => String(window.app.graph.nodes.find(n => n.type === '{TRAIN_NODE}').id)")
    assert page.evaluate(f"() => window.app.graph.getNodeById({train_id}).widgets"
                         ".find(w => w.name === 'preview_every').value") == EVERY
    page.evaluate(RECORD_JS, train_id)
    prompt_id = comfy_page.click_run()

    # while the node runs, the page shows its progress and its preview (the node's preview image slot)
    shown_js = """(id) => String(window.app.runningNodeId) === id && (window.app.nodePreviewImages?.[id] || []).length > 0
                          && window.app.progress && window.app.progress.value >= 1"""
    page.wait_for_function(f"(id) => ({shown_js})(id) || window.__done", arg=train_id, timeout=600_000)
    assert page.evaluate(shown_js, train_id), "the training node ran without showing a preview in the page"
    comfy_page.screenshot(SCREENSHOTS / "training_preview.png")
    entry = comfy_server.wait(prompt_id, timeout=600)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    page.wait_for_function("() => window.__previews.every(p => p.width > 0)", timeout=10_000)
    previews = [p for p in page.evaluate("() => window.__previews") if p["node"] == train_id]
    assert [(p["running"], p["value"], p["max"]) for p in previews] == \
        [(train_id, s, STEPS) for s in range(EVERY, STEPS + 1, EVERY)], previews
    # a square image (the 64 px hint's preview; the server scales previews to fit --preview-size, 512)
    assert all(p["width"] > 0 and p["width"] == p["height"] for p in previews), json.dumps(previews)
    assert comfy_page.errors == []
