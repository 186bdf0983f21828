"""Every table of the workbench, in one module (SQLModel template style).

Timestamps are UTC epoch seconds (floats): cheap to compare in SQL and to plot.
JSON payloads (recipes, configs, manifests, results) are stored as text columns ending in `_json`.
"""

from __future__ import annotations

import time

from sqlmodel import Field, SQLModel

SCHEMA_VERSION = 1


def now() -> float:
    return time.time()


class SchemaInfo(SQLModel, table=True):
    id: int | None = Field(default=1, primary_key=True)
    version: int
    created_at: float = Field(default_factory=now)


class SourceModel(SQLModel, table=True):
    """An HF-format model folder the workbench may quantize."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, min_length=1, max_length=128)
    path: str
    architecture: str
    dtype: str = "bfloat16"
    num_params: int = 0
    num_layers: int = 0
    size_bytes: int = 0
    is_default: bool = False
    created_at: float = Field(default_factory=now)


class Checkpoint(SQLModel, table=True):
    """A published checkpoint: `merged` (FlexQuant, several variants) or `single` (one exported variant)."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, min_length=1, max_length=128)
    path: str
    kind: str = "merged"
    source_model_id: int | None = Field(default=None, foreign_key="sourcemodel.id")
    job_id: int | None = Field(default=None, foreign_key="job.id")
    size_bytes: int = 0
    manifest_json: str = "{}"
    created_at: float = Field(default_factory=now)


class Variant(SQLModel, table=True):
    """One quantized variant inside a checkpoint (e.g. w8a8, w4a16)."""

    id: int | None = Field(default=None, primary_key=True)
    checkpoint_id: int = Field(foreign_key="checkpoint.id", index=True)
    name: str
    scheme: str
    group_size: int | None = None
    weight_bytes: int = 0
    config_json: str = "{}"


class Job(SQLModel, table=True):
    """A durable unit of work. The queue (jobs/) owns the state machine:
    queued -> running -> done | failed | cancelled | interrupted; retry makes a new attempt."""

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(index=True)
    status: str = Field(default="queued", index=True)
    params_json: str = "{}"
    needs_gpu: bool = False
    priority: int = 0
    title: str = ""
    created_at: float = Field(default_factory=now)
    started_at: float | None = None
    finished_at: float | None = None
    heartbeat_at: float | None = None
    worker_id: str | None = None
    worker_pid: int | None = None
    attempts: int = 0
    cancel_requested: bool = False
    stage: str = ""
    percent: float = 0.0
    message: str = ""
    eta_s: float | None = None
    log_tail: str = ""
    error: str | None = None
    result_json: str | None = None
    work_dir: str | None = None
    peak_rss_bytes: int | None = None


class PolicyRecord(SQLModel, table=True):
    """A named policy (YAML text as the user wrote it) and, if auto-tuned, the data behind it."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True)
    body_yaml: str
    origin: str = "user"
    data_json: str | None = None
    created_at: float = Field(default_factory=now)
    updated_at: float = Field(default_factory=now)


class Run(SQLModel, table=True):
    """One runtime session, evaluation or benchmark over a checkpoint."""

    id: int | None = Field(default=None, primary_key=True)
    kind: str = "serve"
    runtime: str = "cpu"
    checkpoint_id: int | None = Field(default=None, foreign_key="checkpoint.id")
    checkpoint_path: str = ""
    policy_name: str = ""
    status: str = "running"
    config_json: str = "{}"
    result_json: str | None = None
    started_at: float = Field(default_factory=now)
    ended_at: float | None = None


class StepRecord(SQLModel, table=True):
    """One engine step: what it contained, how long it took, which variant computed it."""

    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="run.id", index=True)
    step: int
    ts: float
    duration_ms: float
    num_prefill_tokens: int
    num_decode_reqs: int
    variant: str
    layer_variants_json: str | None = None
    policy_name: str = ""


class RequestRecord(SQLModel, table=True):
    """One served request: timings and the variant mix of the steps that produced its tokens."""

    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="run.id", index=True)
    request_id: str
    arrival_ts: float
    first_token_ts: float | None = None
    finished_ts: float | None = None
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    variant_mix_json: str = "{}"
    error: str | None = None


class EvalResult(SQLModel, table=True):
    """Accuracy of one target (bf16, a variant, or a policy) of a checkpoint on held-out text."""

    id: int | None = Field(default=None, primary_key=True)
    checkpoint_id: int | None = Field(default=None, foreign_key="checkpoint.id", index=True)
    job_id: int | None = Field(default=None, foreign_key="job.id")
    target: str
    dataset: str
    perplexity: float
    # Share of positions whose top-1 token equals BF16's top-1 (1.0 for BF16 itself).
    token_agreement: float | None = None
    # Next-token top-1 accuracy against the text itself, in [0, 1]; compared to BF16 in points.
    top1_accuracy: float | None = None
    num_tokens: int = 0
    created_at: float = Field(default_factory=now)
