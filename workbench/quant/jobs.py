"""The "quantize" job kind: a registered source model -> a registered merged checkpoint.

Params: `{"model": <source model name>, "checkpoint": <new checkpoint name>, "recipe": {...}}`.
`validate_quantize` runs at submit time (model exists, name free, recipe valid) so a bad request is
refused before anything is queued. The job publishes the checkpoint under
`<data_dir>/checkpoints/<name>` and registers the `Checkpoint` and its `Variant` rows in one
transaction; a crash after publishing but before registering is finished on the retry.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import select

from jobs.registry import job_kind
from storage.crud import db_errors, find_checkpoint
from storage.db import write_session
from storage.models import Checkpoint, Variant
from workbench import ckpt_format as fmt
from workbench.quant.recipe import VARIANT_SPECS, parse_recipe

__all__ = ["quantize_job", "validate_quantize", "register_checkpoint", "CHECKPOINT_NAME_RE"]

log = logging.getLogger(__name__)

CHECKPOINT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
PARAM_KEYS = {"model", "checkpoint", "recipe"}


def validate_quantize(params: dict, engine: Engine) -> dict:
    """Normalized params, or `ValueError` saying which param is wrong and how to fix it."""
    from workbench.models import get_model

    if not isinstance(params, dict):
        raise ValueError("quantize params must be a mapping with keys model, checkpoint, recipe")
    extra = sorted(set(params) - PARAM_KEYS)
    if extra:
        raise ValueError(f"unknown quantize param(s) {extra}; expected {sorted(PARAM_KEYS)}")
    if not params.get("model"):
        raise ValueError("quantize needs 'model': the name of a registered source model")
    model = get_model(engine, params["model"])  # ModelError (a ValueError) lists the known models
    name = params.get("checkpoint")
    if not isinstance(name, str) or not CHECKPOINT_NAME_RE.match(name):
        raise ValueError(
            f"checkpoint name {name!r} is not usable; use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    if find_checkpoint(engine, name=name) is not None:
        raise ValueError(f"a checkpoint named {name!r} already exists; choose another name")
    recipe = parse_recipe(params.get("recipe"))
    if recipe.calibration_path:
        from workbench.textdata import read_text_file

        # Read it now (size-capped): an empty, binary or oversized file is refused before a job is
        # queued, with the file and line at fault, instead of failing minutes later in the worker.
        read_text_file(Path(recipe.calibration_path))
    return {"model": model.name, "checkpoint": name, "recipe": recipe.model_dump()}


def register_checkpoint(
    engine: Engine, *, name: str, path: Path, source_model_id: int | None = None, job_id: int | None = None
) -> Checkpoint:
    """Insert the `Checkpoint` row of a published merged checkpoint and one `Variant` row per variant."""
    from workbench.quant.check import check_checkpoint

    report = check_checkpoint(path, verify_hashes=False).raise_if_bad()
    manifest = json.loads((Path(path) / fmt.MANIFEST_NAME).read_text())
    qcfg = fmt.read_config(path)["quantization_config"]
    variant_cfgs = qcfg["variants"] if report.kind == "merged" else {manifest.get("variant", "single"): qcfg}
    with db_errors(engine, "register the checkpoint"), write_session(engine) as session:
        if session.exec(select(Checkpoint).where(Checkpoint.name == name)).first() is not None:
            raise ValueError(f"a checkpoint named {name!r} already exists; choose another name")
        row = Checkpoint(
            name=name,
            path=str(Path(path).resolve()),
            kind=report.kind,
            source_model_id=source_model_id,
            job_id=job_id,
            size_bytes=sum(report.files.values()),
            manifest_json=json.dumps(manifest),
        )
        session.add(row)
        session.flush()
        for variant, cfg in variant_cfgs.items():
            info = manifest.get("variants", {}).get(variant, {})
            scheme = VARIANT_SPECS[variant].preset if variant in VARIANT_SPECS else "compressed-tensors"
            session.add(
                Variant(
                    checkpoint_id=row.id,
                    name=variant,
                    scheme=info.get("scheme", scheme),
                    group_size=info.get("group_size"),
                    weight_bytes=report.weight_bytes.get(variant, 0),
                    config_json=json.dumps(cfg),
                )
            )
        session.commit()
        session.refresh(row)
        return row


def _finished_by_an_earlier_attempt(out_dir: Path, source_path: str, recipe: dict) -> bool:
    """A crash between publish and register leaves our own complete output; recognise it by its manifest."""
    try:
        manifest = json.loads((out_dir / fmt.MANIFEST_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return manifest.get("source", {}).get("path") == source_path and manifest.get("recipe") == recipe


@job_kind("quantize", requeue_safe=True, validate=validate_quantize)
def quantize_job(ctx, params: dict) -> dict:
    """Quantize, merge, validate, publish and register; returns the new checkpoint's summary."""
    from workbench.models import get_model
    from workbench.quant.factory import quantize_and_merge

    params = validate_quantize(params, ctx.engine)  # the DB may have changed since submit
    model = get_model(ctx.engine, params["model"])
    recipe = parse_recipe(params["recipe"])
    name = params["checkpoint"]
    out_dir = Path(ctx.data_dir) / "checkpoints" / name
    source_path = str(Path(model.path).resolve())
    if out_dir.exists() and _finished_by_an_earlier_attempt(out_dir, source_path, recipe.model_dump()):
        ctx.log(f"{out_dir} was published by an earlier attempt; registering it")
    else:
        ctx.log(f"quantizing {model.name} ({model.path}) into {', '.join(recipe.variants)}")
        quantize_and_merge(Path(model.path), out_dir, recipe, reporter=ctx, work_dir=ctx.work_dir)
    ctx.update("register", 100.0, f"registering checkpoint {name}")
    try:
        row = register_checkpoint(
            ctx.engine, name=name, path=out_dir, source_model_id=model.id, job_id=ctx.job_id
        )
    except ValueError:
        shutil.rmtree(out_dir, ignore_errors=True)  # name taken meanwhile: do not leave an orphan folder
        raise
    manifest = json.loads(row.manifest_json)
    variants = {
        v: {"group_size": info.get("group_size"), "weight_bytes": info.get("weight_bytes")}
        for v, info in manifest["variants"].items()
    }
    ctx.log(f"checkpoint {name} registered (id {row.id}): {row.size_bytes / 2**20:.1f} MiB, {variants}")
    return {
        "checkpoint_id": row.id,
        "checkpoint": name,
        "path": row.path,
        "variants": variants,
        "notes": manifest.get("notes", []),
        "peak_rss_bytes": manifest.get("peak_rss_bytes"),
        "timings_s": manifest.get("timings_s"),
    }
