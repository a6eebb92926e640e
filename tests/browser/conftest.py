"""Fixtures of the browser tier: one headless Chromium per session, driving the e2e tier's ComfyUI server."""

from __future__ import annotations

import os

import pytest

from harness import browser as browser_harness


@pytest.fixture(scope="session")
def chromium():
    """Headless system Chromium under Playwright; skipped with the reason where it is not installed (not in CI)."""
    reason = browser_harness.unavailable_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the browser tier must run in CI, but {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = browser_harness.launch(playwright)
        try:
            yield browser
        finally:
            browser.close()


def _page(chromium, server):
    browser_harness.preset_settings(server)
    context = chromium.new_context(viewport=browser_harness.VIEWPORT)
    page = browser_harness.ComfyPage(context, server.url).open()
    return context, page


@pytest.fixture(scope="module")
def module_page(chromium, comfy_server):
    """One ComfyUI page shared by a module's tests (opening one costs ~10 s on this machine)."""
    context, page = _page(chromium, comfy_server)
    yield page
    context.close()


@pytest.fixture
def comfy_page(chromium, comfy_server):
    """A fresh ComfyUI page for one test."""
    context, page = _page(chromium, comfy_server)
    yield page
    context.close()
