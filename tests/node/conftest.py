"""Fixtures the node tests of several files share."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def style_image(comfy_root):
    """A smooth 64 px IMAGE for the InstantStyle tests (``harness.tiny_ipadapter.style_image``)."""
    from harness import tiny_ipadapter

    return tiny_ipadapter.style_image()
