"""`JobContext`: the `Reporter` a job function receives, backed by its row in the queue.

It lives inside the per-job child process (see `jobs/child.py`, `jobs/runner.py`). Progress and log lines are
buffered and written at most every `flush_interval_s` (a job may report per batch, thousands of
times) and always on a stage change; each write also reads back `cancel_requested`, which is what
`check_cancelled()` acts on.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from jobs.progress import Cancelled, Reporter
from jobs.queue import update_running

__all__ = ["JobContext"]

log = logging.getLogger(__name__)


class JobContext(Reporter):
    """Progress, log and cancellation for one attempt of one job.

    `work_dir` is fresh and empty; the queue deletes it when the attempt ends, so a job publishes
    its outputs by renaming them out of it. `data_dir` is the workbench data folder.
    """

    def __init__(
        self,
        *,
        job_id: int,
        engine: Engine,
        data_dir: Path,
        work_dir: Path,
        worker_id: str,
        flush_interval_s: float = 0.5,
    ):
        super().__init__()
        self.job_id, self.engine, self.worker_id = job_id, engine, worker_id
        self.data_dir, self.work_dir = Path(data_dir), Path(work_dir)
        self.flush_interval_s = flush_interval_s
        self.cancel_seen = False  # the row says cancel (or the job is no longer ours)
        self.stop_signalled = False  # the worker sent SIGTERM (see runner)
        self.writing = False  # inside a DB write: a stop signal must not interrupt it half-way
        self._pending: dict[str, Any] = {}
        self._lines: list[str] = []
        self._last_flush = 0.0
        self._last_stage: str | None = None

    # --- Reporter API -------------------------------------------------------------------------
    def on_update(self, stage: str, percent: float, message: str, eta_s: float | None) -> None:
        stage_changed, self._last_stage = stage != self._last_stage, stage
        self._pending.update(stage=stage, percent=percent, message=message, eta_s=eta_s)
        log.debug("job %s: %s %.1f%% %s", self.job_id, stage, percent, message)
        self.flush(force=stage_changed or percent >= 100.0)
        self._raise_if_stopped()

    def log(self, line: str) -> None:
        """Append a line to the job's log tail (and the attempt's full log file)."""
        line = str(line)
        log.info("job %s: %s", self.job_id, line)
        self._lines.append(line)
        self.flush()
        self._raise_if_stopped()

    def buffer_line(self, line: str) -> None:
        """Queue a line for the log tail without echoing or flushing (for log handlers)."""
        self._lines.append(line)

    def check_cancelled(self) -> None:
        """Raise `Cancelled` if the user cancelled this job (checked against the DB, throttled)."""
        if not (self.cancel_seen or self.stop_signalled):
            self.flush()
        if self.cancel_seen or self.stop_signalled:
            raise Cancelled(f"job {self.job_id} was cancelled")

    # --- persistence --------------------------------------------------------------------------
    def flush(self, force: bool = False) -> None:
        """Write buffered progress and log lines now (if `force` or the interval has passed)."""
        now = time.monotonic()
        if not force and now - self._last_flush < self.flush_interval_s:
            return
        self.writing = True
        try:
            values, lines = dict(self._pending), list(self._lines)
            self._pending.clear()
            self._lines.clear()
            self._last_flush = now
            row = update_running(self.engine, self.job_id, self.worker_id, values, lines)
        finally:
            self.writing = False
        if row is None or row.cancel_requested:
            self.cancel_seen = True

    def _raise_if_stopped(self) -> None:
        # A stop signal that arrived during a DB write was deferred (see runner); act on it now.
        if self.stop_signalled:
            raise Cancelled(f"job {self.job_id} was stopped by the worker")
