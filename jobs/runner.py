"""The per-job child process: `python -m jobs.runner ...`, started by the worker for each attempt.

Running each attempt in its own process is what makes cancel and crash handling reliable: the
worker can always stop it (SIGTERM, then SIGKILL after a grace period) even if the job never calls
`check_cancelled()`, and the job dies with the worker (PR_SET_PDEATHSIG, set by the worker before
exec, plus a parent watchdog here). The child writes progress, log lines and the `done`/`failed`
outcome itself; the worker settles everything else (cancelled, interrupted, crashed).

Exit codes: 0 done, 1 failed, 3 cancelled, 4 the job was not ours to run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import psutil

from jobs.context import JobContext
from jobs.progress import Cancelled
from jobs.queue import finish, get_job, remove_work_dir
from jobs.registry import get_kind, import_kind_modules
from storage.db import make_engine

EXIT_DONE, EXIT_FAILED, EXIT_CANCELLED, EXIT_NOT_OURS = 0, 1, 3, 4

log = logging.getLogger("jobs.runner")

_PROJECT_ROOT = Path(__file__).resolve().parents[1]
_PR_SET_PDEATHSIG = 1
try:
    _libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
except OSError:  # pragma: no cover - exotic libc
    _libc = None


# --- the worker's side: start, stop and measure a job process ----------------------------------
def env_with_project_root() -> dict[str, str]:
    """This environment with the project root first on PYTHONPATH (`-m jobs.runner` must import)."""
    env = dict(os.environ)
    paths = [str(_PROJECT_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: the kernel SIGKILLs it when the worker dies, however.
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def job_log_path(data_dir: Path, job_id: int, attempt: int) -> Path:
    """Full stdout/stderr of one attempt (the DB keeps only the last lines); kept after the job."""
    return Path(data_dir) / "logs" / "jobs" / f"job-{job_id}-attempt-{attempt}.log"


def spawn_job_process(
    db_path: Path, data_dir: Path, modules: Sequence[str], job_id: int, worker_id: str, log_path: Path
) -> subprocess.Popen:
    """Start `python -m jobs.runner` for a claimed job, in its own process group, dying with us;
    its stdout and stderr (library prints, a crash's last words) go to `log_path`."""
    cmd = [sys.executable, "-m", "jobs.runner", "--db", str(db_path), "--data-dir", str(data_dir)]
    cmd += ["--modules", ",".join(modules), "--job-id", str(job_id), "--worker-id", worker_id]
    cmd += ["--parent-pid", str(os.getpid())]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            cmd,
            env=env_with_project_root(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def last_lines(path: Path, count: int = 20) -> list[str]:
    """The last `count` lines of a text file (empty if it is missing)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16_384))
            return f.read().decode("utf-8", "replace").splitlines()[-count:]
    except OSError:
        return []


def stop_job_process(child: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the job's process group, SIGKILL what is left after `grace_s`; returns once it exited."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            break
        try:
            child.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            log.warning("job process %s ignored %s for %.1f s", child.pid, sig.name, wait_s)
    try:
        os.killpg(child.pid, signal.SIGKILL)  # the job's own subprocesses, if any survived it
    except (ProcessLookupError, PermissionError):
        pass


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants now (0 if it is gone)."""
    total = 0
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


# --- the child's side ----------------------------------------------------------------------------


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


def run(args: argparse.Namespace) -> int:
    """Run one claimed attempt; returns the exit code."""
    engine = make_engine(Path(args.db))
    job = get_job(engine, args.job_id)
    if job.status != "running" or job.worker_id != args.worker_id:
        log.warning("job %s is %s under %s, not ours; not running it", job.id, job.status, job.worker_id)
        return EXIT_NOT_OURS
    try:
        import_kind_modules(args.modules.split(","))
        kind = get_kind(job.kind)
        if not job.work_dir:
            raise RuntimeError(f"job {job.id} was claimed without a work_dir; claim it with work_root=...")
    except Exception as exc:  # noqa: BLE001 - a setup problem must still reach the job row
        finish(
            engine,
            job.id,
            args.worker_id,
            "failed",
            error=readable_error(exc),
            message=readable_error(exc),
            log_lines=traceback.format_exc().splitlines(),
        )
        return EXIT_FAILED
    ctx = JobContext(
        job_id=job.id,
        engine=engine,
        data_dir=Path(args.data_dir),
        work_dir=Path(job.work_dir),
        worker_id=args.worker_id,
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

    def fail(exc: BaseException, lines: list[str]) -> int:
        ctx.flush(force=True)
        error = readable_error(exc)
        remove_work_dir(ctx.work_dir)  # gone before anyone sees the final status
        finish(
            engine,
            job.id,
            args.worker_id,
            "failed",
            error=error,
            message=error,
            peak_rss_bytes=_peak_rss_bytes(),
            log_lines=lines,
        )
        log.error("job %s failed: %s", job.id, error)
        return EXIT_FAILED

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
        return fail(exc, traceback.format_exc().splitlines())
    finally:
        logging.getLogger().removeHandler(forward)
    try:
        result_json = json.dumps(result) if result is not None else None
    except (TypeError, ValueError) as exc:
        return fail(ValueError(f"job kind {job.kind!r} returned a result that is not JSON: {exc}"), [])
    ctx.flush(force=True)
    remove_work_dir(ctx.work_dir)
    finish(
        engine,
        job.id,
        args.worker_id,
        "done",
        result_json=result_json,
        stage="done",
        percent=100.0,
        eta_s=None,
        peak_rss_bytes=_peak_rss_bytes(),
    )
    return EXIT_DONE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.runner", description=__doc__.split("\n")[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--modules", default="")
    parser.add_argument("--job-id", type=int, required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    if os.getppid() != args.parent_pid:
        return EXIT_NOT_OURS  # the worker is already gone
    threading.Thread(target=_watch_parent, args=(args.parent_pid,), daemon=True).start()
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s job-{args.job_id} %(levelname)s %(name)s: %(message)s",
    )
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
