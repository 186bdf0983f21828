"""The worker process: claims jobs from the queue and runs each attempt in a child process.

    python -m jobs.worker --db PATH --data-dir DIR --modules workbench.job_kinds [--once] [--poll 0.5]

`--modules` are imported so their `@job_kind`s are registered; only those kinds are claimed.
While a child runs, the worker heartbeats the job row, samples the child's memory, and watches for
cancel. On start (and every `stale_after_s` while idle) it recovers jobs of dead workers. SIGTERM or
SIGINT: the running attempt is stopped and marked `interrupted` (re-queued if its kind is
`requeue_safe`), its work_dir removed, and the worker exits 0. `--once` exits when nothing is left
to claim. `--start-method` (auto|fork|spawn): see `jobs/child.py`. Several workers may share one DB.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Engine

from jobs import child as job_process
from jobs import queue
from jobs.registry import import_kind_modules, is_requeue_safe, known_kinds
from jobs.runner import EXIT_CANCELLED
from storage.db import open_db
from storage.models import Job

__all__ = ["Worker", "start_worker", "main"]

log = logging.getLogger("jobs.worker")

# Same defaults as workbench.settings (jobs/ must not import workbench; the app passes its values).
DEFAULT_HEARTBEAT_S = 2.0
DEFAULT_STALE_AFTER_S = 15.0
DEFAULT_GRACE_S = 3.0


@dataclass
class Worker:
    """One worker: a claim loop running one attempt at a time in a child process."""

    db_path: Path
    data_dir: Path
    modules: Sequence[str]
    poll_s: float = 0.5
    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    stale_after_s: float = DEFAULT_STALE_AFTER_S
    grace_s: float = DEFAULT_GRACE_S  # between SIGTERM and SIGKILL of a job being stopped
    start_method: str = "auto"  # how job processes start: see jobs/child.py
    stopping: bool = False
    engine: Engine = field(init=False)

    def __post_init__(self) -> None:
        self.db_path, self.data_dir = Path(self.db_path), Path(self.data_dir)
        self.engine = open_db(self.db_path)
        self.pid = os.getpid()
        self.worker_id = f"{socket.gethostname()}:{self.pid}"

    def request_stop(self, signum: int = signal.SIGTERM, _frame: object = None) -> None:
        """Signal handler: finish up (stopping the running job) and leave the loop."""
        log.info("worker %s: got signal %s, stopping", self.worker_id, signum)
        self.stopping = True

    def run(self, *, once: bool = False) -> None:
        """Claim and run jobs until stopped (or, with `once`, until nothing is claimable)."""
        queue.recover(self.engine, stale_after_s=self.stale_after_s)
        last_recover = time.monotonic()
        log.info("worker %s ready; kinds: %s", self.worker_id, ", ".join(known_kinds()))
        while not self.stopping:
            work_root = self.data_dir / "work"
            job = queue.claim(self.engine, self.worker_id, self.pid, kinds=known_kinds(), work_root=work_root)
            if job is not None:
                self.run_job(job)
                continue
            if once:
                break
            if time.monotonic() - last_recover > self.stale_after_s:
                queue.recover(self.engine, stale_after_s=self.stale_after_s)
                last_recover = time.monotonic()
            deadline = time.monotonic() + self.poll_s
            while not self.stopping and time.monotonic() < deadline:
                time.sleep(0.05)
        log.info("worker %s exits", self.worker_id)

    def run_job(self, job: Job) -> None:
        """Run one claimed attempt in a child process and settle its final status."""
        work_dir = Path(job.work_dir or self.data_dir / "work" / f"job-{job.id}")
        queue.remove_work_dir(work_dir)  # leftovers of a crashed attempt with the same name
        work_dir.mkdir(parents=True)
        log.info("job %s (%s) attempt %s starts in %s", job.id, job.kind, job.attempts, work_dir)
        log_path = job_process.job_log_path(self.data_dir, job.id, job.attempts)
        self.engine.dispose()  # no SQLite connection may cross a fork (see jobs/child.py)
        method = job_process.resolve_start_method(self.start_method)
        child = job_process.start_job_process(
            method, self.db_path, self.data_dir, self.modules, job.id, self.worker_id, log_path
        )
        peak_rss, stop_reason, last_beat = 0, None, time.monotonic()
        while child.poll() is None:
            peak_rss = max(peak_rss, job_process.tree_rss(child.pid))
            if stop_reason is None:
                if self.stopping:
                    stop_reason = "worker stopping"
                elif time.monotonic() - last_beat >= self.heartbeat_s:
                    last_beat = time.monotonic()
                    beat = {"heartbeat_at": time.time()}
                    row = queue.update_running(self.engine, job.id, self.worker_id, beat)
                    stop_reason = "lost" if row is None else ("cancel" if row.cancel_requested else None)
                elif queue.get_job(self.engine, job.id).cancel_requested:
                    stop_reason = "cancel"
                if stop_reason is not None:
                    log.info("job %s: stopping its process (%s)", job.id, stop_reason)
                    job_process.stop_job_process(child, self.grace_s)
                    continue
            time.sleep(min(0.2, self.poll_s))
        self._settle(job, child.returncode, stop_reason, work_dir, log_path)
        if peak_rss:
            queue.append_log(self.engine, job.id, [], peak_rss_bytes=peak_rss)
        log.info("job %s ended: %s", job.id, queue.get_job(self.engine, job.id).status)

    def _settle(
        self, job: Job, returncode: int, stop_reason: str | None, work_dir: Path, log_path: Path
    ) -> None:
        # The child already wrote done/failed; anything else that ends an attempt is settled here.
        row = queue.get_job(self.engine, job.id)
        if row.status == "running" and row.worker_id == self.worker_id:
            error = None
            if stop_reason == "cancel" or row.cancel_requested or returncode == EXIT_CANCELLED:
                status, note = "cancelled", "cancelled; partial outputs removed"
            elif stop_reason == "worker stopping" and is_requeue_safe(job.kind):
                status, note = "queued", "re-queued: the worker was stopped"
            elif stop_reason == "worker stopping":
                status, note = "interrupted", "interrupted: the worker was stopped"
                error = (
                    "The worker was stopped while this job ran; partial outputs were removed. Retry the job."
                )
            else:
                how = (
                    f"was killed by signal {signal.Signals(-returncode).name}"
                    if returncode < 0
                    else f"exited with code {returncode}"
                )
                hint = " (SIGKILL often means it ran out of memory)" if returncode == -signal.SIGKILL else ""
                status = "failed"
                note = error = f"The job process {how} without reporting a result{hint}."
            lines = [f"[worker] {note}"]
            if status == "failed":  # the job could not report why; its last output may say
                lines = [
                    f"[worker] last output of the job process ({log_path}):",
                    *job_process.last_lines(log_path),
                    *lines,
                ]
            queue.finish(
                self.engine, job.id, self.worker_id, status, message=note, error=error, log_lines=lines
            )
        queue.remove_work_dir(work_dir)


def start_worker(
    db_path: Path,
    data_dir: Path,
    modules: Sequence[str],
    *,
    once: bool = False,
    poll_s: float = 0.5,
    heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
    grace_s: float = DEFAULT_GRACE_S,
    start_method: str = "auto",
    log_path: Path | None = None,
) -> subprocess.Popen:
    """Start `python -m jobs.worker` as a subprocess (stderr to `log_path` if given, else inherited).

    Stop it with `.terminate()` (clean: its running job is interrupted, work_dir removed) + `.wait()`."""
    cmd = [sys.executable, "-m", "jobs.worker", "--db", str(db_path), "--data-dir", str(data_dir)]
    cmd += ["--modules", ",".join(modules), "--poll", str(poll_s), "--heartbeat", str(heartbeat_s)]
    cmd += ["--stale-after", str(stale_after_s), "--grace", str(grace_s), "--start-method", start_method]
    cmd += ["--once"] if once else []
    if log_path is None:
        return subprocess.Popen(cmd, env=job_process.env_with_project_root(), stdout=subprocess.DEVNULL)
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as stderr:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            cmd, env=job_process.env_with_project_root(), stdout=subprocess.DEVNULL, stderr=stderr
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--db", required=True, type=Path, help="workbench SQLite file")
    parser.add_argument("--data-dir", required=True, type=Path, help="data folder (work dirs go in work/)")
    parser.add_argument("--modules", default="", help="comma-separated modules that register job kinds")
    parser.add_argument("--once", action="store_true", help="exit when no job is left to claim")
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between claims when idle")
    parser.add_argument("--heartbeat", type=float, default=DEFAULT_HEARTBEAT_S)
    parser.add_argument("--stale-after", type=float, default=DEFAULT_STALE_AFTER_S)
    parser.add_argument(
        "--grace", type=float, default=DEFAULT_GRACE_S, help="seconds from SIGTERM to SIGKILL"
    )
    parser.add_argument(
        "--start-method", choices=job_process.START_METHODS, default="auto", help="how job processes start"
    )
    args = parser.parse_args(argv)
    log_format = "%(asctime)s worker %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=log_format)
    modules = [m.strip() for m in args.modules.split(",") if m.strip()]
    try:
        import_kind_modules(modules)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    worker = Worker(
        args.db,
        args.data_dir,
        modules,
        args.poll,
        args.heartbeat,
        args.stale_after,
        args.grace,
        args.start_method,
    )
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    worker.run(once=args.once)
    return 0


if __name__ == "__main__":
    sys.exit(main())
