"""Headless Chromium for the page tests: where the browser is, its flags, and a clean skip without it."""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and os.path.exists(p)), None)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def launch(pw):
    """A headless Chromium browser from a playwright handle (`sync_playwright()`)."""
    return pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def skip_module_without_chromium() -> None:
    """Call at a test module's top, before importing playwright (a test extra, the browser a system package)."""
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; `make sysdeps` does it)",
                    allow_module_level=True)
