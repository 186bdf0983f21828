"""The bench's HTML report: one self-contained page per results dict (figures, goals, roofline, memory).

`render_report` builds the page from the pure analysis of `workbench.bench.report`; `write_report`
writes it atomically. Plotly is imported only when drawing, so the analysis stays importable without it.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import pandas as pd

from workbench.bench.goals import goal_verdicts, goals, memory, roofline
from workbench.bench.report import control_drift, default_flex_label, frames

__all__ = ["render_report", "write_report", "write_text_atomic"]


def _table(df: pd.DataFrame, table_id: str) -> str:
    shown = df.copy()
    if "met" in shown:
        shown["met"] = shown["met"].map({True: "yes", False: "NO"}).fillna("no data")
    return shown.to_html(
        index=False,
        table_id=table_id,
        na_rep="—",
        float_format=lambda v: f"{v:.4g}",
        border=0,
        classes="data",
    )


def _key_values(mapping: dict) -> str:
    cells = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(json.dumps(v))}</td></tr>"
        for k, v in mapping.items()
    )
    return f"<table class='kv'>{cells}</table>"


def render_report(results: dict, *, plotlyjs: str = "cdn", flex_label: str | None = None) -> str:
    """The whole report as one HTML string: run facts, figures, goals, roofline, memory, errors, and
    the raw results JSON embedded (`<script id="bench-results" type="application/json">`)."""
    from workbench.bench import figures  # plotly only when drawing

    if plotlyjs not in ("cdn", "inline"):
        raise ValueError(
            f"plotlyjs must be 'cdn' (needs network to view) or 'inline' (self-contained), not {plotlyjs!r}"
        )
    fr = frames(results)
    sweep, online = fr["sweep"], fr["online"]
    flex = flex_label or default_flex_label(results)
    goal_rows = goals(results, flex)
    shown = [
        ("fig-sweep-prefill", figures.sweep_figure(sweep, "prefill_s")),
        ("fig-sweep-tpot", figures.sweep_tpot_figure(sweep)),
        ("fig-online-ttft", figures.online_figure(online, "ttft_p50_ms")),
        ("fig-online-tpot", figures.online_figure(online, "tpot_p50_ms")),
        ("fig-online-throughput", figures.online_figure(online, "output_throughput_tok_s")),
        ("fig-sweep-tpot-wall", figures.sweep_figure(sweep, "tpot_ms")),
        (
            "fig-variant-share",
            figures.variant_share_figure(sweep if online.empty else pd.concat([sweep, online])),
        ),
    ]
    divs = [
        fig.to_html(
            full_html=False,
            include_plotlyjs=(True if plotlyjs == "inline" else "cdn") if i == 0 else False,
            div_id=div_id,
            config={"displaylogo": False},
        )
        for i, (div_id, fig) in enumerate(shown)
    ]
    machine, esc = results["machine"], html.escape
    title = f"FlexQuant bench — {machine.get('gpu', 'unknown GPU')} — {results['status']}"
    tuned = results.get("autotune") or {}
    errors = "".join(f"<li>{esc(str(e))}</li>" for e in results["errors"]) or "<li>none</li>"
    # "</script>" inside a string of the results must not end the script element.
    raw = json.dumps(results, sort_keys=True).replace("</", "<\\/")
    drift = control_drift(results)
    control = (
        "<h2>Engine-order control (the same baseline engine first and last)</h2>"
        + _table(drift, "control-drift")
        if not drift.empty
        else ""
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}} .grid{{display:grid;
grid-template-columns:1fr 1fr;gap:1em}} table.data,table.kv{{border-collapse:collapse;font-size:14px}}
td,th{{border:1px solid #ddd;padding:3px 8px;text-align:left}} pre{{background:#f6f6f6;padding:8px}}</style>
</head><body>
<h1>{esc(title)}</h1>
<p>Status <b>{esc(results["status"])}</b>. Command: <code>{esc(str(results.get("command", "")))}</code>.
Every comparison below is a ratio of two measurements from this run (flex / reference).</p>
<h2>Machine</h2>{_key_values(machine)}
<h2>Workload</h2>{_key_values(results["spec"])}
<section id="headline-figures" class="grid">{"".join(divs[:4])}</section>
<section class="grid">{"".join(divs[4:])}</section>
<h2>Goals ({esc(str(flex))})</h2>{_table(goal_verdicts(goal_rows), "goal-verdicts")}
<details open><summary>every point</summary>{_table(goal_rows, "goals")}</details>
<h2>Batch-1 decode step vs HBM roofline</h2>{_table(roofline(results), "roofline")}
<h2>Resident weight memory</h2>{_table(memory(results), "memory")}{control}
<h2>Auto-tuned policy</h2><p>int4 kernel: {esc(str(tuned.get("kernel")))}</p>
<pre>{esc(tuned.get("policy_yaml") or "no auto-tuned policy in this run")}</pre>
<h2>Errors</h2><ul id="errors">{errors}</ul>
<script type="application/json" id="bench-results">{raw}</script>
</body></html>
"""


def write_report(
    results: dict, html_path: str | Path, *, plotlyjs: str = "cdn", flex_label: str | None = None
) -> Path:
    """Write `render_report` to `html_path` atomically (temp file beside it, then rename)."""
    return write_text_atomic(
        Path(html_path), render_report(results, plotlyjs=plotlyjs, flex_label=flex_label)
    )


def write_text_atomic(path: Path, text: str) -> Path:
    """A reader sees the old file or the whole new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
