"""Job kinds used by the queue and worker tests (imported by the test process and, through
`--modules tests.jobkinds_for_tests`, by real worker processes)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from jobs.registry import job_kind


def _append(path: str, line: str) -> None:
    # O_APPEND keeps lines from concurrent processes whole.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _write_pid_file(params: dict) -> None:
    if params.get("pid_file"):
        tmp = params["pid_file"] + ".tmp"
        Path(tmp).write_text(str(os.getpid()))
        os.replace(tmp, params["pid_file"])


def _wait_for_file(path: str, timeout: float = 60.0, tick=None) -> None:
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        if tick is not None:
            tick()
        time.sleep(0.05)


@job_kind("sleep")
def sleep_job(ctx, params):
    """Sleep `seconds` in `steps` steps, reporting progress and checking for cancel."""
    steps = int(params.get("steps", 10))
    for i in range(steps):
        ctx.check_cancelled()
        ctx.update("sleeping", 100.0 * i / steps, f"step {i + 1}/{steps}")
        ctx.log(f"step {i + 1}")
        time.sleep(float(params.get("seconds", 1.0)) / steps)
    return {"steps": steps}


@job_kind("progress_gate")
def progress_gate_job(ctx, params):
    """Reports rising progress and log lines until params['gate'] exists."""
    ticks = [0]

    def tick() -> None:
        ticks[0] += 1
        ctx.update("waiting", min(90.0, ticks[0]), f"tick {ticks[0]}")
        ctx.log(f"tick {ticks[0]}")
        ctx.check_cancelled()

    _wait_for_file(params["gate"], tick=tick)
    return {"ticks": ticks[0]}


@job_kind("record")
def record_job(ctx, params):
    """Append '<job id> <worker pid>' to params['path']: who ran which job."""
    _append(params["path"], f"{ctx.job_id} {os.getppid()}")
    return {"worker_pid": os.getppid()}


@job_kind("write_then_sleep")
def write_then_sleep_job(ctx, params):
    """Write scratch files into work_dir, then sleep without ever calling check_cancelled."""
    for i in range(3):
        (ctx.work_dir / f"part-{i}.bin").write_bytes(b"x" * 1024)
    _write_pid_file(params)
    time.sleep(float(params.get("seconds", 120)))
    return {"slept": True}


@job_kind("stubborn")
def stubborn_job(ctx, params):
    """Ignore SIGTERM and Cancelled alike: only SIGKILL stops this one."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    (ctx.work_dir / "scratch.bin").write_bytes(b"y" * 1024)
    _write_pid_file(params)
    deadline = time.monotonic() + float(params.get("seconds", 120))
    while time.monotonic() < deadline:
        try:
            time.sleep(0.1)
        except Exception:  # noqa: BLE001 - deliberately swallows Cancelled
            pass
    return {"slept": True}


@job_kind("fail")
def fail_job(ctx, params):
    ctx.log("about to fail")
    raise ValueError(params.get("message", "the input folder has no config.json; pick a model folder"))


@job_kind("fail_unless_exists")
def fail_unless_exists_job(ctx, params):
    """Fails until the file params['path'] exists (for retry)."""
    if not Path(params["path"]).exists():
        raise FileNotFoundError(f"{params['path']} does not exist yet")
    return {"found": params["path"]}


@job_kind("progress")
def progress_job(ctx, params):
    """Two stages, many log lines, a result, and a known memory peak."""
    ctx.update("load", 10, "loading")
    block = bytearray(int(params.get("alloc_mb", 64)) * 1024 * 1024)
    for i in range(0, len(block), 4096):  # touch every page so it counts in RSS
        block[i] = 1
    for i in range(int(params.get("lines", 250))):
        ctx.log(f"line {i}")
    ctx.update("compute", 90, "almost there")
    return {"answer": 42, "bytes": len(block)}


@job_kind("gpu_sleep", needs_gpu=True)
def gpu_sleep_job(ctx, params):
    """A GPU job: logs start/end events; waits for params['wait_for'] to exist if given."""
    _append(params["events"], f"start {ctx.job_id}")
    if params.get("wait_for"):
        _wait_for_file(params["wait_for"])
    else:
        time.sleep(float(params.get("seconds", 0.3)))
    _append(params["events"], f"end {ctx.job_id}")


@job_kind("touch")
def touch_job(ctx, params):
    Path(params["path"]).touch()


@job_kind("requeue_gate", requeue_safe=True)
def requeue_gate_job(ctx, params):
    """Safe to restart from scratch after a crash; runs until params['gate'] exists."""
    (ctx.work_dir / "partial.bin").write_bytes(b"z")
    _write_pid_file(params)
    _wait_for_file(params["gate"])
    return {"done": True}


def _validate_count(params: dict, engine) -> dict:
    n = params.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"'n' must be a positive integer, got {n!r}; e.g. {{'n': 3}}")
    return {"n": n, "label": str(params.get("label", "count"))}


@job_kind("count", validate=_validate_count)
def count_job(ctx, params):
    return {"total": sum(range(params["n"]))}


@job_kind("bad_result")
def bad_result_job(ctx, params):
    return {"not json": object()}


@job_kind("crash")
def crash_job(ctx, params):
    """Dies the hard way (as the OOM killer would do it), after a last word on stderr."""
    os.write(2, b"last words before the crash\n")
    os.kill(os.getpid(), signal.SIGKILL)
