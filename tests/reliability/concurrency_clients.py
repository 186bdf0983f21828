"""Client processes for the concurrency test: job submitters and a poller that reads like the UI.

    python -m tests.reliability.concurrency_clients submit DB NAME COUNT RECORD_FILE GO_FILE OUT_JSON
    python -m tests.reliability.concurrency_clients poll DB STOP_FILE OUT_JSON

Both write a `<OUT_JSON>.ready` file once imported and connected, wait for GO_FILE (submitters) so all
start at once, and write what happened (ids, latencies, every error with its message) to OUT_JSON.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _wait_for(path: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)


def submit(db: str, name: str, count: int, record_file: str, go_file: str, out: str) -> None:
    """Submit `count` "record" jobs as fast as possible once GO_FILE exists."""
    import tests.jobkinds_for_tests  # noqa: F401 - registers the "record" kind
    from jobs import queue
    from storage.db import open_db

    engine = open_db(Path(db))
    Path(out + ".ready").touch()
    _wait_for(Path(go_file))
    ids, latencies, errors = [], [], []
    for k in range(count):
        t0 = time.perf_counter()
        try:
            job = queue.submit(engine, "record", {"path": record_file}, title=f"{name}-{k}")
            ids.append(job.id)
        except Exception as exc:  # noqa: BLE001 - every error is the finding
            errors.append(f"{type(exc).__name__}: {exc}")
        latencies.append((time.perf_counter() - t0) * 1000)
    Path(out).write_text(json.dumps({"ids": ids, "latencies_ms": latencies, "errors": errors}))


def poll(db: str, stop_file: str, out: str) -> None:
    """Read what the Models & Jobs tab reads, back to back, until STOP_FILE exists."""
    from jobs import queue
    from storage.db import open_db
    from workbench import views

    engine = open_db(Path(db))
    Path(out + ".ready").touch()
    polls, errors, latencies, max_seen = 0, [], [], 0
    while not Path(stop_file).exists():
        t0 = time.perf_counter()
        try:
            frame = views.jobs_frame(engine)
            views.models_frame(engine)
            views.checkpoints_frame(engine)
            jobs = queue.list_jobs(engine)
            if jobs:
                queue.get_job(engine, jobs[0].id)
            max_seen = max(max_seen, len(frame))
        except Exception as exc:  # noqa: BLE001 - every error is the finding
            errors.append(f"{type(exc).__name__}: {exc}")
        latencies.append((time.perf_counter() - t0) * 1000)
        polls += 1
        time.sleep(0.02)
    Path(out).write_text(
        json.dumps({"polls": polls, "errors": errors, "latencies_ms": latencies, "max_seen": max_seen})
    )


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "submit":
        submit(args[0], args[1], int(args[2]), args[3], args[4], args[5])
    elif command == "poll":
        poll(*args)
    else:
        sys.exit(f"unknown command {command!r}")
