"""TelemetryWriter on a real SQLite file: batching, background flushing, request timings, Run rows."""

from __future__ import annotations

import json
import threading
import time

import pytest
from sqlalchemy import text
from sqlmodel import Session, select

from storage.models import RequestRecord, Run, StepRecord
from workbench.runtime.telemetry import RequestTiming, TelemetryWriter, create_run, end_run, layer_groups


def count(db, model) -> int:
    with Session(db) as s:
        return len(s.exec(select(model)).all())


def add_steps(writer: TelemetryWriter, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        writer.step(step=i, ts=1000.0 + i, duration_ms=2.5, num_prefill_tokens=0, num_decode_reqs=3,
                    variant="w4a16", policy_name="pd")


def test_rows_wait_for_the_batch_then_are_written_together(db_engine):
    run_id = create_run(db_engine, runtime="cpu", checkpoint_path="/x", policy_name="pd")
    writer = TelemetryWriter(db_engine, run_id, interval_s=3600, batch_rows=10)
    try:
        add_steps(writer, 9)
        time.sleep(0.3)
        assert count(db_engine, StepRecord) == 0  # below the batch size, long interval: still buffered
        add_steps(writer, 1, start=9)
        deadline = time.monotonic() + 20
        while count(db_engine, StepRecord) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert count(db_engine, StepRecord) == 10  # the 10th row triggered one batch write
    finally:
        writer.close()


def test_interval_flush_and_close_write_everything(db_engine):
    run_id = create_run(db_engine, runtime="cpu", checkpoint_path="/x", policy_name="pd")
    writer = TelemetryWriter(db_engine, run_id, interval_s=0.1, batch_rows=1000)
    add_steps(writer, 3)
    deadline = time.monotonic() + 20
    while count(db_engine, StepRecord) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count(db_engine, StepRecord) == 3
    add_steps(writer, 2, start=3)
    writer.close()  # whatever is buffered at close is written
    assert count(db_engine, StepRecord) == 5 and writer.rows_written == 5
    writer.step(step=99, ts=0, duration_ms=0, num_prefill_tokens=1, num_decode_reqs=0, variant="w8a8",
                policy_name="pd")
    assert count(db_engine, StepRecord) == 5  # closed: dropped with a warning, no exception


def test_failed_write_keeps_rows_for_the_next_try(db_engine):
    run_id = create_run(db_engine, runtime="cpu", checkpoint_path="/x", policy_name="pd")
    writer = TelemetryWriter(db_engine, run_id, interval_s=3600, batch_rows=10_000)
    try:
        add_steps(writer, 4)
        with db_engine.connect() as conn:
            conn.execute(text("ALTER TABLE steprecord RENAME TO steprecord_away"))
            conn.commit()
        assert writer.flush() == 0
        with db_engine.connect() as conn:
            conn.execute(text("ALTER TABLE steprecord_away RENAME TO steprecord"))
            conn.commit()
        assert writer.flush() == 4
        assert count(db_engine, StepRecord) == 4
    finally:
        writer.close()


def test_request_timing_gives_ttft_tpot_and_mix(db_engine):
    run_id = create_run(db_engine, runtime="cpu", checkpoint_path="/x", policy_name="pd")
    writer = TelemetryWriter(db_engine, run_id)
    t = RequestTiming("chatcmpl-1", arrival_ts=100.0, prompt_tokens=12, output_tokens=5,
                      first_token_ts=100.25, finished_ts=101.25, variant_mix={"w4a16": 3, "w8a8": 1})
    writer.request(t)
    writer.request(RequestTiming("chatcmpl-2", arrival_ts=100.0, error="cancelled by the client"))
    writer.close()
    with Session(db_engine) as s:
        recs = {r.request_id: r for r in s.exec(select(RequestRecord)).all()}
    one = recs["chatcmpl-1"]
    assert one.ttft_ms == pytest.approx(250.0) and one.tpot_ms == pytest.approx(250.0)  # 1 s over 4 gaps
    assert json.loads(one.variant_mix_json) == {"w4a16": 3, "w8a8": 1} and one.run_id == run_id
    two = recs["chatcmpl-2"]
    assert two.ttft_ms is None and two.tpot_ms is None and two.error == "cancelled by the client"


def test_layer_groups_and_step_layer_json(db_engine):
    assert layer_groups({0: "a", 1: "a", 2: "b", 3: "a"}) == [
        {"first": 0, "last": 1, "variant": "a"}, {"first": 2, "last": 2, "variant": "b"},
        {"first": 3, "last": 3, "variant": "a"}]
    run_id = create_run(db_engine, runtime="cpu", checkpoint_path="/x", policy_name="pd")
    writer = TelemetryWriter(db_engine, run_id)
    writer.step(step=0, ts=1.0, duration_ms=1.0, num_prefill_tokens=0, num_decode_reqs=1, variant="w4a16",
                policy_name="pd", layer_variants={0: "w8a8", 1: "w4a16"})
    writer.close()
    with Session(db_engine) as s:
        row = s.exec(select(StepRecord)).one()
    assert json.loads(row.layer_variants_json)[0] == {"first": 0, "last": 0, "variant": "w8a8"}


def test_run_rows_are_created_and_ended_once(db_engine):
    run_id = create_run(db_engine, runtime="vllm", checkpoint_path="/ck", policy_name="pd",
                        config={"port": 1})
    end_run(db_engine, run_id, status="failed", result={"error": "boom"})
    with Session(db_engine) as s:
        first_end = s.get(Run, run_id).ended_at
    end_run(db_engine, run_id)  # a second stop keeps the first end and status
    with Session(db_engine) as s:
        run = s.get(Run, run_id)
    assert run.runtime == "vllm" and json.loads(run.config_json) == {"port": 1}
    assert run.status == "failed" and run.ended_at == first_end
    assert json.loads(run.result_json)["error"] == "boom"


def test_end_run_survives_a_telemetry_commit_between_its_read_and_its_write(db_engine):
    """The CI failure of 2026-11-25: a second server's telemetry committed while `stop()` was
    ending the first run, and SQLite refused the deferred transaction's upgrade with "database is
    locked". Here another connection commits step rows right after end_run's first SELECT."""
    from sqlalchemy import event

    from storage.db import make_engine

    other = make_engine(db_engine.url.database)  # a separate pool: another process's connection
    run_id = create_run(db_engine, runtime="cpu", checkpoint_path="/ck", policy_name="pd")
    writer = TelemetryWriter(other, run_id, batch_rows=10_000, interval_s=3600)
    injected = []

    def commit_from_elsewhere(conn, cursor, statement, *_args) -> None:  # noqa: ANN001
        if statement.lstrip().upper().startswith("SELECT") and not injected:
            injected.append(statement)
            add_steps(writer, 3)
            # The concurrent writer waits out our lock (busy timeout) when we hold it; when we
            # do not, it commits now and our later UPDATE would hit a stale snapshot.
            t = threading.Thread(target=writer.flush)
            t.start()
            t.join(timeout=0.5)
            injected.append(t)

    event.listen(db_engine, "after_cursor_execute", commit_from_elsewhere)
    try:
        end_run(db_engine, run_id, status="ended")
    finally:
        event.remove(db_engine, "after_cursor_execute", commit_from_elsewhere)
    injected[1].join(timeout=30)
    writer.close()
    other.dispose()
    with Session(db_engine) as s:
        assert s.get(Run, run_id).status == "ended"
    assert count(db_engine, StepRecord) == 3
