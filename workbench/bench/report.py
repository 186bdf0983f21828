"""Bench results (schema "flexquant-bench/1"): load and check them, and flatten them into DataFrames.

Pure functions of the results dict, except `load_results`. The goal verdicts, roofline, memory and
README table are `workbench.bench.goals`; the HTML file is `workbench.bench.report_html`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

__all__ = [
    "SCHEMA",
    "ResultsError",
    "check_results",
    "control_drift",
    "default_flex_label",
    "frames",
    "load_results",
    "sweep_tpot_metric",
]

SCHEMA = "flexquant-bench/1"
STATUSES = ("complete", "interrupted", "failed")
TARGET_TEXT = "label kind variant kernel checkpoint error control_of".split()
TARGET_NUMBERS = "weight_memory_gib weight_bytes_b1 engine_start_s".split()
ROW_TEXT = "label target kind policy".split()
SWEEP_NUMBERS = "batch prefill_s decode_s tpot_ms ttft_p50_ms ttft_mean_ms tpot_req_p50_ms".split()
ONLINE_NUMBERS = (
    "rate requests completed errors duration_s output_throughput_tok_s request_throughput".split()
)
LATENCIES, STATS = ("ttft", "tpot", "itl"), ("mean", "p50", "p90", "p99")


class ResultsError(ValueError):
    """Not a flexquant-bench/1 result; the message names the source and each problem."""


def load_results(path: str | Path) -> dict:
    """Read and check a results JSON file (`check_results`)."""
    path = Path(path)
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ResultsError(f"cannot read bench results {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ResultsError(
            f"{path} is not JSON ({exc.msg}, line {exc.lineno}); is it a bench results file?"
        ) from None
    return check_results(results, source=str(path))


def _is_number(value: object, *, null_ok: bool = True) -> bool:
    if value is None:
        return null_ok
    return isinstance(value, int | float) and not isinstance(value, bool)


def _row_problems(section: str, i: int, row: object, labels: list[str]) -> list[str]:
    where = f"{section}[{i}]"
    if not isinstance(row, dict) or not isinstance(row.get("label"), str):
        return [f"{where} needs a string label"]
    where = f"{where} ({row['label']})"
    load, numbers = ("batch", SWEEP_NUMBERS[1:]) if section == "sweep" else ("rate", ONLINE_NUMBERS[1:])
    problems = [f"{where}: {key} must be a number or null" for key in numbers if not _is_number(row.get(key))]
    if row.get("target") not in labels:
        problems.append(f"{where}: target {row.get('target')!r} is not one of the target labels {labels}")
    if not _is_number(row.get(load), null_ok=False) or row[load] <= 0:
        problems.append(f"{where}: {load} must be a positive number")
    if not isinstance(row.get("variant_share") or {}, dict):
        problems.append(f"{where}: variant_share must be a mapping variant -> share")
    if section == "online":
        problems += [
            f"{where}: {m}_ms must be a mapping with {list(STATS)} or null"
            for m in LATENCIES
            if not isinstance(row.get(f"{m}_ms") or {}, dict)
        ]
    return problems


def check_results(results: object, source: str = "results") -> dict:
    """`results` unchanged if it has the flexquant-bench/1 shape, else ResultsError listing what is wrong."""
    if not isinstance(results, dict):
        raise ResultsError(f"{source}: expected a JSON object, got {type(results).__name__}")
    problems = []
    if results.get("schema") != SCHEMA:
        problems.append(
            f"schema is {results.get('schema')!r}, expected {SCHEMA!r} (written by another version?)"
        )
    if results.get("status") not in STATUSES:
        problems.append(f"status is {results.get('status')!r}, expected one of {list(STATUSES)}")
    for key, kind in (
        ("machine", dict),
        ("spec", dict),
        ("targets", list),
        ("sweep", list),
        ("online", list),
        ("errors", list),
    ):
        if not isinstance(results.get(key), kind):
            problems.append(f"{key} is missing or not a {'list' if kind is list else 'mapping'}")
    if results.get("autotune") is not None and not isinstance(results.get("autotune"), dict):
        problems.append("autotune must be null or a mapping (policy_name, policy_yaml, kernel, data)")
    labels: list[str] = []
    for i, target in enumerate(results.get("targets") if isinstance(results.get("targets"), list) else []):
        if not isinstance(target, dict) or not isinstance(target.get("label"), str):
            problems.append(f"targets[{i}] needs a string label")
            continue
        labels.append(target["label"])
        if target.get("kind") not in ("stock", "flex"):
            problems.append(f"targets[{i}] ({target['label']}): kind must be 'stock' or 'flex'")
        problems += [
            f"targets[{i}].{key} must be a number or null"
            for key in TARGET_NUMBERS
            if not _is_number(target.get(key))
        ]
    if len(set(labels)) < len(labels):
        problems.append(f"target labels repeat: {sorted({x for x in labels if labels.count(x) > 1})}")
    for section in ("sweep", "online"):
        rows = results.get(section) if isinstance(results.get(section), list) else []
        for i, row in enumerate(rows):
            problems += _row_problems(section, i, row, labels)
    if problems:
        shown = "; ".join(problems[:12]) + (f"; and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise ResultsError(f"{source} is not a valid {SCHEMA} result: {shown}")
    return results


def _frame(rows: list[dict], text: list[str], numbers: list[str], extra: list[str] = ()) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=[*text, *numbers, *extra])
    for column in numbers:
        df[column] = pd.to_numeric(df[column], errors="coerce").astype(float)
    return df


def frames(results: dict) -> dict[str, pd.DataFrame]:
    """{"targets", "sweep", "online"}: one row per target / sweep point / online point, numbers as float
    (NaN where a measurement failed), online latencies flattened to `ttft_p50_ms`, `itl_p99_ms`, ...;
    sweep and online rows carry their target's `kind`."""
    targets = _frame(
        [{k: t.get(k) for k in TARGET_TEXT + TARGET_NUMBERS} for t in results["targets"]],
        TARGET_TEXT,
        TARGET_NUMBERS,
    )
    kind_of = dict(zip(targets["label"], targets["kind"], strict=True))

    def base(row: dict) -> dict:
        return {**row, "kind": kind_of.get(row["target"]), "variant_share": row.get("variant_share") or {}}

    sweep = _frame([base(r) for r in results["sweep"]], ROW_TEXT, SWEEP_NUMBERS, ["variant_share"])
    latency = [f"{m}_{s}_ms" for m in LATENCIES for s in STATS]
    flat = [
        {**base(r), **{f"{m}_{s}_ms": (r.get(f"{m}_ms") or {}).get(s) for m in LATENCIES for s in STATS}}
        for r in results["online"]
    ]
    online = _frame(flat, ROW_TEXT, ONLINE_NUMBERS + latency, ["variant_share"])
    return {"targets": targets, "sweep": sweep, "online": online}


def sweep_tpot_metric(sweep: pd.DataFrame) -> str:
    """The batch TPOT to show: per request (`tpot_req_p50_ms`, `vllm bench`'s TPOT) where the run
    measured it; older runs have only the wall method (`tpot_ms`), which at large batch mostly
    measures how prefill overlaps decode (docs/benchmarks/README.md)."""
    measured = "tpot_req_p50_ms" in sweep and sweep["tpot_req_p50_ms"].notna().any()
    return "tpot_req_p50_ms" if measured else "tpot_ms"


def _flex_rows(results: dict) -> list[dict]:
    """Sweep and online rows measured on a FlexQuant target (labelled "<target>:<policy>")."""
    flex = {t["label"] for t in results["targets"] if t.get("kind") == "flex"}
    return [r for r in results["sweep"] + results["online"] if r["target"] in flex]


def default_flex_label(results: dict) -> str | None:
    """The label of the auto-tuned policy's measurement if there is one, else the only FlexQuant label,
    else None (no FlexQuant measurement)."""
    tuned = (results.get("autotune") or {}).get("policy_name")
    rows = _flex_rows(results)
    for row in rows:
        if tuned and row.get("policy") == tuned:
            return row["label"]
    measured = sorted({r["label"] for r in rows})
    if len(measured) > 1:
        raise ValueError(
            f"several FlexQuant labels were measured ({measured}) and none is the auto-tuned "
            "policy's; pass flex_label= one of them"
        )
    return measured[0] if measured else None


# (section, load column, metrics) compared between a baseline and its engine-order control
DRIFT_METRICS = (
    ("sweep", "batch", ("prefill_s", "tpot_req_p50_ms", "tpot_ms")),
    ("online", "rate", ("ttft_p50_ms", "tpot_p50_ms")),
)


def control_drift(results: dict) -> pd.DataFrame:
    """One row per (control target, metric, batch or rate) measured on both: the baseline's first
    value, the control's (the same engine started again after every other target) and control / first.
    How far these stray from 1 is how far engine order and machine drift alone move a ratio."""
    fr = frames(results)
    pairs = fr["targets"].dropna(subset=["control_of"])
    rows = []
    for control, first in zip(pairs["label"], pairs["control_of"], strict=True):
        for section, load, metrics in DRIFT_METRICS:
            df = fr[section]
            # by target: a pinned CPU-runtime baseline labels its rows "<target>:<policy>"
            a, b = df[df["target"] == first].set_index(load), df[df["target"] == control].set_index(load)
            for metric in metrics:
                for at in sorted(set(a.index) & set(b.index)):
                    x, y = float(a.at[at, metric]), float(b.at[at, metric])
                    if x == x and y == y and x > 0:  # both measured
                        rows.append((first, control, section, metric, f"{load} {at:g}", x, y, y / x))
    columns = ["baseline", "control", "section", "metric", "where", "first", "again", "ratio"]
    return pd.DataFrame(rows, columns=columns)
