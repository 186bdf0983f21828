"""Load: the CPU reference runtime serves 16 concurrent streaming chats for 2 minutes on loopback.

Closed loop: 16 simulated users, each sending its next streamed chat as soon as the last one ended,
until the time (FLEXQUANT_LOAD_SECONDS, default 120) or the request budget runs out. The server's RSS
is sampled every second; growth between the first and the last stretch of the run must stay bounded.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time

import httpx
import psutil
import pytest
from sqlmodel import Session, func, select

from storage.db import open_db
from storage.models import RequestRecord
from workbench.chat_client import astream_chat, chat_body

USERS = 16
SECONDS = float(os.environ.get("FLEXQUANT_LOAD_SECONDS", "120"))
MAX_REQUESTS = 20_000  # the count bound; the time bound normally ends the run first
MAX_TOKENS = 24
WARMUP_S = 10.0  # RSS before this is start-up (allocator pools, first batches), not growth
# RSS of the last stretch may exceed the first by this much: a leak of ~1 KiB per request over
# thousands of requests shows, allocator noise does not.
RSS_GROWTH_LIMIT = 1.20
RSS_GROWTH_SLACK = 32 * 2**20


def _tree_rss(pid: int) -> int:
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        return sum(p.memory_info().rss for p in procs)
    except psutil.Error:
        return 0


async def _user(base_url: str, model: str, user: int, deadline: float, budget: list[int], out: dict) -> None:
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0, connect=10.0)) as client:
        turn = 0
        while time.monotonic() < deadline and budget[0] > 0:
            budget[0] -= 1
            turn += 1
            messages = [{"role": "user", "content": f"user {user} turn {turn}: tell me about the weather"}]
            body = chat_body(
                messages, model=model, max_tokens=MAX_TOKENS, temperature=0.7, extra={"seed": turn}
            )
            try:
                updates = [update async for update in astream_chat(client, base_url, body)]
                stats = updates[-1].stats  # the final update (done=True) carries the reply's timings
                if stats.ttft_ms is None:  # sampling (temperature 0.7) picked EOS first: an empty reply
                    out["empty"] += 1
                else:
                    out["ttft_ms"].append(stats.ttft_ms)
                out["tokens"] += stats.output_tokens
                out["done"] += 1
            except Exception as exc:  # noqa: BLE001 - every error is a finding
                out["errors"].append(f"{type(exc).__name__}: {exc}")


async def _load(base_url: str, model: str) -> dict:
    out = {"ttft_ms": [], "tokens": 0, "done": 0, "empty": 0, "errors": []}
    deadline = time.monotonic() + SECONDS
    budget = [MAX_REQUESTS]
    await asyncio.gather(*(_user(base_url, model, u, deadline, budget, out) for u in range(USERS)))
    return out


def _recorded(engine, run_id: int, *, expect: int, timeout: float = 30.0) -> int:
    """RequestRecord rows of the run once the server's batched telemetry caught up (or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        with Session(engine) as s:
            count = s.exec(
                select(func.count()).select_from(RequestRecord).where(RequestRecord.run_id == run_id)
            ).one()
        if count >= expect or time.monotonic() > deadline:
            return count
        time.sleep(0.5)


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


@pytest.mark.slow
def test_cpu_runtime_serves_16_concurrent_streams(cpu_server, reliability):
    handle = cpu_server.handle
    engine = open_db(cpu_server.data / "workbench.db")
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    try:
        model = httpx.get(f"{handle.base_url}/v1/models", timeout=30).json()["data"][0]["id"]
        before = _recorded(engine, handle.run_id, expect=0)  # rows of earlier tests on this server
        t0 = time.monotonic()

        def sample() -> None:
            while not stop.wait(1.0):
                samples.append((time.monotonic() - t0, _tree_rss(handle.pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out = asyncio.run(_load(handle.base_url, model))
        elapsed = time.monotonic() - t0
        stop.set()
        sampler.join(timeout=5)
        alive = handle.is_running() and httpx.get(f"{handle.base_url}/health", timeout=30).status_code == 200
        recorded = _recorded(engine, handle.run_id, expect=before + out["done"]) - before
    finally:
        stop.set()
        engine.dispose()

    steady = [rss for t, rss in samples if t >= WARMUP_S]
    window = max(1, len(steady) // 5)
    first, last = statistics.median(steady[:window]), statistics.median(steady[-window:])
    ttft = out["ttft_ms"]
    with reliability.case(
        "load",
        f"{USERS} concurrent streaming chats for {SECONDS:.0f} s (loopback)",
        fault=f"{USERS} closed-loop users",
    ) as case:
        case.detail = (
            f"{out['done']} chats, {len(out['errors'])} errors, server alive: {alive}; RSS "
            f"{first / 2**20:.0f} -> {last / 2**20:.0f} MiB (first vs last fifth after warm-up); "
            f"{recorded} RequestRecord rows"
        )
        assert out["errors"] == [], out["errors"][:5]
        assert alive and out["done"] >= USERS
        assert last <= first * RSS_GROWTH_LIMIT + RSS_GROWTH_SLACK, (first, last)
        assert recorded == out["done"]  # telemetry kept up: one row per served chat
    for name, value in [
        ("duration / users", f"{elapsed:.0f} s / {USERS}"),
        ("chats completed / errors", f"{out['done']} / {len(out['errors'])}"),
        ("empty replies (EOS sampled first: no TTFT)", out["empty"]),
        ("chats per second", f"{out['done'] / elapsed:.1f}"),
        ("output tokens per second (all users)", f"{out['tokens'] / elapsed:.0f}"),
        (
            "TTFT p50 / p90 / p99",
            f"{_pct(ttft, 0.5):.0f} / {_pct(ttft, 0.9):.0f} / {_pct(ttft, 0.99):.0f} ms",
        ),
        ("TTFT max", f"{max(ttft):.0f} ms"),
        (
            "server RSS after warm-up: first fifth / last fifth / peak",
            f"{first / 2**20:.0f} / {last / 2**20:.0f} / {max(r for _, r in samples) / 2**20:.0f} MiB",
        ),
        ("RSS growth (last / first fifth)", f"{last / first:.3f} (limit {RSS_GROWTH_LIMIT} + 32 MiB)"),
        ("RSS samples", len(samples)),
    ]:
        reliability.figure("load", name, value)
