"""Compare tab: a short benchmark of 2+ policies on one workload, a two-pane chat arena, and the
stored `flexquant bench` results (stock single variants vs FlexQuant, measured on a GPU).

Both run on the one running server: a policy is applied live (PUT /flexquant/policy) before its
runs, so every policy serves the same checkpoint, prompts (same seed) and loads. The arena follows
FastChat's side-by-side layout: every widget and handler loops over `range(NUM_SIDES)`. The panes
are generated one after the other (apply A, generate, apply B, generate), so each reply's timings
belong to its policy alone. The policy that ran before is put back afterwards.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from functools import partial

import gradio as gr
import pandas as pd

from workbench import plots_compare, views, views_bench
from workbench.bench import figures, goals, report
from workbench.chat_client import ChatStats, stream_chat
from workbench.loadgen import LoadSpec, compare_policies
from workbench.policy import Policy
from workbench.ui.chat import served_by, stats_footer
from workbench.ui.common import TabHook, UIContext, user_error

log = logging.getLogger(__name__)

__all__ = ["build_compare_tab", "parse_rates", "NUM_SIDES", "BENCH_EMPTY"]

NUM_SIDES = 2
BENCH_EMPTY = (
    "No benchmark results stored yet. Measure on a GPU machine with `flexquant bench --baseline "
    "w8a8=DIR --baseline w4a16-marlin=DIR --checkpoint MERGED_DIR` (the run is stored here when it "
    "shares this data folder), or bring its results file over: `flexquant bench --import results.json`."
)
# (element id suffix, section of report.frames, figure builder) of each benchmark chart, two per row.
BENCH_FIGURES = [
    ("sweep-prefill_s", "sweep", partial(figures.sweep_figure, metric="prefill_s")),
    ("sweep-tpot_ms", "sweep", figures.sweep_tpot_figure),
    ("online-ttft_p50_ms", "online", partial(figures.online_figure, metric="ttft_p50_ms")),
    ("online-tpot_p50_ms", "online", partial(figures.online_figure, metric="tpot_p50_ms")),
]
# drift / within_drift: how far the reference's own engine moved between its first and its control
# measurement, and whether a miss is inside that (goals.py)
GOAL_TABLE_COLUMNS = "goal name where flex reference_label reference ratio met drift within_drift".split()
SUMMARY_COLUMNS = [
    "policy",
    "rate",
    "requests",
    "errors",
    "ttft_p50_ms",
    "ttft_p90_ms",
    "tpot_p50_ms",
    "tpot_p90_ms",
    "output_tok_per_s",
]


def parse_rates(text: str) -> list[float]:
    """ "0.5, 1, 2" -> [0.5, 1.0, 2.0]; ValueError naming the bad entry."""
    rates = []
    for part in (text or "").replace(";", ",").split(","):
        if not part.strip():
            continue
        try:
            rate = float(part)
        except ValueError:
            raise ValueError(f"load {part.strip()!r} is not a number; write loads like 0.5, 1, 2") from None
        if rate < 0:
            raise ValueError(f"load {rate} is negative; loads are requests per second (0 = back to back)")
        rates.append(rate)
    if not rates:
        raise ValueError("give at least one load, e.g. 1, 2")
    return rates


def _library(ctx: UIContext) -> dict[str, Policy]:
    slot = ctx.runtime
    variants = views.checkpoint_info(ctx.engine, slot.checkpoint_id).variants if slot.checkpoint_id else None
    return views.policy_library(ctx.engine, variants=variants)


@contextmanager
def _restoring_policy(ctx: UIContext):
    """Put the runtime's policy back after a comparison switched it around."""
    before = ctx.runtime.policy
    try:
        yield
    finally:
        if before is not None and ctx.runtime.running:
            try:
                ctx.runtime.handle.set_policy(before)
            except Exception as exc:  # the comparison's own error matters more
                log.warning("could not restore policy %s: %s", before.name, exc)


def build_compare_tab(ctx: UIContext) -> TabHook:
    """Create and wire the Compare tab inside the current `gr.Blocks`; returns its refresh hook."""
    names = list(views.policy_library(ctx.engine))
    refresh = gr.Button("Refresh policy lists (for the running checkpoint)")
    gr.Markdown("### Benchmark policies on one workload")
    with gr.Row():
        chosen = gr.CheckboxGroup(
            names, value=names[:2], label="Policies (2 or more)", elem_id="fq-cmp-policies"
        )
        rates = gr.Textbox(
            "0, 2", label="Loads (requests/s, comma-separated; 0 = back to back)", elem_id="fq-cmp-rates"
        )
    with gr.Row():
        count = gr.Number(
            4, precision=0, minimum=1, maximum=1000, label="Requests per run", elem_id="fq-cmp-count"
        )
        words = gr.Number(
            32, precision=0, minimum=1, maximum=8192, label="Prompt length (words)", elem_id="fq-cmp-words"
        )
        tokens = gr.Number(
            8, precision=0, minimum=1, maximum=4096, label="Output length (tokens)", elem_id="fq-cmp-tokens"
        )
        conc = gr.Number(4, precision=0, minimum=1, maximum=256, label="Concurrency")
        limit = gr.Number(120, minimum=1, maximum=3600, label="Time limit per run (s)")
    run_btn = gr.Button("Run comparison", variant="primary", elem_id="fq-cmp-run")
    verdict = gr.Markdown(elem_id="fq-cmp-verdict")
    figure = gr.Plot(
        plots_compare.compare_figure(pd.DataFrame()), label="TTFT / TPOT vs load", elem_id="fq-cmp-plot"
    )
    table = gr.Dataframe(
        pd.DataFrame(columns=SUMMARY_COLUMNS), label="Per policy and load", interactive=False
    )

    def run(policy_names, rate_text, n, w, t, c, lim, progress=gr.Progress()):  # noqa: B008 - Gradio injects it
        try:
            base_url = ctx.runtime.base_url()
            library = _library(ctx)
            missing = [p for p in policy_names or [] if p not in library]
            if missing:
                raise ValueError(f"policies {missing} do not fit the running checkpoint; refresh the lists")
            spec = LoadSpec(
                num_requests=int(n),
                prompt_words=int(w),
                max_tokens=int(t),
                concurrency=int(c),
                duration_s=float(lim),
            )
            with _restoring_policy(ctx):
                bench = compare_policies(
                    base_url,
                    [library[p] for p in policy_names or []],
                    parse_rates(rate_text),
                    spec,
                    on_progress=lambda what, frac: progress(frac, desc=what),
                )
        except Exception as exc:
            raise user_error(exc) from None
        winner = plots_compare.pick_winner(bench)
        text = (
            (
                f"**Winner on TPOT p50: {winner}** (lowest mean over the loads). "
                f"Errors: {int(bench['errors'].sum())}."
            )
            if winner
            else "No successful requests."
        )
        top = bench["top_error"].dropna()
        if len(top):
            text += f"\n\nMost frequent error: {top.iloc[0]}"
        return text, plots_compare.compare_figure(bench), bench.reindex(columns=SUMMARY_COLUMNS).round(1)

    run_btn.click(run, [chosen, rates, count, words, tokens, conc, limit], [verdict, figure, table])

    gr.Markdown("### Side by side: one prompt, two policies")
    pickers, chatbots, stats = [], [], []
    with gr.Row():
        for i in range(NUM_SIDES):
            with gr.Column():
                pickers.append(
                    gr.Dropdown(
                        names,
                        value=names[min(i, len(names) - 1)],
                        label=f"Policy {'AB'[i]}",
                        elem_id=f"fq-arena-policy-{i}",
                    )
                )
                chatbots.append(
                    gr.Chatbot(
                        label=f"Side {'AB'[i]}",
                        height=300,
                        elem_id=f"fq-arena-chat-{i}",
                        feedback_options=None,
                    )
                )
                stats.append(gr.Markdown(elem_id=f"fq-arena-stats-{i}"))
    with gr.Row():
        prompt = gr.Textbox(
            placeholder="Same prompt to both sides…", show_label=False, scale=5, elem_id="fq-arena-input"
        )
        send = gr.Button("Send to both", variant="primary", scale=1, elem_id="fq-arena-send")
        arena_tokens = gr.Slider(8, 512, value=64, step=8, label="Max new tokens", scale=2)

    def battle(text, n_tokens, *policy_names):
        if not text or not text.strip():
            raise gr.Error("type a prompt first")
        try:
            base_url = ctx.runtime.base_url()
            library = _library(ctx)
            policies = [library[name] for name in policy_names]
        except KeyError as exc:
            raise gr.Error(f"policy {exc} does not fit the running checkpoint; refresh the lists") from None
        except Exception as exc:
            raise user_error(exc) from None
        panes = [[{"role": "user", "content": text}] for _ in range(NUM_SIDES)]
        lines = ["" for _ in range(NUM_SIDES)]
        with _restoring_policy(ctx):
            for i in range(NUM_SIDES):
                try:
                    ctx.runtime.handle.set_policy(policies[i])
                    answer = {"role": "assistant", "content": ""}
                    panes[i].append(answer)
                    final = ChatStats()
                    for update in stream_chat(
                        base_url, [{"role": "user", "content": text}], max_tokens=int(n_tokens)
                    ):
                        answer["content"], final = update.text, update.stats
                        yield "", *panes, *lines
                except Exception as exc:
                    raise user_error(exc) from None
                lines[i] = f"**{policies[i].name}** — {stats_footer(final, served_by(ctx, final.request_id))}"
                yield "", *panes, *lines

    gr.on([send.click, prompt.submit], battle, [prompt, arena_tokens, *pickers], [prompt, *chatbots, *stats])

    def refresh_lists(chosen_now, *picked):
        try:
            library = list(_library(ctx))
        except Exception as exc:
            raise user_error(exc) from None
        kept = [p for p in chosen_now or [] if p in library]
        sides = [p if p in library else library[min(i, len(library) - 1)] for i, p in enumerate(picked)]
        return gr.update(choices=library, value=kept if len(kept) >= 2 else library[:2]), *[
            gr.update(choices=library, value=side) for side in sides
        ]

    refresh.click(refresh_lists, [chosen, *pickers], [chosen, *pickers])
    bench_pick = _build_bench_results(ctx)

    def on_open(chosen_now, picked_bench, *picked):
        return *refresh_lists(chosen_now, *picked), _bench_choices(ctx, picked_bench)

    hooked = [chosen, *pickers]
    return TabHook(on_open, [chosen, bench_pick, *pickers], [*hooked, bench_pick])


def _bench_choices(ctx: UIContext, current: int | None) -> dict:
    """The stored bench runs, newest first; keeps the shown run if it is still there."""
    choices = views_bench.bench_run_choices(ctx.engine)
    ids = [run_id for _, run_id in choices]
    return gr.update(choices=choices, value=current if current in ids else (ids[0] if ids else None))


def _build_bench_results(ctx: UIContext) -> gr.Dropdown:
    """The "Benchmark results" section; returns its run picker (refreshed when the tab opens)."""
    with gr.Accordion("Benchmark results (flexquant bench)", open=True, elem_id="fq-bench"):
        pick = gr.Dropdown(
            [], value=None, label="Stored benchmark run (newest first)", elem_id="fq-bench-run"
        )
        info = gr.Markdown(BENCH_EMPTY, elem_id="fq-bench-info")
        with gr.Column(visible=False) as shown:
            headline = gr.Markdown(elem_id="fq-bench-headline")
            with gr.Accordion("Goals at every batch and rate", open=False):
                goal_table = gr.Dataframe(pd.DataFrame(columns=GOAL_TABLE_COLUMNS), interactive=False)
            plots_out = []
            for row in range(0, len(BENCH_FIGURES), 2):
                with gr.Row():
                    for key, _, _ in BENCH_FIGURES[row : row + 2]:
                        plots_out.append(gr.Plot(elem_id=f"fq-bench-{key}", show_label=False))

    def show(run_id):
        if run_id is None:
            return BENCH_EMPTY, gr.update(visible=False), "", pd.DataFrame(), *[None] * len(plots_out)
        try:
            results = views_bench.bench_results(ctx.engine, int(run_id))
            frames = report.frames(results)
            headline_text = goals.headline_markdown(results)
            goal_rows = goals.goals(results).reindex(columns=GOAL_TABLE_COLUMNS).round(3)
        except Exception as exc:
            raise user_error(exc) from None
        figs = [build(frames[section]) for _, section, build in BENCH_FIGURES]
        described = views_bench.describe_bench_run(results)
        return described, gr.update(visible=True), headline_text, goal_rows, *figs

    pick.change(show, [pick], [info, shown, headline, goal_table, *plots_out])
    return pick
