"""A real Chromium (Debian's package) driven by Playwright against the whole stack: an API, a worker, a database.

The browser is never downloaded: Playwright launches /usr/bin/chromium. Where it is missing the tests skip,
unless MODELPRESS_REQUIRE_BROWSER is set (CI sets it), where they fail.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.utils.stack import Stack, running_stack

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
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


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not Path(CHROMIUM).exists():
        message = f"no Chromium at {CHROMIUM}: install Debian's `chromium` package (make install does, as root)"
        if os.environ.get("MODELPRESS_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def dashboard_stack(migrated: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(migrated, tmp_path_factory.mktemp("dashboard")) as stack:
        yield stack


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the pages' screenshots go: MODELPRESS_SCREENSHOTS (docs/screenshots for the README), else a temp dir."""
    folder = Path(os.environ.get("MODELPRESS_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder
