"""Real worker processes on a real SQLite file: claim race, GPU exclusivity, progress and log,
cancel of jobs that never check, failure, retry, SIGTERM, and recovery after SIGKILL."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

import tests.jobkinds_for_tests  # noqa: F401 - registers the test job kinds
from jobs import child, queue
from jobs.worker import start_worker

MODULES = ["tests.jobkinds_for_tests"]
log = logging.getLogger(__name__)


def wait_for(predicate, what: str, timeout: float = 30.0):
    """Poll until `predicate()` is truthy; the timeout only guards against a hang."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def job_when(engine, job_id: int, condition, what: str, timeout: float = 30.0):
    """The job row once `condition(row)` holds."""

    def check():
        row = queue.get_job(engine, job_id)
        return row if condition(row) else None

    return wait_for(check, what, timeout)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture
def workers(tmp_path, db_engine):
    """Start workers on tmp_path/wb.db; every one still running is stopped at the end."""
    started = []

    def start(once: bool = False, start_method: str = "auto"):
        proc = start_worker(
            tmp_path / "wb.db",
            tmp_path,
            MODULES,
            once=once,
            poll_s=0.1,
            heartbeat_s=0.5,
            stale_after_s=15,
            grace_s=1.0,
            start_method=start_method,
            log_path=tmp_path / f"worker-{len(started)}.log",
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for log_file in sorted(tmp_path.glob("worker-*.log")):
        log.info("--- %s\n%s", log_file.name, log_file.read_text()[-3000:])


def pid_from(path: Path) -> int:
    return int(wait_for(lambda: path.exists() and path.read_text(), f"{path.name} to be written"))


def test_two_workers_claim_each_job_exactly_once(db_engine, workers, tmp_path):
    record = tmp_path / "ran.txt"
    ids = [queue.submit(db_engine, "record", {"path": str(record)}).id for _ in range(20)]
    procs = [workers(once=True), workers(once=True)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    runs = [tuple(map(int, line.split())) for line in record.read_text().splitlines()]
    assert sorted(job_id for job_id, _ in runs) == sorted(ids)  # each job ran exactly once
    jobs = {j.id: j for j in queue.list_jobs(db_engine)}
    assert all(jobs[i].status == "done" and jobs[i].attempts == 1 for i in ids)
    assert all(jobs[job_id].worker_pid == worker_pid for job_id, worker_pid in runs)
    log.info("jobs per worker: %s", Counter(worker_pid for _, worker_pid in runs))


def test_gpu_jobs_run_one_at_a_time_while_cpu_jobs_pass(db_engine, workers, tmp_path):
    events, gate = tmp_path / "events.txt", tmp_path / "gate"
    first = queue.submit(db_engine, "gpu_sleep", {"events": str(events), "wait_for": str(gate)})
    second = queue.submit(db_engine, "gpu_sleep", {"events": str(events)})
    # Only runs if a worker can take it while the first GPU job holds the GPU; it opens the gate.
    queue.submit(db_engine, "touch", {"path": str(gate)})
    workers(), workers()
    wait_for(lambda: all(j.status == "done" for j in queue.list_jobs(db_engine)), "all jobs done", 60)
    assert events.read_text().split("\n")[:-1] == [
        f"start {first.id}",
        f"end {first.id}",
        f"start {second.id}",
        f"end {second.id}",
    ]


def test_progress_log_heartbeat_result_and_peak_rss_are_persisted(db_engine, workers, tmp_path):
    gate = tmp_path / "gate"
    slow = queue.submit(db_engine, "progress_gate", {"gate": str(gate)})
    busy = queue.submit(db_engine, "progress", {"alloc_mb": 64, "lines": 250})
    workers()
    live = job_when(db_engine, slow.id, lambda j: j.status == "running" and j.percent > 1, "live progress")
    assert live.stage == "waiting" and live.message.startswith("tick ") and live.eta_s is not None
    assert "tick 1" in live.log_tail
    job_when(db_engine, slow.id, lambda j: j.heartbeat_at > live.heartbeat_at, "a newer heartbeat")
    gate.touch()

    done = job_when(db_engine, busy.id, lambda j: j.status == "done", "the progress job", 60)
    assert json.loads(done.result_json) == {"answer": 42, "bytes": 64 * 1024 * 1024}
    assert (done.stage, done.percent, done.error) == ("done", 100.0, None)
    lines = done.log_tail.splitlines()
    assert len(lines) == queue.LOG_TAIL_LINES and lines[-1] == "line 249"
    assert done.peak_rss_bytes >= 64 * 1024 * 1024  # the job really held a 64 MiB buffer
    assert not Path(done.work_dir).exists()
    first = queue.get_job(db_engine, slow.id)
    assert first.status == "done" and json.loads(first.result_json)["ticks"] >= 2


@pytest.mark.parametrize(
    ("kind", "start_method"), [("write_then_sleep", "fork"), ("stubborn", "fork"), ("stubborn", "spawn")]
)
def test_cancel_stops_a_running_job_that_never_checks(db_engine, workers, tmp_path, kind, start_method):
    pid_file = tmp_path / "job.pid"
    job = queue.submit(db_engine, kind, {"pid_file": str(pid_file), "seconds": 120})
    workers(start_method=start_method)
    job_pid = pid_from(pid_file)
    work_dir = Path(queue.get_job(db_engine, job.id).work_dir)
    assert any(work_dir.iterdir())
    queue.cancel(db_engine, job.id)
    final = job_when(db_engine, job.id, lambda j: j.status != "running", "the cancel to settle")
    assert final.status == "cancelled" and final.finished_at is not None
    assert not work_dir.exists()
    wait_for(lambda: not alive(job_pid), "the job process to be gone", 10)


def test_failure_keeps_a_readable_error_and_the_traceback_in_the_log(db_engine, workers):
    job = queue.submit(db_engine, "fail", {"message": "model folder /m has no config.json; pick another"})
    bad = queue.submit(db_engine, "bad_result", {})
    workers(once=True).wait(timeout=60)
    failed = queue.get_job(db_engine, job.id)
    assert failed.status == "failed"
    assert failed.error == "ValueError: model folder /m has no config.json; pick another"
    assert "Traceback" in failed.log_tail and "jobkinds_for_tests.py" in failed.log_tail
    assert "about to fail" in failed.log_tail
    assert not Path(failed.work_dir).exists()
    assert "returned a result that is not JSON" in queue.get_job(db_engine, bad.id).error


def test_a_crashed_job_process_fails_with_its_last_output_in_the_log(db_engine, workers, tmp_path):
    job = queue.submit(db_engine, "crash", {})
    workers(once=True).wait(timeout=60)
    crashed = queue.get_job(db_engine, job.id)
    assert crashed.status == "failed"
    assert "killed by signal SIGKILL" in crashed.error and "out of memory" in crashed.error
    assert "last words before the crash" in crashed.log_tail
    assert not Path(crashed.work_dir).exists()
    full_log = tmp_path / "logs" / "jobs" / f"job-{job.id}-attempt-1.log"
    assert "last words before the crash" in full_log.read_text()


def test_retry_runs_a_failed_job_again_as_a_new_attempt(db_engine, workers, tmp_path):
    marker = tmp_path / "marker"
    job = queue.submit(db_engine, "fail_unless_exists", {"path": str(marker)})
    workers()
    job_when(db_engine, job.id, lambda j: j.status == "failed", "the first attempt to fail")
    marker.touch()
    queue.retry(db_engine, job.id)
    again = job_when(db_engine, job.id, lambda j: j.status == "done", "the retry to finish")
    assert (again.attempts, again.error) == (2, None)
    assert "FileNotFoundError" in again.log_tail  # the first attempt's traceback is kept


def test_sigterm_interrupts_the_running_job_and_exits_cleanly(db_engine, workers, tmp_path):
    pid_file = tmp_path / "job.pid"
    job = queue.submit(db_engine, "write_then_sleep", {"pid_file": str(pid_file)})
    worker = workers()
    job_pid = pid_from(pid_file)
    work_dir = Path(queue.get_job(db_engine, job.id).work_dir)
    worker.terminate()
    assert worker.wait(timeout=30) == 0
    final = queue.get_job(db_engine, job.id)
    assert final.status == "interrupted" and "Retry" in final.error
    assert not work_dir.exists() and not alive(job_pid)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_sigkill_of_the_worker_is_recovered_by_the_next_worker(db_engine, workers, tmp_path, start_method):
    pid_file = tmp_path / "job.pid"
    crashed = queue.submit(db_engine, "write_then_sleep", {"pid_file": str(pid_file)})
    worker = workers(start_method=start_method)
    job_pid = pid_from(pid_file)
    work_dir = Path(queue.get_job(db_engine, crashed.id).work_dir)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    wait_for(lambda: not alive(job_pid), "the orphaned job process to die with its worker", 10)
    assert queue.get_job(db_engine, crashed.id).status == "running"  # nobody settled it yet

    nxt = queue.submit(db_engine, "sleep", {"seconds": 0.2, "steps": 2})
    assert workers(once=True).wait(timeout=60) == 0
    final = queue.get_job(db_engine, crashed.id)
    assert final.status == "interrupted" and "is gone" in final.error
    assert not work_dir.exists()
    assert queue.get_job(db_engine, nxt.id).status == "done"


def test_requeue_safe_job_runs_again_after_a_worker_crash(db_engine, workers, tmp_path):
    pid_file, gate = tmp_path / "job.pid", tmp_path / "gate"
    job = queue.submit(db_engine, "requeue_gate", {"pid_file": str(pid_file), "gate": str(gate)})
    worker = workers()
    pid_from(pid_file)
    first_work_dir = Path(queue.get_job(db_engine, job.id).work_dir)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    gate.touch()  # the second attempt may finish
    assert workers(once=True).wait(timeout=60) == 0
    final = queue.get_job(db_engine, job.id)
    assert (final.status, final.attempts) == ("done", 2)
    assert "re-queued" in final.log_tail
    assert not first_work_dir.exists()


def test_start_method_choice(monkeypatch):
    monkeypatch.setattr(child, "_cuda_driver_loaded", lambda: False)
    assert child.resolve_start_method("auto") == "fork"
    monkeypatch.setattr(child, "_cuda_driver_loaded", lambda: True)  # fork would poison CUDA in the job
    assert child.resolve_start_method("auto") == "spawn"
    assert child.resolve_start_method("fork") == "fork"
    with pytest.raises(ValueError, match="auto, fork, spawn"):
        child.resolve_start_method("forkserver")
