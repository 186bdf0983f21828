"""The worker process: claims jobs from the queue and runs each attempt in a child process.

    python -m jobs.worker --db PATH --data-dir DIR --modules workbench.job_kinds [--once] [--poll 0.5]

`--modules` are imported so their `@job_kind`s are registered; only those kinds are claimed.
While a child runs, the worker heartbeats the job row, samples the child's memory, and watches for
cancel. On start (and every `stale_after_s` while idle) it recovers jobs of dead workers. SIGTERM or
SIGINT: the running attempt is stopped and marked `interrupted` (re-queued if its kind is
`requeue_safe`), its work_dir removed, and the worker exits 0. `--once` exits when nothing is left
to claim. Several workers may share one DB.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from jobs import queue
from jobs.registry import get_kind, import_kind_modules, known_kinds
from jobs.runner import EXIT_CANCELLED
from storage.db import open_db
from storage.models import Job

__all__ = ["Worker", "start_worker", "main"]

log = logging.getLogger("jobs.worker")

# Same defaults as workbench.settings (jobs/ must not import workbench; the app passes its values).
DEFAULT_HEARTBEAT_S = 2.0
DEFAULT_STALE_AFTER_S = 15.0
DEFAULT_GRACE_S = 3.0
_PROJECT_ROOT = Path(__file__).resolve().parents[1]

_PR_SET_PDEATHSIG = 1
try:
    _libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
except OSError:  # pragma: no cover - exotic libc
    _libc = None


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: SIGKILL it when the worker dies, however it dies.
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _env_with_project_root() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(_PROJECT_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class Worker:
    """One worker: a claim loop running one attempt at a time in a child process."""

    def __init__(self, db_path: Path, data_dir: Path, modules: Sequence[str], *, poll_s: float = 0.5,
                 heartbeat_s: float = DEFAULT_HEARTBEAT_S, stale_after_s: float = DEFAULT_STALE_AFTER_S,
                 grace_s: float = DEFAULT_GRACE_S):
        self.db_path, self.data_dir, self.modules = Path(db_path), Path(data_dir), list(modules)
        self.poll_s, self.heartbeat_s, self.stale_after_s, self.grace_s = poll_s, heartbeat_s, stale_after_s, grace_s
        self.engine = open_db(self.db_path)
        self.pid = os.getpid()
        self.worker_id = f"{socket.gethostname()}:{self.pid}"
        self.stopping = False

    def request_stop(self, signum: int = signal.SIGTERM, _frame: object = None) -> None:
        log.info("worker %s: got signal %s, stopping", self.worker_id, signum)
        self.stopping = True

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < end:
            time.sleep(min(0.1, max(0.0, end - time.monotonic())))

    def run(self, *, once: bool = False) -> None:
        """Claim and run jobs until stopped (or, with `once`, until nothing is claimable)."""
        queue.recover(self.engine, stale_after_s=self.stale_after_s)
        last_recover = time.monotonic()
        log.info("worker %s ready; kinds: %s", self.worker_id, ", ".join(known_kinds()))
        while not self.stopping:
            job = queue.claim(self.engine, self.worker_id, self.pid, kinds=known_kinds(),
                              work_root=self.data_dir / "work")
            if job is None:
                if once:
                    break
                if time.monotonic() - last_recover > self.stale_after_s:
                    queue.recover(self.engine, stale_after_s=self.stale_after_s)
                    last_recover = time.monotonic()
                self._sleep(self.poll_s)
                continue
            self.run_job(job)
        log.info("worker %s exits", self.worker_id)

    def run_job(self, job: Job) -> None:
        """Run one claimed attempt in a child process and settle its final status."""
        work_dir = Path(job.work_dir or self.data_dir / "work" / f"job-{job.id}")
        queue.remove_work_dir(work_dir)  # leftovers of a crashed attempt with the same name
        work_dir.mkdir(parents=True)
        log.info("job %s (%s) attempt %s starts in %s", job.id, job.kind, job.attempts, work_dir)
        # Use the same interpreter and path as this worker; its stdout is kept off our stdout.
        cmd = [sys.executable, "-m", "jobs.runner", "--db", str(self.db_path), "--data-dir", str(self.data_dir),
               "--modules", ",".join(self.modules), "--job-id", str(job.id), "--worker-id", self.worker_id,
               "--parent-pid", str(self.pid)]
        child = subprocess.Popen(cmd, env=_env_with_project_root(), stdout=sys.stderr.fileno(),
                                 start_new_session=True, preexec_fn=_die_with_parent)
        peak_rss, stop_reason = 0, None
        last_beat = time.monotonic()
        proc = psutil.Process(child.pid)
        while child.poll() is None:
            try:
                peak_rss = max(peak_rss, _tree_rss(proc))
            except psutil.Error:
                pass
            if stop_reason is None:
                if self.stopping:
                    stop_reason = "worker stopping"
                elif time.monotonic() - last_beat >= self.heartbeat_s:
                    last_beat = time.monotonic()
                    row = queue.update_running(self.engine, job.id, self.worker_id, {"heartbeat_at": time.time()})
                    stop_reason = "lost" if row is None else ("cancel" if row.cancel_requested else None)
                elif queue.get_job(self.engine, job.id).cancel_requested:
                    stop_reason = "cancel"
                if stop_reason is not None:
                    self._stop_child(child, job.id, stop_reason)
                    continue
            time.sleep(min(0.2, self.poll_s))
        self._settle(job, child.returncode, stop_reason, peak_rss, work_dir)

    def _stop_child(self, child: subprocess.Popen, job_id: int, reason: str) -> None:
        # SIGTERM the child's whole process group; SIGKILL whatever is left after the grace period.
        log.info("job %s: stopping its process (%s)", job_id, reason)
        for sig, wait_s in ((signal.SIGTERM, self.grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(child.pid, sig)
            except ProcessLookupError:
                break
            try:
                child.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                if sig == signal.SIGTERM:
                    log.warning("job %s ignored SIGTERM for %.1f s; killing it", job_id, self.grace_s)
        try:
            os.killpg(child.pid, signal.SIGKILL)  # the job's own subprocesses, if any survived
        except (ProcessLookupError, PermissionError):
            pass

    def _settle(self, job: Job, returncode: int, stop_reason: str | None, peak_rss: int, work_dir: Path) -> None:
        row = queue.get_job(self.engine, job.id)
        still_ours = row.status == "running" and row.worker_id == self.worker_id
        if still_ours:
            if stop_reason == "cancel" or row.cancel_requested or returncode == EXIT_CANCELLED:
                queue.finish(self.engine, job.id, self.worker_id, "cancelled", message="cancelled",
                             log_lines=["[worker] cancelled; partial outputs removed"])
            elif stop_reason == "worker stopping":
                requeue = _requeue_safe(job.kind)
                note = "re-queued: the worker was stopped" if requeue else "interrupted: the worker was stopped"
                queue.finish(self.engine, job.id, self.worker_id, "queued" if requeue else "interrupted",
                             message=note, log_lines=[f"[worker] {note}"],
                             error=None if requeue else "The worker was stopped while this job ran. Retry the job.")
            else:
                how = (f"was killed by signal {signal.Signals(-returncode).name}" if returncode < 0
                       else f"exited with code {returncode}")
                hint = " (SIGKILL often means it ran out of memory)" if returncode == -signal.SIGKILL else ""
                error = f"The job process {how} without reporting a result{hint}."
                queue.finish(self.engine, job.id, self.worker_id, "failed", error=error, message=error,
                             log_lines=[f"[worker] {error}"])
        queue.remove_work_dir(work_dir)
        if peak_rss:
            queue.append_log(self.engine, job.id, [], peak_rss_bytes=peak_rss)
        final = queue.get_job(self.engine, job.id)
        log.info("job %s ended: %s", job.id, final.status)


def _requeue_safe(kind: str) -> bool:
    try:
        return get_kind(kind).requeue_safe
    except ValueError:
        return False


def start_worker(db_path: Path, data_dir: Path, modules: Sequence[str], *, once: bool = False,
                 poll_s: float = 0.5, heartbeat_s: float = DEFAULT_HEARTBEAT_S,
                 stale_after_s: float = DEFAULT_STALE_AFTER_S, grace_s: float = DEFAULT_GRACE_S,
                 log_path: Path | None = None) -> subprocess.Popen:
    """Start `python -m jobs.worker` as a subprocess (stderr to `log_path` if given); the caller
    stops it with `.terminate()` (clean: its running job is interrupted) and `.wait()`."""
    cmd = [sys.executable, "-m", "jobs.worker", "--db", str(db_path), "--data-dir", str(data_dir),
           "--modules", ",".join(modules), "--poll", str(poll_s), "--heartbeat", str(heartbeat_s),
           "--stale-after", str(stale_after_s), "--grace", str(grace_s)]
    if once:
        cmd.append("--once")
    stderr = None
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        stderr = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
    try:
        return subprocess.Popen(cmd, env=_env_with_project_root(), stdout=subprocess.DEVNULL, stderr=stderr)
    finally:
        if stderr is not None:
            stderr.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--db", required=True, type=Path, help="workbench SQLite file")
    parser.add_argument("--data-dir", required=True, type=Path, help="workbench data folder (work dirs go in work/)")
    parser.add_argument("--modules", default="", help="comma-separated modules that register job kinds")
    parser.add_argument("--once", action="store_true", help="exit when no job is left to claim")
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between claims when idle")
    parser.add_argument("--heartbeat", type=float, default=DEFAULT_HEARTBEAT_S)
    parser.add_argument("--stale-after", type=float, default=DEFAULT_STALE_AFTER_S)
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE_S, help="seconds between SIGTERM and SIGKILL")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s worker %(levelname)s %(name)s: %(message)s")
    modules = [m.strip() for m in args.modules.split(",") if m.strip()]
    try:
        import_kind_modules(modules)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    worker = Worker(args.db, args.data_dir, modules, poll_s=args.poll, heartbeat_s=args.heartbeat,
                    stale_after_s=args.stale_after, grace_s=args.grace)
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    worker.run(once=args.once)
    return 0


if __name__ == "__main__":
    sys.exit(main())
