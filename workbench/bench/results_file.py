"""The results document of a bench run (schema "flexquant-bench/1", docs/benchmarks/README.md):
what a new one records about the machine and the workload, its atomic rewrite, and picking up an
earlier one to resume (`flexquant bench --resume`).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from workbench.bench.engines import BenchSpec, Target
from workbench.bench.report import SCHEMA
from workbench.bench.weights import H100_HBM_TB_S, bf16_bytes, hbm_tb_s
from workbench.settings import Settings

__all__ = ["bf16_reference", "machine_info", "resumed", "spec_dict", "write_json"]


def write_json(path: Path, data: dict) -> None:
    """Replace `path` with `data` atomically: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def machine_info(settings: Settings, spec: BenchSpec) -> dict:
    """Python, host, GPU and driver, vLLM and torch versions, and the HBM bandwidth of the roofline."""
    info = {"python": platform.python_version(), "host": platform.node(), "hbm_tb_s": None}
    if spec.runtime == "vllm":
        # nvidia-smi and package metadata: a probe of the serving python would import torch + vLLM (~15 s)
        try:
            smi = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                .stdout.strip()
                .splitlines()
            )
        except (OSError, subprocess.TimeoutExpired):
            smi = []
        try:
            vllm_version = importlib.metadata.version("vllm")
        except importlib.metadata.PackageNotFoundError:
            vllm_version = None
        info.update(
            gpu=smi[0].split(",")[0].strip() if smi else None,
            gpu_driver=smi[0].split(",")[-1].strip() if smi else None,
            vllm=vllm_version,
            serving_python=str(settings.vllm_python or sys.executable),
        )
        info["hbm_tb_s"] = hbm_tb_s(info) or H100_HBM_TB_S
    else:
        info.update(gpu=None, vllm=None, runtime="cpu reference")
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    return info


def bf16_reference(targets: list[Target]) -> dict | None:
    """BF16 weight size of the merged checkpoint's model, for the memory goal when no BF16 engine runs."""
    merged = next((t for t in targets if t.kind == "flex"), None)
    try:
        gib = bf16_bytes(merged.checkpoint) / 2**30 if merged else None
    except (ValueError, OSError):
        return None
    return (
        {"weight_gib": round(gib, 3), "source": "2 bytes per parameter of the merged checkpoint"}
        if gib
        else None
    )


def spec_dict(spec: BenchSpec) -> dict:
    """The workload as JSON (tuples as lists): stored in the results and compared on resume."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in spec.__dict__.items()}


def resumed(out_json: Path, spec: BenchSpec, command: str) -> tuple[dict, set[str]]:
    """The earlier results at `out_json` with only its fully measured targets, and their labels."""
    old = json.loads(out_json.read_text())
    if old.get("schema") != SCHEMA or old.get("spec") != spec_dict(spec):
        raise ValueError(
            f"{out_json} holds results of another workload (spec {old.get('spec')}); resume only "
            "with the same settings, or choose another --out folder"
        )
    per_label = len(spec.batches) + len(spec.rates)
    rows = old["sweep"] + old["online"]
    done = {
        t["label"]
        for t in old["targets"]
        if t.get("error") is None
        and t.get("engine_start_s") is not None
        and sum(r["target"] == t["label"] for r in rows) == per_label * max(1, len(t.get("policies") or []))
    }
    old["targets"] = [t for t in old["targets"] if t["label"] in done]
    old["sweep"] = [r for r in old["sweep"] if r["target"] in done]
    old["online"] = [r for r in old["online"] if r["target"] in done]
    old["errors"] = []
    old.setdefault("resumed", []).append({"at": time.time(), "command": command, "kept": sorted(done)})
    return old, done
