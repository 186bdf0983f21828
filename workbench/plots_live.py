"""Pure figure builders for the Live tab: one `DataFrame -> plotly Figure` function per chart of a
run's telemetry (variant per step, batch composition, step latency, rolling TTFT / TPOT), each with a
dashed red line where the policy changed.

The frames come from `workbench.views_telemetry`; colours and layout follow `workbench.plots`.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.plots import LAYOUT, empty_figure, variant_color

__all__ = [
    "policy_change_points",
    "variant_timeline_figure",
    "batch_composition_figure",
    "step_latency_figure",
    "rolling_latency_figure",
]


PHASE_SYMBOLS = {"prefill": "square", "decode": "circle"}


def policy_change_points(steps: pd.DataFrame) -> pd.DataFrame:
    """Rows (t_s, policy_name) where the policy differs from the previous step's: the moments a
    policy was applied. The first step's policy is not a change."""
    if steps.empty or "policy_name" not in steps:
        return pd.DataFrame(columns=["t_s", "policy_name"])
    ordered = steps.sort_values("step")
    changed = ordered["policy_name"].ne(ordered["policy_name"].shift())
    changed.iloc[0] = False
    return ordered.loc[changed, ["t_s", "policy_name"]].reset_index(drop=True)


def _mark_policy_changes(fig: go.Figure, changes: pd.DataFrame | None, **where) -> None:
    if changes is None:
        return
    for row in changes.itertuples():
        fig.add_vline(
            x=row.t_s,
            line_dash="dash",
            line_color="#d62728",
            annotation_text=f"policy → {row.policy_name}",
            annotation_position="top left",
            **where,
        )


def variant_timeline_figure(steps: pd.DataFrame) -> go.Figure:
    """Which variant computed each step over time: one trace per (variant, phase), colour per
    variant, square markers for steps with prefill tokens, circles for pure decode steps; a dashed
    red line where the policy changed."""
    title = "Variant per engine step"
    if steps.empty:
        return empty_figure(title)
    fig = go.Figure(layout=dict(title=title, **LAYOUT))
    for variant in sorted(steps["variant"].unique()):
        for phase, symbol in PHASE_SYMBOLS.items():
            part = steps[(steps["variant"] == variant) & (steps["phase"] == phase)]
            if part.empty:
                continue
            fig.add_trace(
                go.Scatter(
                    x=part["t_s"],
                    y=part["variant"],
                    mode="markers",
                    name=f"{variant} {phase}",
                    marker=dict(color=variant_color(variant), symbol=symbol, size=8),
                    customdata=part[["step", "num_prefill_tokens", "num_decode_reqs", "policy_name"]],
                    hovertemplate="step %{customdata[0]}<br>prefill tokens %{customdata[1]}"
                    "<br>decode reqs %{customdata[2]}<br>policy %{customdata[3]}<extra>%{y}</extra>",
                )
            )
    fig.update_xaxes(title="time since run start (s)")
    fig.update_yaxes(title="variant", type="category")
    _mark_policy_changes(fig, policy_change_points(steps))
    return fig


def batch_composition_figure(steps: pd.DataFrame) -> go.Figure:
    """What each step contained: running decode requests (top) and prefill tokens (bottom), one
    marker per step coloured by the variant that computed it. Markers, not bars: steps are
    milliseconds apart, so bars on a time axis of minutes would be invisible slivers."""
    title = "Batch composition per step"
    if steps.empty:
        return empty_figure(title)
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.12,
        subplot_titles=("decode requests", "prefill tokens"),
    )
    for variant in sorted(steps["variant"].unique()):
        part = steps[steps["variant"] == variant]
        marker = dict(color=variant_color(variant), size=6)
        for row, column in ((1, "num_decode_reqs"), (2, "num_prefill_tokens")):
            fig.add_trace(
                go.Scatter(
                    x=part["t_s"],
                    y=part[column],
                    mode="markers",
                    name=variant,
                    legendgroup=variant,
                    marker=marker,
                    showlegend=row == 1,  # one legend entry per variant
                ),
                row=row,
                col=1,
            )
    fig.update_layout(title=title, **{**LAYOUT, "height": 380})
    fig.update_yaxes(rangemode="tozero")
    fig.update_xaxes(title="time since run start (s)", row=2, col=1)
    _mark_policy_changes(fig, policy_change_points(steps), row="all", col=1)
    return fig


def step_latency_figure(steps: pd.DataFrame) -> go.Figure:
    """Duration of every engine step over time, one colour per variant."""
    title = "Step latency"
    if steps.empty:
        return empty_figure(title)
    fig = go.Figure(layout=dict(title=title, **LAYOUT))
    for variant in sorted(steps["variant"].unique()):
        part = steps[steps["variant"] == variant]
        fig.add_trace(
            go.Scatter(
                x=part["t_s"],
                y=part["duration_ms"],
                mode="markers",
                name=variant,
                marker=dict(color=variant_color(variant), size=6),
            )
        )
    fig.update_xaxes(title="time since run start (s)")
    fig.update_yaxes(title="step duration (ms)", rangemode="tozero")
    _mark_policy_changes(fig, policy_change_points(steps))
    return fig


def rolling_latency_figure(
    requests: pd.DataFrame, *, window: int = 8, changes: pd.DataFrame | None = None
) -> go.Figure:
    """TTFT (top) and TPOT (bottom) per finished request, with a rolling median over `window`
    requests; `changes` (from `policy_change_points`) adds the policy-change lines."""
    title = f"TTFT and TPOT (rolling median of {window} requests)"
    done = requests.dropna(subset=["ttft_ms"]) if not requests.empty else requests
    if done.empty:
        return empty_figure(title, "no finished requests yet")
    done = done.sort_values("t_s")
    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1, subplot_titles=("TTFT (ms)", "TPOT (ms)")
    )
    for row, metric, color in ((1, "ttft_ms", "#2ca02c"), (2, "tpot_ms", "#9467bd")):
        series = done[metric]
        fig.add_trace(
            go.Scatter(
                x=done["t_s"],
                y=series,
                mode="markers",
                name=f"{metric[:4].upper()} per request",
                marker=dict(color=color, size=5, opacity=0.35),
            ),
            row=row,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=done["t_s"],
                y=series.rolling(window, min_periods=1).median(),
                mode="lines",
                name=f"{metric[:4].upper()} rolling median",
                line=dict(color=color, width=3),
            ),
            row=row,
            col=1,
        )
    fig.update_layout(title=title, **{**LAYOUT, "height": 380})
    fig.update_xaxes(title="request finish time since run start (s)", row=2, col=1)
    _mark_policy_changes(fig, changes, row="all", col=1)
    return fig
