"""The goals of issue #5 judged on a bench results dict: verdicts, roofline, memory, README table.

Every verdict is a ratio of two measurements from the same run (flex / reference); a lone absolute
time is never a verdict. "Best single variant" means the best stock target, excluding BF16 (not a
variant of the merged checkpoint) unless `include_bf16=True`. A baseline measured twice (its
engine-order control, `--control`) counts with its faster measurement, so drift between the first
and the last engine cannot flatter FlexQuant; a miss smaller than that drift (FlexQuant would meet
the goal against the slower of the two measurements of one and the same engine) is flagged
`within_drift`, and a goal whose every miss is within drift is "not resolved", not "NOT met". Where
either side was not measured, `met` is None ("no data").
"""

from __future__ import annotations

import math
import re

import pandas as pd

from workbench.bench.report import _flex_rows, control_drift, default_flex_label, frames, sweep_tpot_metric
from workbench.bench.weights import hbm_tb_s

__all__ = ["GOALS", "GOAL_COLUMNS", "goal_verdicts", "goals", "headline_markdown", "memory", "roofline"]

GOAL_COLUMNS = (
    "goal name metric where flex_label flex reference_label reference ratio op limit met drift within_drift"
).split()
# The goals of issue #5 measured per batch ("sweep") or per arrival rate ("online"): (goal, name,
# section, metric, reference, op, limit), met when flex / reference `op` limit. Reference "w8a8": the
# W8A8-only target; "best": the best single variant; "w4a16": the better W4A16 target (lower TTFT is
# the stricter reading of "W4A16-only"). Goal 4 is `roofline()`, goal 5 (memory) is added in `goals`.
GOALS = [
    (1, "TTFT <= 1.03x W8A8-only", "sweep", "prefill_s", "w8a8", "<=", 1.03),
    (1, "TTFT <= 1.03x W8A8-only", "online", "ttft_p50_ms", "w8a8", "<=", 1.03),
    (2, "TPOT <= 1.03x best single variant", "sweep", "tpot_ms", "best", "<=", 1.03),
    # the same per request (`vllm bench`'s TPOT); see LATER_METRICS
    (2, "TPOT <= 1.03x best single variant (per request)", "sweep", "tpot_req_p50_ms", "best", "<=", 1.03),
    (2, "TPOT <= 1.03x best single variant", "online", "tpot_p50_ms", "best", "<=", 1.03),
    (3, "online p50 TPOT >= 15% below W8A8-only", "online", "tpot_p50_ms", "w8a8", "<=", 0.85),
    (3, "online p50 TTFT >= 35% below the better W4A16-only", "online", "ttft_p50_ms", "w4a16", "<=", 0.65),
    (
        3,
        "online output throughput >= best single variant",
        "online",
        "output_throughput_tok_s",
        "best",
        ">=",
        1.0,
    ),
]

# Metrics the bench records only since a later version: older results are not judged on them (where
# another metric is missing in every row, the goal says "no data": a measurement failed).
LATER_METRICS = {"tpot_req_p50_ms"}  # streamed closed batches, since 2026-11-26


def _stock(targets: pd.DataFrame, variant: str | None = None, include_bf16: bool = False) -> list[str]:
    """Stock target labels: of one variant, or all single variants (BF16 only if asked)."""
    stock = targets[targets["kind"] == "stock"]
    if variant is not None:
        return stock.loc[stock["variant"] == variant, "label"].tolist()
    return stock.loc[include_bf16 | (stock["variant"] != "bf16"), "label"].tolist()


def _value(df: pd.DataFrame, label: str | None, load: str, at: float, metric: str) -> float:
    hit = df.loc[(df["label"] == label) & (df[load] == at), metric]
    return float(hit.iloc[0]) if len(hit) else math.nan


def _best(df: pd.DataFrame, labels: list[str], load: str, at: float, metric: str, lowest: bool = True):
    """(label, value) of the best measured among `labels` at this load; (None, nan) if none was."""
    values = {lab: _value(df, lab, load, at, metric) for lab in labels}
    values = {lab: v for lab, v in values.items() if not math.isnan(v)}
    if not values:
        return None, math.nan
    label = (min if lowest else max)(values, key=values.get)
    return label, values[label]


def _goal_row(goal, name, metric, where, flex, value, ref_label, ref, op, limit, drift=math.nan) -> dict:  # noqa: ANN001
    """`drift`: slower / faster measurement of the reference's engine (first and control), NaN
    without a control; a miss is `within_drift` when FlexQuant meets the limit against the slower."""
    ratio = value / ref if ref and not math.isnan(value) and not math.isnan(ref) else math.nan
    met = None if math.isnan(ratio) else bool(ratio <= limit if op == "<=" else ratio >= limit)
    within = None
    if met is False and not math.isnan(drift):
        within = bool(ratio / drift <= limit if op == "<=" else ratio * drift >= limit)
    return dict(
        zip(
            GOAL_COLUMNS,
            (goal, name, metric, where, flex, value, ref_label, ref, ratio, op, limit, met, drift, within),
            strict=True,
        )
    )


def _same_engines(targets: pd.DataFrame) -> dict[str, list[str]]:
    """Label -> the labels measured on the same engine setup: a baseline and its engine-order controls."""
    base = {
        label: of if isinstance(of, str) else label
        for label, of in zip(targets["label"], targets["control_of"], strict=True)
    }
    return {label: [other for other in base if base[other] == base[label]] for label in base}


def _drift(df: pd.DataFrame, same_engine: list[str], load: str, at: float, metric: str) -> float:
    """Slower / faster of the measurements of one engine setup (`_same_engines`) at this point; NaN
    unless it was measured twice (first and control)."""
    values = [_value(df, label, load, at, metric) for label in same_engine]
    values = [v for v in values if not math.isnan(v) and v > 0]
    return max(values) / min(values) if len(values) > 1 else math.nan


def goals(results: dict, flex_label: str | None = None, *, include_bf16: bool = False) -> pd.DataFrame:
    """One row per goal of issue #5 and batch/rate (every batch and rate of the spec, measured or not):
    flex value, reference label and value, ratio = flex / reference, `op`, `limit` and `met`."""
    flex = flex_label or default_flex_label(results)
    if flex is None:
        return pd.DataFrame(columns=GOAL_COLUMNS)
    fr = frames(results)
    targets = fr["targets"]
    flex_rows = [r for r in _flex_rows(results) if r["label"] == flex]
    if not flex_rows:
        labels = sorted({r["label"] for r in _flex_rows(results)})
        raise ValueError(f"no FlexQuant measurement is labelled {flex!r}; the FlexQuant labels are {labels}")
    candidates = {"best": _stock(targets, include_bf16=include_bf16), "w4a16": _stock(targets, "w4a16")}
    w8a8, bf16 = _stock(targets, "w8a8"), (_stock(targets, "bf16") or [None])[0]
    same_engines = _same_engines(targets)
    loads = {"sweep": ("batch", "batch {:g}", "batches"), "online": ("rate", "rate {:g} req/s", "rates")}
    rows = []
    for goal, name, section, metric, reference, op, limit in GOALS:
        df = fr[section]
        if metric in LATER_METRICS and df[metric].isna().all():
            continue
        load, where, spec_key = loads[section]
        for at in sorted(set(results["spec"].get(spec_key) or []) | set(df[load].dropna())):
            labels = w8a8 if reference == "w8a8" else candidates[reference]
            ref_label, ref = _best(df, labels, load, at, metric, lowest=op == "<=")
            value = _value(df, flex, load, at, metric)
            drift = _drift(df, same_engines.get(ref_label, []), load, at, metric)
            rows.append(
                _goal_row(goal, name, metric, where.format(at), flex, value, ref_label, ref, op, limit, drift)
            )
    gib = targets.set_index("label")["weight_memory_gib"]
    flex_gib, bf16_gib = gib.get(flex_rows[0]["target"], math.nan), gib.get(bf16, math.nan)
    if bf16 is None and results.get("bf16_reference"):  # no BF16 engine ran: its size from the shapes
        bf16, bf16_gib = "bf16 (from shapes)", results["bf16_reference"]["weight_gib"]
    name = "weight memory <= 0.8x BF16"
    rows.append(
        _goal_row(5, name, "weight_memory_gib", "resident weights", flex, flex_gib, bf16, bf16_gib, "<=", 0.8)
    )
    return pd.DataFrame(rows, columns=GOAL_COLUMNS)


def _verdict(known: pd.DataFrame, missing: int) -> str:
    if known.empty:
        return "no data"
    misses = known[~known["met"].astype(bool)]
    if not misses.empty:
        within = int((misses["within_drift"] == True).sum())  # noqa: E712 (None: no control)
        if within == len(misses):
            return "not resolved: every miss is within engine drift"
        return f"NOT met ({within} of {len(misses)} misses within engine drift)" if within else "NOT met"
    return "incomplete" if missing else "met"


def goal_verdicts(goal_rows: pd.DataFrame) -> pd.DataFrame:
    """One row per goal: "met" (at every point), "NOT met" (at some point; how many of the misses are
    within engine drift, if any), "not resolved" (every miss within engine drift), "incomplete" (met
    where measured, some points not measured) or "no data"; the worst ratio, where, and how many
    points are missing."""
    out = []
    for (goal, name), part in goal_rows.groupby(["goal", "name"], sort=False):
        known = part[part["met"].notna()]
        worst = {"ratio": math.nan, "where": ""}
        if not known.empty:
            worst = known.loc[
                known["ratio"].idxmax() if part["op"].iloc[0] == "<=" else known["ratio"].idxmin()
            ]
        missing = len(part) - len(known)
        out.append((goal, name, _verdict(known, missing), worst["ratio"], worst["where"], missing))
    return pd.DataFrame(out, columns=["goal", "name", "verdict", "worst_ratio", "where", "missing"])


def _batch1_variant(policy: str | None, share: dict) -> str | None:
    """The variant a (not auto-tuned) flex policy decodes batch 1 with: a fixed `all-<variant>` policy's,
    else the variant that ran most of the batch-1 steps (one prefill step, then decode steps)."""
    if policy and re.fullmatch(r"all-[a-z0-9_]+", policy):
        return policy.removeprefix("all-")
    return max(share, key=share.get) if share else None


def roofline(results: dict) -> pd.DataFrame:
    """Goal 4: batch-1 decode step vs the HBM roofline per label, fraction = (weight_bytes_b1 / HBM
    bandwidth) / TPOT. The auto-tuned flex label uses the flex target's weight_bytes_b1 (the bytes of
    its batch-1 variant, as the runner records them); another flex policy uses the stock target of the
    variant it decodes batch 1 with."""
    fr = frames(results)
    targets, sweep = fr["targets"], fr["sweep"]
    bytes_of = targets.set_index("label")["weight_bytes_b1"]
    hbm_bytes_s = (hbm_tb_s(results["machine"]) or math.nan) * 1e12
    tuned = (results.get("autotune") or {}).get("policy_name")
    rows = []
    for row in sweep[sweep["batch"] == 1].itertuples():
        source = row.target
        if row.kind == "flex" and (tuned is None or row.policy != tuned):
            variant = _batch1_variant(row.policy, row.variant_share)
            same = (
                [lab for lab in _stock(targets, variant) if not math.isnan(bytes_of[lab])] if variant else []
            )
            source = f"{same[0]} (same variant)" if same else source
        weight_bytes = float(bytes_of[source.removesuffix(" (same variant)")])
        roofline_ms = weight_bytes / hbm_bytes_s * 1000
        fraction = roofline_ms / row.tpot_ms
        rows.append((row.label, row.kind, row.tpot_ms, weight_bytes, source, roofline_ms, fraction))
    columns = ["label", "kind", "tpot_ms", "weight_bytes_b1", "bytes_from", "roofline_ms", "fraction"]
    return pd.DataFrame(rows, columns=columns)


def memory(results: dict) -> pd.DataFrame:
    """Goal 5: resident weight memory per target and its ratio to the BF16 target's; without a BF16
    target, to `results["bf16_reference"]` (2 bytes per parameter of the merged checkpoint), else NaN."""
    targets = frames(results)["targets"]
    bf16 = targets.loc[(targets["kind"] == "stock") & (targets["variant"] == "bf16"), "weight_memory_gib"]
    out = targets[["label", "kind", "variant", "kernel", "weight_memory_gib"]].copy()
    reference = float(bf16.iloc[0]) if len(bf16) else math.nan
    if not len(bf16) and results.get("bf16_reference"):
        reference = float(results["bf16_reference"]["weight_gib"])
        out.loc[len(out)] = ["bf16 (from shapes)", "reference", "bf16", None, reference]
    out["ratio_to_bf16"] = out["weight_memory_gib"] / reference
    return out


def _ratio(value: float, note: object = None) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.2f}×" + (f" ({note})" if isinstance(note, str) and note else "")


def headline_markdown(results: dict, flex_label: str | None = None) -> str:
    """The README table: per batch and per rate, flex TTFT and TPOT as ratios to W8A8-only and to the
    better W4A16 target at that point (below 1: FlexQuant is faster), then each goal's verdict."""
    flex = flex_label or default_flex_label(results)
    if flex is None:
        return "_No FlexQuant measurement in this run._\n"
    fr, machine = frames(results), results["machine"]
    targets = fr["targets"]
    kernel_of = targets.set_index("label")["kernel"]
    w8a8, w4a16 = _stock(targets, "w8a8"), _stock(targets, "w4a16")
    sweep_tpot = sweep_tpot_metric(fr["sweep"])
    tpot_note = "TPOT per request (p50)" if sweep_tpot == "tpot_req_p50_ms" else "TPOT by the wall method"
    lines = [
        f"`{flex}` vs single variants, one run on {machine.get('gpu', '?')}, "
        f"vLLM {machine.get('vllm', '?')}. Ratio = FlexQuant / single variant (below 1: FlexQuant is "
        f"faster); batch rows: TTFT = prefill time of the batch, {tpot_note}; rate rows: p50.",
        "",
        "| load | TTFT vs W8A8 | TTFT vs best W4A16 | TPOT vs W8A8 | TPOT vs best W4A16 |",
        "|---|---|---|---|---|",
    ]
    points = []
    for df, load, unit, ttft, tpot in (
        (fr["sweep"], "batch", "batch {:g}", "prefill_s", sweep_tpot),
        (fr["online"], "rate", "{:g} req/s", "ttft_p50_ms", "tpot_p50_ms"),
    ):
        for at in sorted(df.loc[df["label"] == flex, load].unique()):
            points.append((df, load, at, unit.format(at), ttft, tpot))
    for df, load, at, where, ttft, tpot in points:
        cells = []
        for metric in (ttft, tpot):
            value = _value(df, flex, load, at, metric)
            cells.append(_ratio(value / _best(df, w8a8, load, at, metric)[1]))
            best_label, best = _best(df, w4a16, load, at, metric)
            cells.append(_ratio(value / best, kernel_of.get(best_label)))
        lines.append(f"| {where} | " + " | ".join(cells) + " |")
    lines += ["", "| goal | verdict | worst ratio | at |", "|---|---|---|---|"]
    for v in goal_verdicts(goals(results, flex)).itertuples():
        missing = f" ({v.missing} point(s) not measured)" if v.missing and v.verdict != "no data" else ""
        lines.append(f"| {v.goal}. {v.name} | {v.verdict}{missing} | {_ratio(v.worst_ratio)} | {v.where} |")
    drift = control_drift(results)
    for (first, control), part in drift.groupby(["baseline", "control"]):
        lines += [
            "",
            f"Engine-order control: `{first}` measured again after FlexQuant (`{control}`): second / "
            f"first between {part['ratio'].min():.2f}× and {part['ratio'].max():.2f}× (median "
            f"{part['ratio'].median():.2f}×) over {len(part)} points; goals use the faster of the two.",
        ]
    for r in roofline(results).query("label == @flex").itertuples():
        lines += [
            "",
            f"Batch-1 decode step of `{flex}`: {r.tpot_ms:.2f} ms, {r.fraction:.0%} of the HBM roofline "
            f"({r.weight_bytes_b1 / 1e9:.1f} GB read per step at {hbm_tb_s(machine)} TB/s).",
        ]
    return "\n".join(lines) + "\n"
