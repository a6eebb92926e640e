"""A node's help page as the frontend shows it: Node Library -> the node's "?" shows nodes/web/docs/<id>.md."""

from __future__ import annotations

import re

from harness.comfy_env import PACK_NAME
from harness.help_pages import page_path

NODE_ID = "FrozenTuneUniTuneFineTune"


def plain(markdown: str) -> str:
    """Markdown as the rendered page reads: no emphasis or code marks, one space between words."""
    return " ".join(re.sub(r"[*`_]", "", markdown).split())


def test_node_library_help_shows_the_pack_help_page(comfy_page, comfy_server):
    display_name = comfy_server.object_info()[NODE_ID]["display_name"]
    with comfy_page.page.expect_response(
            lambda r: r.url.endswith(f"/extensions/{PACK_NAME}/docs/{NODE_ID}.md") and r.ok) as resp:
        panel = comfy_page.open_node_help(display_name)
    assert resp.value.text() == page_path(NODE_ID).read_text()
    paragraphs = [p for p in page_path(NODE_ID).read_text().split("\n\n") if p and not p.startswith(("#", "<!--"))]
    panel.get_by_text("Typical recipe").first.wait_for()
    shown = plain(panel.inner_text())
    assert plain(paragraphs[0]) in shown, shown[:2000]
    assert plain(paragraphs[1]) in shown, shown[:2000]
