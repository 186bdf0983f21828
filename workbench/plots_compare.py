"""Pure figure builders that put targets or policies side by side: accuracy per evaluated target, and
TTFT / TPOT vs offered load per policy (the Compare tab). Same conventions as `workbench.plots`.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from workbench.plots import LAYOUT, empty_figure, variant_color

__all__ = ["accuracy_figure", "compare_figure", "pick_winner"]


def accuracy_figure(evals: pd.DataFrame) -> go.Figure:
    """Perplexity (left) and token agreement with BF16 (right) per evaluated target."""
    title = "Accuracy vs BF16"
    if evals.empty:
        return empty_figure(title, "no evaluation results for this checkpoint")
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("perplexity (lower is better)", "token agreement with BF16 (higher is better)"),
    )
    colors = [variant_color(t) for t in evals["target"]]
    fig.add_trace(
        go.Bar(
            x=evals["target"],
            y=evals["perplexity"],
            marker_color=colors,
            name="perplexity",
            text=evals["perplexity"].round(2),
            textposition="outside",
            cliponaxis=False,
        ),
        row=1,
        col=1,
    )
    agreement = evals["token_agreement"].astype(float)
    fig.add_trace(
        go.Bar(
            x=evals["target"],
            y=agreement,
            marker_color=colors,
            name="token agreement",
            text=agreement.map(lambda v: "" if pd.isna(v) else f"{v:.1%}"),
            textposition="outside",
            cliponaxis=False,
        ),
        row=1,
        col=2,
    )
    fig.update_yaxes(range=[0, 1.1], tickformat=".0%", row=1, col=2)
    fig.update_yaxes(rangemode="tozero", row=1, col=1)
    fig.update_layout(title=title, showlegend=False, **{**LAYOUT, "margin": dict(l=50, r=20, t=80, b=40)})
    return fig


def pick_winner(bench: pd.DataFrame, metric: str = "tpot_p50_ms") -> str | None:
    """The policy with the lowest mean `metric` over all loads it ran at (None without data)."""
    valid = bench.dropna(subset=[metric]) if not bench.empty else bench
    if valid.empty:
        return None
    return str(valid.groupby("policy")[metric].mean().idxmin())


def compare_figure(bench: pd.DataFrame, *, winner_metric: str = "tpot_p50_ms") -> go.Figure:
    """TTFT (left) and TPOT (right) p50 vs offered load, one line per policy; the winner on
    `winner_metric` is drawn thick and named in the title."""
    title = "Policies side by side"
    if bench.empty:
        return empty_figure(title, "run a comparison to see results")
    winner = pick_winner(bench, winner_metric)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("TTFT p50 (ms)", "TPOT p50 (ms)"))
    for i, (policy, part) in enumerate(bench.sort_values("rate").groupby("policy", sort=True)):
        is_winner = policy == winner
        color = qualitative.Plotly[i % len(qualitative.Plotly)]
        line = dict(color=color, width=5 if is_winner else 2, dash="solid" if is_winner else "dot")
        label = f"{policy} ★" if is_winner else str(policy)
        for col, metric in ((1, "ttft_p50_ms"), (2, "tpot_p50_ms")):
            fig.add_trace(
                go.Scatter(
                    x=part["rate"],
                    y=part[metric],
                    mode="lines+markers",
                    name=label,
                    legendgroup=str(policy),
                    showlegend=col == 1,
                    line=line,
                    marker=dict(size=11 if is_winner else 7),
                ),
                row=1,
                col=col,
            )
    fig.update_xaxes(title="offered load (requests/s)")
    fig.update_yaxes(rangemode="tozero")
    fig.update_layout(title=f"{title} — winner on {winner_metric}: {winner}", **{**LAYOUT, "height": 360})
    return fig
