"""Models & Jobs tab: register models, submit quantize-and-merge jobs, watch the queue, open checkpoints.

The queue table is HTML (progress bars) refreshed by a 1 s `gr.Timer`; the job itself runs in the
worker process, so nothing here blocks on quantization. Model and checkpoint lists are refreshed
only when the DB's set of rows changes, so an open dropdown is not reset every second. The
Checkpoints section (open one, its accuracy, evaluate it) is `workbench.ui.checkpoints_panel`.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import gradio as gr

from jobs import queue
from workbench import views
from workbench.default_model import DEFAULT_MODEL_NAME, ensure_default_model
from workbench.models import add_model
from workbench.paths import resolve_user_path
from workbench.quant.recipe import VARIANT_SPECS
from workbench.ui.checkpoints_panel import build_checkpoints_panel, checkpoint_choices, wire_checkpoints_panel
from workbench.ui.common import GradioReporter, UIContext, user_error
from workbench.ui.jobs_table import render_jobs_html

log = logging.getLogger(__name__)

__all__ = ["build_models_jobs_tab", "model_choices"]

UPLOADS = "uploads"


def model_choices(ctx: UIContext) -> list[str]:
    return list(views.models_frame(ctx.engine)["name"])


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

    checkpoints = build_checkpoints_panel(ctx)
    ckpts_df, ckpt_pick = checkpoints.ckpts_df, checkpoints.ckpt_pick

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

    wire_checkpoints_panel(ctx, checkpoints, timer=timer, job_id=job_id)
