"""Concurrency: 20 job submissions from 4 processes, 2 workers running them, and one process polling
the DB the way the UI's jobs tab does, all on one SQLite file at the same time."""

from __future__ import annotations

import json
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

from jobs import queue
from jobs.child import env_with_project_root
from jobs.worker import start_worker
from storage.db import open_db

SUBMITTERS, PER_SUBMITTER, WORKERS = 4, 5, 2


def _wait(predicate, what: str, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def test_many_submitters_workers_and_a_poller_on_one_db(tmp_path, reliability):
    db = tmp_path / "workbench.db"
    engine = open_db(db)
    record, go, stop = tmp_path / "ran.txt", tmp_path / "go", tmp_path / "stop"
    client = [sys.executable, "-m", "tests.reliability.concurrency_clients"]
    env = env_with_project_root()
    outs = [tmp_path / f"submitter-{i}.json" for i in range(SUBMITTERS)]
    poll_out = tmp_path / "poller.json"
    procs = [
        subprocess.Popen(
            client + ["submit", str(db), f"p{i}", str(PER_SUBMITTER), str(record), str(go), str(out)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, out in enumerate(outs)
    ]
    poller = subprocess.Popen(
        client + ["poll", str(db), str(stop), str(poll_out)], env=env, stderr=subprocess.PIPE, text=True
    )
    workers = [
        start_worker(
            db,
            tmp_path,
            ["tests.jobkinds_for_tests"],
            poll_s=0.05,
            heartbeat_s=0.5,
            log_path=tmp_path / f"worker-{i}.log",
        )
        for i in range(WORKERS)
    ]
    try:
        _wait(lambda: all(Path(f"{o}.ready").exists() for o in [*outs, poll_out]), "clients to connect", 240)
        t0 = time.monotonic()
        go.touch()  # all submitters start at once
        errs = [p.communicate(timeout=240)[1] for p in procs]
        assert all(p.returncode == 0 for p in procs), errs
        submitted_s = time.monotonic() - t0
        total = SUBMITTERS * PER_SUBMITTER
        _wait(lambda: len(queue.list_jobs(engine, status="done")) == total, "every job to run", 240)
        all_done_s = time.monotonic() - t0
    finally:
        stop.touch()
        poller_err = poller.communicate(timeout=120)[1]
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(timeout=60)
    results = [json.loads(o.read_text()) for o in outs]
    polled = json.loads(poll_out.read_text())
    ids = [i for r in results for i in r["ids"]]
    sub_errors = [e for r in results for e in r["errors"]]
    latencies = [x for r in results for x in r["latencies_ms"]]
    rows = queue.list_jobs(engine, limit=1000)
    ran = [int(line.split()[0]) for line in record.read_text().splitlines()]
    worker_logs = "".join((tmp_path / f"worker-{i}.log").read_text() for i in range(WORKERS))
    with sqlite3.connect(db) as conn:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    engine.dispose()

    with reliability.case(
        "concurrency",
        f"{total} submissions from {SUBMITTERS} processes, {WORKERS} workers, 1 UI-like poller",
        fault="concurrent writers and readers on one SQLite file",
    ) as case:
        case.detail = (
            f"{len(ids)} ids returned, {len(set(ids))} distinct; {len(rows)} Job rows; "
            f"{len(ran)} runs of {len(set(ran))} distinct jobs; submit errors {len(sub_errors)}, "
            f"poll errors {len(polled['errors'])} in {polled['polls']} polls; "
            f"'database is locked' in worker logs: {'database is locked' in worker_logs}; "
            f"integrity {integrity}"
        )
        assert sub_errors == [] and polled["errors"] == [], (sub_errors, polled["errors"][:5])
        assert len(ids) == len(set(ids)) == total
        assert sorted(j.id for j in rows) == sorted(ids)  # none lost, none extra
        assert sorted(j.title for j in rows) == sorted(
            f"p{i}-{k}" for i in range(SUBMITTERS) for k in range(PER_SUBMITTER)
        )
        assert all(j.status == "done" and j.attempts == 1 for j in rows)
        assert sorted(ran) == sorted(ids)  # each job ran exactly once
        assert "database is locked" not in worker_logs + poller_err + "".join(errs)
        assert polled["polls"] > 0 and polled["max_seen"] == total and integrity == "ok"
    for name, value in [
        (
            "submissions / distinct ids / Job rows / runs",
            f"{total} / {len(set(ids))} / {len(rows)} / {len(ran)}",
        ),
        ("submit latency p50 / max", f"{statistics.median(latencies):.0f} ms / {max(latencies):.0f} ms"),
        ("UI-like polls during the run / errors", f"{polled['polls']} / {len(polled['errors'])}"),
        (
            "poll latency p50 / p99",
            f"{_pct(polled['latencies_ms'], 0.5):.0f} ms / {_pct(polled['latencies_ms'], 0.99):.0f} ms",
        ),
        ("all submitted / all run after go", f"{submitted_s:.1f} s / {all_done_s:.1f} s"),
        ("'database is locked' errors surfaced", 0),
    ]:
        reliability.figure("concurrency", name, value)
