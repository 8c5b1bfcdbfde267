"""The browser tests: real headless Chromium (Debian's /usr/bin/chromium, driven
by Playwright) against the real system (API on a socket, a Celery worker process).

Chromium or Playwright missing skips these tests outside CI; with
BONEDETECT_REQUIRE_SERVICES=1 (.ci/run, which installs Debian's chromium) it
fails them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.integration.conftest import pg_url, redis_url, start_system  # noqa: F401  (fixtures)

CHROMIUM = os.environ.get("BONEDETECT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def missing(what: str) -> None:
    if os.environ.get("BONEDETECT_REQUIRE_SERVICES"):
        pytest.fail(what)
    pytest.skip(what)


@pytest.fixture
def browser_page(tmp_path: Path):
    """A fresh Chromium profile and one page; console errors and the URLs it requested are recorded."""
    if not Path(CHROMIUM).exists():
        missing(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium chromium-driver)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("Playwright for Python is not installed (pip install playwright)")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
            accept_downloads=True,
        )
        page = context.pages[0] if context.pages else context.new_page()
        page.errors = []
        page.requested = []
        page.on("pageerror", lambda err: page.errors.append(str(err)))
        page.on("console", lambda msg: msg.type == "error" and page.errors.append(msg.text))
        page.on("request", lambda req: page.requested.append(req.url))
        page.set_default_timeout(30_000)
        try:
            yield page
        finally:
            context.close()
