"""Every example workflow reads in the ComfyUI page: no node hides another, and Notes explain it.

Node rectangles follow LiteGraph: ``pos`` is the body's top-left corner, the 30 px title sits above
it, and a node needs about 24 px per widget row and per input/output slot row. The widget rows of
the pack's nodes come from their schemas (a saved workflow may lack the values of newer widgets,
which the page still draws); stock nodes count the saved ``widgets_values``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
TITLE = 30
ROW = 24
MIN_WIDTH = 320
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Nodes that draw more than their rows: image previews and multiline text boxes.
EXTRA_HEIGHT = {"LoadImage": 240, "SaveImage": 240, "PreviewImage": 240, "CLIPTextEncode": 72}
UI_ONLY = {"Note", "MarkdownNote"}


def workflow_paths() -> list[Path]:
    return sorted(WORKFLOWS.glob("*.json"))


def schema_widget_rows(node_classes) -> dict[str, int]:
    """node id -> widget rows the page draws (a seed's control_after_generate is a row of its own)."""
    rows = {}
    for cls in node_classes:
        schema = cls.GET_SCHEMA()
        rows[schema.node_id] = sum(
            1 + bool(getattr(inp, "control_after_generate", None))
            for inp in schema.inputs if inp.get_io_type() in WIDGET_TYPES)
    return rows


def min_height(node: dict, widget_rows: dict[str, int]) -> int:
    """The body height the node's slots and widgets need (title excluded)."""
    if node["type"] in UI_ONLY:
        return 2 * ROW
    inputs = [i for i in node.get("inputs") or [] if not i.get("widget")]  # widget inputs sit on their row
    slots = max(len(inputs), len(node.get("outputs") or []))
    widgets = max(len(node.get("widgets_values") or []), widget_rows.get(node["type"], 0))
    return slots * ROW + widgets * ROW + EXTRA_HEIGHT.get(node["type"], 0)


def rectangle(node: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) including the title bar above ``pos``."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE, x + w, y + h


def overlaps(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def layout_problems(workflow: dict, widget_rows: dict[str, int]) -> list[str]:
    problems = []
    nodes = workflow["nodes"]
    for node in nodes:
        label = f"node {node['id']} {node['type']}"
        w, h = node["size"]
        if w < MIN_WIDTH:
            problems.append(f"{label} is {w} px wide (< {MIN_WIDTH})")
        need = min_height(node, widget_rows)
        if h < need:
            problems.append(f"{label} is {h} px tall, its rows need {need}")
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            if overlaps(rectangle(a), rectangle(b)):
                problems.append(f"node {a['id']} {a['type']} overlaps node {b['id']} {b['type']}")
    return problems


def test_there_are_workflows():
    assert len(workflow_paths()) >= 6


@pytest.mark.parametrize("path", workflow_paths(), ids=lambda p: p.stem)
def test_workflow_nodes_do_not_overlap(path, pack):
    from frozentune.nodes import NODE_CLASSES

    problems = layout_problems(json.loads(path.read_text()), schema_widget_rows(NODE_CLASSES))
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", workflow_paths(), ids=lambda p: p.stem)
def test_workflow_has_a_note(path):
    notes = [n for n in json.loads(path.read_text())["nodes"] if n["type"] in UI_ONLY]
    assert notes, f"{path.name} has no Note node explaining it"
    for note in notes:
        text = (note.get("widgets_values") or [""])[0]
        assert isinstance(text, str) and text.strip(), f"{path.name}: Note {note['id']} is empty"


def test_the_overlap_check_can_fail():
    """The check catches the kind of overlap the page showed (a tall node running into the next one)."""
    tall = {"id": 1, "type": "X", "pos": [0, 0], "size": [320, 180], "widgets_values": [0] * 14}
    below = {"id": 2, "type": "SaveImage", "pos": [0, 200], "size": [320, 300], "widgets_values": ["x"]}
    problems = layout_problems({"nodes": [tall, below]}, {})
    assert any("need" in p for p in problems) and any("overlaps" in p for p in problems), problems
