"""Headless Chromium for the browser tests: Debian's `chromium`, driven through Playwright.

The suite needs no browser download: Playwright launches the system's chromium with
the flags this machine needs. Where chromium is missing the tests fail saying how to
install it (`make test` installs it on Debian as root); they are never skipped.
Set ``FGCLIP_SCREENSHOTS=<dir>`` to keep a screenshot of every page a test checks.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip
SCREENSHOTS_ENV = "FGCLIP_SCREENSHOTS"
INSTALL = "install Debian's chromium: `sudo apt-get install chromium` (`make test` does it when run as root)"


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail(f"headless Chromium is needed for this test and is not on PATH: {INSTALL}")
    return path


@contextmanager
def browser(offline: bool = False) -> Iterator:
    """A fresh page (new profile) in headless Chromium; ``offline`` refuses every non-file request."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chrome = pw.chromium.launch(executable_path=chromium_path(), args=FLAGS, headless=True)
        try:
            context = chrome.new_context(viewport={"width": 1600, "height": 1000})
            if offline:
                blocked: list[str] = []
                context.blocked = blocked  # what the page asked the network for, for the assertions

                def refuse(route) -> None:
                    blocked.append(route.request.url)
                    route.abort("internetdisconnected")

                context.route(re.compile(r"^(?!file:|data:|blob:)"), refuse)
            yield context.new_page()
        finally:
            chrome.close()


def wait_for_text(page, text: str, timeout_ms: float) -> str:
    """The page's visible text once it contains ``text`` (the UIs render after their API calls return)."""
    from playwright.sync_api import TimeoutError as PageTimeout

    try:
        page.wait_for_function("t => document.body.innerText.includes(t)", arg=text, timeout=timeout_ms)
    except PageTimeout:
        screenshot(page, "timed-out")
        shown = " | ".join(line for line in page.inner_text("body").splitlines() if line.strip())
        pytest.fail(f"{page.url}: {text!r} not shown within {timeout_ms / 1000:g} s; the page shows: {shown[:3000]}")
    return page.inner_text("body")


def screenshot(page, name: str) -> None:
    """Keep the page as ``$FGCLIP_SCREENSHOTS/<name>.png`` when that variable is set."""
    where = os.environ.get(SCREENSHOTS_ENV)
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(where) / f"{name}.png"), full_page=True)


def section_titles(text: str) -> list[str]:
    """The chart sections of an MLflow run or compare page, in page order, from its inner text.

    Each section heading renders as its name, then its chart count in parentheses, on the next line.
    """
    lines = [line.strip() for line in text.splitlines()]
    return [lines[i] for i in range(len(lines) - 1) if lines[i] and re.fullmatch(r"\(\d+\)", lines[i + 1])]
