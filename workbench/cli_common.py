"""Shared pieces of the `flexquant` CLI: settings/DB per invocation, errors, progress, job waiting.

Every command gets its settings and DB through `state(ctx)`; every user-facing error ends in
`fail(msg)` (red message on stderr, exit code 2, no traceback).
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from sqlalchemy.engine import Engine

from jobs.progress import Reporter
from storage.db import open_db
from storage.models import Job
from workbench.settings import Settings

# soft_wrap: long paths and messages stay on one line, so they can be copied and grepped.
console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
TERMINAL_STATUSES = ("done", "failed", "cancelled", "interrupted")
# Modules that register job kinds, tried in order; the first is the app's own (it imports all kinds).
KIND_MODULES = {
    "quantize": ("workbench.job_kinds", "workbench.quant.jobs"),
    "evaluate": ("workbench.job_kinds",),
}


def fail(message: str) -> None:
    """Print `message` in red on stderr and exit with code 2 (no traceback)."""
    err_console.print(f"[bold red]error:[/bold red] {escape(str(message))}")
    raise typer.Exit(EXIT_USER_ERROR)


@dataclass
class CliState:
    """What the global options decided, plus the DB opened on first use."""

    settings: Settings
    _engine: Engine | None = field(default=None, repr=False)

    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = open_db(self.settings.db_path)
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


def state(ctx: typer.Context) -> CliState:
    """The CliState the root callback stored on the click context."""
    return ctx.find_root().obj


def import_backend(module: str, command: str):  # noqa: ANN201 - a module
    """Import a library module lazily; a missing one is a clear error, not a traceback."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        fail(f"`flexquant {command}` needs {module}, which is not available here ({exc})")


def register_kind(kind: str) -> None:
    """Import a module that registers job kind `kind` in this process (needed to submit it)."""
    from jobs.registry import known_kinds

    for module in KIND_MODULES.get(kind, ("workbench.job_kinds",)):
        if kind in known_kinds():
            return
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # the module exists but something it imports is missing: a real problem
                raise


class RichReporter(Reporter):
    """A `Reporter` that drives one rich progress bar."""

    def __init__(self, progress: Progress, task: TaskID):
        super().__init__()
        self.progress, self.task = progress, task

    def on_update(self, stage: str, percent: float, message: str, eta_s: float | None) -> None:
        self.progress.update(self.task, completed=percent, description=escape(f"{stage}: {message}"))


def make_progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def wait_for_job(engine: Engine, job_id: int, *, poll_s: float = 0.5) -> Job:
    """Show job `job_id`'s progress until it ends; Ctrl-C stops waiting, not the job."""
    from jobs import queue

    job = queue.get_job(engine, job_id)
    queued_since = time.monotonic()
    hinted = False
    try:
        with make_progress() as progress:
            task = progress.add_task(f"job {job_id} queued", total=100)
            while job.status not in TERMINAL_STATUSES:
                if job.status == "queued" and not hinted and time.monotonic() - queued_since > 10:
                    console.print("still queued: is a worker running? (`flexquant jobs worker` or the app)")
                    hinted = True
                text = f"job {job_id} {job.status} {job.stage}: {job.message}".rstrip(": ")
                progress.update(task, completed=job.percent, description=escape(text))
                time.sleep(poll_s)
                job = queue.get_job(engine, job_id)
            progress.update(task, completed=job.percent, description=escape(f"job {job_id} {job.status}"))
    except KeyboardInterrupt:
        console.print(
            f"stopped waiting; job {job_id} goes on in the worker "
            f"(`flexquant jobs show {job_id}`, `flexquant jobs cancel {job_id}`)"
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    return job


def finish_waited_job(job: Job) -> None:
    """Exit 0 for a done job; otherwise report its status and error (exit 2)."""
    if job.status == "done":
        console.print(
            f"[green]job {job.id} done[/green]" + (f": {escape(job.result_json)}" if job.result_json else "")
        )
        return
    last_line = (job.error or "").strip().splitlines()[-1:] or [job.message or "no error recorded"]
    fail(f"job {job.id} {job.status}: {last_line[0]} (full log: `flexquant jobs show {job.id}`)")


def print_fields(fields: list[tuple[str, str]]) -> None:
    """`key  value` lines, keys aligned; values printed verbatim (escaped)."""
    width = max((len(key) for key, _ in fields), default=0)
    for key, value in fields:
        console.print(f"[bold]{key:<{width}}[/bold]  {escape(str(value))}")


def human_bytes(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def human_count(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def fmt_time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
