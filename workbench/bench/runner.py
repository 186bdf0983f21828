"""Run a benchmark: every target started in turn, the same workload on each, results as they come.

Order: stock baselines first, then FlexQuant (its auto-tuned policy is derived from the baselines'
sweep of this very run, and its int4 kernel with it). For each target: start the engine, read the
weight memory vLLM reports, warm up, then per policy the closed-batch sweep and the online loads.
The results JSON (schema in docs/benchmarks/README.md) is rewritten atomically after every
measurement, so an interrupted or failed run keeps what it measured and says how it ended; a
`Run` row (kind "bench") holds the same dict in the DB.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.engine import Engine

from workbench import ckpt_format as fmt
from workbench.bench import client, measure, results_file
from workbench.bench.engines import BenchSpec, Target, engine_config, weight_memory_gib, with_policies
from workbench.bench.report import SCHEMA
from workbench.bench.weights import decode_bytes_per_step
from workbench.policy import Policy, StepInfo, decide
from workbench.runtime.serve import start_server
from workbench.runtime.telemetry import create_run, end_run
from workbench.settings import Settings

__all__ = ["SCHEMA", "run_bench"]

log = logging.getLogger(__name__)
Progress = Callable[[str, int], None]  # (what is being measured, units done so far)


def total_units(spec: BenchSpec, targets: list[Target]) -> int:
    """Progress units: one per engine start and per measurement (batch or rate) of every policy."""
    per_policy = len(spec.batches) + len(spec.rates)
    return sum(1 + per_policy * len(t.measurement_labels()) for t in targets)


def _target_entry(target: Target, spec: BenchSpec) -> dict:
    entry = {
        "label": target.label,
        "kind": target.kind,
        "checkpoint": str(target.checkpoint),
        "variant": target.variant,
        "kernel": target.kernel,
        "policies": [p.name for p in target.policies],
        "weight_memory_gib": None,
        "weight_bytes_b1": None,
        "engine_start_s": None,
        "run_id": None,
        "error": None,
        "warmup_bursts": [],  # per policy, before its measurements
        "control_of": target.control_of,
    }
    first = target.policies[0] if target.policies else None
    b1_variant = decide(first, StepInfo(0, 1)) if (target.kind == "flex" and first) else target.variant
    try:
        entry["weight_bytes_b1"] = decode_bytes_per_step(target.checkpoint, b1_variant)
    except (ValueError, OSError) as exc:
        log.warning("no per-step weight bytes for %s: %s", target.label, exc)
    return entry


def _measure_target(
    target: Target,
    spec: BenchSpec,
    results: dict,
    *,
    db: Engine,
    settings: Settings,
    save: Callable[[], None],
    progress: Progress,
    done: list[int],
) -> None:
    entry = _target_entry(target, spec)
    results["targets"].append(entry)
    vocab = int(fmt.read_config(target.checkpoint)["vocab_size"])
    first_policy = target.policies[0] if target.policies else None
    progress(f"starting {target.label}", done[0])
    t_start = time.monotonic()
    windows: list[tuple[dict, float, float]] = []  # (row, start, end): steps of each measurement
    # Steps reach the DB at stop. A live copy shares this process, which times the requests, only while
    # FlexQuant runs (stock engines write none); runs 12-14 found no effect beyond +-1.4%, but a
    # comparison should not depend on it (docs/benchmarks/README.md, "Runs 12-14").
    handle = start_server(
        engine_config(target, spec, first_policy, spec.port), engine=db, settings=settings, live_steps=False
    )
    entry["run_id"] = handle.run_id
    try:
        handle.wait_healthy(900)
        entry["engine_start_s"] = round(time.monotonic() - t_start, 1)
        entry["weight_memory_gib"] = weight_memory_gib(handle.log_tail(4_000_000))
        done[0] += 1
        save()
        policies: list[Policy | None] = list(target.policies) if target.kind == "flex" else [None]
        for policy in policies:
            label = target.label if policy is None else f"{target.label}:{policy.name}"
            if policy is not None and policy is not first_policy:
                handle.set_policy(policy)
            prompts = client.PromptSource(vocab, spec.prompt_len, seed=spec.seed)
            entry["warmup_bursts"].append(measure.warm_up(handle, spec, prompts))
            base = {"label": label, "target": target.label, "policy": policy.name if policy else None}
            measurements = [("sweep", f"batch {b}", measure.sweep_row, b) for b in spec.batches]
            measurements += [("online", f"{r:g} req/s", measure.online_row, r) for r in spec.rates]
            for section, what, take, at in measurements:
                progress(f"{label}: {what}", done[0])
                t0 = time.time()
                results[section].append({**base, **take(handle, spec, prompts, at)})
                windows.append((results[section][-1], t0, time.time()))
                done[0] += 1
                save()
    finally:
        handle.stop()
        # After the stop every step is on record (the CPU runtime writes the DB in batches).
        steps = measure.recorded_steps(handle) if windows else []
        for row, t0, t1 in windows:
            row["variant_share"] = measure.variant_share(steps, t0, t1)
            row["window"] = [round(t0, 3), round(t1, 3)]  # wall clock: to find its steps in telemetry
        save()


def _autotune(results: dict, target: Target, db: Engine) -> Target:
    """Replace the flex target's `auto` placeholder by the policy tuned from this run's stock sweep."""
    from workbench.bench.autotune import INT4_KERNELS, save_tuned_policy, tune_policy

    # Baselines: stock engines, or (CPU runtime) the merged checkpoint pinned to one variant.
    baselines = [
        r | {"variant": t["variant"], "kernel": t["kernel"]}
        for r in results["sweep"]
        for t in results["targets"]
        if t["label"] == r["target"] and t["variant"] not in (None, "bf16") and not t.get("control_of")
    ]
    if not baselines:
        raise ValueError(
            "the auto policy is tuned from the baselines' sweep, and no baseline was measured; "
            "add --baseline w8a8=DIR and --baseline w4a16-marlin=DIR (or pinned variants)"
        )
    if target.kernel:  # the given policies fixed the engine's int4 kernel: tune within it
        baselines = [r for r in baselines if r["kernel"] in (None, target.kernel)]
    kernels = (target.kernel,) if target.kernel else INT4_KERNELS
    tuned = tune_policy(baselines, name="auto", int4_kernels=kernels)
    record = save_tuned_policy(db, tuned)
    results["autotune"] = {
        "policy_name": tuned.policy.name,
        "policy_id": record.id,
        "kernel": tuned.kernel,
        "policy_yaml": record.body_yaml,
        "data": tuned.data,
    }
    return with_policies(target, [tuned.policy], tuned.kernel)


def run_bench(
    spec: BenchSpec,
    targets: list[Target],
    *,
    out_json: Path,
    db: Engine,
    settings: Settings,
    command: str = "",
    progress: Progress | None = None,
    resume: bool = False,
    start_targets_within_s: float | None = None,
) -> dict:
    """Measure every target; return the results dict (also at `out_json` and in a `Run` row).

    `resume`: keep the fully measured targets of an earlier run at `out_json` (same spec) and measure
    only the others — a long benchmark split over several sessions of one machine.
    `start_targets_within_s`: start no target after this many seconds; the run then ends
    "interrupted" (resume it later) instead of being killed mid-target by an outer time limit."""
    if not targets:
        raise ValueError("nothing to measure: give a merged checkpoint and/or baselines")
    progress = progress or (lambda what, done: log.info("bench: %s", what))
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    # Baselines first (the auto policy is tuned from their sweep), controls last (the engine order).
    ordered = sorted(targets, key=lambda t: 2 if t.control_of else (0 if t.variant is not None else 1))
    if resume and out_json.exists():
        results, kept = results_file.resumed(out_json, spec, command)
        ordered = [t for t in ordered if t.label not in kept]
        results.update(status="running", ended_at=None)
    else:
        results = {
            "schema": SCHEMA,
            "status": "running",
            "started_at": time.time(),
            "ended_at": None,
            "command": command,
            "machine": results_file.machine_info(settings, spec),
            "spec": results_file.spec_dict(spec),
            "targets": [],
            "sweep": [],
            "online": [],
            "autotune": None,
            "errors": [],
            "bf16_reference": results_file.bf16_reference(targets),
        }
    run_id = create_run(
        db,
        runtime=spec.runtime,
        checkpoint_path=str(targets[-1].checkpoint),
        kind="bench",
        policy_name=",".join(label for t in ordered for label in t.measurement_labels()),
        config={"spec": results["spec"], "out_json": str(out_json), "gpu": results["machine"].get("gpu")},
    )
    results["run_id"] = run_id

    def save() -> None:
        results_file.write_json(out_json, results)

    done = [0]
    save()
    t_begin = time.monotonic()
    try:
        for target in ordered:
            if start_targets_within_s is not None and time.monotonic() - t_begin > start_targets_within_s:
                results["errors"].append(
                    f"time budget of {start_targets_within_s:.0f} s reached before "
                    f"{target.label}; run again with --resume to measure the rest"
                )
                results["status"] = "interrupted"
                break
            try:
                if target.auto_policy:
                    target = _autotune(results, target, db)
                _measure_target(
                    target, spec, results, db=db, settings=settings, save=save, progress=progress, done=done
                )
            except Exception as exc:  # noqa: BLE001 - one target failing must not lose the others
                log.exception("bench target %s failed", target.label)
                results["errors"].append(f"target {target.label}: {exc}")
                if results["targets"] and results["targets"][-1]["label"] == target.label:
                    results["targets"][-1]["error"] = str(exc)
                save()
        if results["status"] != "interrupted":
            results["status"] = "complete" if not results["errors"] else "failed"
    except KeyboardInterrupt:
        results["status"] = "interrupted"
        raise
    finally:
        results["ended_at"] = time.time()
        save()
        end_run(
            db, run_id, status={"complete": "ended"}.get(results["status"], results["status"]), result=results
        )
    return results
