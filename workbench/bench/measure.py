"""One measurement of a running engine: a closed-batch sweep point, an online load, and which
variant computed each engine step (the FlexQuant plugin's telemetry, or the CPU runtime's DB rows).

Rows follow the results schema in docs/benchmarks/README.md; `runner` decides when to take them.
"""

from __future__ import annotations

import json
import statistics
import time

from workbench.bench import client
from workbench.bench.engines import BenchSpec
from workbench.runtime.serve import ServerHandle

__all__ = [
    "median_or_none",
    "online_row",
    "recorded_steps",
    "step_rows",
    "sweep_row",
    "variant_share",
    "warm_up",
]


STEP_FIELDS = ("ts", "variant", "duration_ms", "num_prefill_tokens", "num_decode_reqs")


def step_rows(handle: ServerHandle) -> list[dict]:
    """Every engine step the server recorded, as {STEP_FIELDS}: the vLLM plugin's JSONL telemetry, or
    the CPU runtime's StepRecord rows. Read once per engine, after it stopped."""
    if handle.runtime == "vllm":
        path = handle.steps_file
        if path is None or not path.exists():
            return []  # a stock engine: no FlexQuant telemetry
        steps = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                steps.append({k: rec[k] for k in STEP_FIELDS} | {"ts": float(rec["ts"])})
            except (ValueError, KeyError, TypeError):
                continue
        return steps
    from sqlmodel import Session, select

    from storage.models import StepRecord

    with Session(handle.engine) as s:
        rows = s.exec(select(StepRecord).where(StepRecord.run_id == handle.run_id)).all()
        return [{k: getattr(r, k) for k in STEP_FIELDS} for r in rows]


def recorded_steps(handle: ServerHandle) -> list[tuple[float, str]]:
    """(time, variant) of every recorded engine step (`step_rows`)."""
    return [(s["ts"], str(s["variant"])) for s in step_rows(handle)]


def variant_share(steps: list[tuple[float, str]], t0: float, t1: float) -> dict[str, float]:
    """Share of engine steps per variant between two wall-clock times."""
    counts: dict[str, int] = {}
    for ts, variant in steps:
        if t0 <= ts <= t1:
            counts[variant] = counts.get(variant, 0) + 1
    total = sum(counts.values())
    return {v: round(n / total, 4) for v, n in sorted(counts.items())} if total else {}


def warm_up(handle: ServerHandle, spec: BenchSpec, prompts: client.PromptSource) -> int:
    """Keep the engine busy for `spec.warmup_s` (at least one burst) before a policy is measured, so
    first-request costs and an idle GPU's low clocks (an H100 idles at 345 MHz) stay out of the
    first measurement. Returns the number of bursts sent."""
    batch = min(16, spec.max_batch)
    t_end, bursts = time.monotonic() + spec.warmup_s, 0
    while bursts == 0 or time.monotonic() < t_end:
        client.burst(handle.base_url, "bench", prompts, batch, spec.output_len)
        bursts += 1
    return bursts


def sweep_row(handle: ServerHandle, spec: BenchSpec, prompts: client.PromptSource, batch: int) -> dict:
    """One closed batch of `batch` requests, `repeats` times: medians and every sample."""
    repeats = spec.repeats_small if batch <= 16 else spec.repeats_large
    # Alternate the two kinds of burst so a slow phase of the machine hits both, not one
    prefills, fulls, tpots, bursts = [], [], [], []  # bursts: each streamed request's TTFT, per burst
    for _ in range(repeats):
        prefills.append(client.burst(handle.base_url, "bench", prompts, batch, 1))
        wall, requests = client.burst_streamed(handle.base_url, "bench", prompts, batch, spec.output_len)
        fulls.append(wall)
        bursts.append([r.ttft_ms for r in requests if r.ttft_ms is not None])
        tpots.append(median_or_none([r.tpot_ms for r in requests]))
    prefill, full = statistics.median(prefills), statistics.median(fulls)
    return {
        "batch": batch,
        "prefill_s": prefill,
        "decode_s": full,
        # H100-BASELINE.md's method: decode time per token of the batch, from two wall times
        "tpot_ms": (full - prefill) / (spec.output_len - 1) * 1000,
        # per request, as `vllm bench` reports TPOT: (last token - first token) / (tokens - 1); at
        # large batch with chunked prefill this one still measures decode, the wall method less so
        "ttft_p50_ms": median_or_none([median_or_none(b) for b in bursts]),
        # a burst's median jumps with how many requests its first step caught (run 8: +42 ms at batch
        # 16 for 1 of 16 instead of 2), its mean moves with every request; both: median over repeats
        "ttft_mean_ms": median_or_none([statistics.fmean(b) if b else None for b in bursts]),
        "tpot_req_p50_ms": median_or_none(tpots),
        "repeats": repeats,
        # every sample, so a report can show the spread behind each median
        "prefill_s_samples": prefills,
        "decode_s_samples": fulls,
        "tpot_req_p50_samples": tpots,
        # last minus first TTFT of a burst: near 0 when one step prefilled them all, a prefill step
        # more for each further step the scheduler split the burst over (requests arrive over ms)
        "ttft_spread_ms_samples": [max(b) - min(b) if b else None for b in bursts],
        "ttft_ms_requests": [[round(t, 2) for t in b] for b in bursts],  # per burst, each request's TTFT
        "variant_share": {},
    }


def median_or_none(values: list[float | None]) -> float | None:
    """Median of the known values (a request whose tokens all decode to "" has no streamed timing)."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def online_row(handle: ServerHandle, spec: BenchSpec, prompts: client.PromptSource, rate: float) -> dict:
    requests, wall = client.poisson(
        handle.base_url,
        "bench",
        prompts,
        rate=rate,
        duration_s=spec.online_duration_s,
        max_tokens=spec.online_output_len,
        seed=spec.seed,
    )
    return {"rate": rate, **client.summarize(requests, wall), "variant_share": {}}
