"""Stock W8A8 and FlexQuant side by side on one GPU, measured in alternation (workbench/bench/paired.py).

Part 1, goal 1 at small batch: both engines are started once (each with --gpu-memory of the card);
then every cycle sends one closed prefill burst (max_tokens 1) of each batch to each condition, in a
rotated order: `w8a8` (stock), `flex` (FlexQuant under the first --policy) and `flex-live` (the same
engine while this process copies its step telemetry into the DB every 0.5 s, as `flexquant bench`
did up to run 11). Each burst also reads vLLM's /metrics before and after: the engine's own
prefill time per request (scheduled -> first token) beside the client's wall time.
Part 2, goal 3 at one online rate: the same Poisson window on FlexQuant under each --policy (switched
live) and on stock W8A8, and from FlexQuant's step telemetry how each window's time divides into
prefill-carrying and decode-only steps (`paired.step_split`, `paired.decode_saving`).
Part 3, goals 1 and 3 per rate (--online-pairs N): N pairs of short Poisson windows per --pair-rates
rate, one window on each engine in a rotated order with the same arrivals and prompts, judged on the
median pair (`paired.online_pair_summary`). Runs 12-15 in docs/benchmarks/README.md.

    python scripts/gpu/paired_engines.py --w8a8 /tmp/fq/llama3-8b-w8a8 --merged /tmp/fq/llama3-8b-merged \
        --policy scripts/gpu/policies/tuned-h100.yaml --policy scripts/gpu/policies/w8a8-only.yaml \
        --cycles-until 420 --out /tmp/fqpair
(scripts/gpu/paired_engines.sh wraps it for the device machine.)
"""
# ruff: noqa: T201  (a script: printing is its output)

from __future__ import annotations

import argparse
import threading
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import httpx

from storage.db import open_db
from workbench import ckpt_format as fmt
from workbench.bench import client, measure, paired, results_file
from workbench.bench.engines import (
    BenchSpec,
    Target,
    baseline_target,
    engine_config,
    hinted_kernel,
    weight_memory_gib,
)
from workbench.bench.paired_report import report_lines
from workbench.cli_policy import read_policy_file
from workbench.runtime.serve import ServerHandle, start_server
from workbench.settings import Settings

T0 = time.monotonic()


def say(what: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f} s] {what}", flush=True)


def scrape(handle: ServerHandle) -> dict:
    return paired.parse_histograms(httpx.get(f"{handle.base_url}/metrics", timeout=10).text)


def burst_row(handle: ServerHandle, prompts: client.PromptSource, batch: int) -> dict:
    """One prefill burst: the client's wall time and the engine's per-request means from /metrics."""
    before = scrape(handle)
    wall = client.burst(handle.base_url, "bench", prompts, batch, 1)
    after, deadline = scrape(handle), time.monotonic() + 2.0
    # the API server records a finished request's histograms after it answered: wait for all of them
    while "prefill_s" in before and after.get("prefill_s", (0, 0))[1] - before["prefill_s"][1] < batch:
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
        after = scrape(handle)
    return {"batch": batch, "wall_s": wall, **paired.engine_means(before, after)}


class LiveImport:
    """While open, copy the engine's new step telemetry into the DB every 0.5 s (the live importer)."""

    def __init__(self, handle: ServerHandle):
        self.handle, self.stop = handle, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            self.handle.import_new_steps()

    def __enter__(self) -> LiveImport:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def online_pairs(handles: dict[str, ServerHandle], spec: BenchSpec, vocab: int, args, record: dict,
                 save) -> None:
    """Part 3: per rate, pairs of short Poisson windows, one on each engine in a rotated order, with
    the same arrivals and prompts within a pair (its seed): goal 1's TTFT and goal 3's TPOT at that
    rate judged on pairs, as the prefill cycles judge batches."""
    record["online_pairs"] = []
    short = replace(spec, online_duration_s=args.pair_window)
    for rate in (float(r) for r in args.pair_rates.split(",")):
        for pair, order in enumerate(paired.cycle_orders(["w8a8", "flex"], args.online_pairs)):
            for condition in order:
                prompts = client.PromptSource(vocab, spec.prompt_len, seed=1000 + pair)
                row = measure.online_row(handles[condition], replace(short, seed=1000 + pair), prompts, rate)
                record["online_pairs"].append(paired.online_pair_row(pair, condition, rate, row))
            save()
        say(f"online pairs at {rate:g} req/s done")
    record["online_pair_summary"] = paired.online_pair_summary(record["online_pairs"], "w8a8")
    save()


def start(target: Target, spec: BenchSpec, port: int, db, settings, record: dict) -> ServerHandle:
    policy = target.policies[0] if target.policies else None
    say(f"starting {target.label} on port {port}")
    t = time.monotonic()
    cfg = engine_config(target, spec, policy, port)
    handle = start_server(cfg, engine=db, settings=settings, live_steps=False)
    handle.wait_healthy(900)
    record["engines"][target.label] = {
        "start_s": round(time.monotonic() - t, 1), "port": port, "log": str(handle.log_path),
        "weight_memory_gib": weight_memory_gib(handle.log_tail(4_000_000)),
    }
    say(f"{target.label} healthy after {time.monotonic() - t:.0f} s")
    return handle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--w8a8", type=Path, required=True)
    ap.add_argument("--merged", type=Path, required=True)
    ap.add_argument("--policy", type=Path, action="append", required=True)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--cycles-until", type=float, default=420, help="start no cycle after this many s")
    ap.add_argument("--max-cycles", type=int, default=200)
    ap.add_argument("--rate", type=float, default=24.0)
    ap.add_argument("--online-duration", type=float, default=20.0)
    ap.add_argument("--online-output-len", type=int, default=128)
    ap.add_argument("--skip-online", action="store_true", help="no long online windows (part 2)")
    ap.add_argument("--online-pairs", type=int, default=0,
                    help="part 3: this many pairs of short online windows per --pair-rates rate")
    ap.add_argument("--pair-rates", default="12,24")
    ap.add_argument("--pair-window", type=float, default=5.0, help="seconds of arrivals per short window")
    ap.add_argument("--gpu-memory", type=float, default=0.42)
    ap.add_argument("--runtime", default="vllm", help="vllm, or cpu (a check of this script)")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    settings = Settings(data_dir=args.out / "data")
    db = open_db(settings.db_path)
    policies = [read_policy_file(p)[0] for p in args.policy]
    batches = tuple(int(b) for b in args.batches.split(","))
    spec = BenchSpec(prompt_len=args.prompt_len, output_len=16, batches=batches, rates=(args.rate,),
                     online_output_len=args.online_output_len, online_duration_s=args.online_duration,
                     gpu_memory_utilization=args.gpu_memory, runtime=args.runtime, port=args.port)
    if args.runtime == "cpu":  # no stock engine on the CPU runtime: the merged checkpoint pinned to W8A8
        from workbench.policy import fixed_policy

        stock = Target(label="w8a8", kind="flex", checkpoint=args.merged, variant="w8a8",
                       policies=[fixed_policy("w8a8")])
    else:
        stock = baseline_target("w8a8", args.w8a8)
    flex = Target(label="flex", kind="flex", checkpoint=args.merged, policies=policies,
                  kernel=hinted_kernel(policies))
    out_json = args.out / "paired.json"
    record = {"schema": "flexquant-paired/1", "started_at": time.time(), "argv": vars(args) | {
        "w8a8": str(args.w8a8), "merged": str(args.merged), "policy": [str(p) for p in args.policy],
        "out": str(args.out)}, "machine": results_file.machine_info(settings, spec),
        "spec": results_file.spec_dict(spec), "engines": {}, "bursts": [], "online": [], "status": "running"}
    save = lambda: results_file.write_json(out_json, record)  # noqa: E731
    handles: dict[str, ServerHandle] = {}
    try:
        handles["w8a8"] = start(stock, spec, args.port, db, settings, record)
        handles["flex"] = start(flex, spec, args.port + 1, db, settings, record)
        vocab = int(fmt.read_config(args.merged)["vocab_size"])
        for handle in handles.values():
            measure.warm_up(handle, spec, client.PromptSource(vocab, spec.prompt_len, seed=99))
        save()
        conditions = ["w8a8", "flex", "flex-live"]
        prompts = {c: client.PromptSource(vocab, spec.prompt_len, seed=0) for c in conditions}
        for cycle, order in enumerate(paired.cycle_orders(conditions, args.max_cycles)):
            if time.monotonic() - T0 > args.cycles_until:
                break
            for condition in order:
                handle = handles[condition.removesuffix("-live")]
                with LiveImport(handle) if condition.endswith("-live") else nullcontext():
                    for batch in batches:
                        record["bursts"].append({"cycle": cycle, "condition": condition,
                                                 **burst_row(handle, prompts[condition], batch)})
            if cycle % 10 == 9:
                say(f"cycle {cycle + 1} done")
                save()
        record["summary"] = paired.pair_summary(record["bursts"], baseline="w8a8")
        save()
        if args.online_pairs:
            online_pairs(handles, spec, vocab, args, record, save)
        online_prompts = client.PromptSource(vocab, spec.prompt_len, seed=1)
        windows = [] if args.skip_online else [("flex", p) for p in policies] + [("w8a8", None)]
        for label, policy in windows:
            handle = handles[label]
            if policy is not None:
                handle.set_policy(policy)
            measure.warm_up(handle, spec, online_prompts)
            say(f"online {args.rate:g} req/s on {label}{':' + policy.name if policy else ''}")
            t0 = time.time()
            row = measure.online_row(handle, spec, online_prompts, args.rate)
            record["online"].append({"label": label if policy is None else f"flex:{policy.name}",
                                     "window": [t0, time.time()], **row})
            save()
        record["status"] = "complete"
    except KeyboardInterrupt:
        record["status"] = "interrupted"
    except Exception as exc:  # an engine that fails to start or dies: say so in the record, then raise
        record["status"], record["error"] = "failed", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        for handle in handles.values():
            handle.stop()
        steps = measure.step_rows(handles["flex"]) if "flex" in handles else []
        splits = {o["label"]: paired.step_split(steps, *o["window"]) for o in record["online"]
                  if o["label"].startswith("flex")}
        for label, split in splits.items():
            split["decode_saving"] = paired.decode_saving(split, [s for k, s in splits.items() if k != label])
        record["online_steps"] = splits
        record["ended_at"] = time.time()
        save()
        report(record)


def report(record: dict) -> None:
    print()
    print("\n".join(report_lines(record)))

if __name__ == "__main__":
    main()
