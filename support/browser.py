"""Headless Chromium for the page's browser tests: Debian's `chromium` (`apt-get install
chromium`) driven by Playwright (PyPI, the dev extra), launched by `executable_path`.
Playwright's own browser download is never used (it cannot work on a machine that reaches
only package registries).

`browser_unusable()` says why no browser can be launched here (None when one can);
`launch_chromium()` starts one. DSPHERE_CHROMIUM names another executable.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import Browser

EXECUTABLES = ("chromium", "chromium-browser")


def chromium_path() -> str | None:
    """DSPHERE_CHROMIUM, else the first of EXECUTABLES on PATH."""
    named = os.environ.get("DSPHERE_CHROMIUM")
    if named:
        return shutil.which(named) or (named if os.access(named, os.X_OK) else None)
    return next((p for p in map(shutil.which, EXECUTABLES) if p), None)


def browser_unusable() -> str | None:
    """Why Chromium cannot be driven here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]')"
    if chromium_path() is None:
        return "no chromium executable (apt-get install -y chromium)"
    return None


@contextmanager
def launch_chromium() -> Iterator[Browser]:
    """A headless Chromium, closed on exit. --no-sandbox: tests and CI run as root, where
    Chromium refuses its sandbox; the browser only ever loads the local service."""
    from playwright.sync_api import sync_playwright

    path = chromium_path()
    assert path is not None, browser_unusable()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            yield browser
        finally:
            browser.close()
