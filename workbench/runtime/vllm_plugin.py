"""FlexQuant's vLLM plugin: the entry point, and the live-policy channel between API server and engine.

`register()` is the `vllm.general_plugins` entry point (pyproject). vLLM calls it in every process
(API server, engine core, workers), possibly more than once; it registers the quantization method
`flexquant`, whose code lives in `vllm_adapter` (weights) and `vllm_dispatch` (per-step dispatch): the
only modules that touch vLLM internals.

Live policy edits cross a process boundary: `vllm serve` answers HTTP in the API-server process, but
the variant is chosen in the engine-core/worker process. They talk through two small JSON files, so
no extra port, socket or DB driver is needed in the serving environment:

  FLEXQUANT_POLICY_FILE        {"version": str, "policy": {...}}  written (atomically) by the API side
  FLEXQUANT_POLICY_FILE.ack    {"version", "ok", "applied_at_step", "policy_name", "error"}  by rank 0

`PolicyMiddleware` (passed to `vllm serve --middleware`) serves `GET/PUT /flexquant/policy` and
`GET /flexquant/stats`: PUT validates the body like the CPU server does (400 + message on error, the
old policy stays), publishes it and waits until the engine acknowledges the step at which it applies.

Imports stay light (stdlib, pydantic, yaml, workbench.policy): this module is imported by the API
server before any model exists, and by the workbench to build commands.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

from workbench.policy import Policy, PolicyError, check_policy_for, policy_from_dict

logger = logging.getLogger(__name__)

ENV_POLICY_FILE = "FLEXQUANT_POLICY_FILE"
ENV_POLICY_JSON = "FLEXQUANT_POLICY_JSON"  # the policy at engine start (wins over a stale file)
ENV_TELEMETRY = "FLEXQUANT_TELEMETRY"  # JSONL path; unset = no telemetry
ENV_CHECKPOINT = "FLEXQUANT_CHECKPOINT"  # lets the API process validate variants/layers up front
ENV_KERNELS = "FLEXQUANT_KERNELS"  # "w4a16=marlin,..." overrides the int4 kernel per variant
APPLY_TIMEOUT_S = 10.0
MAX_BODY_BYTES = 64 * 1024
STATS_TAIL_BYTES = 256 * 1024


def register() -> None:
    """`vllm.general_plugins` entry point: register the `flexquant` quantization method (idempotent)."""
    from workbench.runtime import vllm_adapter  # vLLM and torch are imported only here

    vllm_adapter.register_quantization()


# ---------------------------------------------------------------- the file channel


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON next to `path` and rename it over, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None if it is missing or (being replaced) unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def ack_path(policy_file: Path) -> Path:
    return Path(policy_file).with_name(Path(policy_file).name + ".ack")


def publish_policy(policy_file: Path, policy: Policy, version: str | None = None) -> str:
    """Hand a policy to the engine; returns the version string its acknowledgement will carry."""
    version = version or f"{time.time_ns()}-{os.getpid()}"
    write_json_atomic(policy_file, {"version": version, "policy": policy.model_dump(exclude_none=True)})
    return version


def write_ack(policy_file: Path, *, version: str, ok: bool, step: int | None = None,
              policy_name: str | None = None, error: str | None = None) -> None:
    write_json_atomic(ack_path(policy_file), {
        "version": version, "ok": ok, "applied_at_step": step, "policy_name": policy_name, "error": error,
    })


def checkpoint_shape(ckpt_dir: Path) -> tuple[list[str], int | None]:
    """(variant names, number of layers) of a merged checkpoint, for validating policies."""
    from workbench.ckpt_format import read_config, read_flexquant_config

    variants = list(read_flexquant_config(ckpt_dir)["variants"])
    return variants, read_config(ckpt_dir).get("num_hidden_layers")


def validate_policy_for(data: object, ckpt_dir: Path | None) -> Policy:
    """Parse a policy dict and check it against the checkpoint; `PolicyError` says what is wrong."""
    if not isinstance(data, dict):
        raise PolicyError('body must be JSON {"policy": {name, prefill, decode, layers?}}')
    policy = policy_from_dict(data)
    if ckpt_dir is not None:
        variants, num_layers = checkpoint_shape(ckpt_dir)
        check_policy_for(policy, variants, num_layers)
    return policy


async def apply_policy(policy_file: Path, policy: Policy, timeout_s: float = APPLY_TIMEOUT_S) -> dict:
    """Publish `policy` and wait for the engine's answer: the ack dict, or a timeout error dict."""
    version = publish_policy(policy_file, policy)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ack = read_json(ack_path(policy_file))
        if ack and ack.get("version") == version:
            return ack
        await asyncio.sleep(0.02)
    return {"ok": False, "timeout": True,
            "error": f"the engine did not pick up policy {policy.name!r} within {timeout_s:.0f} s; "
                     "is the vLLM engine alive (see its log)?"}


def telemetry_stats(path: Path, tail_bytes: int = STATS_TAIL_BYTES) -> dict:
    """A small summary of the last steps in the telemetry JSONL: steps per variant, last step."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            start = max(0, fh.tell() - tail_bytes)
            fh.seek(start)
            lines = fh.read().decode("utf-8", "replace").splitlines()[1 if start else 0:]  # first may be cut
    except OSError:
        return {"steps": 0}
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    if not rows:
        return {"steps": 0}
    return {"steps": len(rows), "last_step": rows[-1].get("step"), "policy_name": rows[-1].get("policy_name"),
            "by_variant": dict(Counter(r.get("variant") for r in rows)),
            "mean_duration_ms": round(sum(r.get("duration_ms") or 0 for r in rows) / len(rows), 4)}


# ---------------------------------------------------------------- the HTTP side (vllm serve --middleware)


class PolicyMiddleware:
    """ASGI middleware adding `/flexquant/policy` (GET, PUT) and `/flexquant/stats` to `vllm serve`."""

    def __init__(self, app) -> None:
        self.app = app
        self._lock = asyncio.Lock()  # one PUT at a time: each waits for its own acknowledgement

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith("/flexquant/"):
            await self.app(scope, receive, send)
            return
        status, body = await self._handle(scope["method"], path, receive)
        payload = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

    async def _handle(self, method: str, path: str, receive) -> tuple[int, dict]:
        policy_file = os.environ.get(ENV_POLICY_FILE)
        if not policy_file:
            return 503, {"error": f"{ENV_POLICY_FILE} is not set: this server was not started by FlexQuant"}
        ckpt = os.environ.get(ENV_CHECKPOINT)
        if path == "/flexquant/stats" and method == "GET":
            tel = os.environ.get(ENV_TELEMETRY)
            return 200, telemetry_stats(Path(tel)) if tel else {"steps": 0, "telemetry": "off"}
        if path != "/flexquant/policy":
            return 404, {"error": f"no FlexQuant endpoint {path}"}
        if method == "GET":
            current = read_json(Path(policy_file)) or {}
            return 200, {"policy": current.get("policy"), "ack": read_json(ack_path(Path(policy_file)))}
        if method != "PUT":
            return 405, {"error": f"{method} is not allowed on /flexquant/policy; use GET or PUT"}
        raw = await _read_body(receive)
        if raw is None:
            return 413, {"error": f"policy body is larger than {MAX_BODY_BYTES} bytes"}
        try:
            body = json.loads(raw or b"null")
            data = body.get("policy") if isinstance(body, dict) else None
            policy = validate_policy_for(data, Path(ckpt) if ckpt else None)
        except (ValueError, PolicyError) as exc:  # JSONDecodeError is a ValueError
            return 400, {"error": str(exc)}
        async with self._lock:
            ack = await apply_policy(Path(policy_file), policy)
        if ack.get("ok"):
            return 200, {"applied_at_step": ack.get("applied_at_step"), "policy_name": policy.name}
        return (504 if ack.get("timeout") else 400), {"error": ack.get("error") or "policy rejected"}


async def _read_body(receive) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)
