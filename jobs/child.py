"""The per-job child process, seen from the worker: start it, stop it, measure it.

Each attempt runs in its own process so the worker can always stop it (SIGTERM to its process
group, SIGKILL after a grace period) even if the job never calls `check_cancelled()`, and so a
crash or an out-of-memory kill takes down only that attempt. What runs inside is `jobs.runner`.

Start methods: `fork` (default on Linux) reuses the job-kind modules the worker already imported
(torch, transformers, llmcompressor: many seconds per job on a 2-core machine). It is safe because
the worker is single-threaded in Python, never runs job code, and closes its SQLite connections
before each fork. It is NOT safe once the CUDA driver is loaded in the worker (importing
llmcompressor on a GPU machine probes the device): then `auto` picks `spawn`, a fresh interpreter
(`python -m jobs.runner`) that re-imports the modules.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import psutil

from jobs import runner

__all__ = ["JobProcess", "start_job_process", "stop_job_process", "tree_rss", "job_log_path", "last_lines"]
__all__ += ["START_METHODS", "resolve_start_method", "env_with_project_root"]

log = logging.getLogger(__name__)

EXIT_CRASHED = 70  # the child's own machinery failed (see the attempt's log file)
START_METHODS = ("auto", "fork", "spawn")
_PROJECT_ROOT = Path(__file__).resolve().parents[1]
_PR_SET_PDEATHSIG = 1
try:
    _libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
except OSError:  # pragma: no cover - exotic libc
    _libc = None


class JobProcess:
    """A forked job process: the part of `subprocess.Popen` the worker needs."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None  # negative: killed by that signal, as with Popen

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit; `subprocess.TimeoutExpired` if it still runs after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"job process {self.pid}", timeout)
            time.sleep(0.02)
        return self.returncode


def job_log_path(data_dir: Path, job_id: int, attempt: int) -> Path:
    """Full stdout/stderr of one attempt (the DB keeps only the last lines); kept after the job."""
    return Path(data_dir) / "logs" / "jobs" / f"job-{job_id}-attempt-{attempt}.log"


def env_with_project_root() -> dict[str, str]:
    """This environment with the project root first on PYTHONPATH (`python -m jobs...` must import
    even where the project is not installed)."""
    env = dict(os.environ)
    paths = [str(_PROJECT_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    # Job processes run torch on a small shared CPU: spinning OpenMP waiters made 2 threads ~18x
    # slower than passive ones (docs/quantize-speed.md). Must be set before torch is imported.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _cuda_driver_loaded() -> bool:
    # libcuda is dlopen'ed on the first CUDA call (even a device count); a forked child of a
    # process that initialized the driver cannot use CUDA.
    try:
        with open("/proc/self/maps") as maps:
            return "libcuda.so" in maps.read()
    except OSError:
        return True  # cannot tell: be safe


def resolve_start_method(requested: str) -> str:
    """`fork` or `spawn` for `requested` in START_METHODS (`auto`: fork unless unsafe here)."""
    if requested not in START_METHODS:
        raise ValueError(f"unknown start method {requested!r}; use one of {', '.join(START_METHODS)}")
    if requested != "auto":
        return requested
    return "fork" if sys.platform.startswith("linux") and not _cuda_driver_loaded() else "spawn"


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies, however it dies (Linux)."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def start_job_process(
    method: str,
    db_path: Path,
    data_dir: Path,
    modules: Sequence[str],
    job_id: int,
    worker_id: str,
    log_path: Path,
) -> JobProcess | subprocess.Popen:
    """Start the process for claimed job `job_id` (method `fork` or `spawn`) in its own session
    (process group), dying with the worker, its stdout/stderr appended to `log_path`.

    For `fork` the caller must hold no open SQLite connection (dispose its engine first)."""
    if method == "fork":
        return _fork(db_path, data_dir, job_id, worker_id, log_path)
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
            preexec_fn=die_with_parent,
        )


def _fork(db_path: Path, data_dir: Path, job_id: int, worker_id: str, log_path: Path) -> JobProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    parent_pid = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns from this branch
        code = EXIT_CRASHED
        try:
            os.close(ready_r)
            os.setsid()
            die_with_parent()
            os.close(ready_w)  # tells the worker our process group exists
            out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.close(out)
            code = runner.child_main(Path(db_path), Path(data_dir), job_id, worker_id, parent_pid)
        except BaseException:  # noqa: BLE001 - report anything, then leave without unwinding the worker
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(ready_w)
    os.read(ready_r, 1)  # b"" once the child closed its end (after setsid) or died
    os.close(ready_r)
    return JobProcess(pid)


def stop_job_process(child: JobProcess | subprocess.Popen, grace_s: float) -> None:
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
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def last_lines(path: Path, count: int = 20) -> list[str]:
    """The last `count` lines of a text file (empty if it is missing)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16_384))
            return f.read().decode("utf-8", "replace").splitlines()[-count:]
    except OSError:
        return []
