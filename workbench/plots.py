"""Pure figure builders: one `DataFrame -> plotly Figure` function per chart the UI shows.

No database, no Gradio: the frames come from `workbench.views` (or a benchmark), so every chart can
be unit-tested by looking at its traces. Here: the live run's charts and the policy picture;
`plots_compare` holds the side-by-side ones (accuracy per target, policies vs load). Colours are
fixed per variant so that W8A8 is the same blue on every tab (a legend you have to re-read per
chart is a legend nobody reads).
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from workbench.policy import Policy

__all__ = [
    "VARIANT_COLORS",
    "variant_color",
    "policy_change_points",
    "variant_timeline_figure",
    "batch_composition_figure",
    "step_latency_figure",
    "rolling_latency_figure",
    "policy_figure",
    "empty_figure",
]

VARIANT_COLORS = {"w8a8": "#1f77b4", "w4a16": "#ff7f0e", "bf16": "#7f7f7f", "mixed": "#9467bd"}
PHASE_SYMBOLS = {"prefill": "square", "decode": "circle"}
LAYOUT = dict(template="plotly_white", margin=dict(l=50, r=20, t=50, b=40), height=320)


def variant_color(name: str) -> str:
    """The colour of a variant (or any other series name): fixed for known ones, stable otherwise.
    A fixed policy `all-<variant>` (how evaluations name a variant alone) gets its variant's colour."""
    name = name.removeprefix("all-")
    if name in VARIANT_COLORS:
        return VARIANT_COLORS[name]
    palette = qualitative.Safe
    # A stable hash (not Python's salted hash()) so a name keeps its colour across processes.
    return palette[sum(name.encode()) % len(palette)]


def empty_figure(title: str, message: str = "no data yet") -> go.Figure:
    fig = go.Figure(layout=dict(title=title, **LAYOUT))
    fig.add_annotation(
        text=message,
        showarrow=False,
        xref="paper",
        yref="paper",
        x=0.5,
        y=0.5,
        font=dict(size=14, color="#7f7f7f"),
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


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
        fig.add_trace(
            go.Scatter(
                x=part["t_s"],
                y=part["num_decode_reqs"],
                mode="markers",
                name=variant,
                legendgroup=variant,
                marker=marker,
            ),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=part["t_s"],
                y=part["num_prefill_tokens"],
                mode="markers",
                name=variant,
                legendgroup=variant,
                marker=marker,
                showlegend=False,
            ),
            row=2,
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


def policy_figure(
    policy: Policy, *, num_layers: int | None = None, max_batch: int | None = None
) -> go.Figure:
    """The policy as a picture: the prefill variant, the decode variant for each batch range, and
    (when `num_layers` is known) which layers are pinned to a variant by a layer override."""
    bounds = [r.max_batch for r in policy.decode if r.max_batch is not None]
    x_max = max_batch or max(32, 2 * (bounds[-1] if bounds else 16))
    rows = 2 if num_layers else 1
    fig = make_subplots(
        rows=rows,
        cols=1,
        vertical_spacing=0.35,
        subplot_titles=("variant by step kind and decode batch size", "per-layer overrides")[:rows],
    )
    seen: set[str] = set()

    def bar(y: str, lo: float, hi: float, variant: str, label: str, row: int) -> None:
        fig.add_trace(
            go.Bar(
                y=[y],
                x=[hi - lo],
                base=[lo],
                orientation="h",
                name=variant,
                legendgroup=variant,
                showlegend=variant not in seen,
                marker_color=variant_color(variant),
                text=[label],
                textposition="inside",
                insidetextanchor="middle",
                hovertemplate=f"{label}<extra>{variant}</extra>",
            ),
            row=row,
            col=1,
        )
        seen.add(variant)

    bar("prefill", 0.5, x_max + 0.5, policy.prefill, f"prefill: {policy.prefill}", 1)
    lo = 1
    for rule in policy.decode:
        hi = rule.max_batch if rule.max_batch is not None else x_max
        span = f"{lo}–{rule.max_batch}" if rule.max_batch is not None else f"≥{lo}"
        bar("decode", lo - 0.5, max(hi, lo) + 0.5, rule.variant, f"batch {span}: {rule.variant}", 1)
        lo = (rule.max_batch or x_max) + 1
    fig.update_xaxes(title="running decode requests", range=[0.5, x_max + 0.5], row=1, col=1)
    if num_layers:
        covered = [(r.first, r.last, r.variant) for r in policy.layers]
        for first, last, variant in covered:
            bar("layers", first - 0.5, last + 0.5, variant, f"layers {first}–{last}: {variant}", 2)
        free = [i for i in range(num_layers) if not any(f <= i <= la for f, la, _ in covered)]
        if free:
            fig.add_trace(
                go.Bar(
                    y=["layers"] * len(free),
                    x=[1] * len(free),
                    base=[i - 0.5 for i in free],
                    orientation="h",
                    name="follow step policy",
                    marker_color="#e5e5e5",
                    hovertemplate="layer %{base}<extra>follows the step policy</extra>",
                ),
                row=2,
                col=1,
            )
        fig.update_xaxes(
            title="layer", range=[-0.5, num_layers - 0.5], row=2, col=1, dtick=max(1, num_layers // 16)
        )  # whole layers only
    fig.update_layout(
        title=f"Policy {policy.name}", barmode="overlay", **{**LAYOUT, "height": 260 if rows == 1 else 420}
    )
    return fig
