"""`flexquant`: the workbench from a terminal (typer + rich).

    flexquant [--data-dir DIR] [--allow-root DIR ...] COMMAND ...

init / models / jobs / policy manage the workbench DB; quantize / check / evaluate / serve / bench
call the library (imported lazily, so the CLI starts fast and works without the heavy parts).
Every expected failure prints one red line and exits with code 2; `python -m workbench.cli` works too.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Column, Table
from typer.core import TyperGroup

from storage.db import DatabaseError
from workbench.cli_common import (
    EXIT_INTERRUPTED,
    CliState,
    RichReporter,
    console,
    err_console,
    fail,
    human_bytes,
    human_count,
    make_progress,
    print_fields,
    state,
)
from workbench.settings import Settings

# Exceptions from our own packages are written for users; so are these standard ones.
_USER_ERROR_TYPES = (ValueError, DatabaseError, OSError)
_OWN_PACKAGES = ("workbench.", "jobs.", "storage.")


def _is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, _USER_ERROR_TYPES) or type(exc).__module__.startswith(_OWN_PACKAGES)


class _ErrorHandlingGroup(TyperGroup):
    """Root command group: turns user-facing exceptions from any command into `fail(...)`."""

    def invoke(self, ctx):  # noqa: ANN001, ANN201 - click API
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:  # noqa: BLE001 - filtered right below
            if not _is_user_error(exc):
                raise
            fail(str(exc))


app = typer.Typer(
    cls=_ErrorHandlingGroup,
    help="FlexQuant Workbench: build, check, serve and compare multi-variant quantized LLM checkpoints.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="Source models the workbench can quantize.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@app.callback()
def _root(
    ctx: typer.Context,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Workbench data folder (overrides FLEXQUANT_DATA_DIR).")
    ] = None,
    allow_root: Annotated[
        list[Path] | None,
        typer.Option("--allow-root", help="Extra folder models/text may be read from (repeatable)."),
    ] = None,
) -> None:
    """Read settings from FLEXQUANT_* env vars, then apply the global options."""
    base = Settings()
    overrides: dict = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if allow_root:
        overrides["allowed_roots"] = [*base.allowed_roots, *allow_root]
    settings = base.model_copy(update=overrides) if overrides else base
    ctx.obj = CliState(settings=settings)
    ctx.call_on_close(ctx.obj.close)


@app.command()
def init(
    ctx: typer.Context,
    no_model: Annotated[bool, typer.Option("--no-model", help="Create the DB and folders only.")] = False,
) -> None:
    """Create the data folder and DB, and convert + register the embedded default model (once)."""
    st = state(ctx)
    st.settings.ensure_dirs()
    engine = st.engine()
    console.print(f"database ready: {st.settings.db_path}")
    if no_model:
        return
    from workbench.default_model import ensure_default_model

    with make_progress() as progress:
        task = progress.add_task("default model", total=100)
        row = ensure_default_model(engine, st.settings, RichReporter(progress, task))
    console.print(
        f"[green]default model {escape(row.name)}[/green]: {row.architecture}, {row.num_layers} layers, "
        f"{human_count(row.num_params)} params, {row.dtype} at {escape(row.path)}"
    )


@models_app.command("add")
def models_add(ctx: typer.Context, name: str, path: Path) -> None:
    """Register the HF model folder PATH under NAME (checked first; nothing is saved if it fails)."""
    from workbench.models import add_model

    st = state(ctx)
    row = add_model(st.engine(), name=name, path=path, settings=st.settings)
    console.print(
        f"[green]added {escape(row.name)}[/green]: {row.architecture}, {row.num_layers} layers, "
        f"{human_count(row.num_params)} params, {row.dtype}, {human_bytes(row.size_bytes)}"
    )


@models_app.command("list")
def models_list(ctx: typer.Context) -> None:
    """Every registered source model."""
    from workbench.models import list_models

    rows = list_models(state(ctx).engine())
    if not rows:
        console.print(
            "no models yet: `flexquant init` adds the default, `flexquant models add NAME PATH` yours"
        )
        return
    table = Table(
        "id",
        Column("name", no_wrap=True),
        "architecture",
        "layers",
        "params",
        "dtype",
        "size",
        "default",
        box=box.SIMPLE_HEAD,
    )
    for m in rows:
        table.add_row(
            str(m.id),
            m.name,
            m.architecture.removesuffix("ForCausalLM"),
            str(m.num_layers),
            human_count(m.num_params),
            m.dtype,
            human_bytes(m.size_bytes),
            "yes" if m.is_default else "",
        )
    console.print(table)


@models_app.command("show")
def models_show(ctx: typer.Context, name: str) -> None:
    """Details of one model (NAME or id), re-checked on disk."""
    from workbench.models import ModelError, get_model, inspect_model_dir

    m = get_model(state(ctx).engine(), name)
    fields = [
        (key, str(getattr(m, key))) for key in ("id", "name", "path", "architecture", "dtype", "num_layers")
    ]
    fields += [
        ("params", human_count(m.num_params)),
        ("size", human_bytes(m.size_bytes)),
        ("default", "yes" if m.is_default else "no"),
    ]
    try:
        info = inspect_model_dir(Path(m.path))
        fields.append(("on disk", f"ok: {', '.join(info.weight_files)}"))
    except ModelError as exc:
        fields.append(("on disk", f"PROBLEM: {exc}"))
    print_fields(fields)


def _register_subcommands() -> None:
    from workbench import cli_jobs, cli_policy, cli_run, cli_synth

    app.add_typer(cli_jobs.jobs_app, name="jobs")
    app.add_typer(cli_policy.policy_app, name="policy")
    cli_run.register(app)
    cli_synth.register(app)


_register_subcommands()


def main() -> None:
    """Console-script entry point (`flexquant`)."""
    app(prog_name="flexquant")


if __name__ == "__main__":
    sys.exit(main())
