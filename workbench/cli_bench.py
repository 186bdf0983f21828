"""`flexquant bench`: the side-by-side benchmark (engines started here), or a live load on a running server.

With `--checkpoint` and/or `--baseline NAME=DIR` it starts each engine in turn (stock vLLM on the
single-variant exports, then FlexQuant on the merged checkpoint under every `--policy` and the
auto-tuned one) and runs the same closed-batch sweep and Poisson loads on each; results go to
`OUT/results.json`, `OUT/report.html` and a `Run` row. Without them it drives the server at `--url`.
With `--import FILE` it stores a results file measured elsewhere (e.g. on a GPU machine) in this
workbench's DB, where the Compare tab shows it.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from workbench.cli_common import console, fail, import_backend, make_progress, state
from workbench.cli_policy import policy_by_name_or_file


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        fail(f"{what} must be comma-separated whole numbers, e.g. 1,4,16; got {text!r}")


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        fail(f"{what} must be comma-separated numbers, e.g. 2,8,16; got {text!r}")


def bench(
    ctx: typer.Context,
    checkpoint: Annotated[
        Path | None,
        typer.Option("--checkpoint", help="Merged FlexQuant checkpoint to measure under policies."),
    ] = None,
    baseline: Annotated[
        list[str] | None,
        typer.Option(
            "--baseline", help="Stock vLLM baseline NAME=DIR (bf16, w8a8, w4a16-marlin, w4a16-machete)."
        ),
    ] = None,
    policy: Annotated[
        list[str] | None, typer.Option("--policy", help="Saved policy or file (repeatable).")
    ] = None,
    auto_policy: Annotated[
        bool, typer.Option("--auto-policy/--no-auto-policy", help="Tune a policy from the baselines' sweep.")
    ] = True,
    batches: Annotated[str, typer.Option("--batches", help="Closed batch sizes.")] = "1,4,16,64,128,256",
    rates: Annotated[
        str | None,
        typer.Option("--rate", "--rates", help="Poisson arrival rates, requests/s (bench: 2,8,16; live: 1)."),
    ] = None,
    prompt_len: Annotated[int, typer.Option("--prompt-len")] = 1024,
    output_len: Annotated[int, typer.Option("--output-len", help="Tokens per request in the sweep.")] = 64,
    online_output_len: Annotated[int, typer.Option("--online-output-len")] = 128,
    duration: Annotated[float, typer.Option("--duration", help="Seconds of arrivals per rate.")] = 20.0,
    runtime: Annotated[str, typer.Option("--runtime", help="vllm, or cpu (reference runtime).")] = "vllm",
    port: Annotated[int, typer.Option("--port")] = 8100,
    out: Annotated[Path, typer.Option("--out", help="Folder for results.json and report.html.")] = Path(
        "bench-out"
    ),
    repeats: Annotated[
        int, typer.Option("--repeats", help="Runs per closed batch > 16 (median kept; <= 16: 3+).")
    ] = 1,
    control: Annotated[
        bool,
        typer.Option(
            "--control",
            help="Measure the first baseline again after FlexQuant (engine-order control; goals use "
            "the faster of its two measurements).",
        ),
    ] = False,
    warmup: Annotated[
        float, typer.Option("--warmup", help="Seconds of load before each policy is measured.")
    ] = 3.0,
    prefill_graphs: Annotated[
        bool,
        typer.Option(
            "--prefill-graphs/--eager-prefill",
            help="Prefill and mixed steps in vLLM's breakable CUDA graphs in every engine, or op by op "
            "(slower to measure: host launch noise). Decode is in CUDA graphs either way.",
        ),
    ] = True,
    time_budget: Annotated[
        float | None, typer.Option("--time-budget", help="Start no new engine after this many seconds.")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Keep the fully measured targets of OUT/results.json; run the rest."),
    ] = False,
    url: Annotated[
        str, typer.Option("--url", help="Live mode: a running local server.")
    ] = "http://127.0.0.1:8000",
    num_requests: Annotated[int, typer.Option("--requests", help="Live mode: requests per rate.")] = 16,
    concurrency: Annotated[int, typer.Option("--concurrency", help="Live mode.")] = 4,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Live mode: tokens per reply.")] = 32,
    prompt_words: Annotated[int, typer.Option("--prompt-words", help="Live mode: words per prompt.")] = 64,
    import_file: Annotated[
        Path | None,
        typer.Option("--import", help="Store a results.json measured elsewhere in this DB (nothing is run)."),
    ] = None,
) -> None:
    """Benchmark FlexQuant policies against stock single-variant baselines (or load a running server)."""
    if import_file is not None:
        _import(ctx, import_file)
        return
    if checkpoint is None and not baseline:
        live = {
            "rate": 1.0,
            "prompt_words": prompt_words,
            "max_tokens": max_tokens,
            "concurrency": concurrency,
            "num_requests": num_requests,
            "duration_s": duration,
        }
        _live(ctx, url, policy or [], _floats(rates or "1", "--rate"), live, out)
        return
    engines = import_backend("workbench.bench.engines", "bench")
    runner = import_backend("workbench.bench.runner", "bench")
    st = state(ctx)
    try:
        spec = engines.BenchSpec(
            prompt_len=prompt_len,
            output_len=output_len,
            batches=_ints(batches, "--batches"),
            rates=_floats(rates or "2,8,16", "--rate"),
            online_output_len=online_output_len,
            online_duration_s=duration,
            runtime=runtime,
            port=port,
            repeats_small=max(3, repeats),
            repeats_large=repeats,
            warmup_s=warmup,
            prefill_graphs=prefill_graphs,
        )
        targets = []
        for item in baseline or []:
            name, sep, folder = item.partition("=")
            if not sep:
                fail(f"--baseline {item!r}: write NAME=DIR, e.g. w8a8=/data/llama3-8b-w8a8")
            targets.append(engines.baseline_target(name.strip(), Path(folder).expanduser()))
        if control:
            if not targets:
                fail("--control repeats the first --baseline; give at least one --baseline")
            targets.append(engines.control_target(targets[0]))  # run_bench measures it last
        if checkpoint is not None:
            policies = [policy_by_name_or_file(ctx, p) for p in policy or []]
            targets.append(
                engines.Target(
                    label="flex",
                    kind="flex",
                    checkpoint=checkpoint.expanduser(),
                    policies=policies,
                    kernel=engines.hinted_kernel(policies),
                    auto_policy=auto_policy,
                )
            )
            if not policies and not auto_policy:
                fail("nothing to measure on the merged checkpoint: give --policy NAME or keep --auto-policy")
    except ValueError as exc:
        fail(str(exc))
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    with make_progress() as bar:
        task = bar.add_task("bench", total=runner.total_units(spec, targets))

        def on_progress(what: str, done: int) -> None:
            bar.update(task, completed=done, description=escape(what))

        try:
            results = runner.run_bench(
                spec,
                targets,
                out_json=results_path,
                db=st.engine(),
                settings=st.settings,
                command=shlex.join(["flexquant", *sys.argv[1:]]),
                progress=on_progress,
                resume=resume,
                start_targets_within_s=time_budget,
            )
        except KeyboardInterrupt:
            console.print(
                f"[yellow]interrupted[/yellow]; what was measured is in {escape(str(results_path))}"
            )
            raise typer.Exit(130) from None
        bar.update(task, completed=runner.total_units(spec, targets), description="done")
    _finish(results, results_path, out)


def _import(ctx: typer.Context, path: Path) -> None:
    """`--import FILE`: check the file, store it as a bench `Run`, print its headline table and run id."""
    report = import_backend("workbench.bench.report", "bench --import")
    goals = import_backend("workbench.bench.goals", "bench --import")
    store = import_backend("workbench.bench.store", "bench --import")
    path = path.expanduser()
    try:
        results = report.load_results(path)
    except report.ResultsError as exc:
        fail(str(exc))
    run_id = store.import_results(state(ctx).engine(), results, str(path.resolve()))
    try:
        console.print(goals.headline_markdown(results))
    except ValueError as exc:  # e.g. several FlexQuant policies and no auto-tuned one: still stored
        console.print(f"[yellow]no headline table: {escape(str(exc))}[/yellow]")
    console.print(
        f"stored as bench run {run_id} (status {escape(store.run_status(results))}); "
        "see it in the app's Compare tab"
    )


def _finish(results: dict, results_path: Path, out: Path) -> None:
    for error in results["errors"]:
        console.print(f"[red]error:[/red] {escape(error)}")
    try:
        goals = import_backend("workbench.bench.goals", "bench")
        report_html = import_backend("workbench.bench.report_html", "bench")
        report_html.write_report(results, out / "report.html")
        console.print(goals.headline_markdown(results))
        console.print(f"report: {escape(str(out / 'report.html'))}")
    except ImportError as exc:  # plotly/pandas absent in a bare serving env: the JSON is the result
        console.print(
            f"[yellow]no HTML report here ({escape(str(exc))}); run scripts/bench_report.py on the "
            "results file[/yellow]"
        )
    console.print(f"results: {escape(str(results_path))} (status {results['status']})")
    if results["status"] != "complete":
        raise typer.Exit(1)


def _live(
    ctx: typer.Context, url: str, policy: list[str], rates: tuple[float, ...], live: dict, out: Path
) -> None:
    """Drive a running server with a Poisson workload; with 2+ policies compare them live."""
    loadgen = import_backend("workbench.loadgen", "bench")
    import pandas as pd

    try:
        spec = loadgen.LoadSpec(**live)
    except ValueError as exc:
        fail(str(exc))
    url = url.rstrip("/")
    if len(policy) >= 2:
        policies = [policy_by_name_or_file(ctx, p) for p in policy]
        frame = loadgen.compare_policies(
            url, policies, list(rates), spec, on_progress=lambda what, f: console.print(f"{f:4.0%} {what}")
        )
    else:
        if policy:
            from workbench.chat_client import put_policy

            put_policy(url, policy_by_name_or_file(ctx, policy[0]))
        rows = []
        for r in rates:
            result = loadgen.run_load(url, loadgen.LoadSpec(**{**spec.__dict__, "rate": r}))
            rows.append({"policy": policy[0] if policy else "(live)", "rate": r, **result.summary()})
        frame = pd.DataFrame(rows)
    table = Table(*[str(c) for c in frame.columns])
    for record in frame.itertuples(index=False):
        table.add_row(*[f"{v:.2f}" if isinstance(v, float) else str(v) for v in record])
    console.print(table)
    if out.suffix == ".csv":
        tmp = out.with_name(out.name + ".tmp")
        frame.to_csv(tmp, index=False)
        tmp.replace(out)
        console.print(f"wrote {escape(str(out))}")
