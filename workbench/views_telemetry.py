"""Read-only views of one run's telemetry for the Live and Chat tabs: engine steps, requests, the
variant mix of a request, and the resident weight memory a runtime reports.

Like `workbench.views` (which lists the runs themselves): DB rows -> pandas DataFrames, no SQL in the
callbacks. Times are also given as `t_s`, seconds since the run started, because that is what a
timeline axis wants.
"""

from __future__ import annotations

import json

import pandas as pd
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from storage.models import RequestRecord, Run, StepRecord

__all__ = [
    "json_object",
    "steps_frame",
    "requests_frame",
    "request_record",
    "format_variant_mix",
    "memory_frame",
]

STEP_COLUMNS = [
    "step",
    "ts",
    "t_s",
    "duration_ms",
    "num_prefill_tokens",
    "num_decode_reqs",
    "variant",
    "phase",
    "policy_name",
]
REQUEST_COLUMNS = [
    "request_id",
    "arrival_ts",
    "t_s",
    "ttft_ms",
    "tpot_ms",
    "prompt_tokens",
    "output_tokens",
    "variant_mix",
    "error",
]


def _run_start(session: Session, run_id: int) -> float:
    run = session.get(Run, run_id)
    return run.started_at if run is not None else 0.0


def _last_rows(engine: Engine, table, order, run_id: int, last: int) -> tuple[float, list]:
    """(the run's start time, its last `last` rows of `table` by `order`, oldest first)."""
    with Session(engine) as session:
        start = _run_start(session, run_id)
        rows = session.exec(
            select(table).where(table.run_id == run_id).order_by(col(order).desc()).limit(last)
        ).all()
    return start, list(reversed(rows))


def steps_frame(engine: Engine, run_id: int, *, last: int = 3000) -> pd.DataFrame:
    """The last `last` engine steps of a run in step order, with `t_s` and `phase` ("prefill" when the
    step had prefill tokens, else "decode") added."""
    start, rows = _last_rows(engine, StepRecord, StepRecord.step, run_id, last)
    df = pd.DataFrame(
        [r.model_dump() for r in rows],
        columns=[c for c in STEP_COLUMNS if c not in ("t_s", "phase")],
    )
    df["t_s"] = df["ts"] - start
    df["phase"] = ["prefill" if n > 0 else "decode" for n in df["num_prefill_tokens"]]
    return df[STEP_COLUMNS]


def requests_frame(engine: Engine, run_id: int, *, last: int = 1000) -> pd.DataFrame:
    """The last `last` requests of a run by arrival, `t_s` = finish time since the run started (NaN
    while running), `variant_mix` = {variant: share of its decode steps}."""
    start, rows = _last_rows(engine, RequestRecord, RequestRecord.id, run_id, last)
    records = []
    for r in rows:
        item = r.model_dump()
        item["t_s"] = r.finished_ts - start if r.finished_ts is not None else float("nan")
        item["variant_mix"] = json_object(r.variant_mix_json)
        records.append(item)
    return pd.DataFrame(records, columns=REQUEST_COLUMNS)


def json_object(text: str | None) -> dict:
    """A JSON text column read as a dict; {} when empty, damaged or not an object."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def request_record(engine: Engine, request_id: str) -> dict | None:
    """One request's telemetry (timings, tokens, `variant_mix` dict) by its id, or None if the
    runtime has not written it yet."""
    with Session(engine) as session:
        row = session.exec(
            select(RequestRecord)
            .where(RequestRecord.request_id == request_id)
            .order_by(col(RequestRecord.id).desc())
        ).first()
    if row is None:
        return None
    item = row.model_dump()
    item["variant_mix"] = json_object(row.variant_mix_json)
    return item


def format_variant_mix(mix: dict) -> str:
    """`{"w4a16": 9, "w8a8": 1}` (counts or shares) -> "w4a16 90% · w8a8 10%", largest first."""
    total = sum(float(v) for v in mix.values() if isinstance(v, int | float))
    if total <= 0:
        return ""
    parts = sorted(
        ((k, float(v) / total) for k, v in mix.items() if isinstance(v, int | float)), key=lambda kv: -kv[1]
    )
    return " · ".join(f"{k} {share:.0%}" for k, share in parts)


def memory_frame(stats: dict) -> pd.DataFrame:
    """Resident weight memory from a runtime's `/flexquant/stats` body: one row per variant plus
    "shared" and "total", in MiB (the memory report may be at the top level or under "memory")."""
    report = stats.get("memory", stats) if isinstance(stats, dict) else {}
    per_variant = report.get("per_variant") or {}
    rows = [(name, int(size)) for name, size in per_variant.items()]
    for key in ("shared", "total", "bf16"):
        if isinstance(report.get(key), int | float):
            rows.append((key if key != "bf16" else "bf16 (same model, for reference)", int(report[key])))
    df = pd.DataFrame(rows, columns=["part", "bytes"])
    df["MiB"] = (df["bytes"] / 2**20).round(2)
    return df
