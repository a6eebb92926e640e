"""Every node has a help page, in the place the ComfyUI frontend looks, and it is up to date."""

from __future__ import annotations

import pytest

from harness import help_pages


@pytest.fixture(scope="module")
def schemas(pack):
    from frozentune.nodes import NODE_CLASSES

    return [cls.GET_SCHEMA() for cls in NODE_CLASSES]


def test_the_pack_serves_its_web_folder(pack):
    import frozentune

    assert (help_pages.DOCS.parent.resolve() ==
            (help_pages.DOCS.parents[2] / frozentune.WEB_DIRECTORY).resolve())


def test_every_node_has_a_page_with_every_input(schemas):
    for schema in schemas:
        page = help_pages.page_path(schema.node_id)
        assert page.is_file(), f"no help page for {schema.node_id}: write {page}"
        text = page.read_text()
        assert text.startswith(f"# {schema.display_name}\n"), schema.node_id
        for section in ("## Typical recipe", "## What it costs", "## Inputs and outputs"):
            assert section in text, (schema.node_id, section)
        for item in schema.inputs:
            assert f"| **{item.id}**" in text, (schema.node_id, item.id)


def test_pages_say_what_the_tooltips_say(schemas):
    stale = [s.node_id for s in schemas if help_pages.rendered(s) != help_pages.page_path(s.node_id).read_text()]
    assert not stale, f"help pages out of date with their schema: {stale}; run `python -m harness.help_pages --write`"


def test_a_changed_tooltip_makes_the_page_stale(schemas):
    schema = schemas[0]
    schema.inputs[0].tooltip = schema.inputs[0].tooltip + " (changed)"
    try:
        assert help_pages.rendered(schema) != help_pages.page_path(schema.node_id).read_text()
    finally:
        schema.inputs[0].tooltip = schema.inputs[0].tooltip[: -len(" (changed)")]
