"""Store a bench results dict (schema "flexquant-bench/1") as a `Run` row, e.g. one measured elsewhere.

A benchmark run on a GPU machine writes `results.json` (and a `Run` row in *that* machine's DB);
`import_results` puts such a file into this workbench's DB, so the Compare tab can show it. The row
looks like one `run_bench` writes: kind "bench", `result_json` = the whole dict.
"""

from __future__ import annotations

import json
import time

from sqlalchemy.engine import Engine
from sqlmodel import Session

from storage.models import Run
from workbench.bench.report import check_results

__all__ = ["import_results", "run_status"]


def run_status(results: dict) -> str:
    """The `Run.status` of a results dict: "ended" for a complete run (as `run_bench` writes it), else
    the file's own status ("interrupted", "failed")."""
    return "ended" if results.get("status") == "complete" else str(results.get("status"))


def _runtime(results: dict) -> str:
    # Older files have no runtime in their spec; a run with a GPU named in `machine` was a vLLM run.
    runtime = results["spec"].get("runtime")
    if runtime:
        return str(runtime)
    return "vllm" if results["machine"].get("gpu") else "cpu"


def _labels(results: dict) -> list[str]:
    """Measurement labels in the order they were measured, each once."""
    seen: dict[str, None] = {}
    for row in results["sweep"] + results["online"]:
        seen.setdefault(row["label"], None)
    return list(seen) or [t["label"] for t in results["targets"]]


def import_results(engine: Engine, results: dict, source: str) -> int:
    """Insert `results` (checked with `report.check_results`; ResultsError if malformed) as an ended
    `Run` of kind "bench" and return its id. `source` (the file it came from) is kept in config_json."""
    check_results(results, source=source)
    started = results.get("started_at")
    ended = results.get("ended_at")
    targets = results["targets"]
    run = Run(
        kind="bench",
        runtime=_runtime(results),
        checkpoint_path=str(targets[-1].get("checkpoint") or "") if targets else "",
        policy_name=",".join(_labels(results)),
        status=run_status(results),
        config_json=json.dumps(
            {"spec": results["spec"], "imported_from": source, "gpu": results["machine"].get("gpu")}
        ),
        result_json=json.dumps(results),
        started_at=float(started) if isinstance(started, int | float) else time.time(),
        ended_at=float(ended) if isinstance(ended, int | float) else time.time(),
    )
    with Session(engine) as session:
        session.add(run)
        session.commit()
        return int(run.id)
