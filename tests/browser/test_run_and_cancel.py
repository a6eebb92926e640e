"""The page's Run and Cancel buttons: a workflow queued from the page finishes and its image shows in the page;
Cancel stops a long training run, which shows its progress in the page while it runs."""

from __future__ import annotations

import json
import time
from pathlib import Path

from harness.comfy_env import PACK_NAME
from harness.server import TINY_RUN_OVERRIDES, error_message

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "out" / "browser"
RUN_WORKFLOW = ROOT / "workflows" / "UniTune - edit a photo with a prompt (SD1.5).json"
TRAIN_WORKFLOW = ROOT / "workflows" / "UniTune - fine-tune on a photo then sample (SD1.5).json"
TRAIN_NODE = "FrozenTuneUniTuneFineTune"
LONG_STEPS = 10_000  # the node's maximum; hours on this machine: only Cancel ends it within the test
# The e2e tier's tiny-model sizes, with training and sampling cut to 2 steps: this test is about the button.
RUN_OVERRIDES = {**TINY_RUN_OVERRIDES, TRAIN_NODE: {"steps": 2, "batch_size": 1}, "FrozenTuneUniTuneEdit": {"steps": 2}}


def with_overrides(prompt: dict, overrides: dict[str, dict[str, object]]) -> dict:
    """The API prompt with the widget values set by node class, as ``ComfyPage.set_widgets`` sets them."""
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        for name, value in overrides.get(node["class_type"], {}).items():
            if name in node["inputs"]:
                node["inputs"][name] = value
    return out
CANCEL_WITHIN_S = 30.0


def test_run_button_queues_the_workflow_and_its_image_shows(comfy_page, comfy_server):
    workflow = json.loads(RUN_WORKFLOW.read_text())
    comfy_page.load_template(PACK_NAME, RUN_WORKFLOW.stem)
    comfy_page.errors.clear()  # loading is test_templates.py's; from here on the page must log no error
    assert comfy_page.set_widgets(RUN_OVERRIDES) > 0
    expected = with_overrides(comfy_server.to_api(workflow), RUN_OVERRIDES)
    with comfy_page.page.expect_request(lambda r: r.url.endswith("/api/prompt") and r.method == "POST") as req:
        prompt_id = comfy_page.click_run()
    assert req.value.post_data_json["prompt"] == expected, "the page queued another prompt than the e2e tier"

    entry = comfy_server.wait(prompt_id, timeout=600)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    saved = sorted(p.name for p in comfy_server.output_files(entry))
    assert saved, "the workflow saved no image"
    # the page got every saved image over its websocket ("executed" messages -> app.nodeOutputs); the history
    # answers as soon as the prompt ends, the page's messages may still be on their way: wait for them a while
    deadline = time.monotonic() + 30
    while True:
        received = comfy_page.page.evaluate(
            """() => Object.values(window.app.nodeOutputs || {}).flatMap(o => (o.images || [])
                       .filter(i => i.type === 'output').map(i => i.filename))""")
        if sorted(received) == saved or time.monotonic() > deadline:
            break
        comfy_page.page.wait_for_timeout(200)
    assert sorted(received) == saved, received
    # and the SaveImage nodes show them (the canvas draws, and so loads, the nodes in view: fit them all in)
    comfy_page.fit_view()
    deadline = time.monotonic() + 60
    while True:
        shown = [s for s in comfy_page.images_shown() if "type=output" in s["src"]]
        shown_names = sorted(s["src"].split("filename=")[1].split("&")[0] for s in shown if s["width"] > 0)
        if (shown_names and set(shown_names) <= set(saved)) or time.monotonic() > deadline:
            break
        comfy_page.page.wait_for_timeout(500)
    # at least one saved image drawn in its SaveImage node (the canvas loads a node's images when it draws it,
    # which headless Chromium does not always do for every node in view)
    assert shown_names and set(shown_names) <= set(saved), shown
    assert all(s["width"] > 0 and s["type"] == "SaveImage" for s in shown), shown
    comfy_page.screenshot(SCREENSHOTS / f"run_{RUN_WORKFLOW.stem}.png")
    assert comfy_page.errors == []


def test_cancel_button_stops_a_training_node_quickly(comfy_page, comfy_server):
    comfy_page.load_template(PACK_NAME, TRAIN_WORKFLOW.stem)
    comfy_page.errors.clear()  # loading is test_templates.py's; from here on the page must log no error
    comfy_page.set_widgets({**RUN_OVERRIDES, TRAIN_NODE: {"steps": LONG_STEPS, "batch_size": 1}})
    train_id = comfy_page.page.evaluate(f"() => String(window.app.graph.nodes.find(n => n.type === '{TRAIN_NODE}').id)")
    prompt_id = comfy_page.click_run()
    # the page shows the training node running, with its progress counting towards LONG_STEPS
    comfy_page.page.wait_for_function(
        """([id, steps]) => String(window.app.runningNodeId) === id && window.app.progress
                            && window.app.progress.max === steps && window.app.progress.value >= 1""",
        arg=[train_id, LONG_STEPS], timeout=300_000)
    comfy_page.screenshot(SCREENSHOTS / "training_progress.png")

    started = time.monotonic()
    comfy_page.click_cancel()
    entry = comfy_server.wait(prompt_id, timeout=120)
    took = time.monotonic() - started
    events = [event for event, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in events, entry["status"]
    interrupted = next(data for event, data in entry["status"]["messages"] if event == "execution_interrupted")
    assert str(interrupted["node_id"]) == train_id, interrupted
    assert took < CANCEL_WITHIN_S, f"Cancel took {took:.1f}s to stop the training node"
    assert comfy_page.errors == []
