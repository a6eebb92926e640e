"""Every example workflow has its Templates-menu thumbnail (``workflows/<name>.jpg``), captured from its current
graph by ``make thumbnails``: a JPEG of the tool's size whose recorded graph hash is that of the workflow file."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image

from harness import thumbnails

WORKFLOWS = thumbnails.workflow_files()
FIX = "run `make thumbnails` (cd tests && PYTHONPATH=. ../.venv/bin/python -m harness.thumbnails --write) and commit"


# `<Capability> - <what it does, sentence case> (<base>)`, the base maybe words ("Flux.1 dev", "Z-Image Turbo"): the frontend shows
# the file name as the card's title; no commas (gpu-check's --workflows takes a comma-separated list) or other
# characters a shell or URL treats specially.
TITLE = re.compile(r"[A-Z][A-Za-z0-9 .()-]* - [a-z][A-Za-z0-9 .()-]* \([A-Za-z0-9.-]+( [A-Za-z0-9.-]+)*\)")


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_file_name_reads_as_a_title(path):
    assert TITLE.fullmatch(path.stem), (
        f"{path.name!r}: name it '<Capability> - <what it does, sentence case> (<base>).json' with ASCII letters, "
        "digits, spaces, hyphens, parentheses and dots only, e.g. 'UniTune - edit a photo with a prompt (SD1.5).json'")


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_has_a_current_thumbnail(path):
    why = thumbnails.stale(path)
    assert why is None, f"{path.name}: {why}; {FIX} the .jpg"


@pytest.fixture
def copied(tmp_path):
    """A copy of the first example workflow and its thumbnail, current to begin with."""
    src = WORKFLOWS[0]
    dest = tmp_path / src.name
    shutil.copy2(src, dest)
    shutil.copy2(thumbnails.thumbnail_path(src), thumbnails.thumbnail_path(dest))
    assert thumbnails.stale(dest) is None
    return dest


def test_moving_a_node_makes_the_thumbnail_stale_and_the_saved_view_does_not(copied):
    workflow = json.loads(copied.read_text())
    workflow.setdefault("extra", {})["ds"] = {"scale": 0.5, "offset": [123, 456]}
    copied.write_text(json.dumps(workflow, indent=4))  # another camera, another formatting: the same graph
    assert thumbnails.stale(copied) is None

    workflow["nodes"][0]["pos"][0] += 10
    copied.write_text(json.dumps(workflow))
    assert "before the last change" in thumbnails.stale(copied)


def test_a_missing_or_foreign_thumbnail_is_reported(copied):
    jpg = thumbnails.thumbnail_path(copied)
    with Image.open(jpg) as img:
        img.convert("RGB").save(jpg, "JPEG", comment=b"made elsewhere")  # same picture, no recorded hash
    assert "no recorded graph" in thumbnails.stale(copied)
    with Image.open(jpg) as img:
        img.resize((2000, 256)).save(jpg, "JPEG", comment=(thumbnails.COMMENT_PREFIX
                                                           + thumbnails.graph_hash(copied)).encode())
    assert "2000x256 JPEG" in thumbnails.stale(copied)
    with Image.open(jpg) as img:
        img.save(jpg, "PNG")
    assert "PNG" in thumbnails.stale(copied)
    jpg.unlink()
    assert "missing" in thumbnails.stale(copied)


def test_readme_shows_one_thumbnail_per_capability():
    """The README's pictures are the committed thumbnails (graph captures), one for each capability's section."""
    readme = (thumbnails.comfy_env.REPO_ROOT / "README.md").read_text()
    shown = [Path(unquote(m)) for m in re.findall(r"!\[[^\]]*\]\((workflows/[^)\s]+\.jpg)\)", readme)]
    stems = {p.stem for p in WORKFLOWS}
    assert all(p.stem in stems for p in shown), f"README shows images that are no workflow's thumbnail: {shown}"
    capabilities = [p.stem.split(" - ")[0] for p in shown]
    assert len(set(shown)) >= 5, shown  # UniTune fine-tune and edit, InstantStyle, ControlNet-Zero, textual inversion
    assert {"UniTune", "InstantStyle", "ControlNet-Zero", "Textual Inversion"} <= set(capabilities), capabilities
