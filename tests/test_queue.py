"""The queue API on a real SQLite file: submit validation, claim order and atomicity, GPU
exclusivity, cancel, retry, fencing and crash recovery (no worker processes here)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlmodel import Session, select

import tests.jobkinds_for_tests  # noqa: F401 - registers the test job kinds
from jobs import queue
from storage.db import open_db
from storage.models import Job


def _count_jobs(engine) -> int:
    with Session(engine) as session:
        return len(session.exec(select(Job)).all())


def test_submit_unknown_kind_lists_known_kinds_and_inserts_nothing(db_engine):
    with pytest.raises(ValueError, match="unknown job kind 'quantise'.*known kinds:.*sleep"):
        queue.submit(db_engine, "quantise", {})
    assert _count_jobs(db_engine) == 0


def test_submit_validate_hook_rejects_and_normalizes(db_engine):
    with pytest.raises(ValueError, match="'n' must be a positive integer"):
        queue.submit(db_engine, "count", {"n": -1})
    with pytest.raises(ValueError, match="must be JSON"):
        queue.submit(db_engine, "sleep", {"when": object()})
    assert _count_jobs(db_engine) == 0

    job = queue.submit(db_engine, "count", {"n": 3}, title="three")
    assert (job.status, job.title, job.attempts) == ("queued", "three", 0)
    assert json.loads(job.params_json) == {"n": 3, "label": "count"}


def test_claim_order_attempts_and_work_dir(db_engine, tmp_path):
    low = queue.submit(db_engine, "sleep", {})
    high = queue.submit(db_engine, "sleep", {}, priority=5)
    later = queue.submit(db_engine, "sleep", {})
    claimed = [queue.claim(db_engine, "w1", 111, work_root=tmp_path / "work") for _ in range(3)]
    assert [j.id for j in claimed] == [high.id, low.id, later.id]
    assert queue.claim(db_engine, "w1", 111) is None
    first = claimed[0]
    assert (first.status, first.worker_id, first.worker_pid, first.attempts) == ("running", "w1", 111, 1)
    assert first.work_dir == str(tmp_path / "work" / f"job-{high.id}-attempt-1")
    assert queue.get_job(db_engine, high.id).status == "running"


def test_claim_only_kinds_the_worker_knows(db_engine):
    job = queue.submit(db_engine, "sleep", {})
    assert queue.claim(db_engine, "w1", 1, kinds=["record"]) is None
    assert queue.claim(db_engine, "w1", 1, kinds=["record", "sleep"]).id == job.id


def test_gpu_jobs_never_run_together_but_cpu_jobs_pass_them(db_engine):
    gpu1 = queue.submit(db_engine, "gpu_sleep", {})
    gpu2 = queue.submit(db_engine, "gpu_sleep", {})
    cpu = queue.submit(db_engine, "sleep", {})
    assert gpu1.needs_gpu and not cpu.needs_gpu
    assert queue.claim(db_engine, "w1", 1).id == gpu1.id
    assert queue.claim(db_engine, "w2", 2).id == cpu.id  # skips the blocked GPU job
    assert queue.claim(db_engine, "w3", 3) is None
    assert queue.finish(db_engine, gpu1.id, "w1", "done")
    assert queue.claim(db_engine, "w3", 3).id == gpu2.id


def _claim_until_empty(db_path: str, worker_id: str, out_path: str) -> None:
    engine = open_db(Path(db_path))
    claimed = []
    while (job := queue.claim(engine, worker_id, 0)) is not None:
        claimed.append(job.id)
    Path(out_path).write_text(json.dumps(claimed))


def test_claim_race_between_processes_claims_each_job_once(db_engine, tmp_path):
    ids = {queue.submit(db_engine, "sleep", {}).id for _ in range(120)}
    db_engine.dispose()  # an SQLite connection must not cross a fork
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(
            target=_claim_until_empty,
            args=(str(tmp_path / "wb.db"), f"w{i}", str(tmp_path / f"claims-{i}.json")),
        )
        for i in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    per_worker = [json.loads((tmp_path / f"claims-{i}.json").read_text()) for i in range(4)]
    all_claims = [job_id for claims in per_worker for job_id in claims]
    logging.getLogger(__name__).info("claims per process: %s", [len(c) for c in per_worker])
    assert sorted(all_claims) == sorted(ids)  # every job once, none twice
    assert {j.attempts for j in queue.list_jobs(db_engine, status="running")} == {1}


def test_cancel_queued_running_and_finished(db_engine):
    queued = queue.submit(db_engine, "sleep", {})
    assert queue.cancel(db_engine, queued.id).status == "cancelled"
    assert queue.cancel(db_engine, queued.id).status == "cancelled"  # idempotent

    running = queue.submit(db_engine, "sleep", {})
    queue.claim(db_engine, "w1", 1)
    after = queue.cancel(db_engine, running.id)
    assert (after.status, after.cancel_requested) == ("running", True)

    done = queue.submit(db_engine, "sleep", {})
    queue.claim(db_engine, "w1", 1)
    queue.finish(db_engine, done.id, "w1", "done")
    with pytest.raises(ValueError, match="already done"):
        queue.cancel(db_engine, done.id)
    with pytest.raises(queue.JobNotFound, match="no job with id 999"):
        queue.cancel(db_engine, 999)


def test_retry_makes_a_new_attempt(db_engine):
    job = queue.submit(db_engine, "sleep", {})
    with pytest.raises(ValueError, match="only failed, cancelled, interrupted"):
        queue.retry(db_engine, job.id)
    queue.claim(db_engine, "w1", 1)
    queue.finish(db_engine, job.id, "w1", "failed", error="boom")
    again = queue.retry(db_engine, job.id)
    assert (again.status, again.error, again.worker_id, again.attempts) == ("queued", None, None, 1)
    assert "retry requested after attempt 1 (failed)" in again.log_tail
    second = queue.claim(db_engine, "w2", 2)
    assert (second.id, second.attempts) == (job.id, 2)


def test_updates_are_fenced_to_the_running_worker(db_engine):
    job = queue.submit(db_engine, "sleep", {})
    queue.claim(db_engine, "w1", 1)
    assert queue.update_running(db_engine, job.id, "w2", {"percent": 50.0}) is None
    assert queue.update_running(db_engine, job.id, "w1", {"percent": 50.0}, ["hello"]).percent == 50.0
    queue.finish(db_engine, job.id, "w1", "done")
    assert queue.update_running(db_engine, job.id, "w1", {"percent": 10.0}) is None
    assert not queue.finish(db_engine, job.id, "w1", "failed")
    row = queue.get_job(db_engine, job.id)
    assert (row.status, row.percent, row.log_tail) == ("done", 50.0, "hello")


def test_log_tail_keeps_the_last_lines(db_engine):
    job = queue.submit(db_engine, "sleep", {})
    queue.claim(db_engine, "w1", 1)
    queue.update_running(db_engine, job.id, "w1", {}, [f"line {i}" for i in range(150)])
    queue.update_running(
        db_engine, job.id, "w1", {}, ["a\nb", "x" * 5000] + [f"more {i}" for i in range(100)]
    )
    lines = queue.get_job(db_engine, job.id).log_tail.splitlines()
    assert len(lines) == queue.LOG_TAIL_LINES
    assert lines[-1] == "more 99" and lines[0] == "line 53"  # 150 + 2 + 1 + 100 lines, 200 kept
    assert max(len(line) for line in lines) <= 2000


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_recover_settles_jobs_of_dead_or_silent_workers(db_engine, tmp_path):
    work = tmp_path / "work"
    dead = queue.submit(db_engine, "sleep", {})
    safe = queue.submit(db_engine, "requeue_gate", {})
    silent = queue.submit(db_engine, "sleep", {})
    cancelling = queue.submit(db_engine, "sleep", {})
    healthy = queue.submit(db_engine, "sleep", {})
    dead_pid = _dead_pid()
    for job, pid in (
        (dead, dead_pid),
        (safe, dead_pid),
        (silent, os.getpid()),
        (cancelling, dead_pid),
        (healthy, os.getpid()),
    ):
        claimed = queue.claim(db_engine, f"w{job.id}", pid, work_root=work)
        assert claimed.id == job.id
        Path(claimed.work_dir).mkdir(parents=True)
        (Path(claimed.work_dir) / "partial.bin").write_bytes(b"x")
    queue.cancel(db_engine, cancelling.id)
    queue.update_running(db_engine, silent.id, f"w{silent.id}", {"heartbeat_at": time.time() - 60})

    recovered = queue.recover(db_engine, stale_after_s=15)
    assert sorted(recovered) == sorted([dead.id, safe.id, silent.id, cancelling.id])
    status = {j.id: j for j in queue.list_jobs(db_engine)}
    assert status[dead.id].status == "interrupted" and "Retry it" in status[dead.id].error
    assert status[silent.id].status == "interrupted" and "no heartbeat" in status[silent.id].error
    assert (status[safe.id].status, status[safe.id].worker_id) == ("queued", None)
    assert status[cancelling.id].status == "cancelled"
    assert status[healthy.id].status == "running"
    assert sorted(p.name for p in work.iterdir()) == [f"job-{healthy.id}-attempt-1"]
    # The re-queued job runs again as attempt 2.
    assert queue.claim(db_engine, "w9", 9, kinds=["requeue_gate"]).attempts == 2
