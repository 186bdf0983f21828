"""`flexquant policy ...`: validate, save, list, show and live-apply FlexQuant policies."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Column, Table

from workbench.cli_common import console, fail, fmt_time, state
from workbench.policy import MAX_POLICY_BYTES, Policy, StepInfo, check_policy_for, decide, parse_policy

policy_app = typer.Typer(help="FlexQuant policies (which variant computes each step).", no_args_is_help=True)


def read_policy_file(path: Path) -> tuple[Policy, str]:
    """Parse a YAML/JSON policy file; (policy, its text). Size is checked before reading."""
    if not path.is_file():
        fail(f"{path} is not a file")
    if path.stat().st_size > MAX_POLICY_BYTES:
        fail(f"{path} is larger than {MAX_POLICY_BYTES} bytes; a policy is a few lines")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        fail(f"{path} is not UTF-8 text")
    try:
        return parse_policy(text), text
    except ValueError as exc:
        fail(f"{path}: {exc}")


def policy_by_name_or_file(ctx: typer.Context, name: str) -> Policy:
    """A saved policy by name, or a policy file if `name` is an existing path."""
    from storage.crud import find_policy

    row = find_policy(state(ctx).engine(), name=name)
    if row is not None:
        return parse_policy(row.body_yaml)
    if Path(name).is_file():
        return read_policy_file(Path(name))[0]
    fail(f"no saved policy named {name!r} and no such file; see `flexquant policy list`")


def _summary(policy: Policy) -> str:
    parts = [f"prefill -> {policy.prefill}"]
    low = 1
    for rule in policy.decode:
        span = f"{low}-{rule.max_batch}" if rule.max_batch else f">={low}"
        parts.append(f"decode batch {span} -> {rule.variant}")
        low = (rule.max_batch or 0) + 1
    parts += [f"layers {r.first}-{r.last} -> {r.variant}" for r in policy.layers]
    return "; ".join(parts)


@policy_app.command("validate")
def policy_validate(
    file: Path,
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="Also check it against this checkpoint folder.")
    ] = None,
) -> None:
    """Check a policy file (and, with --checkpoint, that the checkpoint has its variants and layers)."""
    policy, _ = read_policy_file(file)
    if checkpoint is not None:
        from workbench.ckpt_format import read_config, read_flexquant_config

        if not (checkpoint / "config.json").is_file():
            fail(f"{checkpoint} has no config.json; give a merged FlexQuant checkpoint folder")
        variants = list(read_flexquant_config(checkpoint)["variants"])
        check_policy_for(policy, variants, read_config(checkpoint).get("num_hidden_layers"))
    console.print(f"[green]policy {escape(policy.name)} is valid[/green]: {escape(_summary(policy))}")
    examples = [(512, 0), (0, 1), (0, 8), (0, 64)]
    picks = ", ".join(f"{p} prefill/{d} decode -> {decide(policy, StepInfo(p, d))}" for p, d in examples)
    console.print(f"examples: {picks}")


@policy_app.command("save")
def policy_save(ctx: typer.Context, file: Path) -> None:
    """Save (or replace) a policy file in the workbench under its `name`."""
    from storage.crud import save_policy

    policy, text = read_policy_file(file)
    row = save_policy(state(ctx).engine(), name=policy.name, body_yaml=text)
    console.print(f"[green]saved policy {escape(row.name)}[/green]: {escape(_summary(policy))}")


@policy_app.command("list")
def policy_list(ctx: typer.Context) -> None:
    """Saved policies."""
    from storage.crud import list_policies

    rows = list_policies(state(ctx).engine())
    if not rows:
        console.print("no saved policies: `flexquant policy save FILE` adds one")
        return
    table = Table(Column("name", no_wrap=True), "origin", "updated", "rules", box=box.SIMPLE_HEAD)
    for row in rows:
        try:
            rules = _summary(parse_policy(row.body_yaml))
        except ValueError as exc:
            rules = f"[red]invalid: {escape(str(exc))}[/red]"
        table.add_row(escape(row.name), row.origin, fmt_time(row.updated_at), rules)
    console.print(table)


@policy_app.command("show")
def policy_show(ctx: typer.Context, name: str) -> None:
    """The text of a saved policy, as written."""
    from storage.crud import find_policy

    row = find_policy(state(ctx).engine(), name=name)
    if row is None:
        fail(f"no saved policy named {name!r}; see `flexquant policy list`")
    console.print(escape(row.body_yaml.rstrip()))


@policy_app.command("apply")
def policy_apply(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Saved policy name or a policy file.")],
    url: Annotated[
        str, typer.Option("--url", help="Base URL of the running server.")
    ] = "http://127.0.0.1:8000",
) -> None:
    """Switch a running server (vLLM or CPU) to this policy now (PUT /flexquant/policy)."""
    from workbench.chat_client import put_policy

    policy = policy_by_name_or_file(ctx, name)
    reply = put_policy(url.rstrip("/"), policy)
    console.print(
        f"[green]policy {escape(policy.name)} applied[/green] at step {reply.get('applied_at_step')}"
    )
