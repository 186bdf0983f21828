"""The progress contract between long-running library code and whoever runs it (job, CLI, test).

Library functions take a `Reporter` and call it; they never know whether a job row, a rich progress
bar or nothing at all is listening. `check_cancelled()` is where cooperative cancellation happens.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """Raised inside a job when the user asked it to stop."""


@dataclass
class Reporter:
    """Base reporter: logs stages and tracks ETA; subclasses forward updates somewhere visible."""

    started: float = field(default_factory=time.monotonic)
    stage: str = ""
    percent: float = 0.0

    def update(self, stage: str, percent: float, message: str = "") -> None:
        self.stage, self.percent = stage, max(0.0, min(100.0, percent))
        self.on_update(stage, self.percent, message, self.eta_s())

    def log(self, line: str) -> None:
        log.info(line)

    def check_cancelled(self) -> None:
        """Raise `Cancelled` if the run should stop; the default never does."""

    def eta_s(self) -> float | None:
        elapsed = time.monotonic() - self.started
        if self.percent <= 0.5 or self.percent >= 100:
            return None
        return elapsed * (100.0 - self.percent) / self.percent

    def on_update(self, stage: str, percent: float, message: str, eta_s: float | None) -> None:
        log.debug("%s %.1f%% %s", stage, percent, message)


class Span:
    """Maps a sub-task's 0..100 onto [lo, hi] of the parent's percent scale."""

    def __init__(self, reporter: Reporter, lo: float, hi: float):
        self.reporter, self.lo, self.hi = reporter, lo, hi

    def update(self, stage: str, percent: float, message: str = "") -> None:
        self.reporter.update(stage, self.lo + (self.hi - self.lo) * percent / 100.0, message)

    def log(self, line: str) -> None:
        self.reporter.log(line)

    def check_cancelled(self) -> None:
        self.reporter.check_cancelled()
