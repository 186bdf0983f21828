"""FlexQuant on vLLM, proven on a GPU: token equality, per-step dispatch, live policy, telemetry cost.

Run on the GPU machine (vLLM 0.26 staged, this package installed with its entry point):
    python scripts/gpu/flexquant_proof.py all --work /tmp/fq --out $OUT
Each engine runs in its own subprocess (a clean GPU per engine). Results: $OUT/summary.json, the
flex engine's telemetry JSONL, and per-engine logs. See docs/gpu-runs/ for recorded runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from workbench.policy import StepInfo, decide, fixed_policy, policy_from_dict  # noqa: E402
from workbench.runtime import vllm_plugin  # noqa: E402

CAPTURE_SIZES = [1, 2, 4, 8, 16]
COMPILATION = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY", "cudagraph_capture_sizes": CAPTURE_SIZES}
# PROOF_PREFILL_GRAPHS=1: prefill and mixed steps (up to the 256-token chunk) in breakable graphs too,
# in the stock engines as in the FlexQuant one
PREFILL_GRAPHS = os.environ.get("PROOF_PREFILL_GRAPHS") == "1"
if PREFILL_GRAPHS:
    COMPILATION = {"mode": 0, "cudagraph_mode": "FULL_AND_PIECEWISE",
                   "cudagraph_capture_sizes": [*CAPTURE_SIZES, 32, 64, 128, 256]}
# Decode batches of 1..3 -> w4a16; 3 is deliberately NOT a capture size (batch 3 replays size 4).
SWITCHING = {"name": "switch-at-3", "prefill": "w8a8",
             "decode": [{"max_batch": 3, "variant": "w4a16"}, {"variant": "w8a8"}]}
PINNED = {"name": "pinned-0-9", "prefill": "w8a8", "decode": [{"variant": "w4a16"}],
          "layers": [{"first": 0, "last": 9, "variant": "w8a8"}]}
# Which int4 kernel the flex engine uses (per variant) and which stock runs it is compared with.
FLEX_KERNELS = os.environ.get("PROOF_FLEX_KERNELS", "w4a16=marlin")
STOCK_RUNS = os.environ.get("PROOF_STOCK_RUNS", "w8a8,w4a16-marlin,w4a16").split(",")
BASE_ENV = {"VLLM_PLUGINS": "flexquant", "VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_USE_V2_MODEL_RUNNER": "1",
            "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "VLLM_DISABLE_COMPILE_CACHE": "1", "VLLM_USE_BREAKABLE_CUDAGRAPH": "1" if PREFILL_GRAPHS else "0"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: T201 - script output


# ---------------------------------------------------------------- checkpoints


def make_checkpoints(work: Path, shapes: str) -> dict[str, Path]:
    from workbench.quant.shapes import SHAPES, write_wordlevel_tokenizer
    from workbench.quant.synthetic import make_synthetic_checkpoint

    tok = write_wordlevel_tokenizer(work / f"tok-{shapes}", SHAPES[shapes].vocab)
    out = {}
    for name, variants, layout in (("merged", ("w8a8", "w4a16"), "merged"), ("w8a8", ("w8a8",), "single"),
                                   ("w4a16", ("w4a16",), "single")):
        path = work / f"{shapes}-{name}"
        if not path.exists():
            started = time.time()
            make_synthetic_checkpoint(path, shapes=shapes, variants=variants, layout=layout, tokenizer_dir=tok)
            log(f"checkpoint {path.name} written in {time.time() - started:.1f} s")
        out[name] = path
    return out


# ---------------------------------------------------------------- engine jobs (run in a subprocess)


def prompts(lens: list[int], seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(2, 4000) for _ in range(n)]} for n in lens]


def make_llm(ckpt: str):
    from vllm import LLM

    return LLM(model=ckpt, max_model_len=1024, max_num_seqs=16, max_num_batched_tokens=256,
               gpu_memory_utilization=0.3, enable_prefix_caching=False, seed=0, compilation_config=COMPILATION)


def generate(llm, lens: list[int], max_tokens: int | list[int], seed: int) -> list[list[int]]:
    from vllm import SamplingParams

    caps = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(lens)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, detokenize=False) for m in caps]
    outs = llm.generate(prompts(lens, seed), params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def tpot_ms(llm, n_tokens: int = 128, repeats: int = 3) -> list[float]:
    """Batch-1 decode time per token: (wall(n) - wall(1)) / (n - 1), `repeats` times."""
    out = []
    for r in range(repeats):
        t0 = time.perf_counter()
        generate(llm, [32], 1, 100 + r)
        t1 = time.perf_counter()
        generate(llm, [32], n_tokens, 100 + r)
        t2 = time.perf_counter()
        out.append(round(((t2 - t1) - (t1 - t0)) / (n_tokens - 1) * 1000, 4))
    return out


TOKEN_WORKLOADS = {"b1": ([24], 48, 1), "b8": ([5, 17, 33, 9, 64, 12, 40, 21], 32, 2),
                   "chunked": ([300, 12, 20, 8], 24, 3)}


def job_stock(ckpt: str, out: str) -> None:
    llm = make_llm(ckpt)
    res = {"tokens": {k: generate(llm, *w) for k, w in TOKEN_WORKLOADS.items()}, "tpot_ms": tpot_ms(llm)}
    # Same engine, same requests again: is the kernel itself deterministic?
    res["tokens_again"] = {k: generate(llm, *w) for k, w in TOKEN_WORKLOADS.items()}
    Path(out).write_text(json.dumps(res))


def publish_and_wait(policy: dict, timeout: float = 10.0) -> dict:
    pf = Path(os.environ[vllm_plugin.ENV_POLICY_FILE])
    started = time.perf_counter()
    version = vllm_plugin.publish_policy(pf, policy_from_dict(policy))
    while time.perf_counter() - started < timeout:
        ack = vllm_plugin.read_json(vllm_plugin.ack_path(pf))
        if ack and ack.get("version") == version:
            return {**ack, "ack_s": round(time.perf_counter() - started, 4)}
        time.sleep(0.01)
    raise TimeoutError(f"no ack for policy {policy['name']}")


def job_flex(ckpt: str, out: str) -> None:
    tel = Path(os.environ[vllm_plugin.ENV_TELEMETRY])
    res: dict = {"phases": {}}
    llm = make_llm(ckpt)
    res["phases"]["all-w8a8"] = {"tokens": {k: generate(llm, *w) for k, w in TOKEN_WORKLOADS.items()},
                                 "tpot_ms": tpot_ms(llm)}
    # Telemetry cost, same engine, interleaved A/B blocks (pause file read by the telemetry thread).
    pause = Path(str(tel) + ".pause")
    cost = {"on": [], "off": []}
    for i in range(10):
        for state in (("on", "off") if i % 2 == 0 else ("off", "on")):  # ABBA: cancels slow drift
            pause.unlink(missing_ok=True) if state == "on" else pause.touch()
            time.sleep(0.25)
            cost[state] += tpot_ms(llm, 256, 1)
    pause.unlink(missing_ok=True)
    time.sleep(0.3)
    res["telemetry_cost_tpot_ms"] = cost
    for name, policy in (("all-w4a16", fixed_policy("w4a16").model_dump()), ("switch-at-3", SWITCHING)):
        ack = publish_and_wait(policy)
        phase = {"ack": ack, "tokens": {k: generate(llm, *w) for k, w in TOKEN_WORKLOADS.items()}}
        if name == "all-w4a16":
            phase["tokens_again"] = {k: generate(llm, *w) for k, w in TOKEN_WORKLOADS.items()}
        if name == "switch-at-3":  # a shrinking batch: decode sizes 6..1, plus chunked-prefill mixed steps
            phase["tokens"]["shrinking"] = generate(llm, [8, 300, 9, 10, 11, 12], [6, 12, 18, 24, 30, 36], 4)
        else:
            phase["tpot_ms"] = tpot_ms(llm)
        res["phases"][name] = phase
    t0 = time.perf_counter()
    ack = publish_and_wait(PINNED)
    res["phases"]["pinned-0-9"] = {"ack": ack, "tokens": {"b1": generate(llm, *TOKEN_WORKLOADS["b1"])},
                                   "publish_to_done_s": round(time.perf_counter() - t0, 3)}
    time.sleep(0.5)  # let the telemetry thread flush
    Path(out).write_text(json.dumps(res))


# ---------------------------------------------------------------- checks (parent process)


def check_telemetry(lines: list[dict], res: dict) -> dict:
    """Every step's variant against `decide`, and the kernels that actually ran against the variant."""
    policies = {"all-w8a8": fixed_policy("w8a8"), "all-w4a16": fixed_policy("w4a16"),
                "switch-at-3": policy_from_dict(SWITCHING), "pinned-0-9": policy_from_dict(PINNED)}
    report: dict = {"steps": len(lines), "by_policy": {}, "mismatches": []}
    for row in lines:
        pol = policies.get(row["policy_name"])
        want = decide(pol, StepInfo(row["num_prefill_tokens"], row["num_decode_reqs"])) if pol else None
        want_exec = {want} | ({r.variant for r in pol.layers} if pol and pol.layers else set())
        kind = "mixed" if row["num_prefill_tokens"] and row["num_decode_reqs"] else (
            "prefill" if row["num_prefill_tokens"] else "decode")
        key = f"{kind}/{row['variant']}/{'graph' if row['cudagraph'] else 'eager'}"
        report["by_policy"].setdefault(row["policy_name"], {}).setdefault(key, 0)
        report["by_policy"][row["policy_name"]][key] += 1
        if row["variant"] != want or set(row["executed"]) != want_exec:
            report["mismatches"].append(row)
    for name in ("all-w4a16", "switch-at-3", "pinned-0-9"):
        ack = res["phases"][name]["ack"]
        first = next((r["step"] for r in lines if r["policy_name"] == name), None)
        report[f"{name}_applied_at_step"] = ack["applied_at_step"]
        report[f"{name}_first_telemetry_step"] = first
    return report


def same(a: dict, b: dict) -> dict:
    """Per workload: True, or where the first prompt's tokens first differ."""
    out = {}
    for k in a:
        if a[k] == b.get(k):
            out[k] = True
            continue
        diffs = [(i, next((j for j, (x, y) in enumerate(zip(p, q, strict=False)) if x != y), None))
                 for i, (p, q) in enumerate(zip(a[k], b.get(k) or [], strict=False)) if p != q]
        out[k] = {"prompts_differing": len(diffs), "first": diffs[:3]}
    return out


def run_job(kind: str, ckpt: Path, out: Path, logf: Path, extra_env: dict | None = None) -> dict | None:
    if os.environ.get("PROOF_REUSE") and out.exists():
        return json.loads(out.read_text())
    env = {**os.environ, **BASE_ENV, **(extra_env or {})}
    started = time.time()
    with open(logf, "w") as fh:
        proc = subprocess.run([sys.executable, __file__, kind, str(ckpt), str(out)], env=env, stdout=fh,
                              stderr=subprocess.STDOUT, timeout=420)
    log(f"{kind} on {ckpt.name}: rc={proc.returncode} in {time.time() - started:.0f} s")
    if proc.returncode != 0:
        print(logf.read_text()[-4000:])  # noqa: T201
        return None
    return json.loads(out.read_text())


def checkpoints_ready(work: Path, timeout_s: float = 300) -> dict[str, Path]:
    """Wait for a background `ckpts` run (started while vLLM was being staged), else write them now."""
    done = work / "ckpts.done"
    started = time.time()
    while not done.exists() and (work / "ckpts.running").exists() and time.time() - started < timeout_s:
        time.sleep(1)
    if not done.exists():
        log("no finished background checkpoints; writing them now")
    ckpts = make_checkpoints(work, "smollm2-135m")
    log(f"checkpoints ready after waiting {time.time() - started:.0f} s")
    return ckpts


def main_ckpts(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / "ckpts.running").touch()
    try:
        make_checkpoints(work, "smollm2-135m")
        (work / "ckpts.done").touch()
    finally:
        (work / "ckpts.running").unlink(missing_ok=True)


def main_all(work: Path, outdir: Path, skip_serve: bool) -> None:
    work.mkdir(parents=True, exist_ok=True)
    outdir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "compilation": COMPILATION}
    try:
        import torch
        import vllm

        summary["versions"] = {"vllm": vllm.__version__, "torch": torch.__version__,
                               "gpu": torch.cuda.get_device_name(0)}
        ckpts = checkpoints_ready(work)
        marlin = {"VLLM_DISABLED_KERNELS": "MacheteLinearKernel"}
        stock = {v: run_job("job-stock", ckpts[v.split("-")[0]], work / f"stock-{v}.json", outdir / f"stock-{v}.log",
                            marlin if v.endswith("marlin") else None)
                 for v in STOCK_RUNS}
        summary["stock_self_equal"] = {v: same(r["tokens"], r["tokens_again"]) for v, r in stock.items() if r}
        tel = work / "flex-steps.jsonl"
        tel.unlink(missing_ok=True)
        flex = run_job("job-flex", ckpts["merged"], work / "flex.json", outdir / "flex.log",
                       {vllm_plugin.ENV_TELEMETRY: str(tel), vllm_plugin.ENV_POLICY_FILE: str(work / "policy.json"),
                        vllm_plugin.ENV_POLICY_JSON: json.dumps(fixed_policy("w8a8").model_dump()),
                        vllm_plugin.ENV_KERNELS: FLEX_KERNELS})
        if flex:
            eq = {}
            for run, r in stock.items():
                if r and (run == "w8a8" or run.endswith("marlin") == ("marlin" in FLEX_KERNELS)):
                    phase = flex["phases"]["all-" + run.split("-")[0]]
                    eq[run] = same(phase["tokens"], r["tokens"])
                    summary[f"tpot_ms_stock_{run}"] = r["tpot_ms"]
                    summary[f"tpot_ms_flex_{run}"] = phase["tpot_ms"]
            summary["token_equality_vs_stock"] = eq
            summary["flex_w4a16_self_equal"] = same(flex["phases"]["all-w4a16"]["tokens"],
                                                    flex["phases"]["all-w4a16"]["tokens_again"])
            meta = vllm_plugin.read_json(Path(str(tel) + ".meta.json"))
            summary["telemetry_self_timed"] = meta
            lines = [json.loads(x) for x in tel.read_text().splitlines() if x.strip()]
            (outdir / "flex-steps.jsonl").write_text(tel.read_text())
            summary["telemetry"] = check_telemetry(lines, flex)
            cost = flex["telemetry_cost_tpot_ms"]
            on, off = statistics.median(cost["on"]), statistics.median(cost["off"])
            summary["telemetry_cost"] = {**cost, "median_on": on, "median_off": off,
                                         "overhead_pct_of_median": round((on - off) / off * 100, 2)}
            summary["pinned_publish_to_done_s"] = flex["phases"]["pinned-0-9"]["publish_to_done_s"]
            summary["flex_log_flexquant"] = [x for x in (outdir / "flex.log").read_text().splitlines()
                                             if "FlexQuant" in x or "LinearKernel" in x][:20]
        if not skip_serve:
            from scripts.gpu.serve_check import serve_check

            summary["serve"] = serve_check(ckpts["merged"], work, outdir)
    except Exception:
        summary["error"] = traceback.format_exc()
    (outdir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "telemetry"}, indent=1))  # noqa: T201
    print(json.dumps({k: v for k, v in summary.get("telemetry", {}).items() if k != "mismatches"}, indent=1))  # noqa: T201
    print("mismatches:", summary.get("telemetry", {}).get("mismatches", [])[:5])  # noqa: T201


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["all", "ckpts", "job-stock", "job-flex"])
    ap.add_argument("a", nargs="?")
    ap.add_argument("b", nargs="?")
    ap.add_argument("--work", default="/tmp/fq")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/fq-out"))
    ap.add_argument("--skip-serve", action="store_true")
    args = ap.parse_args()
    if args.cmd == "all":
        main_all(Path(args.work), Path(args.out), args.skip_serve)
    elif args.cmd == "ckpts":
        main_ckpts(Path(args.work))
    elif args.cmd == "job-stock":
        job_stock(args.a, args.b)
    else:
        job_flex(args.a, args.b)
