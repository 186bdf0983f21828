"""What every tab shares: the DB engine, the settings, and the one runtime this app serves with.

The app serves at most one checkpoint at a time (one GPU, one port); `RuntimeSlot` holds its
`ServerHandle` behind a lock so two browser tabs cannot start two servers. Everything else a tab
needs comes from the library (`workbench.views`, `workbench.plots`, `workbench.chat_client`...).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
from sqlalchemy.engine import Engine

from jobs.progress import Reporter
from workbench.policy import Policy
from workbench.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["NoRuntime", "RuntimeSlot", "UIContext", "TabHook", "GradioReporter", "user_error"]


class NoRuntime(RuntimeError):
    """Raised when a tab needs a running server and none is started."""

    def __init__(self) -> None:
        super().__init__("no runtime is running: start one in the Runtime tab first")


@dataclass
class RuntimeSlot:
    """The app's serving process (or none) and the checkpoint/policy it was started with."""

    handle: Any = None  # workbench.runtime.serve.ServerHandle
    checkpoint_name: str = ""
    checkpoint_id: int | None = None
    policy: Policy | None = None
    healthy: bool = False  # set once the server answered /health
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def running(self) -> bool:
        return self.handle is not None

    def base_url(self) -> str:
        """URL of the running server; `NoRuntime` if there is none."""
        handle = self.handle
        if handle is None:
            raise NoRuntime()
        return handle.base_url.rstrip("/")

    def run_id(self) -> int | None:
        handle = self.handle
        return getattr(handle, "run_id", None) if handle is not None else None

    def stop(self) -> None:
        """Stop the server if one runs (idempotent)."""
        with self.lock:
            handle, self.handle, self.policy, self.healthy = self.handle, None, None, False
        if handle is not None:
            log.info("stopping runtime at %s", handle.base_url)
            handle.stop()


@dataclass
class UIContext:
    engine: Engine
    settings: Settings
    runtime: RuntimeSlot = field(default_factory=RuntimeSlot)


@dataclass
class TabHook:
    """How a tab refreshes its lists when the page loads or the tab is selected: the layout is built
    once at start-up, so dropdown choices computed then would go stale (new checkpoints, policies)."""

    fn: Any
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)


class GradioReporter(Reporter):
    """Forwards library progress (`jobs.progress.Reporter`) to a `gr.Progress` bar."""

    def __init__(self, progress: gr.Progress) -> None:
        super().__init__()
        self.progress = progress

    def on_update(self, stage: str, percent: float, message: str, eta_s: float | None) -> None:
        self.progress(percent / 100.0, desc=f"{stage}: {message}" if message else stage)


def user_error(exc: Exception) -> gr.Error:
    """A `gr.Error` carrying the library's message (they are written for users); unknown exception
    types get their type name so a bug is not mistaken for bad input."""
    if isinstance(exc, ValueError | RuntimeError | OSError):
        return gr.Error(str(exc), duration=None)
    log.exception("unexpected error in a UI callback")
    return gr.Error(f"{type(exc).__name__}: {exc}", duration=None)
