"""Engines measured in alternation on one GPU: FlexQuant against stock W8A8 with the machine paired out.

Runs 7-10 (docs/benchmarks/README.md) started one engine after another and compared each FlexQuant
engine with the W8A8 engines before and after it; the machine's drift between engine starts (the
same W8A8 engine moved up to 1.5x) left goal 1 unresolved at batch 1 and 4 after ten rounds. Here
every engine is started once, side by side on one GPU (each with its share of the memory), and the
load alternates between them burst by burst, so the conditions of one cycle meet the same clocks,
the same temperature and the same host. A condition is an engine and how this process treats it
(e.g. FlexQuant with its step telemetry copied into the DB while it serves, as `flexquant bench`
did up to run 11); each cycle measures every condition once, in a rotated order.

Beside the client's wall time, each burst reads vLLM's own Prometheus histograms before and after
(`/metrics`: their `_sum` and `_count` are exact), which split a request's TTFT into time queued, time
in the engine from scheduling to its first token (the prefill step), and the rest (HTTP, tokenizing,
the API server): the engine-side prefill time does not depend on the client's process at all.

`step_split` reads FlexQuant's step telemetry of an online window: how the serving time divides
into steps that carry a prefill chunk and decode-only steps, and how fast each variant's decode steps
ran at each batch, on the same engine.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict

from workbench.bench.engine_spread import median_interval, spread_verdict

__all__ = [
    "HISTOGRAMS",
    "ONLINE_GOALS",
    "cycle_orders",
    "decode_saving",
    "engine_means",
    "online_pair_row",
    "online_pair_summary",
    "pair_summary",
    "parse_histograms",
    "step_split",
]

# vLLM's per-request histograms (vllm/v1/metrics/loggers.py); seconds
HISTOGRAMS = {
    "queue_s": "vllm:request_queue_time_seconds",
    "prefill_s": "vllm:request_prefill_time_seconds",
    "ttft_s": "vllm:time_to_first_token_seconds",
}
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(?P<value>\S+)")


def parse_histograms(text: str, names: dict[str, str] = HISTOGRAMS) -> dict[str, tuple[float, float]]:
    """{key: (sum, count)} of each named histogram in a Prometheus text exposition, added over its
    label sets (one per engine and model); a histogram absent from `text` is left out."""
    parts = ("sum", "count")
    wanted = {f"{metric}_{part}": (key, i) for key, metric in names.items() for i, part in enumerate(parts)}
    totals: dict[str, list[float]] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match["name"] not in wanted:
            continue
        key, i = wanted[match["name"]]
        totals.setdefault(key, [0.0, 0.0])[i] += float(match["value"])
    return {key: (s, c) for key, (s, c) in totals.items()}


def engine_means(before: dict, after: dict) -> dict[str, float | None]:
    """Mean seconds per request of each histogram between two scrapes (None: no request in between)."""
    means: dict[str, float | None] = {}
    for key in HISTOGRAMS:
        if key not in before or key not in after:
            means[key] = None
            continue
        count = after[key][1] - before[key][1]
        means[key] = (after[key][0] - before[key][0]) / count if count > 0 else None
    return means


def cycle_orders(conditions: list[str], cycles: int) -> list[list[str]]:
    """The order of the conditions in each cycle: rotated by one per cycle, so each condition runs
    first, in the middle and last equally often (a cycle's first burst may meet a cooler GPU)."""
    n = len(conditions)
    return [conditions[i % n:] + conditions[: i % n] for i in range(cycles)]


def pair_summary(rows: list[dict], baseline: str, goal: float = 1.03, *, group: str = "batch",
                 measures: tuple[str, ...] = ("wall_s", *HISTOGRAMS)) -> list[dict]:
    """Per condition (other than `baseline`), `group` value (a batch, a rate) and measure: the ratio
    condition / baseline within each cycle, its median over cycles with a distribution-free interval
    (`median_interval`, 95%), the geometric mean ratio, and the verdict of that interval against
    `goal` (`spread_verdict`: goal 1's 1.03 by default).

    `rows`: one per measurement, {"cycle", "condition", group: ..., measure: value, ...}; a measure
    missing or None in either member of a cycle leaves that cycle out of its ratio."""
    by_key: dict[tuple, dict] = {(r["cycle"], r["condition"], r[group]): r for r in rows}
    measures = [m for m in measures if any(r.get(m) is not None for r in rows)]
    conditions = list(dict.fromkeys(r["condition"] for r in rows if r["condition"] != baseline))
    groups = sorted({r[group] for r in rows})
    out = []
    for condition in conditions:
        for at in groups:
            for measure in measures:
                base, this = [], []
                for (cycle, cond, g), row in by_key.items():
                    ref = by_key.get((cycle, baseline, g))
                    if cond != condition or g != at or ref is None:
                        continue
                    if row.get(measure) and ref.get(measure):
                        this.append(row[measure])
                        base.append(ref[measure])
                if not this:
                    continue
                ratios = [t / b for t, b in zip(this, base, strict=True)]
                low, high, coverage = median_interval(ratios)
                out.append({
                    "condition": condition, group: at, "measure": measure, "cycles": len(ratios),
                    "baseline_median": statistics.median(base), "median": statistics.median(this),
                    "ratio_median": statistics.median(ratios), "ratio_low": low, "ratio_high": high,
                    "coverage": coverage,
                    "ratio_geomean": math.exp(statistics.fmean(math.log(r) for r in ratios)),
                    "verdict": spread_verdict(low, high, goal),
                })
    return out


def online_pair_row(pair: int, condition: str, rate: float, summary: dict) -> dict:
    """One short online window of an online pair, flattened for `pair_summary(group="rate")`: TTFT
    and TPOT p50 (ms) and output throughput from `client.summarize`'s row."""
    return {"cycle": pair, "condition": condition, "rate": rate,
            "ttft_p50_ms": summary["ttft_ms"]["p50"], "tpot_p50_ms": summary["tpot_ms"]["p50"],
            "output_tok_s": summary["output_throughput_tok_s"],
            "completed": summary["completed"], "requests": summary["requests"]}


# measure -> the bound its ratio to stock W8A8 must stay under: goal 1 (TTFT <= 1.03x) and goal 3
# (p50 TPOT at least 15% below); throughput is reported without one (open-loop load: equal when kept up)
ONLINE_GOALS = {"ttft_p50_ms": 1.03, "tpot_p50_ms": 0.85, "output_tok_s": None}


def online_pair_summary(rows: list[dict], baseline: str) -> list[dict]:
    """`pair_summary` of online pairs per rate, each measure judged against its ONLINE_GOALS bound."""
    out = []
    for measure, goal in ONLINE_GOALS.items():
        for s in pair_summary(rows, baseline, goal or 1.0, group="rate", measures=(measure,)):
            out.append(s if goal else s | {"verdict": "—"})
    return out


DECODE_BUCKETS = (1, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def _bucket(batch: int) -> str:
    """The label of the decode-batch range `batch` falls into, e.g. "17-24"."""
    low = 1
    for high in DECODE_BUCKETS:
        if batch <= high:
            return str(high) if low == high else f"{low}-{high}"
        low = high + 1
    return f">{DECODE_BUCKETS[-1]}"


def _mean3(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 3) if values else None


def step_split(steps: list[dict], t0: float, t1: float) -> dict:
    """FlexQuant's telemetry steps (`ts` within [t0, t1]) of one online window: steps and milliseconds
    that carried prefill tokens against decode-only steps, and per decode-batch range and variant the
    decode-only steps' count, mean and total `duration_ms` (start to next start: the time they held
    the GPU)."""
    inside = [s for s in steps if t0 <= s["ts"] <= t1 and s.get("duration_ms") is not None]
    prefill = [s for s in inside if s["num_prefill_tokens"] > 0]
    decode = [s for s in inside if s["num_prefill_tokens"] == 0 and s["num_decode_reqs"] > 0]
    by_range: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for s in decode:
        by_range[_bucket(s["num_decode_reqs"])][s["variant"]].append(s["duration_ms"])
    total_ms = sum(s["duration_ms"] for s in inside)
    prefill_ms = sum(s["duration_ms"] for s in prefill)
    decode_ms = sum(s["duration_ms"] for s in decode)
    return {
        "steps": len(inside),
        "prefill_steps": len(prefill),
        "decode_steps": len(decode),
        "total_ms": round(total_ms, 3),
        "prefill_ms": round(prefill_ms, 3),
        "decode_ms": round(decode_ms, 3),
        "prefill_time_share": round(prefill_ms / total_ms, 4) if total_ms else None,
        "prefill_step_mean_ms": _mean3([s["duration_ms"] for s in prefill]),
        "prefill_tokens_mean": _mean3([s["num_prefill_tokens"] for s in prefill]),
        "decode_by_batch": {
            rng: {v: {"steps": len(d), "mean_ms": _mean3(d), "total_ms": round(sum(d), 3)}
                  for v, d in sorted(vs.items())}
            for rng, vs in sorted(by_range.items(), key=lambda kv: int(kv[0].lstrip(">").split("-")[0]))
        },
    }


def decode_saving(split: dict, references: list[dict]) -> dict:
    """How much of `split`'s window a better per-step choice of decode variant could have saved: each
    decode-only step priced at the fastest variant's mean at its batch range, over `references`
    (`step_split`s of windows on the same engine, e.g. under two policies). An estimate that holds
    the schedule fixed; prefill-carrying steps keep their time (W8A8 is the fastest prefill)."""
    fastest: dict[str, float] = {}  # from the sums: rounded means would price a step 0.0005 ms off
    for ref in [split, *references]:
        for rng, variants in ref["decode_by_batch"].items():
            for stats in variants.values():
                fastest[rng] = min(fastest.get(rng, math.inf), stats["total_ms"] / stats["steps"])
    best_ms = sum(stats["steps"] * fastest[rng]
                  for rng, variants in split["decode_by_batch"].items() for stats in variants.values())
    saved = split["decode_ms"] - best_ms
    return {"decode_ms_best": round(best_ms, 3), "saved_ms": round(saved, 3),
            "saved_share_of_window": round(saved / split["total_ms"], 4) if split["total_ms"] else None}
