"""`flexquant jobs ...`: look at, cancel and retry queued work, and run a worker in the foreground."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Column, Table

from workbench.cli_common import console, fail, fmt_time, print_fields, state

jobs_app = typer.Typer(help="The job queue (quantize, evaluate, ...).", no_args_is_help=True)

DEFAULT_KIND_MODULES = "workbench.job_kinds"


@jobs_app.command("list")
def jobs_list(
    ctx: typer.Context,
    status: Annotated[
        str | None, typer.Option("--status", help="Only jobs in this state (queued, running, done, ...).")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000)] = 50,
) -> None:
    """Jobs, newest first."""
    from jobs import queue

    known = ("queued", "running", *queue.TERMINAL)
    if status is not None and status not in known:
        fail(f"unknown status {status!r}; use one of {', '.join(known)}")
    rows = queue.list_jobs(state(ctx).engine(), status=status, limit=limit)
    if not rows:
        console.print("no jobs" + (f" with status {status}" if status else ""))
        return
    table = Table(
        "id",
        "kind",
        "title",
        Column("status", no_wrap=True),
        "progress",
        "stage",
        "created",
        box=box.SIMPLE_HEAD,
    )
    for job in rows:
        table.add_row(
            str(job.id),
            job.kind,
            escape(job.title),
            job.status,
            f"{job.percent:.0f}%",
            escape(job.stage),
            fmt_time(job.created_at),
        )
    console.print(table)


@jobs_app.command("show")
def jobs_show(
    ctx: typer.Context,
    job_id: Annotated[int, typer.Argument(metavar="ID")],
    lines: Annotated[int, typer.Option("--lines", "-n", min=0, help="How many log lines to show.")] = 20,
) -> None:
    """One job: state, progress, parameters, result or error, and the end of its log."""
    from jobs import queue

    job = queue.get_job(state(ctx).engine(), job_id)
    eta = f", about {job.eta_s:.0f} s left" if job.eta_s and job.status == "running" else ""
    fields = [
        ("id", str(job.id)),
        ("kind", job.kind),
        ("title", job.title),
        ("status", job.status),
        ("progress", f"{job.percent:.1f}% {job.stage} {job.message}".strip() + eta),
        ("attempts", str(job.attempts)),
        ("created", fmt_time(job.created_at)),
        ("started", fmt_time(job.started_at)),
        ("finished", fmt_time(job.finished_at)),
        ("params", job.params_json),
    ]
    if job.result_json:
        fields.append(("result", job.result_json))
    if job.cancel_requested and job.status == "running":
        fields.append(("cancel", "requested"))
    print_fields(fields)
    if job.error:
        console.print("[red]error:[/red]")
        console.print(escape(job.error.rstrip()))
    tail = job.log_tail.splitlines()[-lines:] if lines else []
    if tail:
        console.print(f"[bold]log (last {len(tail)} lines):[/bold]")
        console.print(escape("\n".join(tail)))


@jobs_app.command("cancel")
def jobs_cancel(ctx: typer.Context, job_id: Annotated[int, typer.Argument(metavar="ID")]) -> None:
    """Cancel a queued job, or ask a running one to stop."""
    from jobs import queue

    job = queue.cancel(state(ctx).engine(), job_id)
    note = " (stop requested; the worker ends it shortly)" if job.status == "running" else ""
    console.print(f"job {job.id}: {job.status}{note}")


@jobs_app.command("retry")
def jobs_retry(ctx: typer.Context, job_id: Annotated[int, typer.Argument(metavar="ID")]) -> None:
    """Queue a failed, cancelled or interrupted job again."""
    from jobs import queue

    job = queue.retry(state(ctx).engine(), job_id)
    console.print(f"job {job.id}: {job.status}")


@jobs_app.command("worker")
def jobs_worker(
    ctx: typer.Context,
    modules: Annotated[
        str, typer.Option("--modules", help="Comma-separated modules registering job kinds.")
    ] = DEFAULT_KIND_MODULES,
    once: Annotated[bool, typer.Option("--once", help="Exit when no job is left to claim.")] = False,
) -> None:
    """Run a job worker in the foreground (Ctrl-C stops it; a running job is marked interrupted)."""
    from jobs import worker

    st = state(ctx)
    st.settings.ensure_dirs()
    st.engine()  # create/check the DB here so a bad DB fails with a clear message
    argv = [
        "--db",
        str(st.settings.db_path),
        "--data-dir",
        str(st.settings.data_dir),
        "--modules",
        modules,
        "--heartbeat",
        str(st.settings.heartbeat_s),
        "--stale-after",
        str(st.settings.stale_after_s),
    ]
    if once:
        argv.append("--once")
    code = worker.main(argv)
    if code:
        fail(f"the worker stopped with exit code {code}; see the messages above")


def job_summary(job) -> str:  # noqa: ANN001 - storage.models.Job
    """One line for a freshly submitted job."""
    params = json.loads(job.params_json or "{}")
    return f"queued job {job.id} ({job.kind}) with {escape(json.dumps(params))}"
