"""Pure figure builders for the bench report: one `DataFrame -> plotly Figure` function per chart.

The frames come from `workbench.bench.report.frames`. Colours follow `workbench.plots.variant_color`
(W8A8 is the same blue here as on every tab); FlexQuant lines are drawn thick and solid, stock
single-variant lines thin and dotted in their variant's colour, so "ours vs theirs" reads without
the legend. Values are passed
to Plotly as plain lists so the report's HTML carries readable numbers, not base64 arrays.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from workbench.bench.report import sweep_tpot_metric
from workbench.plots import LAYOUT, empty_figure, variant_color

__all__ = ["METRIC_TITLES", "online_figure", "sweep_figure", "sweep_tpot_figure", "variant_share_figure"]

METRIC_TITLES = {
    "prefill_s": "prefill time of the batch (s)",
    "decode_s": "wall time of the batch (s)",
    "tpot_ms": "TPOT (ms)",
    "tpot_req_p50_ms": "TPOT per request, p50 (ms)",
    "ttft_p50_ms": "TTFT p50 (ms)",
    "ttft_p90_ms": "TTFT p90 (ms)",
    "ttft_p99_ms": "TTFT p99 (ms)",
    "tpot_p50_ms": "TPOT p50 (ms)",
    "tpot_p90_ms": "TPOT p90 (ms)",
    "tpot_p99_ms": "TPOT p99 (ms)",
    "itl_p50_ms": "ITL p50 (ms)",
    "itl_p99_ms": "ITL p99 (ms)",
    "output_throughput_tok_s": "output throughput (tokens/s)",
}


def _flex_labels(df: pd.DataFrame) -> set[str]:
    """Labels measured on a FlexQuant target (the frames' `kind` column; "flex:" labels without one)."""
    if "kind" in df:
        return set(df.loc[df["kind"] == "flex", "label"])
    return {label for label in df["label"] if label.startswith("flex:")}


def _line(label: str, flex: bool) -> dict:
    """Flex "<target>:<policy>": thick, solid, the policy's colour (`all-w8a8` is W8A8 blue). Stock
    "<variant>[-<kernel>]": thin, its variant's colour, dotted (dashed for Machete: same colour as Marlin)."""
    if flex:
        return dict(color=variant_color(label.split(":", 1)[-1]), width=4, dash="solid")
    variant, _, kernel = label.partition("-")
    return dict(color=variant_color(variant), width=2, dash="dash" if kernel == "machete" else "dot")


def _lines_figure(df: pd.DataFrame, x: str, metric: str, title: str, x_title: str, log_x: bool) -> go.Figure:
    valid = df.dropna(subset=[metric]) if not df.empty and metric in df else df.iloc[0:0]
    if valid.empty:
        return empty_figure(title, f"no {METRIC_TITLES.get(metric, metric)} measured")
    fig = go.Figure(layout=dict(title=title, **{**LAYOUT, "height": 360}))
    # Stock first, FlexQuant last: the thick flex lines are drawn on top.
    flex = _flex_labels(valid)
    for label in sorted(valid["label"].unique(), key=lambda name: (name in flex, name)):
        part = valid[valid["label"] == label].sort_values(x)
        fig.add_trace(
            go.Scatter(
                x=part[x].tolist(),
                y=part[metric].tolist(),
                mode="lines+markers",
                name=label,
                line=_line(label, label in flex),
                marker=dict(size=9 if label in flex else 6),
            )
        )
    fig.update_xaxes(title=x_title, type="log" if log_x else "linear")
    if log_x:
        fig.update_xaxes(tickvals=sorted(valid[x].unique().tolist()))  # the measured batches, not 10^k
    values = valid[metric].astype(float)
    # One engine that cannot keep up (W4A16-Marlin at 24 req/s: 30x the others) would flatten every
    # other line against zero on a linear axis
    if (values > 0).all() and values.max() / values.min() > 20:
        fig.update_yaxes(title=METRIC_TITLES.get(metric, metric), type="log")
    else:
        fig.update_yaxes(title=METRIC_TITLES.get(metric, metric), rangemode="tozero")
    return fig


def sweep_figure(sweep: pd.DataFrame, metric: str) -> go.Figure:
    """A sweep metric (e.g. "prefill_s", "tpot_ms") vs batch size on a log axis, one line per label."""
    drawn = ("prefill_s", "tpot_ms", "tpot_req_p50_ms", "decode_s", "ttft_p50_ms")
    if metric not in drawn:
        raise ValueError(f"sweep_figure draws one of {', '.join(drawn)}, not {metric!r}")
    name = METRIC_TITLES[metric].split(" (")[0]
    return _lines_figure(sweep, "batch", metric, f"Batch sweep: {name} vs batch", "batch (requests)", True)


def sweep_tpot_figure(sweep: pd.DataFrame) -> go.Figure:
    """TPOT vs batch: per request where the run measured it, else the wall method
    (`report.sweep_tpot_metric`)."""
    return sweep_figure(sweep, sweep_tpot_metric(sweep))


def online_figure(online: pd.DataFrame, metric: str) -> go.Figure:
    """An online metric (e.g. "ttft_p50_ms", "tpot_p50_ms", "output_throughput_tok_s") vs arrival rate."""
    if metric not in METRIC_TITLES or metric in ("prefill_s", "decode_s", "tpot_ms"):
        raise ValueError(f"online_figure draws one of the online metrics, e.g. ttft_p50_ms, not {metric!r}")
    name = METRIC_TITLES[metric].split(" (")[0]
    return _lines_figure(
        online, "rate", metric, f"Online: {name} vs arrival rate", "arrival rate (req/s)", False
    )


def variant_share_figure(df: pd.DataFrame) -> go.Figure:
    """Stacked share of engine steps per variant for each FlexQuant label at each batch (or rate):
    one bar per (label, load), one colour per variant."""
    title = "Share of engine steps per variant (FlexQuant)"
    load = "batch" if "batch" in df else "rate"
    flex = df[df["label"].isin(_flex_labels(df))] if not df.empty else df
    flex = flex[flex["variant_share"].map(lambda share: isinstance(share, dict) and bool(share))]
    if flex.empty:
        return empty_figure(title, "no FlexQuant step shares recorded")
    flex = flex.sort_values(["label", load])
    labels = flex["label"].tolist()
    loads = [f"batch {v:g}" if load == "batch" else f"{v:g} req/s" for v in flex[load]]
    variants = sorted({v for share in flex["variant_share"] for v in share})
    fig = go.Figure(layout=dict(title=title, barmode="stack", **{**LAYOUT, "height": 360}))
    for variant in variants:
        fig.add_trace(
            go.Bar(
                x=[labels, loads],
                y=[float(share.get(variant, 0.0)) for share in flex["variant_share"]],
                name=variant,
                marker_color=variant_color(variant),
            )
        )
    fig.update_yaxes(title="share of steps", range=[0, 1], tickformat=".0%")
    return fig
