"""The FlexQuant Workbench web app: six tabs, the job worker beside it, and safe defaults.

`main()` is what the repo's `app.py` calls. It binds 127.0.0.1 unless told otherwise; exposing the
app (a non-loopback `--host`, or `--share`) needs FLEXQUANT_USERNAME and FLEXQUANT_PASSWORD, because
the app can read model folders and start processes. It starts the job worker process and stops it,
and any runtime it started, on exit (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import threading
from pathlib import Path

import gradio as gr

from jobs.registry import import_kind_modules
from jobs.worker import start_worker
from storage.db import open_db
from workbench.default_model import ensure_default_model
from workbench.settings import Settings, get_settings, is_loopback_host
from workbench.ui.chat import build_chat_tab
from workbench.ui.common import UIContext
from workbench.ui.compare import build_compare_tab
from workbench.ui.live import build_live_tab
from workbench.ui.models_jobs import build_models_jobs_tab
from workbench.ui.policy import build_policy_tab
from workbench.ui.runtime import build_runtime_tab

log = logging.getLogger(__name__)

__all__ = ["JOB_MODULES", "ExposureError", "build_app", "check_exposure", "main", "parse_args"]

JOB_MODULES = ["workbench.job_kinds"]
CSS = """
.fq-jobs {width: 100%; border-collapse: collapse; font-size: 0.9em}
.fq-jobs th, .fq-jobs td {border-bottom: 1px solid #ddd; padding: 4px 6px; vertical-align: top;
  text-align: left}
.fq-bar {width: 140px; height: 12px; background: #eee; border-radius: 6px; overflow: hidden}
.fq-bar > div {height: 100%}
.fq-log {margin: 0; max-width: 420px; max-height: 5.5em; overflow: auto; white-space: pre-wrap;
  font-size: 0.8em}
.fq-status {font-weight: 600}
"""


# System fonts only: the default theme fetches Google Fonts, which an offline or private host cannot reach.
THEME = gr.themes.Soft(
    font=["ui-sans-serif", "system-ui", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "monospace"],
)


class ExposureError(ValueError):
    """The app would be reachable from other machines without a login."""


def check_exposure(
    host: str, share: bool, username: str | None, password: str | None
) -> tuple[str, str] | None:
    """The (username, password) to require, or None on loopback without credentials.

    Raises `ExposureError` when the app would be exposed (non-loopback host or a share link) with
    no credentials: the app reads folders and starts processes, so it must not be open to a network."""
    have = bool(username) and bool(password)
    if (share or not is_loopback_host(host)) and not have:
        where = "a public share link" if share else f"host {host}"
        raise ExposureError(
            f"refusing to serve the workbench on {where} without a login: set FLEXQUANT_USERNAME and "
            "FLEXQUANT_PASSWORD, or bind 127.0.0.1 (the default) and use an SSH tunnel"
        )
    return (username, password) if have else None


def build_app(ctx: UIContext) -> gr.Blocks:
    """The Blocks app with its six tabs, wired to `ctx` (engine, settings, runtime slot)."""
    with gr.Blocks(title="FlexQuant Workbench") as demo:
        gr.Markdown(
            "## FlexQuant Workbench\nOne checkpoint, several quantized variants (W8A8, W4A16); a policy "
            f"picks the variant per engine step. Data: `{ctx.settings.data_dir}`"
        )
        tabs = [
            ("Models & Jobs", build_models_jobs_tab),
            ("Runtime", build_runtime_tab),
            ("Policy", build_policy_tab),
            ("Live", build_live_tab),
            ("Chat", build_chat_tab),
            ("Compare", build_compare_tab),
        ]
        for title, build in tabs:
            with gr.Tab(title, id=title.split()[0].lower()) as tab:
                hook = build(ctx)
            if hook is not None:  # fresh lists on page load and whenever the tab is opened
                tab.select(hook.fn, hook.inputs, hook.outputs, show_progress="hidden")
                demo.load(hook.fn, hook.inputs, hook.outputs, show_progress="hidden")
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = get_settings()
    parser = argparse.ArgumentParser(prog="flexquant-app", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=defaults.host, help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=defaults.port, help="port (default %(default)s)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="workbench data folder (DB, models, checkpoints, logs); default FLEXQUANT_DATA_DIR "
        f"or {defaults.data_dir}",
    )
    parser.add_argument(
        "--share", action="store_true", help="create a public Gradio link (needs credentials)"
    )
    return parser.parse_args(argv)


def _raise_keyboard_interrupt(signum, frame) -> None:  # noqa: ANN001 - signal handler signature
    # Gradio's launch() leaves its wait loop on KeyboardInterrupt; SIGTERM should shut down the same way.
    raise KeyboardInterrupt


def _prepare_default_model(ctx: UIContext) -> None:
    """First start: convert the embedded SmolLM2 once (~1 min) while the UI is already up."""
    try:
        row = ensure_default_model(ctx.engine, ctx.settings)
        log.info("default model %r ready at %s", row.name, row.path)
    except Exception as exc:  # noqa: BLE001 - the app stays useful; the Models tab can retry
        log.warning("could not prepare the embedded default model: %s (Models tab: add it again)", exc)


def main(argv: list[str] | None = None) -> int:
    """Run the workbench app until interrupted; returns the process exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings(data_dir=args.data_dir) if args.data_dir else get_settings()
    try:
        auth = check_exposure(args.host, args.share, settings.username, settings.password)
    except ExposureError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    settings.ensure_dirs()
    engine = open_db(settings.db_path)
    import_kind_modules(JOB_MODULES)  # submit() validates params with the kinds' own hooks
    ctx = UIContext(engine=engine, settings=settings)
    if settings.prepare_default_model:
        threading.Thread(
            target=_prepare_default_model, args=(ctx,), name="default-model", daemon=True
        ).start()
    worker: subprocess.Popen | None = None
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        worker = start_worker(
            settings.db_path, settings.data_dir, JOB_MODULES, log_path=settings.logs_dir / "worker.log"
        )
        log.info("job worker started (pid %s), log %s", worker.pid, settings.logs_dir / "worker.log")
        demo = build_app(ctx)
        demo.queue(default_concurrency_limit=4)
        demo.launch(
            server_name=args.host,
            server_port=args.port,
            share=args.share,
            auth=auth,
            css=CSS,
            theme=THEME,
            show_error=True,
            allowed_paths=[],
        )
    except KeyboardInterrupt:
        pass
    finally:
        ctx.runtime.stop()
        if worker is not None and worker.poll() is None:
            worker.terminate()  # clean stop: a running job is marked interrupted and can be retried
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
        engine.dispose()
    return 0
