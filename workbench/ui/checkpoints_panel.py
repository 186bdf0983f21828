"""The Checkpoints section of the Models & Jobs tab: the checkpoint list, opening one (its variants,
manifest and accuracy against BF16) and queuing an accuracy evaluation of it.

`build_checkpoints_panel` lays the section out where the tab calls it; `wire_checkpoints_panel`
connects its events once the tab has made its 1 s timer, so the tab's layout and the order of its
events stay those of one function. `checkpoint_choices` also fills the Runtime and Policy tabs'
checkpoint dropdowns.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import gradio as gr
import pandas as pd

from jobs import queue
from workbench import plots_compare, views
from workbench.ui.common import UIContext, user_error

__all__ = ["CheckpointsPanel", "build_checkpoints_panel", "checkpoint_choices", "wire_checkpoints_panel"]

EVAL_COLUMNS = [
    "target",
    "dataset",
    "perplexity",
    "token_agreement",
    "top1_accuracy",
    "num_tokens",
    "ppl_vs_bf16_pct",
]


def checkpoint_choices(ctx: UIContext, *, kind: str | None = "merged") -> list[tuple[str, int]]:
    """(label, id) pairs for a checkpoint dropdown, newest first."""
    df = views.checkpoints_frame(ctx.engine)
    if kind is not None:
        df = df[df["kind"] == kind]
    return [(f"{r.name}  [{r.variants}]", int(r.id)) for r in df.iloc[::-1].itertuples()]


def _rounded(evals: pd.DataFrame) -> pd.DataFrame:
    return evals.round({"perplexity": 3, "token_agreement": 4, "top1_accuracy": 4, "ppl_vs_bf16_pct": 2})


class CheckpointsPanel(NamedTuple):
    """The Checkpoints section's components, in layout order."""

    ckpts_df: gr.Dataframe
    ckpt_pick: gr.Dropdown
    variants_df: gr.Dataframe
    manifest: gr.JSON
    eval_docs: gr.Number
    eval_seq: gr.Number
    eval_btn: gr.Button
    eval_status: gr.Markdown
    evals_df: gr.Dataframe
    evals_plot: gr.Plot


def build_checkpoints_panel(ctx: UIContext) -> CheckpointsPanel:
    """Lay out the Checkpoints section inside the current `gr.Blocks`; `wire_checkpoints_panel` adds
    its events."""
    gr.Markdown("### Checkpoints")
    ckpts_df = gr.Dataframe(
        views.checkpoints_frame(ctx.engine), interactive=False, label="Checkpoints", max_height=220
    )
    ckpt_pick = gr.Dropdown(
        checkpoint_choices(ctx, kind=None), value=None, label="Open checkpoint", elem_id="fq-open-ckpt"
    )
    with gr.Row():
        variants_df = gr.Dataframe(
            pd.DataFrame(columns=["name", "scheme", "group_size", "weight_mb"]),
            label="Variants",
            interactive=False,
        )
        manifest = gr.JSON(label="Manifest", open=False, max_height=320, elem_id="fq-manifest")
    with gr.Row():
        eval_docs = gr.Number(
            20,
            precision=0,
            minimum=1,
            maximum=1000,
            label="Eval documents (held-out Lee corpus)",
            elem_id="fq-eval-docs",
        )
        eval_seq = gr.Number(
            256, precision=0, minimum=16, maximum=4096, label="Eval sequence length", elem_id="fq-eval-seq"
        )
        eval_btn = gr.Button("Evaluate accuracy (queues a job)", elem_id="fq-eval")
    eval_status = gr.Markdown(elem_id="fq-eval-status")
    evals_df = gr.Dataframe(
        pd.DataFrame(columns=EVAL_COLUMNS),
        label="Accuracy vs BF16 (perplexity, top-1 agreement)",
        interactive=False,
        elem_id="fq-evals",
    )
    evals_plot = gr.Plot(plots_compare.accuracy_figure(pd.DataFrame()), label="Accuracy")
    return CheckpointsPanel(
        ckpts_df,
        ckpt_pick,
        variants_df,
        manifest,
        eval_docs,
        eval_seq,
        eval_btn,
        eval_status,
        evals_df,
        evals_plot,
    )


def wire_checkpoints_panel(
    ctx: UIContext, panel: CheckpointsPanel, *, timer: gr.Timer, job_id: gr.Number
) -> None:
    """Open the picked checkpoint, queue its evaluation (the job's number goes to `job_id`) and, on each
    `timer` tick after an evaluation finished, refresh the open checkpoint's accuracy report."""
    ckpt_pick, variants_df, manifest = panel.ckpt_pick, panel.variants_df, panel.manifest
    eval_docs, eval_seq, eval_btn = panel.eval_docs, panel.eval_seq, panel.eval_btn
    eval_status, evals_df, evals_plot = panel.eval_status, panel.evals_df, panel.evals_plot

    def on_open(checkpoint_id):
        if checkpoint_id is None:
            return (
                pd.DataFrame(columns=["name", "scheme", "group_size", "weight_mb"]),
                {},
                pd.DataFrame(columns=EVAL_COLUMNS),
                plots_compare.accuracy_figure(pd.DataFrame()),
            )
        evals = views.eval_frame(ctx.engine, int(checkpoint_id))
        manifest_data = views.checkpoint_manifest(ctx.engine, int(checkpoint_id))
        return (
            views.variants_frame(ctx.engine, int(checkpoint_id)),
            json.loads(json.dumps(manifest_data)),
            _rounded(evals),
            plots_compare.accuracy_figure(evals),
        )

    ckpt_pick.change(on_open, ckpt_pick, [variants_df, manifest, evals_df, evals_plot])

    def on_evaluate(checkpoint_id, docs, seq):
        try:
            if checkpoint_id is None:
                raise ValueError("open a checkpoint first")
            name = views.checkpoint_info(ctx.engine, int(checkpoint_id)).name
            # "default": the checkpoint's own policy, next to BF16 and every variant alone.
            job = queue.submit(
                ctx.engine,
                "evaluate",
                {"checkpoint": name, "policies": ["default"], "max_docs": int(docs), "seq_len": int(seq)},
                title=f"evaluate {name}",
            )
        except Exception as exc:
            raise user_error(exc) from None
        return f"Queued evaluation job **#{job.id}**; reopen the checkpoint when it is done.", job.id

    eval_btn.click(on_evaluate, [ckpt_pick, eval_docs, eval_seq], [eval_status, job_id])

    def reopen_when_done(checkpoint_id, last_done: int):
        # An evaluation that finished refreshes the accuracy report of the open checkpoint.
        done = sum(1 for j in queue.list_jobs(ctx.engine, status="done", limit=1000) if j.kind == "evaluate")
        if done == last_done or checkpoint_id is None:
            return gr.skip(), gr.skip(), done
        evals = views.eval_frame(ctx.engine, int(checkpoint_id))
        return _rounded(evals), plots_compare.accuracy_figure(evals), done

    evals_seen = gr.State(-1)
    timer.tick(
        reopen_when_done, [ckpt_pick, evals_seen], [evals_df, evals_plot, evals_seen], show_progress="hidden"
    )
