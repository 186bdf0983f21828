"""Pure figure builders: `DataFrame` (or `Policy`) -> plotly Figure, plus the shared look of every chart.

No database, no Gradio: the frames come from `workbench.views` (or a benchmark), so every chart can
be unit-tested by looking at its traces. Here: the variant colours, the common layout, the empty
placeholder figure and the policy picture; `plots_live` holds the live run's charts and
`plots_compare` the side-by-side ones (accuracy per target, policies vs load). Colours are fixed per
variant so that W8A8 is the same blue on every tab (a legend you have to re-read per chart is a
legend nobody reads).
"""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from workbench.policy import Policy

__all__ = [
    "VARIANT_COLORS",
    "variant_color",
    "policy_figure",
    "empty_figure",
]

VARIANT_COLORS = {"w8a8": "#1f77b4", "w4a16": "#ff7f0e", "bf16": "#7f7f7f", "mixed": "#9467bd"}
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
