"""Read-only views for the UI: DB rows -> pandas DataFrames for the jobs, models, checkpoints (variants,
manifest, accuracy), runs and policies, and what the Runtime and Policy tabs need to know of a checkpoint.

The Gradio callbacks call these and hand the frames to `workbench.plots` or to a table; they never
run SQL themselves. A run's telemetry (steps, requests, memory) is in `workbench.views_telemetry`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from storage.crud import list_policies
from storage.models import Checkpoint, EvalResult, Job, Run, SourceModel, Variant
from workbench.ckpt_format import read_config, read_flexquant_config
from workbench.policy import DEFAULT_POLICY, Policy, PolicyError, fixed_policy, parse_policy, policy_from_dict

log = logging.getLogger(__name__)

__all__ = [
    "JOB_COLUMNS",
    "jobs_frame",
    "models_frame",
    "checkpoints_frame",
    "variants_frame",
    "checkpoint_manifest",
    "eval_frame",
    "runs_frame",
    "latest_run_id",
    "CheckpointInfo",
    "checkpoint_info",
    "policy_library",
]

JOB_COLUMNS = [
    "id",
    "kind",
    "title",
    "status",
    "stage",
    "percent",
    "eta_s",
    "message",
    "attempts",
    "created_at",
    "started_at",
    "finished_at",
    "error",
    "log_tail",
]


def _frame(rows: list, columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame([r.model_dump() for r in rows], columns=columns)


def jobs_frame(engine: Engine, *, limit: int = 200) -> pd.DataFrame:
    """The newest `limit` jobs, newest first, with the columns of `JOB_COLUMNS`."""
    with Session(engine) as session:
        rows = session.exec(select(Job).order_by(col(Job.id).desc()).limit(limit)).all()
    return _frame(rows, JOB_COLUMNS)


def models_frame(engine: Engine) -> pd.DataFrame:
    """Registered source models: name, architecture, layers, parameters, size, default flag, path."""
    with Session(engine) as session:
        rows = session.exec(select(SourceModel).order_by(SourceModel.id)).all()
    df = _frame(
        rows,
        [
            "id",
            "name",
            "architecture",
            "num_layers",
            "num_params",
            "size_bytes",
            "dtype",
            "is_default",
            "path",
        ],
    )
    df["size_mb"] = (df["size_bytes"] / 2**20).round(1)
    return df.drop(columns=["size_bytes"])


def checkpoints_frame(engine: Engine) -> pd.DataFrame:
    """Published checkpoints with their size in MiB and variant names."""
    with Session(engine) as session:
        rows = session.exec(select(Checkpoint).order_by(Checkpoint.id)).all()
        variants = session.exec(select(Variant)).all()
    df = _frame(rows, ["id", "name", "kind", "size_bytes", "path", "created_at"])
    names = {}
    for v in variants:
        names.setdefault(v.checkpoint_id, []).append(v.name)
    df["variants"] = [", ".join(names.get(i, [])) for i in df["id"]]
    df["size_mb"] = (df["size_bytes"] / 2**20).round(1)
    return df[["id", "name", "kind", "variants", "size_mb", "path"]]


def variants_frame(engine: Engine, checkpoint_id: int) -> pd.DataFrame:
    """The variants of one checkpoint: scheme, group size and resident weight size in MiB."""
    with Session(engine) as session:
        rows = session.exec(
            select(Variant).where(Variant.checkpoint_id == checkpoint_id).order_by(Variant.id)
        ).all()
    df = _frame(rows, ["name", "scheme", "group_size", "weight_bytes"])
    df["weight_mb"] = (df["weight_bytes"] / 2**20).round(2)
    return df.drop(columns=["weight_bytes"])


def checkpoint_manifest(engine: Engine, checkpoint_id: int) -> dict:
    """The checkpoint's manifest (source, recipe, files, versions) as a dict; {} if unreadable."""
    with Session(engine) as session:
        row = session.get(Checkpoint, checkpoint_id)
    if row is None:
        return {}
    try:
        return json.loads(row.manifest_json or "{}")
    except json.JSONDecodeError:
        return {}


def eval_frame(engine: Engine, checkpoint_id: int) -> pd.DataFrame:
    """The newest evaluation of each target of a checkpoint, BF16 first, with the perplexity change
    against BF16 in percent (`ppl_vs_bf16_pct`) when a BF16 row exists."""
    with Session(engine) as session:
        rows = session.exec(
            select(EvalResult).where(EvalResult.checkpoint_id == checkpoint_id).order_by(EvalResult.id)
        ).all()
    df = _frame(rows, ["target", "dataset", "perplexity", "token_agreement", "top1_accuracy", "num_tokens"])
    df = df.drop_duplicates("target", keep="last")  # a re-run evaluation supersedes the old one
    order = df["target"].map(lambda t: (t != "bf16", not str(t).startswith("all-"), t))
    df = df.iloc[sorted(range(len(df)), key=lambda i: order.iloc[i])].reset_index(drop=True)
    bf16 = df.loc[df["target"] == "bf16", "perplexity"]
    df["ppl_vs_bf16_pct"] = ((df["perplexity"] / bf16.iloc[0] - 1) * 100).round(2) if not bf16.empty else None
    return df


def runs_frame(engine: Engine, *, limit: int = 50) -> pd.DataFrame:
    """The newest runs (serving sessions, benchmarks), newest first."""
    with Session(engine) as session:
        rows = session.exec(select(Run).order_by(col(Run.id).desc()).limit(limit)).all()
    return _frame(
        rows, ["id", "kind", "runtime", "checkpoint_path", "policy_name", "status", "started_at", "ended_at"]
    )


def latest_run_id(engine: Engine, *, kind: str = "serve") -> int | None:
    """The id of the newest run of `kind`, or None."""
    with Session(engine) as session:
        row = session.exec(select(Run.id).where(Run.kind == kind).order_by(col(Run.id).desc())).first()
    return row


@dataclass(frozen=True)
class CheckpointInfo:
    """What the Runtime and Policy tabs need to know about one checkpoint."""

    id: int
    name: str
    path: Path
    variants: list[str]
    num_layers: int | None
    default_policy: Policy | None


def checkpoint_info(engine: Engine, checkpoint_id: int) -> CheckpointInfo:
    """Variants (from the DB), layer count and default policy (from the folder's config.json);
    ValueError if the checkpoint is unknown."""
    with Session(engine) as session:
        row = session.get(Checkpoint, checkpoint_id)
        names = [
            v.name
            for v in session.exec(
                select(Variant).where(Variant.checkpoint_id == checkpoint_id).order_by(Variant.id)
            )
        ]
    if row is None:
        raise ValueError(f"no checkpoint with id {checkpoint_id}; pick one from the list")
    num_layers, default = None, None
    try:
        num_layers = read_config(Path(row.path)).get("num_hidden_layers")
        flex = read_flexquant_config(Path(row.path))
        names = names or list(flex.get("variants", {}))
        if flex.get("policy"):
            default = policy_from_dict(flex["policy"])
    except (OSError, ValueError) as exc:  # a moved folder or a single-variant export: still listable
        log.info("checkpoint %s: %s", row.name, exc)
    return CheckpointInfo(int(row.id), row.name, Path(row.path), names, num_layers, default)


def policy_library(engine: Engine, *, variants: list[str] | None = None) -> dict[str, Policy]:
    """Every policy a user can pick, by name: the built-in default, `all-<variant>` for each variant,
    then the saved PolicyRecords (a saved policy with a built-in's name replaces it). With
    `variants`, policies naming other variants are left out."""
    found: dict[str, Policy] = {}
    candidates = [DEFAULT_POLICY] + [fixed_policy(v) for v in (variants or ["w8a8", "w4a16"])]
    for record in list_policies(engine):
        try:
            candidates.append(parse_policy(record.body_yaml))
        except PolicyError as exc:  # saved before a validation rule tightened: skip, do not crash the tab
            log.warning("saved policy %s no longer parses: %s", record.name, exc)
    for policy in candidates:
        if variants is None or policy.variants <= set(variants):
            found[policy.name] = policy
    return found
