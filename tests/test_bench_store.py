"""Bench results in the DB: `flexquant bench --import`, `bench.store.import_results` and the views the
Compare tab reads (`bench_runs`, `bench_run_choices`, `bench_results`, `describe_bench_run`)."""

from __future__ import annotations

import copy
import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from storage.db import open_db
from workbench import views_bench
from workbench.bench.report import ResultsError, load_results
from workbench.bench.store import import_results
from workbench.cli import app

ROOT = Path(__file__).resolve().parents[1]
H200 = ROOT / "docs/benchmarks/2026-11-26-llama3-8b-h200/results.json"
SAMPLE = ROOT / "tests/data/bench-sample.json"
GRAPH_ROUNDS = "docs/benchmarks/2026-11-26-llama3-8b-h100-prefill-graphs/machine-1/rounds"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("FLEXQUANT_DATA_DIR", "FLEXQUANT_ALLOWED_ROOTS"):
        monkeypatch.delenv(var, raising=False)


def cli(data_dir: Path, *args: str):
    result = CliRunner().invoke(app, ["--data-dir", str(data_dir), *args])
    assert "Traceback" not in result.output, result.output
    return result


def test_cli_import_stores_the_run_and_prints_the_headline(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    r = cli(data_dir, "bench", "--import", str(H200))
    assert r.exit_code == 0, r.output
    assert "| batch 1 |" in r.stdout and "TTFT <= 1.03x W8A8-only" in r.stdout  # the headline table
    assert "stored as bench run 1 (status ended)" in r.stdout

    row = (
        sqlite3.connect(data_dir / "workbench.db")
        .execute("select kind, runtime, status, config_json, result_json, started_at from run where id = 1")
        .fetchone()
    )
    kind, runtime, status, config_json, result_json, started_at = row
    original = json.loads(H200.read_text())
    assert (kind, runtime, status) == ("bench", "vllm", "ended")
    assert json.loads(result_json) == original
    assert json.loads(config_json)["imported_from"] == str(H200)
    assert started_at == original["started_at"]

    engine = open_db(data_dir / "workbench.db")
    try:
        runs = views_bench.bench_runs(engine)
        assert runs.to_dict("records") == [
            {
                "id": 1,
                "started": "2026-11-26 01:35 UTC",
                "status": "ended",
                "gpu": "NVIDIA H200",
                "labels": "w8a8, w4a16-marlin, flex:auto",
            }
        ]
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "is not JSON"),
        ('{"schema": "flexquant-bench/0"}', "schema is 'flexquant-bench/0'"),
        (None, "cannot read bench results"),
    ],
)
def test_cli_import_rejects_a_bad_file_and_stores_nothing(tmp_path: Path, content, expected) -> None:
    data_dir, bad = tmp_path / "data", tmp_path / "results.json"
    if content is not None:
        bad.write_text(content)
    r = cli(data_dir, "bench", "--import", str(bad))
    assert r.exit_code == 2, r.output
    assert expected in r.stderr and str(bad) in r.stderr, r.stderr
    if (data_dir / "workbench.db").exists():
        assert (
            sqlite3.connect(data_dir / "workbench.db").execute("select count(*) from run").fetchone()[0] == 0
        )


def test_cli_import_names_the_broken_row(tmp_path: Path) -> None:
    results = json.loads(H200.read_text())
    results["sweep"][2]["tpot_ms"] = "fast"
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps(results))
    r = cli(tmp_path / "data", "bench", "--import", str(bad))
    assert r.exit_code == 2
    label = results["sweep"][2]["label"]
    assert f"sweep[2] ({label}): tpot_ms must be a number or null" in r.stderr, r.stderr


def test_import_results_status_runtime_and_order(db_engine) -> None:
    h200 = load_results(H200)
    interrupted = copy.deepcopy(h200) | {"status": "interrupted", "started_at": h200["started_at"] + 60}
    sample = load_results(SAMPLE)  # no runtime in its spec, no start time: stored now, a vLLM run
    first = import_results(db_engine, h200, "a.json")
    second = import_results(db_engine, interrupted, "b.json")
    third = import_results(db_engine, sample, "c.json")

    runs = views_bench.bench_runs(db_engine)
    assert runs["id"].tolist() == [third, second, first]  # newest start first
    assert runs["status"].tolist() == ["ended", "interrupted", "ended"]
    assert runs.loc[0, "gpu"] == "NVIDIA H100 80GB HBM3"
    assert runs.loc[0, "labels"] == "w8a8, w4a16-marlin, w4a16-machete, bf16"
    choices = views_bench.bench_run_choices(db_engine)
    assert [run_id for _, run_id in choices] == [third, second, first]
    assert choices[1][0].startswith(f"#{second} · 2026-11-26 01:36 UTC · NVIDIA H200 · w8a8")
    assert views_bench.bench_results(db_engine, first) == h200
    assert views_bench.bench_results(db_engine, second)["status"] == "interrupted"

    with pytest.raises(ResultsError, match="bad.json is not a valid"):
        import_results(db_engine, {**h200, "targets": "w8a8"}, "bad.json")
    assert len(views_bench.bench_runs(db_engine)) == 3


def test_bench_views_ignore_other_runs_and_explain_missing_ones(db_engine) -> None:
    from workbench.runtime.telemetry import create_run

    serve = create_run(db_engine, runtime="cpu", checkpoint_path="/x", policy_name="p")
    running = create_run(db_engine, runtime="vllm", checkpoint_path="/x", policy_name="w8a8", kind="bench")
    assert views_bench.bench_runs(db_engine)["id"].tolist() == [running]  # the serving run is not a benchmark
    assert views_bench.bench_runs(db_engine).loc[0, "gpu"] == "?"  # no results, no GPU recorded
    measuring = create_run(db_engine, runtime="vllm", checkpoint_path="/x", policy_name="w8a8", kind="bench",
                           config={"gpu": "NVIDIA H100 80GB HBM3"})
    runs = views_bench.bench_runs(db_engine).set_index("id")
    assert runs.loc[measuring, "gpu"] == "NVIDIA H100 80GB HBM3"  # a run still measuring names its GPU
    with pytest.raises(ValueError, match=f"no benchmark run with id {serve}"):
        views_bench.bench_results(db_engine, serve)
    with pytest.raises(ValueError, match="no benchmark run with id 999"):
        views_bench.bench_results(db_engine, 999)
    with pytest.raises(ValueError, match=f"benchmark run {running} has no results yet"):
        views_bench.bench_results(db_engine, running)


def test_describe_bench_run() -> None:
    text = views_bench.describe_bench_run(load_results(H200))
    assert text.startswith("**complete** run of 2026-11-26 01:35 UTC on NVIDIA H200 (vLLM 0.26.0)")
    assert "batches [1, 4, 16, 64, 128], rates [4.0, 12.0, 24.0] req/s; prefill eager." in text
    assert "Command: `flexquant " in text
    graphs = load_results(ROOT / f"{GRAPH_ROUNDS}/round-1-graphs.json")
    text = views_bench.describe_bench_run(graphs)
    assert "batches [1, 4, 16], rates [4.0] req/s; prefill in CUDA graphs." in text
    failed = {**load_results(H200), "status": "failed", "errors": ["target bf16: engine did not start"]}
    assert "- error: target bf16: engine did not start" in views_bench.describe_bench_run(failed)
