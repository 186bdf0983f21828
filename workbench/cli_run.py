"""`flexquant quantize | check | evaluate | serve` (and `bench`, in cli_bench): thin wrappers over the library.

Each body imports its backend lazily (quantization pulls torch + llmcompressor; serving may need
vLLM), so `flexquant --help` and the DB commands stay fast and work without those parts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from workbench.cli_common import (
    console,
    fail,
    finish_waited_job,
    human_bytes,
    import_backend,
    print_fields,
    register_kind,
    state,
    wait_for_job,
)
from workbench.cli_jobs import job_summary
from workbench.cli_policy import policy_by_name_or_file
from workbench.quant.recipe import QuantRecipe

_RECIPE_DEFAULTS = QuantRecipe()  # the CLI's defaults are the recipe's, never a second copy


def resolve_checkpoint(ctx: typer.Context, name_or_path: str) -> tuple[Path, str | None]:
    """(folder, registered name or None) for a checkpoint name or a folder inside the allowed roots."""
    from storage.crud import find_checkpoint
    from workbench.paths import resolve_user_path

    st = state(ctx)
    row = find_checkpoint(st.engine(), name=name_or_path)
    if row is not None:
        return Path(row.path), row.name
    if Path(name_or_path).expanduser().exists():
        return resolve_user_path(name_or_path, settings=st.settings, kind="folder"), None
    fail(f"{name_or_path!r} is neither a registered checkpoint nor an existing folder")


def quantize(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Source model name (see `flexquant models list`).")],
    name: Annotated[str, typer.Option("--name", help="Name of the checkpoint to create.")],
    variants: Annotated[str, typer.Option("--variants", help="Comma-separated variants.")] = "w8a8,w4a16",
    smoothquant: Annotated[
        float, typer.Option("--smoothquant", help="SmoothQuant strength (0 disables).")
    ] = 0.8,
    group_size: Annotated[
        int, typer.Option("--group-size", help="W4A16 group size (lowered to fit the model).")
    ] = 128,
    calibration: Annotated[
        Path | None, typer.Option("--calibration", help=".txt or .jsonl calibration text.")
    ] = None,
    num_samples: Annotated[int, typer.Option("--num-samples")] = _RECIPE_DEFAULTS.num_samples,
    seq_len: Annotated[int, typer.Option("--seq-len")] = _RECIPE_DEFAULTS.seq_len,
    title: Annotated[str, typer.Option("--title")] = "",
    wait: Annotated[bool, typer.Option("--wait", help="Show progress until the job ends.")] = False,
) -> None:
    """Queue a quantize job: one merged checkpoint with every requested variant."""
    from jobs import queue
    from workbench.models import get_model
    from workbench.paths import resolve_user_path

    st = state(ctx)
    engine = st.engine()
    source = get_model(engine, model)  # a missing model fails here, before anything is queued
    calibration_path = None
    if calibration is not None:
        calibration_path = str(resolve_user_path(calibration, settings=st.settings, kind="file"))
    recipe = {
        "variants": [v.strip() for v in variants.split(",") if v.strip()],
        "smoothquant_strength": smoothquant,
        "w4a16_group_size": group_size,
        "calibration_path": calibration_path,
        "num_samples": num_samples,
        "seq_len": seq_len,
    }
    register_kind("quantize")
    job = queue.submit(
        engine,
        "quantize",
        {"model": source.name, "checkpoint": name, "recipe": recipe},
        title=title or f"quantize {source.name} -> {name}",
    )
    console.print(job_summary(job))
    if wait:
        finish_waited_job(wait_for_job(engine, job.id))


def check(
    ctx: typer.Context,
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint name or folder.")],
    no_hashes: Annotated[
        bool, typer.Option("--no-hashes", help="Skip the sha256 check of every file.")
    ] = False,
) -> None:
    """Check a checkpoint's config, tensors and manifest; exit 2 listing every problem."""
    check_mod = import_backend("workbench.quant.check", "check")
    folder, _ = resolve_checkpoint(ctx, checkpoint)
    report = check_mod.check_checkpoint(folder, verify_hashes=not no_hashes)
    fields = [
        ("path", str(report.path)),
        ("kind", report.kind),
        ("variants", ", ".join(report.variants) or "-"),
        ("layers", str(report.num_layers or "-")),
        ("files", f"{len(report.files)} ({human_bytes(sum(report.files.values()))})"),
    ]
    fields += [(f"weights {variant}", human_bytes(size)) for variant, size in report.weight_bytes.items()]
    print_fields(fields)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    if not report.ok:
        for problem in report.problems:
            console.print(f"[red]problem:[/red] {escape(problem)}")
        fail(f"checkpoint {folder} has {len(report.problems)} problem(s)")
    console.print("[green]checkpoint ok[/green]")


def evaluate(
    ctx: typer.Context,
    checkpoint: Annotated[str, typer.Argument(help="Registered checkpoint name.")],
    policy: Annotated[
        list[str] | None, typer.Option("--policy", help="Saved policy to score too (repeatable).")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Show progress until the job ends.")] = False,
) -> None:
    """Queue an evaluate job: perplexity/agreement of bf16, every variant and the given policies."""
    policy = policy or []
    from jobs import queue
    from storage.crud import find_checkpoint, find_policy

    engine = state(ctx).engine()
    if find_checkpoint(engine, name=checkpoint) is None:
        fail(f"no checkpoint named {checkpoint!r}; quantize one first (`flexquant quantize`)")
    for name in policy:
        if find_policy(engine, name=name) is None:
            fail(f"no saved policy named {name!r}; save it with `flexquant policy save FILE`")
    register_kind("evaluate")
    job = queue.submit(
        engine,
        "evaluate",
        {"checkpoint": checkpoint, "policies": list(policy)},
        title=f"evaluate {checkpoint}",
    )
    console.print(job_summary(job))
    if wait:
        finish_waited_job(wait_for_job(engine, job.id))


def serve(
    ctx: typer.Context,
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint name or folder.")],
    policy: Annotated[
        str | None, typer.Option("--policy", help="Saved policy name or file (default: the checkpoint's).")
    ] = None,
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    runtime: Annotated[str, typer.Option("--runtime", help="auto, cpu or vllm.")] = "auto",
    gpu_memory_utilization: Annotated[float, typer.Option("--gpu-memory-utilization")] = 0.85,
    tensor_parallel_size: Annotated[int, typer.Option("--tensor-parallel-size", min=1)] = 1,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for the server to be healthy.")
    ] = 600,
    prefill_graphs: Annotated[
        bool,
        typer.Option(
            "--prefill-graphs",
            help="vLLM: prefill and mixed steps in CUDA graphs too (faster, steadier TTFT; ~25 s more "
            "start-up and ~1.3 GiB per variant for an 8B model).",
        ),
    ] = False,
) -> None:
    """Serve a checkpoint (vLLM on a GPU, else the CPU reference) until Ctrl-C."""
    serve_mod = import_backend("workbench.runtime.serve", "serve")
    from workbench.ckpt_format import read_flexquant_config
    from workbench.policy import DEFAULT_POLICY, policy_from_dict
    from workbench.runtime.serve_config import ServeConfig
    from workbench.runtime.vllm_launch import graph_compilation

    st = state(ctx)
    folder, _ = resolve_checkpoint(ctx, checkpoint)
    if policy is not None:
        chosen = policy_by_name_or_file(ctx, policy)
    else:
        default = read_flexquant_config(folder).get("policy")
        chosen = policy_from_dict(default) if default else DEFAULT_POLICY
    cfg = ServeConfig(
        checkpoint=folder,
        policy=chosen,
        port=port,
        host=host,
        runtime=runtime,
        gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel_size=tensor_parallel_size,
        compilation_config=graph_compilation(True) if prefill_graphs else None,
    )
    handle = serve_mod.start_server(cfg, engine=st.engine(), settings=st.settings)
    try:
        console.print(f"starting server (log: {escape(str(handle.log_path))}) ...")
        handle.wait_healthy(timeout)
        console.print(
            f"[green]serving {escape(str(folder))}[/green] at {handle.base_url} with policy "
            f"{escape(chosen.name)} (run {handle.run_id}); Ctrl-C stops it"
        )
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        console.print("stopping ...")
    finally:
        handle.stop()


def register(app: typer.Typer) -> None:
    """Add these commands to the root app."""
    from workbench.cli_bench import bench

    for fn in (quantize, check, evaluate, serve, bench):
        app.command(fn.__name__)(fn)
