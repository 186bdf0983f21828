"""The UI's read views on a real SQLite file: frames, ordering, derived columns and the jobs HTML."""

from __future__ import annotations

import json

import pytest
from sqlmodel import Session

from storage.db import open_db
from storage.models import Checkpoint, EvalResult, Job, RequestRecord, Run, SourceModel, StepRecord, Variant
from workbench import views, views_telemetry
from workbench.ui.jobs_table import render_jobs_html


@pytest.fixture
def engine(tmp_path):
    return open_db(tmp_path / "wb.db")


def add(engine, *rows):
    with Session(engine) as s:
        for r in rows:
            s.add(r)
            s.commit()
            s.refresh(r)
    return rows


def test_jobs_frame_newest_first_and_html(engine):
    add(
        engine,
        Job(
            kind="quantize",
            title="<b>first</b>",
            status="done",
            percent=100,
            started_at=100.0,
            finished_at=190.0,
            log_tail="a\nb\nc\nd\ne\nlast line",
        ),
        Job(
            kind="quantize",
            title="second",
            status="running",
            percent=42.5,
            stage="gptq",
            message="layer 3/8",
            eta_s=75,
            started_at=1000.0,
        ),
        Job(kind="evaluate", status="failed", error="Traceback...\nValueError: bad file"),
    )
    df = views.jobs_frame(engine)
    assert list(df["id"]) == [3, 2, 1]
    page = render_jobs_html(df, log_lines=2, now=1030.0)
    assert "&lt;b&gt;first&lt;/b&gt;" in page and "<b>first</b>" not in page  # titles escaped
    assert "width:42.5%" in page and "1m15s" in page  # running job: bar and ETA
    assert "30s" in page  # elapsed of the running job
    assert "1m30s" in page  # elapsed of the finished job
    assert "e\nlast line" in page and "d\ne" not in page  # only the last 2 log lines
    assert "ValueError: bad file" in page  # a failed job shows its error
    assert page.count("<tr data-job-id") == 3
    assert "No jobs yet" in render_jobs_html(views.jobs_frame(engine).iloc[0:0])


def test_checkpoint_views(engine):
    (ck,) = add(
        engine, Checkpoint(name="ck", path="/x", size_bytes=3 * 2**20, manifest_json='{"recipe": {"a": 1}}')
    )
    add(
        engine,
        Variant(checkpoint_id=ck.id, name="w8a8", scheme="W8A8", weight_bytes=2**20),
        Variant(checkpoint_id=ck.id, name="w4a16", scheme="W4A16", group_size=64, weight_bytes=2**19),
    )
    cks = views.checkpoints_frame(engine)
    assert cks.iloc[0]["variants"] == "w8a8, w4a16" and cks.iloc[0]["size_mb"] == 3.0
    var = views.variants_frame(engine, ck.id)
    assert list(var["name"]) == ["w8a8", "w4a16"] and list(var["weight_mb"]) == [1.0, 0.5]
    assert views.checkpoint_manifest(engine, ck.id) == {"recipe": {"a": 1}}
    assert views.checkpoint_manifest(engine, 999) == {}


def test_eval_frame_orders_and_compares_to_bf16(engine):
    (ck,) = add(engine, Checkpoint(name="ck", path="/x"))
    add(
        engine,
        EvalResult(
            checkpoint_id=ck.id, target="all-w4a16", dataset="lee", perplexity=60.0, token_agreement=0.7
        ),
        EvalResult(checkpoint_id=ck.id, target="pd", dataset="lee", perplexity=44.0, token_agreement=0.8),
        EvalResult(checkpoint_id=ck.id, target="bf16", dataset="lee", perplexity=40.0, token_agreement=1.0),
        EvalResult(
            checkpoint_id=ck.id, target="all-w4a16", dataset="lee", perplexity=50.0, token_agreement=0.75
        ),
    )
    df = views.eval_frame(engine, ck.id)
    assert list(df["target"]) == ["bf16", "all-w4a16", "pd"]
    assert list(df["perplexity"]) == [40.0, 50.0, 44.0]  # the re-run of all-w4a16 wins
    assert list(df["ppl_vs_bf16_pct"]) == [0.0, 25.0, 10.0]


def test_steps_and_requests_frames(engine):
    (run,) = add(engine, Run(started_at=1000.0))
    add(
        engine,
        *[
            StepRecord(
                run_id=run.id,
                step=i,
                ts=1000.0 + i / 10,
                duration_ms=5.0,
                num_prefill_tokens=8 if i == 0 else 0,
                num_decode_reqs=1,
                variant="w8a8" if i == 0 else "w4a16",
                policy_name="pd",
            )
            for i in range(5)
        ],
    )
    (other,) = add(engine, Run(started_at=0.0))
    add(
        engine,
        StepRecord(
            run_id=other.id,
            step=0,
            ts=1.0,
            duration_ms=1,
            num_prefill_tokens=0,
            num_decode_reqs=1,
            variant="w8a8",
        ),
    )
    steps = views_telemetry.steps_frame(engine, run.id, last=3)
    assert list(steps["step"]) == [2, 3, 4]  # the last 3, in order
    assert list(steps["t_s"].round(3)) == [0.2, 0.3, 0.4]
    assert list(views_telemetry.steps_frame(engine, run.id)["phase"]) == ["prefill"] + ["decode"] * 4
    add(
        engine,
        RequestRecord(
            run_id=run.id,
            request_id="r1",
            arrival_ts=1000.0,
            finished_ts=1002.5,
            ttft_ms=30,
            tpot_ms=9,
            variant_mix_json=json.dumps({"w4a16": 9, "w8a8": 1}),
        ),
        RequestRecord(run_id=run.id, request_id="r2", arrival_ts=1001.0),
    )
    req = views_telemetry.requests_frame(engine, run.id)
    assert list(req["request_id"]) == ["r1", "r2"]
    assert req.iloc[0]["t_s"] == 2.5 and req.iloc[1]["t_s"] != req.iloc[1]["t_s"]  # NaN while running
    rec = views_telemetry.request_record(engine, "r1")
    assert rec["variant_mix"] == {"w4a16": 9, "w8a8": 1}
    assert views_telemetry.format_variant_mix(rec["variant_mix"]) == "w4a16 90% · w8a8 10%"
    assert views_telemetry.request_record(engine, "nope") is None
    assert views.latest_run_id(engine) == other.id


def test_models_frame(engine):
    add(
        engine,
        SourceModel(name="m", path="/m", architecture="LlamaForCausalLM", size_bytes=2**21, is_default=True),
    )
    df = views.models_frame(engine)
    assert df.iloc[0]["name"] == "m" and df.iloc[0]["size_mb"] == 2.0 and bool(df.iloc[0]["is_default"])
