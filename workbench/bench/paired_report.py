"""Text and Markdown views of paired runs (`scripts/gpu/paired_engines.py`, `workbench.bench.paired`).

`report_lines` is what the run prints at its end; `goal1_markdown` pools the prefill bursts of one or
more runs (each machine's cycles stay its own pairs) into the README's goal-1 table; `online_markdown`
puts each run's online windows and their step split side by side.
"""

from __future__ import annotations

import json

from workbench.bench.paired import online_pair_summary, pair_summary

__all__ = [
    "goal1_markdown",
    "online_markdown",
    "online_pairs_markdown",
    "pair_rows",
    "pooled_rows",
    "report_lines",
]

MEASURE_NAMES = {
    "wall_s": "client wall",
    "prefill_s": "engine prefill",
    "ttft_s": "server TTFT",
    "queue_s": "queue",
}


def report_lines(record: dict) -> list[str]:
    """The run's summary: paired ratios per condition, batch and measure; online windows; step split."""
    lines = ["paired bursts: condition / w8a8 within each cycle, median [95% interval] (geomean), cycles"]
    for s in record.get("summary", []):
        lines.append(
            f"  {s['condition']:9s} batch {s['batch']:3d} {s['measure']:9s} "
            f"w8a8 {s['baseline_median'] * 1e3:8.2f} ms this {s['median'] * 1e3:8.2f} ms  "
            f"{s['ratio_median']:.4f}x [{s['ratio_low']:.4f}-{s['ratio_high']:.4f}] "
            f"({s['ratio_geomean']:.4f}) n={s['cycles']}  {s['verdict']}"
        )
    if pair_rows(record):
        lines.append("online pairs: flex / w8a8 within each pair of short windows, median [95% interval]")
    for s in pair_rows(record):
        lines.append(
            f"  {s['rate']:5g} req/s {s['measure']:12s} w8a8 {s['baseline_median']:8.2f} "
            f"flex {s['median']:8.2f}  {s['ratio_median']:.4f}x [{s['ratio_low']:.4f}-{s['ratio_high']:.4f}] "
            f"n={s['cycles']}  {s['verdict']}"
        )
    for o in record.get("online", []):
        lines.append(
            f"online {o['label']:18s} TTFT p50 {o['ttft_ms']['p50']:.2f} ms  "
            f"TPOT p50 {o['tpot_ms']['p50']:.3f} ms  out {o['output_throughput_tok_s']:.0f} tok/s  "
            f"completed {o['completed']}/{o['requests']}"
        )
    for label, s in record.get("online_steps", {}).items():
        lines.append(f"steps {label}: {json.dumps({k: v for k, v in s.items() if k != 'decode_by_batch'})}")
        lines.append(f"  decode-only steps by batch: {json.dumps(s['decode_by_batch'])}")
    return lines


def pair_rows(record: dict) -> list[dict]:
    """The run's online-pair summary, worked out from its pairs if the run stopped before it did."""
    if record.get("online_pair_summary"):
        return record["online_pair_summary"]
    return online_pair_summary(record["online_pairs"], "w8a8") if record.get("online_pairs") else []


def pooled_rows(records: list[tuple[str, dict]], key: str = "bursts") -> list[dict]:
    """Every run's `key` rows (bursts, online_pairs), each cycle keyed by its run too, so a pair never
    spans two machines."""
    return [row | {"cycle": f"{name}/{row['cycle']}"} for name, rec in records for row in rec.get(key) or []]


def goal1_markdown(records: list[tuple[str, dict]], condition: str = "flex", baseline: str = "w8a8",
                   measures: tuple[str, ...] = ("wall_s", "prefill_s")) -> str:
    """Per batch and measure: `condition` / `baseline` (FlexQuant / W8A8) of each run and of all runs
    pooled, with the 95% interval of the median pair and the goal-1 verdict on it."""
    records = [(name, rec) for name, rec in records if rec.get("bursts")]  # e.g. online pairs only
    sources = [(name, rec["bursts"]) for name, rec in records]
    if len(records) > 1:
        sources.append(("pooled", pooled_rows(records)))
    tables = {name: {(s["batch"], s["measure"]): s for s in pair_summary(rows, baseline)
                     if s["condition"] == condition} for name, rows in sources}
    names = [name for name, _ in sources]
    lines = [
        "| batch | measure | "
        + " | ".join(f"{n}: {baseline} / {condition} ms, ratio [95%] (pairs)" for n in names)
        + " | verdict (≤ 1.03×) |",
        "|---|---|" + "---|" * len(names) + "---|",
    ]
    batches = sorted({b for t in tables.values() for b, _ in t})
    for batch in batches:
        for measure in measures:
            cells, verdict = [], "—"
            for name in names:
                s = tables[name].get((batch, measure))
                if s is None:
                    cells.append("—")
                    continue
                cells.append(
                    f"{s['baseline_median'] * 1e3:.2f} / {s['median'] * 1e3:.2f}, {s['ratio_median']:.3f}× "
                    f"[{s['ratio_low']:.3f}–{s['ratio_high']:.3f}] ({s['cycles']})"
                )
                verdict = s["verdict"]  # the last column's: the pooled one when there are several runs
            lines.append(f"| {batch} | {MEASURE_NAMES.get(measure, measure)} | " + " | ".join(cells)
                         + f" | {verdict} |")
    return "\n".join(lines) + "\n"


def online_markdown(records: list[tuple[str, dict]], baseline: str = "w8a8") -> str:
    """Each run's online windows: TTFT and TPOT p50, TPOT against stock W8A8, throughput, and for
    FlexQuant windows the share of time in prefill-carrying steps and the decode-only step means."""
    lines = [
        "| run | window | TTFT p50 ms | TPOT p50 ms | TPOT vs stock W8A8 | output tok/s | time in steps "
        "with a prefill chunk | decode-only step ms by batch (variant) | a better decode choice saves |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rec in records:
        stock = next((o for o in rec["online"] if o["label"] == baseline), None)
        for o in rec["online"]:
            tpot = o["tpot_ms"]["p50"]
            vs = f"{tpot / stock['tpot_ms']['p50'] - 1:+.1%}" if stock else "—"
            split = rec.get("online_steps", {}).get(o["label"])
            share = f"{split['prefill_time_share']:.0%}" if split and split["prefill_time_share"] else "—"
            steps = "; ".join(
                f"{rng}: " + ", ".join(f"{st['mean_ms']:.2f} ({v})" for v, st in by_variant.items())
                for rng, by_variant in split["decode_by_batch"].items()
            ) if split else "—"
            saving = split.get("decode_saving", {}).get("saved_share_of_window") if split else None
            lines.append(
                f"| {name} | {o['label']} | {o['ttft_ms']['p50']:.1f} | {tpot:.3f} | {vs} | "
                f"{o['output_throughput_tok_s']:.0f} | {share} | {steps} | "
                + (f"{saving:.1%} of the window |" if saving is not None else "— |")
            )
    return "\n".join(lines) + "\n"


def online_pairs_markdown(records: list[tuple[str, dict]]) -> str:
    """Each run's online pairs per rate, and all runs' pooled where there are several: FlexQuant / W8A8
    for TTFT p50 (goal 1: ≤ 1.03×), TPOT p50 (goal 3: ≤ 0.85×) and output throughput, median over
    pairs with the 95% interval."""
    lines = ["| run | rate req/s | measure | W8A8 / FlexQuant (medians) | ratio [95%] (pairs) | verdict |",
             "|---|---|---|---|---|---|"]
    runs = [(name, pair_rows(rec)) for name, rec in records]
    if sum(1 for _, rows in runs if rows) > 1:  # pairs stay within their machine (pooled_rows)
        runs.append(("pooled", online_pair_summary(pooled_rows(records, "online_pairs"), "w8a8")))
    for name, rows in runs:
        for s in rows:
            lines.append(
                f"| {name} | {s['rate']:g} | {s['measure']} | "
                f"{s['baseline_median']:.2f} / {s['median']:.2f} | {s['ratio_median']:.3f}× "
                f"[{s['ratio_low']:.3f}–{s['ratio_high']:.3f}] ({s['cycles']}) | {s['verdict']} |"
            )
    return "\n".join(lines) + "\n"
