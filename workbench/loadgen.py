"""A small load generator for the runtime's OpenAI endpoint: Poisson arrivals, bounded in count and time.

Loopback only: it exists to drive the local runtime for the Live and Compare tabs, not to load-test
other hosts. Each request streams (httpx) and is timed client-side (TTFT, TPOT, tokens) by
`workbench.chat_client.StreamTimer`. `compare_policies` runs one workload under several policies on
one server, applying each with PUT /flexquant/policy before its runs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

import httpx
import pandas as pd

from workbench.bench.client import run_sync
from workbench.chat_client import ChatError, astream_chat, chat_body, list_models, put_policy
from workbench.policy import Policy

__all__ = [
    "LoadSpec",
    "RequestResult",
    "LoadReport",
    "check_loopback",
    "make_prompt",
    "run_load",
    "compare_policies",
]

log = logging.getLogger(__name__)

# Plain words for synthetic prompts; about one token each for Llama-style tokenizers.
WORDS = (
    "the model reads a long report about weather markets rivers music history science cities food "
    "travel energy water light stone garden winter summer engine policy batch token memory layer "
    "quiet bright early late simple careful open small large green north south story answer"
).split()


@dataclass(frozen=True)
class LoadSpec:
    """One workload. `rate` is the mean arrival rate in requests/s (0: send as fast as `concurrency`
    allows); the run stops after `num_requests` requests or `duration_s` seconds, whichever is first."""

    rate: float = 1.0
    prompt_words: int = 64
    max_tokens: int = 32
    concurrency: int = 4
    num_requests: int = 16
    duration_s: float = 60.0
    seed: int = 0
    model: str | None = None
    # Ask the server to generate exactly max_tokens so policies are compared on equal work; vLLM and
    # the CPU reference both accept this sampling extension.
    ignore_eos: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.rate >= 0, "rate must be >= 0 requests/s"),
            (1 <= self.prompt_words <= 8192, "prompt length must be 1..8192 words"),
            (1 <= self.max_tokens <= 4096, "output length must be 1..4096 tokens"),
            (1 <= self.concurrency <= 256, "concurrency must be 1..256"),
            (1 <= self.num_requests <= 10_000, "request count must be 1..10000"),
            (0 < self.duration_s <= 3600, "duration must be 0..3600 s"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"load spec: {message}")


@dataclass
class RequestResult:
    index: int
    sent_s: float
    request_id: str = ""
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    latency_ms: float | None = None
    output_tokens: int = 0
    error: str | None = None


@dataclass
class LoadReport:
    spec: LoadSpec
    results: list[RequestResult] = field(default_factory=list)
    wall_s: float = 0.0

    def frame(self) -> pd.DataFrame:
        """One row per request (see `RequestResult`)."""
        return pd.DataFrame(
            [asdict(r) for r in self.results], columns=list(RequestResult.__dataclass_fields__)
        )

    def summary(self) -> dict:
        """Counts, TTFT/TPOT p50/p90/p99 over successful requests, and output throughput."""
        df = self.frame()
        ok = df[df["error"].isna()]
        errors = df["error"].dropna()
        out = {
            "requests": len(df),
            "errors": len(errors),
            "wall_s": round(self.wall_s, 3),
            # the most frequent error, so a failing workload says why (e.g. prompt longer than the context)
            "top_error": errors.value_counts().index[0] if len(errors) else None,
            "output_tok_per_s": round(ok["output_tokens"].sum() / self.wall_s, 3) if self.wall_s else 0.0,
        }
        for metric in ("ttft_ms", "tpot_ms"):
            values = ok[metric].dropna()
            for q in (50, 90, 99):
                out[f"{metric[:4]}_p{q}_ms"] = float(values.quantile(q / 100)) if len(values) else None
        return out


def check_loopback(base_url: str) -> None:
    """Raise ValueError unless `base_url` points at this machine (127.0.0.0/8, ::1, localhost)."""
    host = urlparse(base_url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(
        f"the load generator only targets this machine; {base_url!r} is not a loopback address "
        "(use http://127.0.0.1:PORT of the runtime started in the Runtime tab)"
    )


def make_prompt(rng: random.Random, words: int) -> str:
    # Each request gets different words: identical prompts would hit the server's prefix cache
    # and make TTFT look better than any real workload.
    return "Continue this text: " + " ".join(rng.choice(WORDS) for _ in range(words))


async def _one(client: httpx.AsyncClient, base_url: str, body: dict, result: RequestResult) -> None:
    started = time.perf_counter()
    try:
        async for update in astream_chat(client, base_url, body):
            if update.done:
                s = update.stats
                result.request_id, result.ttft_ms, result.tpot_ms = s.request_id, s.ttft_ms, s.tpot_ms
                result.output_tokens = s.output_tokens
        result.latency_ms = (time.perf_counter() - started) * 1000
    except (ChatError, httpx.HTTPError) as exc:
        result.error = str(exc) or type(exc).__name__
    except asyncio.CancelledError:
        result.error = "stopped: the run reached its time limit or was stopped"
        raise


async def _run(base_url: str, spec: LoadSpec, model: str, stop: threading.Event | None) -> LoadReport:
    # Separate streams: the prompts depend only on the seed, not on the rate, so every load level
    # and every policy sees the same prompts.
    prompt_rng, arrival_rng = random.Random(spec.seed), random.Random(spec.seed + 1)
    report = LoadReport(spec)
    gate = asyncio.Semaphore(spec.concurrency)
    t0 = time.perf_counter()
    deadline = t0 + spec.duration_s
    extra = {"ignore_eos": True} if spec.ignore_eos else None
    tasks: list[asyncio.Task] = []

    async def send(result: RequestResult, body: dict) -> None:
        async with gate:
            await _one(client, base_url, body, result)

    limits = httpx.Limits(max_connections=spec.concurrency + 1)
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(spec.duration_s, connect=5.0), limits=limits
    ) as client:
        next_at = t0
        for i in range(spec.num_requests):
            if spec.rate > 0:
                next_at += arrival_rng.expovariate(spec.rate)  # Poisson arrivals
            wait = next_at - time.perf_counter()
            if next_at >= deadline or (stop is not None and stop.is_set()):
                break
            while wait > 0 and not (stop is not None and stop.is_set()):
                await asyncio.sleep(min(wait, 0.2))
                wait = next_at - time.perf_counter()
            body = chat_body(
                [{"role": "user", "content": make_prompt(prompt_rng, spec.prompt_words)}],
                model=model,
                max_tokens=spec.max_tokens,
                extra=extra,
            )
            result = RequestResult(index=i, sent_s=time.perf_counter() - t0)
            report.results.append(result)
            tasks.append(asyncio.create_task(send(result, body)))
        while tasks and not all(t.done() for t in tasks):
            if time.perf_counter() >= deadline or (stop is not None and stop.is_set()):
                for t in tasks:
                    t.cancel()
                break
            await asyncio.sleep(0.05)
        await asyncio.gather(*tasks, return_exceptions=True)
    report.wall_s = time.perf_counter() - t0
    return report


def run_load(base_url: str, spec: LoadSpec, *, stop: threading.Event | None = None) -> LoadReport:
    """Run `spec` against the loopback server at `base_url` and return every request's timings.

    Requests still running at `duration_s` (or when `stop` is set) are cancelled and reported with
    an error, so the call never takes much longer than `duration_s`."""
    check_loopback(base_url)
    model = spec.model or list_models(base_url)[0]
    report = run_sync(lambda: _run(base_url.rstrip("/"), spec, model, stop))
    log.info("load run at %.2f req/s: %s", spec.rate, report.summary())
    return report


def compare_policies(
    base_url: str,
    policies: list[Policy],
    rates: list[float],
    spec: LoadSpec,
    *,
    on_progress: Callable[[str, float], None] | None = None,
    stop: threading.Event | None = None,
) -> pd.DataFrame:
    """Run `spec` at every rate under every policy on one server (applying each policy live first).

    Returns one row per (policy, rate) with the `LoadReport.summary()` columns, ready for
    `workbench.plots_compare.compare_figure`. The same seed gives every policy the same prompts."""
    if len(policies) < 2:
        raise ValueError("pick at least two policies to compare")
    if not rates:
        raise ValueError("give at least one load (requests/s)")
    rows = []
    total, done = len(policies) * len(rates), 0
    for policy in policies:
        put_policy(base_url, policy)
        for rate in rates:
            if stop is not None and stop.is_set():
                return pd.DataFrame(rows)
            if on_progress:
                on_progress(f"{policy.name} at {rate:g} req/s", done / total)
            report = run_load(base_url, LoadSpec(**{**asdict(spec), "rate": rate}), stop=stop)
            rows.append({"policy": policy.name, "rate": rate, **report.summary()})
            done += 1
    if on_progress:
        on_progress("done", 1.0)
    return pd.DataFrame(rows)
