"""Models & Jobs tab: register models, submit quantize-and-merge jobs, watch the queue, open checkpoints.

The queue table is HTML (progress bars) refreshed by a 1 s `gr.Timer`; the job itself runs in the
worker process, so nothing here blocks on quantization. Model and checkpoint lists are refreshed
only when the DB's set of rows changes, so an open dropdown is not reset every second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import gradio as gr
import pandas as pd

from jobs import queue
from workbench import plots_compare, views
from workbench.default_model import DEFAULT_MODEL_NAME, ensure_default_model
from workbench.models import add_model
from workbench.paths import resolve_user_path
from workbench.quant.recipe import VARIANT_SPECS
from workbench.ui.common import GradioReporter, UIContext, user_error
from workbench.ui.jobs_table import render_jobs_html

log = logging.getLogger(__name__)

__all__ = ["build_models_jobs_tab", "checkpoint_choices", "model_choices"]

UPLOADS = "uploads"
EVAL_COLUMNS = [
    "target",
    "dataset",
    "perplexity",
    "token_agreement",
    "top1_accuracy",
    "num_tokens",
    "ppl_vs_bf16_pct",
]


def model_choices(ctx: UIContext) -> list[str]:
    return list(views.models_frame(ctx.engine)["name"])


def checkpoint_choices(ctx: UIContext, *, kind: str | None = "merged") -> list[tuple[str, int]]:
    """(label, id) pairs for a checkpoint dropdown, newest first."""
    df = views.checkpoints_frame(ctx.engine)
    if kind is not None:
        df = df[df["kind"] == kind]
    return [(f"{r.name}  [{r.variants}]", int(r.id)) for r in df.iloc[::-1].itertuples()]


def _rounded(evals: pd.DataFrame) -> pd.DataFrame:
    return evals.round({"perplexity": 3, "token_agreement": 4, "top1_accuracy": 4, "ppl_vs_bf16_pct": 2})


def _signature(ctx: UIContext) -> str:
    return f"{model_choices(ctx)}|{checkpoint_choices(ctx, kind=None)}"


def _keep_upload(ctx: UIContext, upload: str) -> str:
    # Gradio's upload cache is private to this process and may be cleaned; the worker process
    # needs a stable path inside the data dir, named by content so re-uploads do not pile up.
    src = Path(upload)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    dest_dir = ctx.settings.data_dir / UPLOADS
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{digest}{src.suffix or '.txt'}"
    if not dest.exists():
        tmp = dest.with_suffix(dest.suffix + ".part")
        shutil.copyfile(src, tmp)
        tmp.replace(dest)
    return str(dest)


def build_models_jobs_tab(ctx: UIContext) -> None:
    """Create and wire the Models & Jobs tab inside the current `gr.Blocks`."""
    gr.Markdown("### Models")
    models_df = gr.Dataframe(
        views.models_frame(ctx.engine), interactive=False, label="Source models", max_height=220
    )
    with gr.Row():
        new_name = gr.Textbox(label="Model name", placeholder="my-llama", scale=1, elem_id="fq-model-name")
        new_path = gr.Textbox(
            label="Model folder (HF format, inside the data dir or an allowed root)",
            scale=3,
            elem_id="fq-model-path",
        )
        add_btn = gr.Button("Add model", scale=1, elem_id="fq-model-add")
    default_btn = gr.Button(
        f"Add the embedded default model ({DEFAULT_MODEL_NAME})",
        variant="secondary",
        elem_id="fq-default-model",
    )
    model_status = gr.Markdown(elem_id="fq-model-status")

    gr.Markdown("### Quantize and merge")
    with gr.Row():
        src_model = gr.Dropdown(model_choices(ctx), value=None, label="Source model", elem_id="fq-src-model")
        ckpt_name = gr.Textbox(label="Checkpoint name", placeholder="smollm2-flex", elem_id="fq-ckpt-name")
        title = gr.Textbox(label="Job title (optional)")
    with gr.Row():
        variants = gr.CheckboxGroup(list(VARIANT_SPECS), value=["w8a8", "w4a16"], label="Variants")
        sq = gr.Slider(0.0, 0.95, value=0.8, step=0.05, label="SmoothQuant strength (0 = off)")
        group = gr.Dropdown([32, 64, 128], value=64, label="W4A16 group size")
    with gr.Row():
        calib_file = gr.File(
            label="Calibration text (.txt one doc per line, or .jsonl)",
            file_types=[".txt", ".jsonl"],
            type="filepath",
            height=140,
            elem_id="fq-calib-file",
        )
        calib_path = gr.Textbox(label="…or a calibration file path (empty = built-in Lee corpus)")
        samples = gr.Number(
            value=32, precision=0, minimum=1, maximum=4096, label="Calibration samples", elem_id="fq-samples"
        )
        seq_len = gr.Number(
            value=256, precision=0, minimum=16, maximum=8192, label="Sequence length", elem_id="fq-seq-len"
        )
    submit_btn = gr.Button("Submit quantize job", variant="primary", elem_id="fq-submit")
    submit_status = gr.Markdown(elem_id="fq-submit-status")

    gr.Markdown("### Queue")
    jobs_html = gr.HTML(render_jobs_html(views.jobs_frame(ctx.engine)), elem_id="fq-jobs")
    with gr.Row():
        job_id = gr.Number(None, label="Job #", precision=0, scale=1, elem_id="fq-job-id")
        cancel_btn = gr.Button("Cancel job", scale=1)
        retry_btn = gr.Button("Retry job", scale=1)
    job_status = gr.Markdown()

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

    timer = gr.Timer(1.0)
    seen = gr.State(_signature(ctx))

    def tick(last: str):
        page = render_jobs_html(views.jobs_frame(ctx.engine))
        sig = _signature(ctx)
        if sig == last:
            return page, last, gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return (
            page,
            sig,
            views.models_frame(ctx.engine),
            gr.update(choices=model_choices(ctx)),
            views.checkpoints_frame(ctx.engine),
            gr.update(choices=checkpoint_choices(ctx, kind=None)),
        )

    timer.tick(
        tick, seen, [jobs_html, seen, models_df, src_model, ckpts_df, ckpt_pick], show_progress="hidden"
    )

    def on_add(name: str, path: str):
        try:
            row = add_model(ctx.engine, name=name.strip(), path=Path(path.strip()), settings=ctx.settings)
        except Exception as exc:
            raise user_error(exc) from None
        size = f"{row.num_params / 1e6:.2f}M params"
        return f"Added **{row.name}**: {row.architecture}, {row.num_layers} layers, {size}."

    add_btn.click(on_add, [new_name, new_path], model_status)

    def on_default(progress=gr.Progress()):  # noqa: B008 - Gradio injects progress this way
        try:
            row = ensure_default_model(ctx.engine, ctx.settings, GradioReporter(progress))
        except Exception as exc:
            raise user_error(exc) from None
        return f"Default model **{row.name}** is registered ({row.path})."

    default_btn.click(on_default, None, model_status)

    def on_submit(model, name, job_title, chosen, strength, group_size, upload, path, n_samples, n_seq):
        try:
            calibration = None
            if upload:
                calibration = _keep_upload(ctx, upload)
            elif path and path.strip():
                calibration = str(resolve_user_path(path.strip(), settings=ctx.settings, kind="file"))
            if not model:
                raise ValueError("pick a source model (add one above first)")
            recipe = {
                "variants": list(chosen or []),
                "smoothquant_strength": float(strength),
                "w4a16_group_size": int(group_size),
                "calibration_path": calibration,
                "num_samples": int(n_samples or 0),
                "seq_len": int(n_seq or 0),
            }
            job = queue.submit(
                ctx.engine,
                "quantize",
                {"model": model, "checkpoint": (name or "").strip(), "recipe": recipe},
                title=job_title.strip() or f"quantize {model} → {(name or '').strip()}",
            )
        except Exception as exc:
            raise user_error(exc) from None
        return f"Queued job **#{job.id}**.", job.id

    submit_btn.click(
        on_submit,
        [src_model, ckpt_name, title, variants, sq, group, calib_file, calib_path, samples, seq_len],
        [submit_status, job_id],
    )

    def on_job_action(action, jid):
        try:
            if jid is None:
                raise ValueError("enter a job number first")
            job = action(ctx.engine, int(jid))
        except Exception as exc:
            raise user_error(exc) from None
        return f"Job #{job.id}: {job.status}{' — ' + job.message if job.message else ''}"

    cancel_btn.click(lambda jid: on_job_action(queue.cancel, jid), job_id, job_status)
    retry_btn.click(lambda jid: on_job_action(queue.retry, jid), job_id, job_status)

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
