"""Live tab: what the runtime is doing, step by step, redrawn about every second from the DB.

The runtime writes `StepRecord`/`RequestRecord` rows (batched); a `gr.Timer` reads the last window
of them through `workbench.views_telemetry` and redraws four `workbench.plots_live` figures. A dashed
red line marks every step where the policy name changed, i.e. where a policy was applied. The
built-in load generator drives the server from here; a Stop button ends it early.
"""

from __future__ import annotations

import logging
import threading

import gradio as gr
import pandas as pd

from workbench import plots_live, views, views_telemetry
from workbench.loadgen import LoadSpec, run_load
from workbench.ui.common import TabHook, UIContext, user_error

log = logging.getLogger(__name__)

__all__ = ["build_live_tab", "live_figures", "run_choices"]

CURRENT = "current runtime"


def run_choices(ctx: UIContext) -> list[tuple[str, str]]:
    """Dropdown entries: the current runtime first, then the newest runs."""
    runs = views.runs_frame(ctx.engine, limit=30)
    entries = [(CURRENT, CURRENT)]
    for r in runs.itertuples():
        entries.append((f"run #{r.id} · {r.kind} · {r.runtime} · {r.policy_name} · {r.status}", str(r.id)))
    return entries


def _resolve_run(ctx: UIContext, choice: str | None) -> int | None:
    if choice in (None, "", CURRENT):
        return ctx.runtime.run_id() or views.latest_run_id(ctx.engine)
    return int(choice)


def live_figures(steps: pd.DataFrame, requests: pd.DataFrame, *, window_s: float) -> tuple:
    """The four live figures for the last `window_s` seconds of a run (pure, for tests and the tab)."""
    if not steps.empty:
        steps = steps[steps["t_s"] >= steps["t_s"].max() - window_s]
    changes = plots_live.policy_change_points(steps)
    return (
        plots_live.variant_timeline_figure(steps),
        plots_live.batch_composition_figure(steps),
        plots_live.step_latency_figure(steps),
        plots_live.rolling_latency_figure(requests, changes=changes),
    )


def build_live_tab(ctx: UIContext) -> TabHook:
    """Create and wire the Live tab inside the current `gr.Blocks`; returns its refresh hook."""
    with gr.Row():
        run = gr.Dropdown(run_choices(ctx), value=CURRENT, label="Run", elem_id="fq-live-run", scale=3)
        window = gr.Slider(10, 600, value=120, step=10, label="Window (s)", scale=2)
        auto = gr.Checkbox(True, label="Refresh every second", scale=1)
    summary = gr.Markdown(elem_id="fq-live-summary")
    with gr.Row():
        timeline = gr.Plot(label="Variant per step", elem_id="fq-live-timeline")
        batch = gr.Plot(label="Batch composition")
    with gr.Row():
        latency = gr.Plot(label="Step latency")
        ttft = gr.Plot(label="TTFT / TPOT", elem_id="fq-live-ttft")

    with gr.Accordion("Load generator (drives the running server)", open=True):
        with gr.Row():
            rate = gr.Number(
                2.0,
                minimum=0,
                label="Rate (requests/s, 0 = as fast as concurrency allows)",
                elem_id="fq-load-rate",
            )
            prompt_words = gr.Number(
                32,
                precision=0,
                minimum=1,
                maximum=8192,
                label="Prompt length (words)",
                elem_id="fq-load-words",
            )
            max_tokens = gr.Number(
                16,
                precision=0,
                minimum=1,
                maximum=4096,
                label="Output length (tokens)",
                elem_id="fq-load-tokens",
            )
            concurrency = gr.Number(4, precision=0, minimum=1, maximum=256, label="Concurrency")
            count = gr.Number(
                20, precision=0, minimum=1, maximum=10000, label="Requests", elem_id="fq-load-count"
            )
            duration = gr.Number(30, minimum=1, maximum=3600, label="Duration limit (s)")
        with gr.Row():
            go_btn = gr.Button("Start load", variant="primary", elem_id="fq-load-start")
            stop_btn = gr.Button("Stop load", elem_id="fq-load-stop")
        load_result = gr.Markdown(elem_id="fq-load-result")

    def refresh(choice, window_s):
        run_id = _resolve_run(ctx, choice)
        if run_id is None:
            figs = live_figures(
                views_telemetry.steps_frame(ctx.engine, -1),
                views_telemetry.requests_frame(ctx.engine, -1),
                window_s=float(window_s),
            )
            return ("No run yet: start a runtime in the Runtime tab.", *figs)
        steps = views_telemetry.steps_frame(ctx.engine, run_id)
        requests = views_telemetry.requests_frame(ctx.engine, run_id)
        policy_now = steps["policy_name"].iloc[-1] if not steps.empty else "—"
        mix = steps["variant"].value_counts(normalize=True).to_dict() if not steps.empty else {}
        text = (
            f"Run #{run_id}: {len(steps)} steps, {int(requests['ttft_ms'].notna().sum())} finished requests; "
            f"policy now **{policy_now}**; "
            f"variant share {views_telemetry.format_variant_mix(mix) or '—'}"
        )
        return (text, *live_figures(steps, requests, window_s=float(window_s)))

    outputs = [summary, timeline, batch, latency, ttft]
    timer = gr.Timer(1.0)
    timer.tick(refresh, [run, window], outputs, show_progress="hidden")
    auto.change(lambda on: gr.Timer(active=on), auto, timer)
    run.focus(lambda: gr.update(choices=run_choices(ctx)), None, run)
    run.change(refresh, [run, window], outputs)

    stop_event = threading.Event()

    def start_load(r, words, tokens, conc, n, dur):
        try:
            spec = LoadSpec(
                rate=float(r),
                prompt_words=int(words),
                max_tokens=int(tokens),
                concurrency=int(conc),
                num_requests=int(n),
                duration_s=float(dur),
            )
            base_url = ctx.runtime.base_url()
            stop_event.clear()
            report = run_load(base_url, spec, stop=stop_event)
        except Exception as exc:
            raise user_error(exc) from None
        s = report.summary()

        def ms(v):
            return "—" if v is None else f"{v:.0f} ms"

        return (
            f"Sent {s['requests']} requests in {s['wall_s']:.1f} s ({s['errors']} errors): "
            f"TTFT p50 {ms(s['ttft_p50_ms'])}, p90 {ms(s['ttft_p90_ms'])}; "
            f"TPOT p50 {ms(s['tpot_p50_ms'])}, p90 {ms(s['tpot_p90_ms'])}; "
            f"{s['output_tok_per_s']:.1f} output tokens/s"
            + (f"\n\nMost frequent error: {s['top_error']}" if s["top_error"] else "")
        )

    go_btn.click(start_load, [rate, prompt_words, max_tokens, concurrency, count, duration], load_result)
    stop_btn.click(lambda: stop_event.set() or "Stopping…", None, load_result)
    return TabHook(lambda: gr.update(choices=run_choices(ctx)), [], [run])
