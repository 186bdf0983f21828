"""The durable job queue: a state machine on the `Job` table of the workbench SQLite file.

    queued -> running -> done | failed | cancelled | interrupted      (retry: back to queued)

Every read-then-write runs in `write_session` (BEGIN IMMEDIATE), so the claim is atomic across
processes: two workers can never take the same job, and at most one `needs_gpu` job runs at a time
because the claim query itself refuses a GPU job while another one is running.
Updates from a running job are fenced on (status='running', worker_id): once a job was cancelled,
recovered or finished, late writes from an old worker change nothing.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import exists
from sqlalchemy.engine import Engine
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from jobs.registry import get_kind, is_requeue_safe
from storage.db import write_session
from storage.models import Job

__all__ = ["JobNotFound", "submit", "claim", "cancel", "retry", "get_job", "list_jobs", "recover"]
__all__ += ["update_running", "finish", "append_log", "remove_work_dir", "TERMINAL", "RETRYABLE"]

log = logging.getLogger(__name__)

TERMINAL = ("done", "failed", "cancelled", "interrupted")
RETRYABLE = ("failed", "cancelled", "interrupted")
LOG_TAIL_LINES = 200
_MAX_LINE_CHARS = 2000  # one runaway line (a tensor repr) must not push everything else out
# What a job back in the queue must not keep from its last attempt.
_RELEASED = dict(worker_id=None, worker_pid=None, started_at=None, finished_at=None, heartbeat_at=None)


class JobNotFound(ValueError):
    """No job has the given id."""


def _detached(job: Job) -> Job:
    # A plain copy that stays readable after the session that loaded it is gone.
    return Job.model_validate(job.model_dump())


def _load(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(f"no job with id {job_id}; see the Jobs list for existing ids")
    return job


def _append_tail(tail: str, lines: Iterable[str]) -> str:
    new = [line[:_MAX_LINE_CHARS] for chunk in lines for line in str(chunk).splitlines()]
    if not new:
        return tail
    all_lines = (tail.splitlines() if tail else []) + new
    return "\n".join(all_lines[-LOG_TAIL_LINES:])


def submit(engine: Engine, kind: str, params: dict, *, title: str = "", priority: int = 0) -> Job:
    """Queue a job of a registered kind; `ValueError` (nothing inserted) for an unknown kind,
    params its `validate` hook rejects, or params that are not JSON."""
    job_kind = get_kind(kind)
    params = dict(params or {})
    if job_kind.validate is not None:
        params = job_kind.validate(params, engine)
        if not isinstance(params, dict):
            raise TypeError(f"the validate hook of job kind {kind!r} must return the params dict")
    try:
        params_json = json.dumps(params)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"parameters of a {kind!r} job must be JSON (str, number, list, dict): {exc}"
        ) from None
    job = Job(
        kind=kind,
        params_json=params_json,
        needs_gpu=job_kind.needs_gpu,
        priority=priority,
        title=title or kind,
    )
    with write_session(engine) as session:
        session.add(job)
        session.flush()  # assigns the id
        result = _detached(job)
        session.commit()
    log.info("queued job %s (%s)", result.id, kind)
    return result


def claim(
    engine: Engine,
    worker_id: str,
    pid: int,
    *,
    kinds: Sequence[str] | None = None,
    work_root: Path | None = None,
) -> Job | None:
    """Atomically take the next queued job (highest priority, then oldest) for `worker_id`.

    `kinds` limits the claim to kinds this worker can run; `work_root` is where the attempt's
    fresh `work_dir` will live (recorded on the row before anything is written there).
    """
    running_gpu = aliased(Job)
    query = (
        select(Job)
        .where(Job.status == "queued")
        .where(
            ~col(Job.needs_gpu) | ~exists().where(running_gpu.status == "running", col(running_gpu.needs_gpu))
        )
        .order_by(col(Job.priority).desc(), col(Job.id))
        .limit(1)
    )
    if kinds is not None:
        query = query.where(col(Job.kind).in_(list(kinds)))
    now = time.time()
    with write_session(engine) as session:
        job = session.exec(query).first()
        if job is None:
            session.rollback()
            return None
        job.status, job.worker_id, job.worker_pid = "running", worker_id, pid
        job.attempts += 1
        job.started_at = job.heartbeat_at = now
        job.finished_at, job.cancel_requested, job.error, job.result_json = None, False, None, None
        job.stage, job.percent, job.message, job.eta_s, job.peak_rss_bytes = "starting", 0.0, "", None, None
        if work_root is not None:
            job.work_dir = str(Path(work_root) / f"job-{job.id}-attempt-{job.attempts}")
        session.add(job)
        result = _detached(job)
        session.commit()
    return result


def get_job(engine: Engine, job_id: int) -> Job:
    """The job row; `JobNotFound` (a ValueError) if there is none."""
    with Session(engine) as session:
        return _detached(_load(session, job_id))


def list_jobs(engine: Engine, *, status: str | Iterable[str] | None = None, limit: int = 200) -> list[Job]:
    """Newest jobs first, optionally only those with the given status(es)."""
    query = select(Job).order_by(col(Job.id).desc()).limit(limit)
    if status is not None:
        query = query.where(col(Job.status).in_([status] if isinstance(status, str) else list(status)))
    with Session(engine) as session:
        return [_detached(job) for job in session.exec(query).all()]


def cancel(engine: Engine, job_id: int) -> Job:
    """Cancel a job: a queued one at once; a running one is stopped by its worker within seconds.

    Cancelling a cancelled job changes nothing; a finished one raises `ValueError`."""
    with write_session(engine) as session:
        job = _load(session, job_id)
        if job.status == "queued":
            job.status, job.finished_at, job.message = "cancelled", time.time(), "cancelled before it started"
        elif job.status == "running":
            job.cancel_requested, job.message = True, "cancelling…"
        elif job.status != "cancelled":
            raise ValueError(
                f"job {job_id} is already {job.status}; only queued or running jobs can be cancelled"
            )
        session.add(job)
        result = _detached(job)
        session.commit()
    return result


def retry(engine: Engine, job_id: int) -> Job:
    """Queue a failed, cancelled or interrupted job again; its next claim is a new attempt."""
    with write_session(engine) as session:
        job = _load(session, job_id)
        if job.status not in RETRYABLE:
            raise ValueError(f"job {job_id} is {job.status}; only {', '.join(RETRYABLE)} jobs can be retried")
        job.log_tail = _append_tail(
            job.log_tail, [f"--- retry requested after attempt {job.attempts} ({job.status}) ---"]
        )
        job.status, job.cancel_requested, job.error, job.result_json = "queued", False, None, None
        for key, value in _RELEASED.items():
            setattr(job, key, value)
        job.stage, job.percent, job.message, job.eta_s, job.work_dir = "", 0.0, "", None, None
        session.add(job)
        result = _detached(job)
        session.commit()
    return result


def update_running(
    engine: Engine, job_id: int, worker_id: str, values: dict[str, Any], log_lines: Sequence[str] = ()
) -> Job | None:
    """Write progress/heartbeat fields (and log lines) of a job this worker still runs.

    Returns the updated row, or None if the job is no longer running under `worker_id`."""
    with write_session(engine) as session:
        job = session.get(Job, job_id)
        if job is None or job.status != "running" or job.worker_id != worker_id:
            session.rollback()
            return None
        for key, value in values.items():
            setattr(job, key, value)
        job.log_tail = _append_tail(job.log_tail, log_lines)
        session.add(job)
        result = _detached(job)
        session.commit()
    return result


def finish(
    engine: Engine, job_id: int, worker_id: str, status: str, *, log_lines: Sequence[str] = (), **values: Any
) -> bool:
    """Move a job this worker runs to a terminal (or, for a requeue, `queued`) status; fenced like
    `update_running`. Returns False if the job had already left this worker."""
    values = {"status": status, "finished_at": time.time() if status in TERMINAL else None, **values}
    if status == "queued":
        values.update(_RELEASED, work_dir=None)
    return update_running(engine, job_id, worker_id, values, log_lines) is not None


def append_log(
    engine: Engine, job_id: int, lines: Sequence[str], *, peak_rss_bytes: int | None = None
) -> None:
    """Append lines to a job's log tail whatever its status (worker notes after the job ended),
    and raise its recorded peak RSS to `peak_rss_bytes` if that is higher."""
    with write_session(engine) as session:
        job = _load(session, job_id)
        job.log_tail = _append_tail(job.log_tail, lines)
        if peak_rss_bytes is not None:
            job.peak_rss_bytes = max(job.peak_rss_bytes or 0, peak_rss_bytes)
        session.add(job)
        session.commit()


def remove_work_dir(work_dir: str | Path | None) -> None:
    """Delete an attempt's scratch folder (partial outputs are never kept)."""
    if work_dir and not Path(work_dir).name.startswith("job-"):
        # The path comes from a DB row; never let a bad value delete a folder the queue did not make.
        log.warning("not removing %s: not a job work dir (job-<id>-attempt-<n>)", work_dir)
        return
    if work_dir and Path(work_dir).exists():
        shutil.rmtree(work_dir, ignore_errors=True)
        if Path(work_dir).exists():
            log.warning("could not fully remove work dir %s", work_dir)


def _process_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def recover(engine: Engine, *, stale_after_s: float) -> list[int]:
    """Settle `running` jobs whose worker is gone (pid dead or heartbeat older than `stale_after_s`).

    Such a job becomes `interrupted` (or `queued` again if its kind is `requeue_safe`, or
    `cancelled` if a cancel was pending) and its work_dir is removed. Returns the job ids."""
    now = time.time()
    recovered: list[tuple[int, str | None]] = []
    with write_session(engine) as session:
        for job in session.exec(select(Job).where(Job.status == "running")).all():
            age = now - (job.heartbeat_at or 0.0)
            alive = _process_alive(job.worker_pid)
            if alive and age <= stale_after_s:
                continue
            why = f"worker pid {job.worker_pid} is gone" if not alive else f"no heartbeat for {age:.0f} s"
            recovered.append((job.id, job.work_dir))
            if job.cancel_requested:
                job.status, job.finished_at, note = "cancelled", now, f"cancelled ({why})"
            elif is_requeue_safe(job.kind):
                job.status, job.work_dir, note = "queued", None, f"re-queued after the worker stopped ({why})"
                for key, value in _RELEASED.items():
                    setattr(job, key, value)
            else:
                job.status, job.finished_at, note = "interrupted", now, f"interrupted: {why}"
                job.error = (
                    f"The worker running this job stopped ({why}); partial outputs were removed. Retry it."
                )
            job.message = note
            job.log_tail = _append_tail(job.log_tail, [f"[queue] {note}"])
            session.add(job)
            log.warning("job %s: %s", job.id, note)
        session.commit()
    for _, work_dir in recovered:
        remove_work_dir(work_dir)
    return [job_id for job_id, _ in recovered]
