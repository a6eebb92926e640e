"""``make thumbnails``: each example workflow's Templates-menu thumbnail, a capture of its graph in the real page.

The Templates menu of ComfyUI's frontend (1.32.9) shows ``workflows/<name>.jpg`` on the card of
``workflows/<name>.json``, scaled to fit a square box. The thumbnail is what the workflow does: its nodes
and links, loaded from the Templates endpoint into the real page (headless Chromium, the browser tier's
harness) with the tiny stand-in models, framed on the working nodes (the Note nodes are left out of the
frame: their text is unreadable at card size) and saved as a small JPEG.

Each JPEG records, in its comment segment, the SHA-256 of the graph it shows (``graph_hash``); a node
test fails when a workflow has no thumbnail or its graph changed since (``stale``). Run
``cd tests && PYTHONPATH=. ../.venv/bin/python -m harness.thumbnails --write`` (``make thumbnails``)
to capture the missing and stale ones; ``--all`` captures every one; without ``--write`` it only lists
them and exits 1 if there are any.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import sys
from pathlib import Path

from harness import comfy_env

log = logging.getLogger("frozentune.thumbnails")

WORKFLOWS = comfy_env.REPO_ROOT / "workflows"
# The nodes are drawn at PX_PER_UNIT of their size in the frontend's graph units (node titles ~6 px high, readable
# in the README at full size; the menu card scales it into a square box), unless that exceeds the maximum size.
PX_PER_UNIT = 0.42
MAX_WIDTH, MAX_HEIGHT = 1600, 1000
MIN_WIDTH = 256
QUALITY = 80
COMMENT_PREFIX = "frozentune-thumbnail graph-sha256="
NOTE_TYPES = ("Note", "MarkdownNote")
# Big enough that the frontend draws the nodes at a readable zoom before the capture is scaled down.
CAPTURE_VIEWPORT = {"width": 2000, "height": 1400}
MARGIN = 60  # px around the framed nodes, clear of the canvas's corner buttons

# Frames the working nodes in the middle of the canvas (the litegraph camera: screen = (graph + offset) * scale)
# and returns their on-screen rectangle.
FRAME_JS = """([noteTypes, margin]) => {
  const c = window.app.canvas;
  const nodes = window.app.graph.nodes.filter(n => !noteTypes.includes(n.type));
  let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
  for (const n of (nodes.length ? nodes : window.app.graph.nodes)) {
    const b = n.getBounding();
    x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]);
    x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]);
  }
  const box = c.canvas.getBoundingClientRect();
  const scale = Math.min((box.width - 2 * margin) / (x1 - x0), (box.height - 2 * margin) / (y1 - y0), 1.5);
  c.show_info = false;
  c.deselectAll?.();
  c.ds.scale = scale;
  c.ds.offset = [(box.width - scale * (x1 - x0)) / 2 / scale - x0, (box.height - scale * (y1 - y0)) / 2 / scale - y0];
  c.setDirty(true, true);
  const pad = 12, top = 28;  // above the title bars: the node badges ("frozentune")
  return {clip: {x: box.left + (x0 + c.ds.offset[0]) * scale - pad, y: box.top + (y0 + c.ds.offset[1]) * scale - top,
                 width: (x1 - x0) * scale + 2 * pad, height: (y1 - y0) * scale + pad + top},
          scale: scale, width: x1 - x0, height: y1 - y0};
}"""


def workflow_files() -> list[Path]:
    return sorted(WORKFLOWS.glob("*.json"))


def thumbnail_path(workflow: Path) -> Path:
    return workflow.with_suffix(".jpg")


def graph_hash(workflow: Path) -> str:
    """SHA-256 of what the thumbnail shows: the workflow minus its ``extra`` (saved camera, frontend version),
    canonicalized, so re-saving the same graph or moving the view does not make the thumbnail stale."""
    data = json.loads(workflow.read_text())
    data.pop("extra", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def recorded_hash(jpg: Path) -> str | None:
    """The graph hash a thumbnail was captured from (its JPEG comment), or None if it has none."""
    from PIL import Image

    with Image.open(jpg) as img:
        comment = img.info.get("comment", b"")
    text = comment.decode("ascii", "replace") if isinstance(comment, bytes) else str(comment)
    return text[len(COMMENT_PREFIX):] if text.startswith(COMMENT_PREFIX) else None


def stale(workflow: Path) -> str | None:
    """Why the workflow's thumbnail must be captured again (None when it is current)."""
    from PIL import Image

    jpg = thumbnail_path(workflow)
    if not jpg.is_file():
        return f"{jpg.name} is missing"
    with Image.open(jpg) as img:
        fmt, (width, height) = img.format, img.size
    if fmt != "JPEG" or not MIN_WIDTH <= width <= MAX_WIDTH or not 0 < height <= MAX_HEIGHT:
        return (f"{jpg.name} is a {width}x{height} {fmt}, not a JPEG {MIN_WIDTH}-{MAX_WIDTH} px wide and at most "
                f"{MAX_HEIGHT} high")
    recorded = recorded_hash(jpg)
    if recorded != graph_hash(workflow):
        return f"{jpg.name} shows {'a graph from before the last change' if recorded else 'no recorded graph'}"
    return None


def encode(png: bytes, frame: dict, workflow: Path) -> bytes:
    """The capture (drawn at ``frame["scale"]`` px per graph unit) scaled to PX_PER_UNIT within the maximum size, as
    a JPEG that records the graph hash."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        img = img.convert("RGB")
        factor = min(PX_PER_UNIT / frame["scale"], MAX_WIDTH / img.width, MAX_HEIGHT / img.height)
        size = (max(MIN_WIDTH, round(img.width * factor)), max(1, round(img.height * factor)))
        img = img.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=QUALITY, optimize=True, comment=(COMMENT_PREFIX + graph_hash(workflow)).encode())
    return out.getvalue()


def capture(page, workflow: Path) -> bytes:
    """Load the workflow from the Templates menu, hide the page's panels (focus mode), frame its working nodes and
    return the thumbnail JPEG."""
    page.load_template(comfy_env.PACK_NAME, workflow.stem)
    report = page.missing_nodes_report()
    if report:
        raise RuntimeError(f"{workflow.name}: the page reports missing nodes, fix the workflow first:\n{report}")
    focus = "() => window.app.extensionManager.command.execute('Workspace.ToggleFocusMode')"
    page.page.evaluate(focus)  # on: only the canvas
    try:
        page.page.wait_for_timeout(500)
        frame = page.page.evaluate(FRAME_JS, [list(NOTE_TYPES), MARGIN])
        page.page.wait_for_timeout(800)  # DOM widgets (text boxes) follow the camera on the next frames
        return encode(page.page.screenshot(clip=frame["clip"]), frame, workflow)
    finally:
        page.page.evaluate(focus)  # off: the Templates button is back for the next workflow


def capture_all(workflows: list[Path]) -> list[Path]:
    """Start ComfyUI with the tiny models and Chromium, capture each workflow's thumbnail; returns the files."""
    comfy_env.import_comfy()
    from playwright.sync_api import sync_playwright

    from harness import browser
    from harness.server import ComfyServer, prepare_base

    reason = browser.unavailable_reason()
    if reason:
        raise SystemExit(f"thumbnails: {reason}")
    written = []
    with ComfyServer(prepare_base(comfy_env.REPO_ROOT / "build" / "thumbnails_base")) as srv, \
            sync_playwright() as playwright:
        browser.preset_settings(srv)
        chromium = browser.launch(playwright)
        try:
            context = chromium.new_context(viewport=CAPTURE_VIEWPORT)
            page = browser.ComfyPage(context, srv.url).open()
            for workflow in workflows:
                jpg = thumbnail_path(workflow)
                jpg.write_bytes(capture(page, workflow))
                if page.errors:
                    log.warning("%s: page errors while loading: %s", workflow.name, page.errors)
                    page.errors.clear()
                log.info("wrote %s (%d KB)", jpg.relative_to(comfy_env.REPO_ROOT), jpg.stat().st_size // 1024)
                written.append(jpg)
        finally:
            chromium.close()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="capture the missing and stale thumbnails")
    parser.add_argument("--all", action="store_true", help="with --write: capture every thumbnail")
    parser.add_argument("names", nargs="*", help="workflow file stems (default: all in workflows/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="thumbnails: %(message)s")

    files = workflow_files()
    if args.names:
        by_stem = {p.stem: p for p in files}
        unknown = [n for n in args.names if n not in by_stem]
        if unknown:
            parser.error(f"no workflow {', '.join(map(repr, unknown))}; choose from {', '.join(map(repr, by_stem))}")
        files = [by_stem[n] for n in args.names]
    todo = [(p, "captured again (--all)") if args.all else (p, stale(p)) for p in files]
    todo = [(p, why) for p, why in todo if why]
    for path, why in todo:
        log.info("%s: %s", path.stem, why)
    if not args.write:
        return 1 if todo else 0
    capture_all([p for p, _ in todo])
    return 0


if __name__ == "__main__":
    sys.exit(main())
