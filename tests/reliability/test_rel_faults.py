"""Faults: the worker SIGKILLed at every stage of a real quantize-and-merge job, the serving process
killed mid-stream, and a disk that fills up while a checkpoint is written."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from sqlmodel import Session, func, select

from jobs import queue
from jobs.child import env_with_project_root
from storage.db import open_db
from storage.models import Checkpoint, Variant
from tests.reliability.stage_hold import HOLD_ENV
from workbench.models import add_model

ROOT = Path(__file__).resolve().parents[2]
MODULES = "workbench.job_kinds,tests.reliability.stage_hold"
RECIPE = {"num_samples": 4, "seq_len": 16}
# (what the brief calls the stage, where the hold stops the job: "<Job.stage>#<n-th update>")
KILL_POINTS = [
    ("load", "load#1"),  # reading the source model
    ("smooth", "smooth#2"),  # inside llmcompressor's SmoothQuant pass, layer 1 of 2
    ("gptq", "quantize w4a16#2"),  # inside GPTQ of the 2nd variant (w8a8 already saved in work_dir)
    ("save/merge", "merge#2"),  # merging: the hidden publish folder is open under checkpoints/
    ("validate", "validate#1"),  # merged checkpoint complete in the temp folder, not yet renamed
    ("register", "register#1"),  # published under checkpoints/, its DB rows not yet written
]


def wait_for(predicate, what: str, timeout: float):
    """Poll `predicate` until truthy; the timeout only guards against a hang."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def integrity(db_path: Path) -> str:
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute("PRAGMA integrity_check").fetchall()
        fk = conn.execute("PRAGMA foreign_key_check").fetchall()
    return "ok" if rows == [("ok",)] and not fk else f"{rows} {fk}"


def spawn_worker(data: Path, log: Path, *, hold: str = "", once: bool = False) -> subprocess.Popen:
    """`python -m jobs.worker` in its own process group (so the test can kill the whole group)."""
    cmd = [
        sys.executable,
        "-m",
        "jobs.worker",
        "--db",
        str(data / "workbench.db"),
        "--data-dir",
        str(data),
        "--modules",
        MODULES,
        "--poll",
        "0.1",
        "--heartbeat",
        "0.5",
        "--start-method",
        "fork",
    ]
    env = {**env_with_project_root(), "OMP_NUM_THREADS": "1", HOLD_ENV: hold}
    with open(log, "ab") as err:
        return subprocess.Popen(
            cmd + (["--once"] if once else []),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )


def leftovers(data: Path) -> dict[str, list[str]]:
    """What partial output is on disk: attempt work dirs and hidden (unpublished) checkpoint folders."""
    work = sorted(p.name for p in (data / "work").glob("job-*"))
    ckpts = data / "checkpoints"
    hidden = sorted(p.name for p in ckpts.iterdir() if p.name.startswith(".")) if ckpts.exists() else []
    return {"work_dirs": work, "hidden_checkpoint_dirs": hidden}


def test_worker_sigkill_at_every_quantize_stage(tmp_path, tiny_source, reliability):
    data = tmp_path / "data"
    data.mkdir()
    engine = open_db(data / "workbench.db")
    add_model(engine, name="tiny", path=tiny_source)
    import workbench.job_kinds  # noqa: F401 - submit() validates with the kind's own hook

    jobs = [
        queue.submit(engine, "quantize", {"model": "tiny", "checkpoint": f"ck-{i}", "recipe": RECIPE})
        for i in range(len(KILL_POINTS))
    ]
    workers = {
        stage: spawn_worker(data, tmp_path / f"worker-{i}.log", hold=hold)
        for i, (stage, hold) in enumerate(KILL_POINTS)
    }
    try:
        # Every worker first holds a job of its own, so no worker recovers a job killed under another.
        wait_for(lambda: len(queue.list_jobs(engine, status="running")) == len(jobs), "all jobs claimed", 600)
        killed: dict[str, dict] = {}
        pending = dict(workers)
        deadline = time.monotonic() + 600  # guards against a hang only
        while pending:
            assert time.monotonic() < deadline, f"never held: {sorted(pending)}; {queue.list_jobs(engine)}"
            for stage, proc in list(pending.items()):
                row = next((j for j in queue.list_jobs(engine) if j.worker_pid == proc.pid), None)
                assert proc.poll() is None, f"worker for {stage} exited early; see {tmp_path}"
                assert row is None or row.status == "running", (stage, row.status, row.error)
                if row is None or "[fault-test] held" not in row.log_tail:
                    continue
                hold_stage = dict(KILL_POINTS)[stage].split("#")[0]
                assert row.stage == hold_stage, (stage, row.stage, row.log_tail[-500:])
                children = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
                before = leftovers(data)
                os.killpg(proc.pid, signal.SIGKILL)  # the whole worker process group
                proc.wait()
                wait_for(
                    lambda c=children: (
                        not any(
                            psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                            for p in c
                        )
                    ),
                    f"the job process of {stage} to die with its worker",
                    15,
                )
                killed[stage] = {
                    "job": row.id,
                    "worker": proc.pid,
                    "stage": row.stage,
                    "message": row.message,
                    "work_dir": row.work_dir,
                    "before": before,
                }
                del pending[stage]
            time.sleep(0.1)
        left = leftovers(data)
        mid_integrity = integrity(data / "workbench.db")
        still_running = [j.id for j in queue.list_jobs(engine, status="running")]
        published_unregistered = sorted(
            p.name for p in (data / "checkpoints").iterdir() if not p.name.startswith(".")
        )

        nxt = queue.submit(
            engine, "quantize", {"model": "tiny", "checkpoint": "after-crash", "recipe": RECIPE}
        )
        final = spawn_worker(data, tmp_path / "worker-final.log", once=True)
        assert final.wait(timeout=420) == 0, (tmp_path / "worker-final.log").read_text()[-3000:]
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    rows = {j.id: j for j in queue.list_jobs(engine)}
    end_integrity = integrity(data / "workbench.db")
    end_left = leftovers(data)
    ckpt_dirs = sorted(p.name for p in (data / "checkpoints").iterdir())
    with Session(engine) as s:
        n_ckpt = s.exec(select(func.count()).select_from(Checkpoint)).one()
        n_var = s.exec(select(func.count()).select_from(Variant)).one()
    from workbench.quant.check import check_checkpoint

    for stage, info in killed.items():
        row = rows[info["job"]]
        note = f"re-queued after the worker stopped (worker pid {info['worker']} is gone)"
        name = json.loads(row.params_json)["checkpoint"]
        valid = check_checkpoint(data / "checkpoints" / name).ok
        with reliability.case(
            "faults",
            f"worker SIGKILL during {stage} (Job.stage={info['stage']!r})",
            fault=f"SIGKILL worker group pid {info['worker']}",
        ) as case:
            case.detail = (
                f"at the kill: work dir {'present' if info['before']['work_dirs'] else 'none'}, "
                f"{len(info['before']['hidden_checkpoint_dirs'])} hidden dir(s) under checkpoints/ "
                f"(all jobs); the next worker re-queued it (quantize is requeue_safe): {row.status} on "
                f"attempt {row.attempts}, old work dir removed, checkpoint {name} "
                f"{'valid' if valid else 'INVALID'}"
            )
            assert info["job"] in still_running  # nobody settled it before the next worker
            assert note in row.log_tail, row.log_tail[-1500:]
            assert (row.status, row.attempts) == ("done", 2), (row.status, row.error)
            assert not Path(info["work_dir"]).exists()
    with reliability.case(
        "faults",
        "after all kills: DB integrity, leftovers, next job, history",
        fault=f"{len(killed)} worker SIGKILLs",
    ) as case:
        case.detail = (
            f"PRAGMA integrity_check after kills: {mid_integrity}, at the end: {end_integrity}; "
            f"partial outputs after kills: {len(left['work_dirs'])} work dirs, "
            f"{len(left['hidden_checkpoint_dirs'])} hidden checkpoint dirs, "
            f"{len(published_unregistered)} published-but-unregistered; after recovery: "
            f"{len(end_left['work_dirs'])} work dirs, {len(end_left['hidden_checkpoint_dirs'])} hidden dirs; "
            f"next job {rows[nxt.id].status}; {n_ckpt} checkpoints / {n_var} variant rows"
        )
        assert mid_integrity == "ok" and end_integrity == "ok"
        assert left["work_dirs"] and left["hidden_checkpoint_dirs"]  # the faults did leave partial output
        assert end_left == {"work_dirs": [], "hidden_checkpoint_dirs": []}, end_left
        assert rows[nxt.id].status == "done" and rows[nxt.id].attempts == 1
        assert ckpt_dirs == sorted([*(f"ck-{i}" for i in range(len(KILL_POINTS))), "after-crash"])
        assert all(check_checkpoint(data / "checkpoints" / name).ok for name in ckpt_dirs)
        assert (n_ckpt, n_var) == (len(ckpt_dirs), 2 * len(ckpt_dirs))
        register_job = rows[killed["register"]["job"]]
        assert "published by an earlier attempt; registering it" in register_job.log_tail
    engine.dispose()

    history_code = (
        "import json, sys; from storage.db import open_db; from jobs.queue import list_jobs;"
        "e = open_db(sys.argv[1]);"
        "print(json.dumps([dict(id=j.id, status=j.status, attempts=j.attempts,"
        " requeued='re-queued' in j.log_tail, held='[fault-test] held' in j.log_tail)"
        " for j in list_jobs(e)]))"
    )
    with reliability.case("faults", "a fresh process reads the full job history") as case:
        out = subprocess.run(
            [sys.executable, "-c", history_code, str(data / "workbench.db")],
            env=env_with_project_root(),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        history = json.loads(out.stdout)
        case.detail = (
            f"{len(history)} jobs, statuses {sorted({h['status'] for h in history})}, "
            f"{sum(h['attempts'] for h in history)} attempts, "
            f"{sum(h['requeued'] for h in history)} with the recovery note"
        )
        assert len(history) == len(KILL_POINTS) + 1
        assert sum(h["requeued"] and h["held"] for h in history) == len(KILL_POINTS)
        assert all(h["status"] == "done" for h in history)
    reliability.figure(
        "faults",
        "quantize jobs killed mid-stage / recovered and finished",
        f"{len(killed)} / {sum(rows[i['job']].status == 'done' for i in killed.values())}",
    )
    job_log_files = sorted((data / "logs" / "jobs").glob("job-*-attempt-*.log"))
    reliability.figure("faults", "per-attempt job log files kept", len(job_log_files))


HELLO = [{"role": "user", "content": "hello there"}]


def test_serving_process_killed_mid_stream_then_restarted(tmp_path, chat_checkpoint, free_port, reliability):
    from workbench.chat_client import ChatError, chat_once, stream_chat
    from workbench.policy import DEFAULT_POLICY
    from workbench.runtime.serve import start_server
    from workbench.runtime.serve_config import ServeConfig
    from workbench.settings import Settings

    settings = Settings(data_dir=tmp_path / "data")
    engine = open_db(settings.db_path)
    cfg = ServeConfig(checkpoint=chat_checkpoint, policy=DEFAULT_POLICY, port=free_port(), cpu_threads=1)
    first = start_server(cfg, engine=engine, settings=settings)
    second = None
    try:
        first.wait_healthy(300)
        deltas, error = [], None
        try:
            for update in stream_chat(first.base_url, HELLO, max_tokens=3000):
                assert not update.done, "the reply finished before the kill; use a longer one"
                deltas.append(update.delta)
                if len(deltas) == 5:
                    os.killpg(first.pid, signal.SIGKILL)  # the server's whole process group
        except ChatError as exc:
            error = str(exc)
        first.proc.wait(timeout=30)
        with Session(engine) as s:
            from storage.models import Run

            run_status = s.get(Run, first.run_id).status
        with reliability.case(
            "faults", "CPU server SIGKILLed mid-stream", fault="SIGKILL server group"
        ) as case:
            case.detail = (
                f"client got {len(deltas)} chunks, then: {error}; server exit {first.proc.returncode}; "
                f"its Run row left as {run_status!r} until the handle is stopped"
            )
            assert error is not None and "cannot reach the model server" in error
            assert len(deltas) >= 5 and not first.is_running()
        t0 = time.monotonic()
        second = start_server(cfg, engine=engine, settings=settings)  # same port, same checkpoint
        second.wait_healthy(300)
        restart_s = time.monotonic() - t0
        text, stats = chat_once(second.base_url, HELLO, max_tokens=16)
        with reliability.case("faults", "CPU server restarted on the same port after the kill") as case:
            case.detail = (
                f"healthy after {restart_s:.1f} s; a new chat got {stats.output_tokens} tokens "
                f"(TTFT {stats.ttft_ms:.0f} ms); DB integrity {integrity(settings.db_path)}"
            )
            assert stats.output_tokens > 0 and text
            assert integrity(settings.db_path) == "ok"
    finally:
        first.stop()
        if second is not None:
            second.stop()
        engine.dispose()


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs: room for a folder, not for a checkpoint. Skips where mounting is not allowed."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a size-limited tmpfs here (needs root/CAP_SYS_ADMIN): {done.stderr.strip()}"
        )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_disk_full_while_saving_a_checkpoint(tmp_path, tiny_source, chat_checkpoint, small_disk, reliability):
    from workbench.quant.export import export_variant

    # 1. the quantize job, its checkpoints/ folder on the full disk
    data = tmp_path / "data"
    data.mkdir()
    (data / "checkpoints").symlink_to(small_disk)
    engine = open_db(data / "workbench.db")
    add_model(engine, name="tiny", path=tiny_source)
    import workbench.job_kinds  # noqa: F401

    job = queue.submit(engine, "quantize", {"model": "tiny", "checkpoint": "no-room", "recipe": RECIPE})
    worker = spawn_worker(data, tmp_path / "worker.log", once=True)
    try:
        assert worker.wait(timeout=420) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    row = queue.get_job(engine, job.id)
    with Session(engine) as s:
        n_ckpt = s.exec(select(func.count()).select_from(Checkpoint)).one()
    with reliability.case(
        "faults",
        "disk full while the quantize job writes the merged checkpoint",
        fault="checkpoints/ on a 64 KiB tmpfs",
    ) as case:
        case.detail = (
            f"job {row.status}: {row.error}; left on the full disk: {sorted(os.listdir(small_disk))}; "
            f"Checkpoint rows {n_ckpt}; work dir removed: {not Path(row.work_dir).exists()}"
        )
        assert row.status == "failed" and "No space left on device" in row.error
        assert os.listdir(small_disk) == [] and n_ckpt == 0 and not Path(row.work_dir).exists()
    engine.dispose()

    # 2. exporting one variant (the single-variant checkpoint for stock runtimes) onto the full disk
    with reliability.case(
        "faults", "disk full while exporting a single-variant checkpoint", fault="out_dir on a 64 KiB tmpfs"
    ) as case:
        with pytest.raises(Exception) as err:  # noqa: B017 - whatever the writer raises, it must say why
            export_variant(chat_checkpoint, "w4a16", small_disk / "w4a16-only")
        case.detail = (
            f"{type(err.value).__name__}: {err.value}; left on the disk: {sorted(os.listdir(small_disk))}"
        )
        assert "No space left on device" in str(err.value)
        assert os.listdir(small_disk) == []
