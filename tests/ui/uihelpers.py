"""Helpers shared by the browser tests (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# Run the flows on the embedded SmolLM2 instead of a tiny random model (documentation screenshots).
REAL_MODEL = os.environ.get("FLEXQUANT_UI_REAL_MODEL") == "1"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def choose(page, elem_id: str, text: str, attempts: int = 3) -> None:
    """Pick the dropdown option containing `text`: type to filter the list, click the option, and
    check the choice stuck (a list refreshed by a timer while typing starts over, as for a user)."""
    box = page.locator(f"#{elem_id} input")
    for _ in range(attempts):
        box.click()
        box.fill(text)
        page.get_by_role("option", name=text).first.click()
        page.keyboard.press("Tab")  # leaving the box clears typed text that was not a selection
        page.wait_for_timeout(300)
        if text in box.input_value():
            return
    raise AssertionError(f"could not select {text!r} in #{elem_id} (shows {box.input_value()!r})")


def shot(app, page, name: str) -> Path:
    """Screenshot of the whole page, without leftover error toasts of earlier steps."""
    for close in page.get_by_role("button", name="Close", exact=True).all():
        if close.is_visible():
            close.click()
    page.wait_for_timeout(300)
    path = app.shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
