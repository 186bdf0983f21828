"""Runtime tab: start and stop serving one checkpoint (vLLM on a GPU, else the CPU reference).

`workbench.runtime.serve.start_server` picks the runtime and explains a failed start (`ServeError`:
port taken, vLLM missing, out of memory...); this tab shows that message as it is, plus the
server's log tail and its resident weight memory per variant.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr
import pandas as pd

from workbench import chat_client, views, views_telemetry
from workbench.runtime.serve import start_server
from workbench.runtime.serve_config import ServeConfig
from workbench.runtime.vllm_launch import graph_compilation
from workbench.ui.checkpoints_panel import checkpoint_choices
from workbench.ui.common import TabHook, UIContext, user_error

log = logging.getLogger(__name__)

__all__ = ["build_runtime_tab", "status_markdown", "log_tail"]

HEALTH_TIMEOUT_S = 600.0
CPU_NOTE = (
    "**CPU reference runtime**: the same checkpoint and policy function, with dequantized weights on the "
    "CPU. Variant switching and telemetry are real; speed is not what a GPU would show."
)


def log_tail(path: Path | str | None, lines: int = 40) -> str:
    """The last `lines` lines of the server log (empty if there is none yet)."""
    if not path or not Path(path).is_file():
        return ""
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        fh.seek(max(0, fh.tell() - 64 * 1024))
        return "\n".join(fh.read().decode("utf-8", "replace").splitlines()[-lines:])


def status_markdown(ctx: UIContext) -> str:
    slot = ctx.runtime
    handle = slot.handle
    if handle is None:
        return "**Stopped.** Pick a checkpoint and a policy, then start."
    if not handle.is_running():
        return (
            f"**The server stopped unexpectedly** (exit code {handle.proc.returncode}); "
            "the log below says why. "
            "Press Stop to clear, then start again."
        )
    if not slot.healthy:
        return f"**Starting** `{slot.checkpoint_name}` at {handle.base_url}… (loading weights)"
    runtime = getattr(handle, "runtime", "")
    policy = slot.policy.name if slot.policy else "?"
    text = (
        f"**Running** `{slot.checkpoint_name}` at {handle.base_url} — runtime **{runtime or 'auto'}**, "
        f"policy **{policy}**, run #{slot.run_id()}"
    )
    return text + ("\n\n" + CPU_NOTE if runtime == "cpu" else "")


def _memory(ctx: UIContext) -> pd.DataFrame:
    if not ctx.runtime.running:
        return pd.DataFrame(columns=["part", "bytes", "MiB"])
    try:
        return views_telemetry.memory_frame(chat_client.get_stats(ctx.runtime.base_url()))
    except (chat_client.ChatError, RuntimeError) as exc:
        log.info("stats not available yet: %s", exc)
        return pd.DataFrame(columns=["part", "bytes", "MiB"])


def _policy_choices(
    ctx: UIContext, checkpoint_id, current: str | None = None
) -> tuple[list[str], str | None]:
    """Policy names fitting a checkpoint and the one to select: `current` if it still fits, else the
    checkpoint's default policy, else the first."""
    if checkpoint_id is None:
        return [], None
    info = views.checkpoint_info(ctx.engine, int(checkpoint_id))
    names = list(views.policy_library(ctx.engine, variants=info.variants))
    if current in names:
        return names, current
    if info.default_policy is not None and info.default_policy.name in names:
        return names, info.default_policy.name
    return names, (names[0] if names else None)


def _policy_update(ctx: UIContext, checkpoint_id, current: str | None = None) -> dict:
    names, value = _policy_choices(ctx, checkpoint_id, current)
    return gr.update(choices=names, value=value)


def build_runtime_tab(ctx: UIContext) -> TabHook:
    """Create and wire the Runtime tab inside the current `gr.Blocks`; returns its refresh hook."""
    choices = checkpoint_choices(ctx)
    first = choices[0][1] if choices else None
    with gr.Row():
        ckpt = gr.Dropdown(choices, value=first, label="Checkpoint (merged)", elem_id="fq-rt-ckpt", scale=2)
        names, chosen = _policy_choices(ctx, first)
        policy = gr.Dropdown(names, value=chosen, label="Policy", elem_id="fq-rt-policy", scale=2)
        runtime = gr.Radio(
            ["auto", "cpu", "vllm"], value="auto", label="Runtime", scale=1, elem_id="fq-rt-kind"
        )
    with gr.Row():
        port = gr.Number(
            value=8000, precision=0, minimum=1024, maximum=65535, label="Port", elem_id="fq-rt-port"
        )
        gpu_mem = gr.Slider(0.1, 0.98, value=0.85, step=0.01, label="GPU memory fraction (vLLM)")
        tp = gr.Number(value=1, precision=0, minimum=1, maximum=8, label="Tensor-parallel size (vLLM)")
        prefill_graphs = gr.Checkbox(
            False,
            label="Prefill in CUDA graphs (vLLM only; steadier TTFT, ~25 s more start-up per variant)",
            elem_id="fq-rt-prefill-graphs",
        )
    with gr.Row():
        start_btn = gr.Button("Start", variant="primary", elem_id="fq-rt-start")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="fq-rt-stop")
        refresh_btn = gr.Button("Refresh lists", elem_id="fq-rt-refresh")
    status = gr.Markdown(status_markdown(ctx), elem_id="fq-rt-status")
    memory = gr.Dataframe(
        _memory(ctx),
        label="Resident weight memory per variant (GET /flexquant/stats)",
        interactive=False,
        elem_id="fq-rt-memory",
    )
    logs = gr.Textbox(label="Server log (tail)", lines=12, max_lines=12, autoscroll=True, interactive=False)

    ckpt.change(lambda c: _policy_update(ctx, c), ckpt, policy)

    def refresh(checkpoint_id, current_policy):
        fresh = checkpoint_choices(ctx)
        ids = [i for _, i in fresh]
        keep = checkpoint_id if checkpoint_id in ids else (ids[0] if ids else None)
        return (
            gr.update(choices=fresh, value=keep),
            _policy_update(ctx, keep, current_policy),
            status_markdown(ctx),
        )

    refresh_btn.click(refresh, [ckpt, policy], [ckpt, policy, status])

    def start(checkpoint_id, policy_name, runtime_kind, port_no, mem_fraction, tp_size, graphs):
        try:
            if checkpoint_id is None or not policy_name:
                raise ValueError("pick a checkpoint and a policy first")
            info = views.checkpoint_info(ctx.engine, int(checkpoint_id))
            chosen = views.policy_library(ctx.engine, variants=info.variants)[policy_name]
            cfg = ServeConfig(
                checkpoint=info.path,
                policy=chosen,
                port=int(port_no),
                gpu_memory_utilization=float(mem_fraction),
                tensor_parallel_size=int(tp_size),
                runtime=runtime_kind,
                compilation_config=graph_compilation(True) if graphs else None,
            )
            slot = ctx.runtime
            with slot.lock:
                if slot.handle is not None:
                    raise ValueError(f"a runtime is already running at {slot.handle.base_url}; stop it first")
                slot.handle = start_server(cfg, engine=ctx.engine, settings=ctx.settings)
                slot.checkpoint_name, slot.checkpoint_id, slot.policy = info.name, info.id, chosen
            handle = slot.handle
        except Exception as exc:
            # The reason goes in the status box too: a toast disappears, the box stays.
            yield f"**Could not start:** {exc}", gr.skip()
            raise user_error(exc) from None
        yield status_markdown(ctx), gr.skip()
        try:
            handle.wait_healthy(HEALTH_TIMEOUT_S)
            ctx.runtime.healthy = True
        except Exception as exc:
            tail = log_tail(getattr(handle, "log_path", None))
            ctx.runtime.stop()
            yield f"**Failed to start:** {exc}", tail
            raise user_error(exc) from None
        yield status_markdown(ctx), log_tail(handle.log_path)

    start_btn.click(start, [ckpt, policy, runtime, port, gpu_mem, tp, prefill_graphs], [status, logs])

    def stop():
        ctx.runtime.stop()
        return status_markdown(ctx), _memory(ctx)

    stop_btn.click(stop, None, [status, memory])

    def poll():
        handle = ctx.runtime.handle
        if handle is None:
            return gr.skip(), gr.skip(), gr.skip()
        return log_tail(handle.log_path), _memory(ctx), status_markdown(ctx)

    gr.Timer(3.0).tick(poll, None, [logs, memory, status], show_progress="hidden")
    return TabHook(refresh, [ckpt, policy], [ckpt, policy, status])
