"""Drive one OpenAI-compatible endpoint the way `vllm bench` does: closed batches and Poisson arrivals.

Prompts are random token ids (sent as a list of ints to /v1/completions), so every server sees the
same number of prompt tokens whatever its tokenizer, and every request gets fresh ids so a prefix
cache can never make a prefill look free. `ignore_eos` makes every request produce exactly
`max_tokens`: policies and variants are compared on equal work.

- `burst(...)`: B requests submitted at once, not streamed; the wall time until the last one
  returns (what `LLM.generate` on a batch measures; ../shared/docs/H100-BASELINE.md's method).
- `burst_streamed(...)`: the same batch streamed, so each request's own TTFT and TPOT are known too
  (at large batch, with chunked prefill, the wall-time difference method mostly measures prefill).
- `poisson(...)`: streamed requests arriving at `rate` req/s for `duration_s`; client-side TTFT,
  TPOT, inter-token latencies and throughput.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import httpx

__all__ = [
    "PromptSource",
    "StreamedRequest",
    "burst",
    "burst_streamed",
    "percentiles",
    "poisson",
    "run_sync",
    "summarize",
]

REQUEST_TIMEOUT_S = 600.0
T = TypeVar("T")


class PromptSource:
    """Fresh random token-id prompts of a fixed length; the same seed gives the same sequence."""

    def __init__(self, vocab_size: int, prompt_len: int, seed: int = 0):
        if vocab_size < 100:
            raise ValueError(f"vocab size {vocab_size} is too small for random prompts")
        self.vocab_size, self.prompt_len = vocab_size, prompt_len
        self._rng = random.Random(seed)

    def next(self) -> list[int]:
        # Stay clear of the lowest ids, where tokenizers keep their special tokens.
        return [self._rng.randrange(10, self.vocab_size - 1) for _ in range(self.prompt_len)]


def run_sync(make_coroutine: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to the end from synchronous code, also where this thread already runs an
    event loop (a UI callback, Playwright's sync API): then in a fresh thread with its own loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coroutine())
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make_coroutine())).result()


def _body(model: str, prompt: list[int], max_tokens: int, stream: bool) -> dict:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def _post(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    resp = await client.post(f"{url}/v1/completions", json=body)
    if resp.status_code != 200:
        raise RuntimeError(f"HTTP {resp.status_code} from {url}/v1/completions: {resp.text[:300]}")
    return resp.json()


def _client(connections: int, keepalive: int | None = None) -> httpx.AsyncClient:
    """An HTTP client that opens every request of a load at once (httpx would queue beyond 100)."""
    limits = httpx.Limits(
        max_connections=connections + 4,
        max_keepalive_connections=connections + 4 if keepalive is None else keepalive,
    )
    return httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits)


def burst(url: str, model: str, prompts: PromptSource, batch: int, max_tokens: int) -> float:
    """Wall seconds for `batch` requests sent together to finish (each exactly `max_tokens` long)."""

    async def run() -> float:
        bodies = [_body(model, prompts.next(), max_tokens, stream=False) for _ in range(batch)]
        async with _client(batch) as client:
            t0 = time.perf_counter()
            replies = await asyncio.gather(*(_post(client, url, b) for b in bodies))
            wall = time.perf_counter() - t0
        _check_lengths([r["usage"]["completion_tokens"] for r in replies], max_tokens)
        return wall

    return run_sync(run)


def burst_streamed(
    url: str, model: str, prompts: PromptSource, batch: int, max_tokens: int
) -> tuple[float, list[StreamedRequest]]:
    """`burst`, streamed: the wall seconds and each request's timeline; RuntimeError on a failed or
    short request (a closed batch is only comparable when every request did the same work)."""

    async def run() -> tuple[float, list[StreamedRequest]]:
        bodies = [_body(model, prompts.next(), max_tokens, stream=True) for _ in range(batch)]
        async with _client(batch) as client:
            t0 = time.perf_counter()
            requests = [StreamedRequest(sent_at=t0) for _ in bodies]
            await asyncio.gather(
                *(_stream_one(client, url, b, r) for b, r in zip(bodies, requests, strict=True))
            )
            wall = time.perf_counter() - t0
        failed = [r.error for r in requests if r.error is not None]
        if failed:
            raise RuntimeError(f"{len(failed)} of {batch} streamed requests failed, e.g. {failed[0]}")
        _check_lengths([r.output_tokens for r in requests], max_tokens)
        return wall, requests

    return run_sync(run)


def _check_lengths(lengths: list[int], max_tokens: int) -> None:
    short = [n for n in lengths if n != max_tokens]
    if short:
        raise RuntimeError(
            f"the server stopped {len(short)} of {len(lengths)} requests early ({short[:3]} tokens "
            f"instead of {max_tokens}); it must honour ignore_eos"
        )


@dataclass
class StreamedRequest:
    """Client-side timeline of one streamed completion."""

    sent_at: float
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None

    @property
    def ttft_ms(self) -> float | None:
        return (self.chunk_times[0] - self.sent_at) * 1000 if self.chunk_times else None

    @property
    def tpot_ms(self) -> float | None:
        if self.output_tokens < 2 or len(self.chunk_times) < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) * 1000 / (self.output_tokens - 1)

    @property
    def itls_ms(self) -> list[float]:
        t = self.chunk_times
        return [(b - a) * 1000 for a, b in zip(t, t[1:], strict=False)]


async def _stream_one(client: httpx.AsyncClient, url: str, body: dict, req: StreamedRequest) -> None:
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    raise RuntimeError(str(chunk["error"])[:200])
                if any(c.get("text") for c in chunk.get("choices") or []):
                    req.chunk_times.append(time.perf_counter())
                usage = chunk.get("usage") or {}
                if usage.get("completion_tokens") is not None:
                    req.output_tokens = int(usage["completion_tokens"])
        req.output_tokens = req.output_tokens or len(req.chunk_times)
    except (httpx.HTTPError, RuntimeError, ValueError) as exc:
        req.error = str(exc) or type(exc).__name__


def poisson(
    url: str,
    model: str,
    prompts: PromptSource,
    *,
    rate: float,
    duration_s: float,
    max_tokens: int,
    seed: int = 0,
) -> tuple[list[StreamedRequest], float]:
    """Requests arriving as a Poisson process for `duration_s`; returns them and the wall time until the
    last one finished. Arrival times depend only on `seed` and `rate`: every target sees the same load."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError(f"rate ({rate}) and duration ({duration_s}) must be > 0")
    rng = random.Random(seed)
    arrivals, t = [], rng.expovariate(rate)
    while t < duration_s:
        arrivals.append(t)
        t += rng.expovariate(rate)

    async def run() -> tuple[list[StreamedRequest], float]:
        async with _client(len(arrivals), keepalive=64) as client:
            t0 = time.perf_counter()
            requests, tasks = [], []
            for at in arrivals:
                body = _body(model, prompts.next(), max_tokens, stream=True)
                delay = t0 + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                req = StreamedRequest(sent_at=time.perf_counter())
                requests.append(req)
                tasks.append(asyncio.create_task(_stream_one(client, url, body, req)))
            await asyncio.gather(*tasks)
            return requests, time.perf_counter() - t0

    return run_sync(run)


def percentiles(values: list[float]) -> dict[str, float | None]:
    """mean, p50, p90, p99 (linear interpolation, like numpy's default); None for no values."""
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    xs = sorted(values)

    def q(p: float) -> float:
        pos = (len(xs) - 1) * p
        lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {"mean": sum(xs) / len(xs), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}


def summarize(requests: list[StreamedRequest], wall_s: float) -> dict:
    """The online row's numbers (see the results schema in docs/benchmarks/README.md)."""
    ok = [r for r in requests if r.error is None]
    errors = [r.error for r in requests if r.error is not None]
    return {
        "requests": len(requests),
        "completed": len(ok),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "duration_s": wall_s,
        "ttft_ms": percentiles([r.ttft_ms for r in ok if r.ttft_ms is not None]),
        "tpot_ms": percentiles([r.tpot_ms for r in ok if r.tpot_ms is not None]),
        "itl_ms": percentiles([x for r in ok for x in r.itls_ms]),
        "output_throughput_tok_s": sum(r.output_tokens for r in ok) / wall_s if wall_s else None,
        "request_throughput": len(ok) / wall_s if wall_s else None,
    }
