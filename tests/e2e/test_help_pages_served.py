"""The help pages reach the browser where ComfyUI 0.3.75's frontend fetches them."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from harness import help_pages
from harness.comfy_env import PACK_NAME


def test_every_node_help_page_is_served(comfy_server, pack_node_ids):
    # The frontend (NodeHelpService) asks /extensions/<pack folder>/docs/<node id>/<locale>.md first,
    # then /extensions/<pack folder>/docs/<node id>.md.
    for node_id in pack_node_ids:
        with urllib.request.urlopen(f"{comfy_server.url}/extensions/{PACK_NAME}/docs/{node_id}.md",
                                    timeout=30) as response:
            served = response.read().decode()
        assert served == help_pages.page_path(node_id).read_text(), node_id
    with pytest.raises(urllib.error.HTTPError):  # and a missing page is a 404, not an empty page
        urllib.request.urlopen(f"{comfy_server.url}/extensions/{PACK_NAME}/docs/FrozenTuneNoSuchNode.md", timeout=30)
