"""The real ComfyUI page in headless Chromium, driven by Playwright (the ``browser`` test tier).

Playwright drives the system's Chromium (Debian's ``chromium``, installed by ``make setup``) through
``executable_path``: nothing is downloaded (no ``playwright install``). The page may only talk to the
test server: every other request (the frontend asks api.comfy.org about node packs and releases) is
aborted, and the console errors those aborted requests cause are not counted as page errors.

``ComfyPage`` wraps one page and does what a user does, through the page's own buttons where it can:
open the Templates menu, load a template, press Run or Cancel, open a node's help.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

log = logging.getLogger(__name__)

# Debian's chromium package: /usr/bin/chromium is a shell wrapper; the binary itself is under /usr/lib.
CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser")
CHROMIUM_ENV = "FROZENTUNE_CHROMIUM"
# root (CI) cannot use Chromium's sandbox; /dev/shm is small in containers.
LAUNCH_ARGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]
VIEWPORT = {"width": 1920, "height": 1080}
READY_JS = "() => !!(window.app && window.app.graph && window.app.canvas && window.app.extensionManager)"
CARD_TITLE = "h3.line-clamp-1"  # a template card's title in frontend 1.32's Templates dialog
# Server-side user settings the browser tier starts the page with: no first-visit Templates tour over the canvas
# (the tests open the menus they need, as a returning user does), nodes drawn with their text at any zoom and no
# minimap, so the screenshots of whole workflows are readable.
PAGE_SETTINGS = {"Comfy.TutorialCompleted": True, "LiteGraph.Canvas.MinFontSizeForLOD": 0, "Comfy.Minimap.Visible": False}
MISSING_NODES_TEXT = "This workflow has missing nodes"


def chromium_path() -> str | None:
    """The Chromium binary to drive: $FROZENTUNE_CHROMIUM, else Debian's."""
    given = os.environ.get(CHROMIUM_ENV)
    if given:
        return given if Path(given).is_file() else None
    for name in CHROMIUM_CANDIDATES:
        found = name if Path(name).is_file() else shutil.which(name)
        if found:
            return found
    return None


def unavailable_reason() -> str | None:
    """Why the browser tier cannot run here (None when it can); the text says how to fix it."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Playwright Python package is not in .venv: run `make setup`"
    if chromium_path() is None:
        return (f"no Chromium found ({', '.join(CHROMIUM_CANDIDATES)} or ${CHROMIUM_ENV}): run `make setup` as root "
                "on Debian/Ubuntu (it runs `apt-get install chromium`), or point $FROZENTUNE_CHROMIUM at a Chromium")
    return None


def launch(playwright):
    """Headless Chromium from the system, never a downloaded build."""
    return playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=LAUNCH_ARGS)


@dataclass
class PageErrors:
    """What went wrong in the page: uncaught exceptions and console errors, minus the aborted outside requests."""

    server: str
    errors: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)

    def route(self, route) -> None:
        url = route.request.url
        if url.startswith(self.server + "/") or url.startswith("data:") or url.startswith("blob:"):
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort()

    def on_pageerror(self, err) -> None:
        self.errors.append(f"pageerror: {err}")

    def on_console(self, msg) -> None:
        if msg.type != "error":
            return
        source = (msg.location or {}).get("url", "")
        if source and not source.startswith(self.server + "/") and source in self.blocked:
            return  # "Failed to load resource" for a request we aborted on purpose
        self.errors.append(f"console.error: {msg.text[:2000]}" + (f" ({source})" if source else ""))


def is_template_url(url: str, pack: str, name: str, ext: str) -> bool:
    """Whether ``url`` fetches the pack's template file ``name.ext``; the names hold spaces and parentheses, which
    the browser percent-encodes (some of them), so the URL is compared decoded."""
    return unquote(url.split("?", 1)[0]).endswith(f"/api/workflow_templates/{pack}/{name}.{ext}")


def preset_settings(server) -> None:
    """Store PAGE_SETTINGS as the server's user settings (read by the page when it opens)."""
    for key, value in PAGE_SETTINGS.items():
        server.post(f"/settings/{key}", value)


class ComfyPage:
    """One ComfyUI page, loaded and ready; ``errors`` collects what goes wrong in it."""

    def __init__(self, context, server_url: str, timeout_ms: float = 60_000):
        self.server = server_url.rstrip("/")
        self.watch = PageErrors(self.server)
        context.route("**/*", self.watch.route)
        self.page = context.new_page()
        self.page.set_default_timeout(timeout_ms)
        self.page.on("pageerror", self.watch.on_pageerror)
        self.page.on("console", self.watch.on_console)

    @property
    def errors(self) -> list[str]:
        return self.watch.errors

    def open(self) -> ComfyPage:
        """Load the page and wait for the app; errors before that are in ``startup_errors``."""
        self.page.goto(self.server + "/")
        self.page.wait_for_function(READY_JS, timeout=180_000)
        self.page.wait_for_timeout(1000)  # the frontend finishes its start-up requests
        # The stock page itself logs errors while it starts (404s for the optional user.css and the empty
        # userdata folders, and a TypeError in frontend 1.32.9's settings code): kept apart, not counted.
        self.startup_errors = list(self.errors)
        self.errors.clear()
        return self

    # --- Templates ------------------------------------------------------------------------------
    def open_templates(self, pack: str):
        """Templates (left bar) -> the pack's entry under EXTENSIONS; returns the dialog."""
        dialog = self.page.locator(".p-dialog").filter(has_text="All Templates")
        if not dialog.is_visible():
            self.page.get_by_role("button", name="Templates", exact=True).click()
            dialog.wait_for()
        dialog.get_by_role("button", name=pack, exact=True).click()
        dialog.get_by_text("Showing").wait_for()
        return dialog

    def listed_templates(self, pack: str) -> list[str]:
        """The titles of the cards the Templates menu shows for the pack (the menu stays open)."""
        return [t.strip() for t in self.open_templates(pack).locator(CARD_TITLE).all_inner_texts()]

    def load_template(self, pack: str, name: str) -> None:
        """Click the template's card, as a user does; the frontend fetches it from /api/workflow_templates/."""
        dialog = self.open_templates(pack)
        with self.page.expect_response(lambda r: is_template_url(r.url, pack, name, "json")):
            dialog.get_by_text(name, exact=True).first.click()
        dialog.wait_for(state="hidden")
        self.page.wait_for_timeout(1500)  # load-time dialogs (missing nodes/models) and node previews settle

    def missing_nodes_report(self) -> str | None:
        """The text of the frontend's missing-nodes dialog, or None when it is not shown."""
        dialog = self.page.get_by_role("dialog").filter(has_text=MISSING_NODES_TEXT)
        return dialog.first.inner_text() if dialog.count() else None

    # --- graph ----------------------------------------------------------------------------------
    def graph_to_prompt(self) -> dict:
        """The API prompt the frontend would queue for the graph on the canvas (``app.graphToPrompt().output``)."""
        return self.page.evaluate("async () => JSON.parse(JSON.stringify((await window.app.graphToPrompt()).output))")

    def node_types(self) -> list[str]:
        return self.page.evaluate("() => window.app.graph.nodes.map(n => n.type)")

    def set_widgets(self, overrides: dict[str, dict[str, object]]) -> int:
        """Set widget values by node class (as a user typing into them would); returns how many were set."""
        return self.page.evaluate(
            """(overrides) => { let set = 0;
                for (const node of window.app.graph.nodes) {
                  const values = overrides[node.type] || {};
                  for (const w of node.widgets || []) {
                    if (w.name in values) { w.value = values[w.name]; w.callback?.(w.value); set++; }
                  }
                }
                window.app.graph.setDirtyCanvas(true, true); return set; }""",
            json.loads(json.dumps(overrides)),
        )

    def images_shown(self) -> list[dict]:
        """The images the nodes show on the canvas: their URL and whether the browser decoded them."""
        return self.page.evaluate(
            """() => window.app.graph.nodes.flatMap(n => (n.imgs || []).map(img => ({
                  node: String(n.id), type: n.type, src: img.src, width: img.naturalWidth, complete: img.complete})))""")

    # --- buttons --------------------------------------------------------------------------------
    def click_run(self) -> str:
        """Press Run; returns the prompt id the server answered with."""
        with self.page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as resp:
            self.page.get_by_role("button", name="Run", exact=True).click()
        body = resp.value.json()
        if "prompt_id" not in body:
            raise AssertionError(f"the server refused the prompt the page queued: {json.dumps(body)[:3000]}")
        return body["prompt_id"]

    def click_cancel(self) -> None:
        """Press the queue bar's "Cancel current run" (it POSTs /api/interrupt)."""
        with self.page.expect_response(lambda r: r.url.endswith("/api/interrupt")):
            self.page.get_by_role("button", name="Cancel current run").click()

    def fit_view(self) -> None:
        """The canvas's "Fit View" button: every node in view (the canvas only draws, and loads images of, those)."""
        self.page.get_by_role("button", name="Fit View (.)").click()
        self.page.wait_for_timeout(500)

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))
        return path

    # --- node library ---------------------------------------------------------------------------
    def open_node_help(self, display_name: str):
        """Node Library -> search the node -> its "?" button; returns the help panel's locator."""
        self.page.get_by_role("button", name="Node Library (n)").click()
        self.page.get_by_placeholder("Search Nodes...").fill(display_name)
        item = self.page.get_by_role("treeitem", name=display_name, exact=True).first
        item.hover()
        item.locator(".help-button").click()
        return self.page.locator(".sidebar-content-container, .comfy-vue-side-bar-container").first
