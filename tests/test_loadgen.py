"""Load generator and chat client against a small in-process OpenAI-style streaming endpoint.

The endpoint streams a known number of tokens with known sleeps, so what the client measures can be
checked against what happened (lower bounds only: sleeps guarantee "at least", never "at most").
The real runtime is exercised by the browser tests and by `test_against_cpu_server` below.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from workbench import chat_client, loadgen
from workbench.policy import fixed_policy

FIRST_DELAY_S = 0.05
TOKEN_DELAY_S = 0.02


class FakeOpenAI:
    """Records the bodies it receives and the policies put to it."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.policies: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.completed = 0

    def app(self) -> Starlette:
        async def models(_: Request):
            return JSONResponse({"data": [{"id": "tiny"}]})

        async def chat(request: Request):
            body = await request.json()
            self.bodies.append(body)
            if body["messages"][-1]["content"] == "fail":
                return JSONResponse({"error": {"message": "prompt refused"}}, status_code=400)

            async def events():
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    await asyncio.sleep(FIRST_DELAY_S)
                    for i in range(body["max_tokens"]):
                        if i:
                            await asyncio.sleep(TOKEN_DELAY_S)
                        chunk = {
                            "id": f"req-{len(self.bodies)}",
                            "choices": [{"delta": {"content": f"t{i} "}}],
                        }
                        yield f"data: {json.dumps(chunk)}\n\n"
                    usage = {"id": "x", "choices": [], "usage": {"completion_tokens": body["max_tokens"]}}
                    yield f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n"
                    self.completed += 1
                finally:
                    self.in_flight -= 1

            return StreamingResponse(events(), media_type="text/event-stream")

        async def policy(request: Request):
            self.policies.append((await request.json())["policy"]["name"])
            return JSONResponse({"applied_at_step": len(self.policies)})

        return Starlette(
            routes=[
                Route("/v1/models", models),
                Route("/v1/chat/completions", chat, methods=["POST"]),
                Route("/flexquant/policy", policy, methods=["PUT"]),
            ]
        )


@pytest.fixture
def server():
    fake = FakeOpenAI()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(fake.app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.01)
    yield fake, f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(5)


def test_stream_chat_measures_ttft_and_tpot(server):
    fake, url = server
    updates = list(chat_client.stream_chat(url, [{"role": "user", "content": "hi"}], max_tokens=5))
    assert [u.delta for u in updates[:-1]] == ["t0 ", "t1 ", "t2 ", "t3 ", "t4 "]
    final = updates[-1]
    assert final.done and final.text == "t0 t1 t2 t3 t4 "
    assert final.stats.output_tokens == 5 and final.stats.request_id == "req-1"
    assert final.stats.ttft_ms >= FIRST_DELAY_S * 1000
    assert final.stats.tpot_ms >= TOKEN_DELAY_S * 1000
    assert fake.bodies[0]["model"] == "tiny" and fake.bodies[0]["stream"] is True


def test_closing_the_stream_aborts_the_request(server):
    """What the chat Stop button relies on: closing the generator closes the HTTP stream."""
    fake, url = server
    stream = chat_client.stream_chat(url, [{"role": "user", "content": "hi"}], max_tokens=500)
    assert next(stream).delta == "t0 "
    stream.close()
    deadline = time.monotonic() + 10
    while fake.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake.in_flight == 0 and fake.completed == 0  # the server saw the client go, mid-reply


def test_stream_chat_errors_are_readable(server):
    _, url = server
    with pytest.raises(chat_client.ChatError, match="HTTP 400: prompt refused"):
        chat_client.chat_once(url, [{"role": "user", "content": "fail"}], model="tiny")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(chat_client.ChatError, match="cannot reach the model server"):
        chat_client.chat_once(dead, [{"role": "user", "content": "x"}], model="tiny")


def test_run_load_counts_concurrency_and_prompts(server):
    fake, url = server
    spec = loadgen.LoadSpec(
        rate=0, prompt_words=10, max_tokens=4, concurrency=2, num_requests=6, duration_s=30
    )
    report = loadgen.run_load(url, spec)
    df = report.frame()
    assert len(df) == 6 and df["error"].isna().all()
    assert (df["output_tokens"] == 4).all()
    assert (df["ttft_ms"] >= FIRST_DELAY_S * 1000).all()
    assert fake.max_in_flight == 2  # never more than `concurrency` in flight
    prompts = [b["messages"][0]["content"] for b in fake.bodies]
    assert len(set(prompts)) == 6 and all(len(p.split()) == 13 for p in prompts)  # 3 words of instruction
    assert all(b["ignore_eos"] is True and b["max_tokens"] == 4 for b in fake.bodies)
    summary = report.summary()
    assert summary["requests"] == 6 and summary["errors"] == 0
    assert summary["ttft_p50_ms"] >= FIRST_DELAY_S * 1000 and summary["tpot_p90_ms"] >= TOKEN_DELAY_S * 1000


def test_run_load_stops_at_time_limit(server):
    _, url = server
    # 200 tokens take >= 4 s each; the 1 s limit must cut them off and report why.
    spec = loadgen.LoadSpec(rate=0, max_tokens=200, concurrency=2, num_requests=2, duration_s=1.0)
    report = loadgen.run_load(url, spec)
    # had they not been cut off they would have finished without an error
    assert all("time limit" in r.error for r in report.results)


def test_run_load_same_seed_same_prompts_at_any_rate(server):
    fake, url = server
    spec = loadgen.LoadSpec(rate=50, prompt_words=5, max_tokens=1, num_requests=3, seed=7)
    loadgen.run_load(url, spec)
    loadgen.run_load(url, loadgen.LoadSpec(**{**spec.__dict__, "rate": 0}))
    prompts = [b["messages"][0]["content"] for b in fake.bodies]
    # requests in flight together may reach the server in any order
    assert sorted(prompts[:3]) == sorted(prompts[3:]) and len(set(prompts[:3])) == 3


def test_loopback_only():
    loadgen.check_loopback("http://127.0.0.1:8000")
    loadgen.check_loopback("http://localhost:8000")
    loadgen.check_loopback("http://[::1]:8000")
    for url in ("http://10.0.0.5:8000", "http://example.com", "http://0.0.0.0:8000"):
        with pytest.raises(ValueError, match="loopback"):
            loadgen.check_loopback(url)


def test_spec_validation():
    with pytest.raises(ValueError, match="concurrency"):
        loadgen.LoadSpec(concurrency=0)
    with pytest.raises(ValueError, match="rate"):
        loadgen.LoadSpec(rate=-1)


def test_compare_policies_applies_each_policy_before_its_runs(server):
    fake, url = server
    spec = loadgen.LoadSpec(prompt_words=4, max_tokens=2, num_requests=2, concurrency=2)
    df = loadgen.compare_policies(url, [fixed_policy("w8a8"), fixed_policy("w4a16")], [0.0, 20.0], spec)
    assert fake.policies == ["all-w8a8", "all-w4a16"]
    assert list(df["policy"]) == ["all-w8a8", "all-w8a8", "all-w4a16", "all-w4a16"]
    assert list(df["rate"]) == [0.0, 20.0, 0.0, 20.0]
    assert (df["requests"] == 2).all() and df["tpot_p50_ms"].notna().all()
    with pytest.raises(ValueError, match="two policies"):
        loadgen.compare_policies(url, [fixed_policy("w8a8")], [1.0], spec)
