"""The nodes' help pages (``nodes/web/docs/<node id>.md``, what the ComfyUI frontend shows).

ComfyUI 0.3.75's frontend (comfyui-frontend-package 1.32) fetches a custom node's help from
``/extensions/<pack folder>/docs/<node id>/<locale>.md`` and then ``.../docs/<node id>.md``; the
server serves ``/extensions/<pack folder>/`` from the pack's ``WEB_DIRECTORY`` (``nodes/web``).

Each page is hand-written (what the node does, a typical recipe, what it costs) except the inputs
and outputs tables between the ``<!-- schema:begin -->`` / ``<!-- schema:end -->`` markers: those
are made from the node schema's tooltips, so the page and the tooltips say the same thing. Run
``python -m harness.help_pages --write`` (from ``tests/``) after changing a schema; the node tests
fail while a page is out of date.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "nodes" / "web" / "docs"
BEGIN, END = "<!-- schema:begin (made from the node's tooltips: python -m harness.help_pages --write) -->", \
    "<!-- schema:end -->"
_BLOCK = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)


def _cell(text) -> str:
    return str(text if text is not None else "").replace("|", "\\|").replace("\n", " ")


def _kind(item) -> str:
    kind = str(item.io_type)
    return {"COMBO": "choice", "BOOLEAN": "on/off"}.get(kind, kind)


def _default(item) -> str:
    parts = []
    for key in ("default", "min", "max"):
        value = getattr(item, key, None)
        if value is not None and not (key == "max" and value >= 2**63):
            parts.append(f"{key} {value!r}" if key != "default" else repr(value))
    return ", ".join(parts)


def schema_block(schema) -> str:
    rows = ["| input | kind | default, range | what it does |", "|---|---|---|---|"]
    for item in schema.inputs:
        optional = " (optional)" if item.optional else ""
        rows.append(f"| **{item.id}**{optional} | {_kind(item)} | {_cell(_default(item))} | {_cell(item.tooltip)} |")
    rows += ["", "| output | what it is |", "|---|---|"]
    for item in schema.outputs:
        rows.append(f"| **{item.display_name or item.id}** | {_cell(item.tooltip)} |")
    return "\n".join([BEGIN, "## Inputs and outputs", "", *rows, END])


def page_path(node_id: str) -> Path:
    return DOCS / f"{node_id}.md"


def rendered(schema) -> str | None:
    """The page with its schema block brought up to date, or None when the page does not exist."""
    path = page_path(schema.node_id)
    if not path.is_file():
        return None
    text = path.read_text()
    if BEGIN not in text:
        return text.rstrip("\n") + "\n\n" + schema_block(schema) + "\n"
    return _BLOCK.sub(lambda _: schema_block(schema), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the schema blocks of every page")
    args = parser.parse_args()
    from harness import comfy_env

    comfy_env.import_comfy()
    comfy_env.import_pack()
    from frozentune.nodes import NODE_CLASSES

    for cls in NODE_CLASSES:
        schema = cls.GET_SCHEMA()
        text = rendered(schema)
        if text is None:
            print(f"missing: {page_path(schema.node_id)}")
        elif args.write and text != page_path(schema.node_id).read_text():
            page_path(schema.node_id).write_text(text)
            print(f"updated: {page_path(schema.node_id).name}")


if __name__ == "__main__":
    main()
