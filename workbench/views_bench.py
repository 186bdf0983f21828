"""What the Compare tab shows of stored benchmarks: `Run` rows of kind "bench" and their results.

Read-only views like `workbench.views`; the results dict is the benchmark's JSON
(`workbench.bench`, schema in docs/benchmarks/README.md).
"""

from __future__ import annotations

import json
import time

import pandas as pd
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from storage.models import Run
from workbench.views_telemetry import json_object

__all__ = ["BENCH_RUN_COLUMNS", "bench_run_choices", "bench_results", "bench_runs", "describe_bench_run"]

BENCH_RUN_COLUMNS = ["id", "started", "status", "gpu", "labels"]



def _bench_summary(run: Run) -> tuple[str, str]:
    """(gpu, labels) of a bench run. The GPU is in the run's small config (since 2026-11-26, also
    while it still measures); older rows have it only in their results (~100 KB to parse)."""
    gpu = json_object(run.config_json).get("gpu")
    if not gpu:
        machine = json_object(run.result_json).get("machine")
        gpu = machine.get("gpu") if isinstance(machine, dict) else None
    runtime = "CPU reference runtime" if run.runtime == "cpu" else "?"
    return str(gpu or runtime), run.policy_name.replace(",", ", ")


def bench_runs(engine: Engine, *, limit: int = 100) -> pd.DataFrame:
    """Stored benchmark runs (kind "bench"), newest first: id, started (UTC, "YYYY-MM-DD HH:MM"),
    status, gpu (from the results' machine) and the measured labels."""
    with Session(engine) as session:
        rows = session.exec(
            select(Run)
            .where(Run.kind == "bench")
            .order_by(col(Run.started_at).desc(), col(Run.id).desc())
            .limit(limit)
        ).all()
    records = [
        (
            int(r.id),
            time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(r.started_at)),
            r.status,
            *_bench_summary(r),
        )
        for r in rows
    ]
    return pd.DataFrame(records, columns=BENCH_RUN_COLUMNS)


def bench_run_choices(engine: Engine) -> list[tuple[str, int]]:
    """(text, run id) per stored bench run, newest first, for a dropdown."""
    return [
        (f"#{r.id} · {r.started} · {r.gpu} · {r.labels} · {r.status}", int(r.id))
        for r in bench_runs(engine).itertuples()
    ]


def bench_results(engine: Engine, run_id: int) -> dict:
    """The results dict stored with bench run `run_id`; ValueError (for the user) if there is no such
    bench run or it has no results yet."""
    with Session(engine) as session:
        run = session.get(Run, int(run_id))
    if run is None or run.kind != "bench":
        raise ValueError(f"no benchmark run with id {run_id}; pick one from the list")
    if not run.result_json:
        raise ValueError(
            f"benchmark run {run_id} has no results yet (status {run.status}); wait for it to end"
        )
    try:
        return json.loads(run.result_json)
    except json.JSONDecodeError as exc:
        raise ValueError(f"benchmark run {run_id}: its stored results are not JSON ({exc.msg})") from None


def describe_bench_run(results: dict) -> str:
    """One markdown paragraph on a bench run: status, machine, workload, command and its errors."""
    machine, spec = results.get("machine") or {}, results.get("spec") or {}
    started = results.get("started_at")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)) if started else "unknown time"
    lines = [
        f"**{results.get('status', '?')}** run of {when} on {machine.get('gpu') or 'no GPU'} "
        f"(vLLM {machine.get('vllm') or '-'}); prompt {spec.get('prompt_len')} tokens, "
        f"batches {spec.get('batches')}, rates {spec.get('rates')} req/s; prefill "
        f"{'in CUDA graphs' if spec.get('prefill_graphs') else 'eager'}."
    ]
    if results.get("command"):
        lines.append(f"Command: `{results['command']}`")
    lines += [f"- error: {e}" for e in results.get("errors") or []]
    return "\n\n".join(lines)
