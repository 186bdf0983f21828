"""What runs inside the per-job child process (started by the worker, see `jobs/child.py`).

`child_main` is entered right after a fork; `python -m jobs.runner ...` is the same for a child
started as a fresh interpreter (the `spawn` start method).

The child builds the `JobContext`, turns the worker's SIGTERM into `Cancelled` inside the job
function (even one that never checks), and writes progress, log lines and the `done`/`failed`
outcome itself; the worker settles everything else (cancelled, interrupted, crashed).

Exit codes: 0 done, 1 failed, 3 cancelled, 4 the job was not ours to run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from jobs.context import JobContext
from jobs.progress import Cancelled
from jobs.queue import finish, get_job, remove_work_dir
from jobs.registry import get_kind, import_kind_modules
from storage.db import make_engine

__all__ = ["EXIT_DONE", "EXIT_FAILED", "EXIT_CANCELLED", "EXIT_NOT_OURS", "run_attempt", "child_main"]

EXIT_DONE, EXIT_FAILED, EXIT_CANCELLED, EXIT_NOT_OURS = 0, 1, 3, 4

log = logging.getLogger("jobs.runner")


def _watch_parent(parent_pid: int) -> None:
    # Backstop for PR_SET_PDEATHSIG (Linux-only, and racy if the worker died before it was set):
    # once reparented, take the whole process group (the job's own subprocesses too) down.
    while True:
        if os.getppid() != parent_pid:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        time.sleep(1.0)


class _ForwardToJobLog(logging.Handler):
    """Copies log records from library code into the job's log tail."""

    def __init__(self, ctx: JobContext, job_module: str):
        super().__init__(logging.INFO)
        self.ctx, self.job_module = ctx, job_module.split(".")[0]
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        # Our own records are already in the tail (ctx.log) or are about the tail itself.
        if record.name.startswith(("jobs.", "sqlalchemy")) or self.ctx.writing:
            return
        ours = record.name.startswith((self.job_module, "workbench"))
        if ours or record.levelno >= logging.WARNING:
            self.ctx.buffer_line(self.format(record))


def _peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux; children counts descendants the job waited for.
    usage = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    return usage * (1 if sys.platform == "darwin" else 1024)


def readable_error(exc: BaseException) -> str:
    """One line for `Job.error`: the exception type and message, no traceback."""
    message = str(exc).strip()
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def run_attempt(db_path: Path, data_dir: Path, job_id: int, worker_id: str) -> int:
    """Run the claimed attempt of job `job_id` in this process; returns the exit code."""
    engine = make_engine(db_path)
    job = get_job(engine, job_id)
    if job.status != "running" or job.worker_id != worker_id:
        log.warning("job %s is %s under %s, not ours; not running it", job.id, job.status, job.worker_id)
        return EXIT_NOT_OURS

    def fail(exc: BaseException, lines: list[str]) -> int:
        error = readable_error(exc)
        remove_work_dir(job.work_dir)  # gone before anyone sees the final status
        rss = _peak_rss_bytes()
        finish(
            engine,
            job.id,
            worker_id,
            "failed",
            error=error,
            message=error,
            peak_rss_bytes=rss,
            log_lines=lines,
        )
        log.error("job %s failed: %s", job.id, error)
        return EXIT_FAILED

    try:
        kind = get_kind(job.kind)
        if not job.work_dir:
            raise RuntimeError(f"job {job.id} was claimed without a work_dir; claim it with work_root=...")
    except Exception as exc:  # noqa: BLE001 - a setup problem must still reach the job row
        return fail(exc, traceback.format_exc().splitlines())
    ctx = JobContext(
        job_id=job.id,
        engine=engine,
        data_dir=Path(data_dir),
        work_dir=Path(job.work_dir),
        worker_id=worker_id,
    )
    job_running = True

    def on_sigterm(_signum: int, _frame: object) -> None:
        ctx.stop_signalled = True
        # Interrupt the job function where it is (even if it never checks), but never half-way
        # through one of our DB writes: then the flag is acted on right after the write.
        if job_running and not ctx.writing:
            raise Cancelled(f"job {job.id} was stopped by the worker")

    signal.signal(signal.SIGTERM, on_sigterm)
    forward = _ForwardToJobLog(ctx, kind.fn.__module__)
    logging.getLogger().addHandler(forward)
    try:
        ctx.update("running", 0.0, "")
        result = kind.fn(ctx, json.loads(job.params_json or "{}"))
        job_running = False
    except Cancelled:
        job_running = False
        ctx.log("stopped: cancelled")
        ctx.flush(force=True)
        return EXIT_CANCELLED
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the job row
        job_running = False
        ctx.flush(force=True)
        return fail(exc, traceback.format_exc().splitlines())
    finally:
        logging.getLogger().removeHandler(forward)
    try:
        result_json = json.dumps(result) if result is not None else None
    except (TypeError, ValueError) as exc:
        return fail(ValueError(f"job kind {job.kind!r} returned a result that is not JSON: {exc}"), [])
    ctx.flush(force=True)
    remove_work_dir(ctx.work_dir)
    final = dict(
        result_json=result_json, stage="done", percent=100.0, eta_s=None, peak_rss_bytes=_peak_rss_bytes()
    )
    finish(engine, job.id, worker_id, "done", **final)
    return EXIT_DONE


def child_main(db_path: Path, data_dir: Path, job_id: int, worker_id: str, parent_pid: int) -> int:
    """Entry of a freshly forked job process (output already redirected); returns the exit code."""
    if os.getppid() != parent_pid:
        return EXIT_NOT_OURS  # the worker died before we got going
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # the worker's own handlers must not apply here
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    log_format = f"%(asctime)s job-{job_id} %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=log_format, force=True)
    return run_attempt(db_path, data_dir, job_id, worker_id)


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.runner`: a job process started as a fresh interpreter."""
    parser = argparse.ArgumentParser(prog="python -m jobs.runner", description=__doc__.split("\n")[0])
    parser.add_argument("--db", required=True, type=Path)
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--modules", default="", help="comma-separated modules that register job kinds")
    parser.add_argument("--job-id", type=int, required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    import_kind_modules(args.modules.split(","))
    return child_main(args.db, args.data_dir, args.job_id, args.worker_id, args.parent_pid)


if __name__ == "__main__":
    sys.exit(main())
