"""The pack's example workflows as a user meets them: listed in the Templates menu, loaded from it with no
missing-node report and no page error, and turned by the frontend into the same API prompt the e2e tier queues."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import unquote

import pytest

from harness.browser import is_template_url
from harness.comfy_env import PACK_NAME

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
SCREENSHOTS = ROOT / "out" / "browser"


def test_templates_endpoint_and_menu_list_the_pack_examples(module_page, comfy_server):
    stems = sorted(p.stem for p in WORKFLOWS)
    assert stems, "workflows/ holds no example workflow"
    assert sorted(comfy_server.get("/workflow_templates").get(PACK_NAME, [])) == stems
    module_page.errors.clear()
    assert sorted(module_page.listed_templates(PACK_NAME)) == stems
    module_page.page.wait_for_load_state("networkidle")
    # a card whose thumbnail (workflows/<name>.jpg) is missing logs a 404 here
    assert module_page.errors == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_template_loads_with_no_missing_nodes_and_no_page_error(module_page, path):
    module_page.open_templates(PACK_NAME)
    module_page.page.wait_for_load_state("networkidle")
    module_page.errors.clear()  # the menu's own errors (thumbnails) are the test above's
    module_page.load_template(PACK_NAME, path.stem)
    assert module_page.missing_nodes_report() is None, module_page.missing_nodes_report()
    module_page.fit_view()
    module_page.screenshot(SCREENSHOTS / f"{path.stem}.png")
    assert module_page.errors == []
    expected = sorted(n["type"] for n in json.loads(path.read_text())["nodes"])
    assert sorted(module_page.node_types()) == expected


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_frontend_prompt_equals_the_e2e_prompt(module_page, comfy_server, path):
    """``app.graphToPrompt().output`` is what the Run button queues; the e2e tier queues comfy-cli's conversion."""
    module_page.load_template(PACK_NAME, path.stem)
    assert module_page.graph_to_prompt() == comfy_server.to_api(json.loads(path.read_text()))


def test_missing_node_check_fires_for_a_renamed_node_id(comfy_page):
    """The checks above can fail: a copy of a workflow with one FrozenTune node id renamed, served from the
    Templates endpoint in its place, makes the frontend report that node as missing; a missing thumbnail and a
    thrown error are caught."""
    path = WORKFLOWS[0]
    comfy_page.page.route(lambda url: is_template_url(url, PACK_NAME, path.stem, "jpg"),
                          lambda route: route.fulfill(status=404, body="not found"))
    comfy_page.open_templates(PACK_NAME)
    comfy_page.page.wait_for_load_state("networkidle")

    def thumbnail_error() -> bool:
        return any(f"{path.stem}.jpg" in unquote(e) for e in comfy_page.errors)

    # The card's image fails, and the console reports it, after the network went idle at times (a flake seen
    # twice in whole-tier runs): wait for the report for a while instead of reading the errors once.
    for _ in range(60):
        if thumbnail_error():
            break
        comfy_page.page.wait_for_timeout(250)
    assert thumbnail_error(), comfy_page.errors

    workflow = json.loads(path.read_text())
    node = next(n for n in workflow["nodes"] if n["type"].startswith("FrozenTune"))
    node["type"] = renamed = node["type"] + "Renamed"
    comfy_page.page.route(lambda url: is_template_url(url, PACK_NAME, path.stem, "json"),
                          lambda route: route.fulfill(json=workflow))
    comfy_page.load_template(PACK_NAME, path.stem)
    report = comfy_page.missing_nodes_report()
    assert report is not None and renamed in report, report

    comfy_page.errors.clear()
    comfy_page.page.evaluate("() => setTimeout(() => { throw new Error('frozentune-browser-self-check') })")
    comfy_page.page.wait_for_timeout(500)
    assert any("frozentune-browser-self-check" in e for e in comfy_page.errors), comfy_page.errors
