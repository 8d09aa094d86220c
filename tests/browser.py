"""Opening a report in headless Chromium (the Debian package, driven by playwright)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_or_skip() -> str:
    """The browser's path; skips where it is missing, except under CI (CI=1), where it must be there."""
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None and not os.environ.get("CI"):
        pytest.skip("chromium is not installed (apt-get install chromium); CI=1 makes this a failure")
    return path or "/usr/bin/chromium"


def load_in_chromium(page_path: Path, screenshot: Path) -> tuple[list[str], list[int]]:
    """Console/page errors and the natural width of every <img> after loading ``page_path``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_or_skip(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.goto(Path(page_path).resolve().as_uri(), wait_until="load")
            page.screenshot(path=str(screenshot), full_page=True)
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
        finally:
            browser.close()
    return errors, widths
