"""Runtime telemetry into the workbench DB: Run rows, and StepRecord/RequestRecord rows in batches.

A runtime step takes milliseconds; an SQLite commit per step would cost as much as the step. The
`TelemetryWriter` buffers rows and a background thread writes them every ~0.5 s or 256 rows, so the
UI (which polls) sees a run live without slowing it down.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel

from storage.db import write_session
from storage.models import RequestRecord, Run, StepRecord

log = logging.getLogger(__name__)

__all__ = ["RequestTiming", "TelemetryWriter", "create_run", "end_run", "layer_groups"]

MAX_BUFFERED = 100_000  # rows kept while the DB is unwritable; past this the oldest are dropped


def create_run(engine: Engine, *, runtime: str, checkpoint_path: str, policy_name: str,
               kind: str = "serve", checkpoint_id: int | None = None, config: dict | None = None) -> int:
    """Insert a running `Run` row and return its id."""
    with Session(engine) as session:
        run = Run(kind=kind, runtime=runtime, checkpoint_path=checkpoint_path, policy_name=policy_name,
                  checkpoint_id=checkpoint_id, config_json=json.dumps(config or {}))
        session.add(run)
        session.commit()
        return int(run.id)


def end_run(engine: Engine, run_id: int, *, status: str = "ended", result: dict | None = None) -> None:
    """Mark a run finished (idempotent: an already ended run keeps its first end time)."""
    # Read-then-write under BEGIN IMMEDIATE: with a plain deferred BEGIN, a telemetry writer that
    # commits between our read and our UPDATE makes SQLite refuse the upgrade at once with
    # "database is locked" (SQLITE_BUSY_SNAPSHOT), without waiting out the busy timeout.
    with write_session(engine) as session:
        run = session.get(Run, run_id)
        if run is None:
            return
        if run.ended_at is None:
            run.ended_at = time.time()
            run.status = status
        if result is not None:
            run.result_json = json.dumps(result)
        session.add(run)
        session.commit()


def layer_groups(layer_variants: Mapping[int, str]) -> list[dict]:
    """{0: a, 1: a, 2: b} -> [{"first": 0, "last": 1, "variant": a}, {"first": 2, "last": 2, ...}]."""
    groups: list[dict] = []
    for layer in sorted(layer_variants):
        variant = layer_variants[layer]
        if groups and groups[-1]["variant"] == variant and groups[-1]["last"] == layer - 1:
            groups[-1]["last"] = layer
        else:
            groups.append({"first": layer, "last": layer, "variant": variant})
    return groups


@dataclass
class RequestTiming:
    """What a runtime tracks per request; `record()` turns it into a RequestRecord with TTFT/TPOT."""

    request_id: str
    arrival_ts: float
    prompt_tokens: int = 0
    output_tokens: int = 0
    first_token_ts: float | None = None
    finished_ts: float | None = None
    variant_mix: dict[str, int] = field(default_factory=dict)  # decode steps per variant
    error: str | None = None

    def record(self, run_id: int) -> RequestRecord:
        ttft = (self.first_token_ts - self.arrival_ts) * 1000 if self.first_token_ts is not None else None
        tpot = None
        if self.first_token_ts is not None and self.finished_ts is not None and self.output_tokens > 1:
            tpot = (self.finished_ts - self.first_token_ts) * 1000 / (self.output_tokens - 1)
        return RequestRecord(run_id=run_id, request_id=self.request_id, arrival_ts=self.arrival_ts,
                             first_token_ts=self.first_token_ts, finished_ts=self.finished_ts,
                             ttft_ms=ttft, tpot_ms=tpot, prompt_tokens=self.prompt_tokens,
                             output_tokens=self.output_tokens, variant_mix_json=json.dumps(self.variant_mix),
                             error=self.error)


class TelemetryWriter:
    """Buffers telemetry rows of one run and writes them in batches from a background thread."""

    def __init__(self, engine: Engine, run_id: int, *, interval_s: float = 0.5, batch_rows: int = 256):
        self.engine, self.run_id = engine, run_id
        self.interval_s, self.batch_rows = interval_s, batch_rows
        self._rows: list[SQLModel] = []
        self._cond = threading.Condition()
        self._closed = False
        self._write_lock = threading.Lock()  # one writer at a time: the thread or an explicit flush()
        self.rows_written = 0
        self._thread = threading.Thread(target=self._loop, name=f"telemetry-run{run_id}", daemon=True)
        self._thread.start()

    def step(self, *, step: int, ts: float, duration_ms: float, num_prefill_tokens: int, num_decode_reqs: int,
             variant: str, policy_name: str, layer_variants: Mapping[int, str] | None = None) -> None:
        """Queue one StepRecord. `variant` is the step's decision; pass `layer_variants` (layer ->
        variant) when layer rules made some layers differ from it: it is stored as layer groups."""
        groups = layer_groups(layer_variants) if layer_variants else []
        self._add(StepRecord(run_id=self.run_id, step=step, ts=ts, duration_ms=duration_ms,
                             num_prefill_tokens=num_prefill_tokens, num_decode_reqs=num_decode_reqs,
                             variant=variant, policy_name=policy_name,
                             layer_variants_json=json.dumps(groups) if groups else None))

    def request(self, timing: RequestTiming) -> None:
        """Queue the RequestRecord of a finished (or failed, or cancelled) request."""
        self._add(timing.record(self.run_id))

    def _add(self, row: SQLModel) -> None:
        with self._cond:
            if self._closed:
                log.warning("telemetry for run %s is closed; dropping a %s", self.run_id, type(row).__name__)
                return
            self._rows.append(row)
            if len(self._rows) > MAX_BUFFERED:
                del self._rows[: len(self._rows) - MAX_BUFFERED]
                log.warning("telemetry buffer full (DB unwritable?); dropped the oldest rows")
            if len(self._rows) >= self.batch_rows:
                self._cond.notify()

    def flush(self) -> int:
        """Write everything buffered now; returns the rows written (0 if the DB refused, rows kept)."""
        with self._write_lock:
            with self._cond:
                rows, self._rows = self._rows, []
            if not rows:
                return 0
            try:
                with Session(self.engine) as session:
                    session.add_all(rows)
                    session.commit()
            except Exception:  # noqa: BLE001 - keep serving; the rows go back and are retried
                log.exception("writing %d telemetry rows for run %s failed; will retry",
                              len(rows), self.run_id)
                with self._cond:
                    self._rows[:0] = rows
                return 0
            self.rows_written += len(rows)
            return len(rows)

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._closed and len(self._rows) < self.batch_rows:
                    self._cond.wait(self.interval_s)
                closed = self._closed
            self.flush()
            if closed:
                return

    def close(self) -> None:
        """Write what is left and stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)
        self.flush()
