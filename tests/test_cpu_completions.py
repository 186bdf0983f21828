"""`POST /v1/completions` and `ignore_eos` on the CPU server: a real server process on the tiny
checkpoint, spoken to over real HTTP the way vLLM's benchmark drives it (token-id prompts, streamed)."""

from __future__ import annotations

import json
import string

import httpx
import pytest
from test_serve import PD, free_port, rows, wait_for
from transformers import AutoTokenizer

from storage.db import open_db
from storage.models import RequestRecord
from workbench.runtime.serve import start_server
from workbench.runtime.serve_config import ServeConfig
from workbench.settings import Settings

VOCAB = 272  # the tiny checkpoint's embedding rows (test_flexmodel.build_tiny_checkpoints)
CONTEXT = 256


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from test_flexmodel import build_tiny_checkpoints

    ckpt, _ = build_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))
    settings = Settings(data_dir=tmp_path_factory.mktemp("data"))
    db = open_db(settings.db_path)
    handle = start_server(ServeConfig(checkpoint=ckpt, policy=PD, port=free_port(), cpu_threads=1),
                          engine=db, settings=settings)
    try:
        handle.wait_healthy(120)
        yield handle, db, AutoTokenizer.from_pretrained(str(ckpt))
    finally:
        handle.stop()
        db.dispose()


def post(handle, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{handle.base_url}{path}", json=body, timeout=60)


def served_model(handle) -> str:
    return httpx.get(f"{handle.base_url}/v1/models").json()["data"][0]["id"]


def stream(handle, path: str, body: dict) -> list[dict]:
    """The parsed `data:` chunks of a streamed request; checks the stream ends with [DONE]."""
    with httpx.stream("POST", f"{handle.base_url}{path}", json={**body, "stream": True}, timeout=60) as resp:
        assert resp.status_code == 200, resp.read()
        payloads = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    return [json.loads(p) for p in payloads[:-1]]


@pytest.fixture(scope="module")
def eos_case(server):
    """(messages, prompt ids, text, n): a one-character chat that the greedy model ends with EOS after
    n tokens of `text`, the case where ignore_eos must make a difference. Searched for, because the
    tiny tokenizer's ids (so the chat prompts' ids) change from one checkpoint build to the next."""
    handle, _, tok = server
    for char in string.ascii_letters + string.digits:
        messages = [{"role": "user", "content": char}]
        out = post(handle, "/v1/chat/completions", {"messages": messages, "max_tokens": 40, "temperature": 0})
        if out.json()["choices"][0]["finish_reason"] == "stop":
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tok.encode(text, add_special_tokens=False)  # as the server does
            reply = out.json()["choices"][0]["message"]["content"]
            return messages, ids, reply, out.json()["usage"]["completion_tokens"]
    pytest.fail("no one-character chat ends on EOS within 40 tokens: ignore_eos cannot be checked")


def test_token_prompt_stops_on_eos_like_the_chat_without_ignore_eos(server, eos_case):
    handle, _, _ = server
    _, ids, text, n = eos_case
    body = {"prompt": ids, "max_tokens": 40, "temperature": 0, "stream_options": {"include_usage": True}}
    chunks = stream(handle, "/v1/completions", body)
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert [c["finish_reason"] for c in choices] == [None] * n + ["stop"]  # EOS: a closing chunk of its own
    assert "".join(c["text"] for c in choices) == text
    assert chunks[-1]["usage"] == {"prompt_tokens": len(ids), "completion_tokens": n,
                                   "total_tokens": len(ids) + n}


def test_token_prompt_stream_with_ignore_eos_runs_to_max_tokens(server, eos_case):
    handle, db, _ = server
    _, ids, text, n = eos_case
    max_tokens = n + 7
    body = {"model": served_model(handle), "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
            "seed": 3, "ignore_eos": True, "stream_options": {"include_usage": True}}
    chunks = stream(handle, "/v1/completions", body)
    token_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert len(token_chunks) == max_tokens  # one chunk per token, the last one carries finish_reason
    assert {c["object"] for c in chunks} == {"text_completion"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["id"].startswith("cmpl-")
    finishes = [c["choices"][0]["finish_reason"] for c in token_chunks]
    assert finishes == [None] * (max_tokens - 1) + ["length"]
    assert all(c["choices"][0]["logprobs"] is None for c in token_chunks)
    assert "".join(c["choices"][0]["text"] for c in token_chunks).startswith(text)
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": len(ids), "completion_tokens": max_tokens,
                                    "total_tokens": len(ids) + max_tokens}
    rid = chunks[0]["id"]
    rec = wait_for(lambda: next((r for r in rows(db, RequestRecord, handle.run_id) if r.request_id == rid),
                                None))
    assert rec.prompt_tokens == len(ids) and rec.output_tokens == max_tokens
    assert rec.error is None and rec.ttft_ms > 0 and rec.tpot_ms > 0


def test_string_prompt_non_stream_equals_its_token_ids(server):
    handle, _, tok = server
    ids = tok.encode("hello there")
    by_text = post(handle, "/v1/completions", {"prompt": "hello there", "temperature": 0, "ignore_eos": True})
    by_ids = post(handle, "/v1/completions", {"prompt": ids, "temperature": 0, "ignore_eos": True})
    assert by_text.status_code == by_ids.status_code == 200
    out = by_text.json()
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-") and out["model"]
    assert isinstance(out["created"], int)
    choice = out["choices"][0]
    assert choice["index"] == 0 and choice["logprobs"] is None and choice["finish_reason"] == "length"
    assert choice["text"] == by_ids.json()["choices"][0]["text"] and choice["text"]
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 16,  # vLLM's default max_tokens
                            "total_tokens": len(ids) + 16}


def test_chat_with_ignore_eos_runs_to_max_tokens(server, eos_case):
    handle, _, _ = server
    messages, ids, text, n = eos_case
    body = {"messages": messages, "max_tokens": n + 5, "temperature": 0, "ignore_eos": True}
    out = post(handle, "/v1/chat/completions", body).json()
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": n + 5,
                            "total_tokens": len(ids) + n + 5}
    assert out["choices"][0]["message"]["content"].startswith(text)
    chunks = stream(handle, "/v1/chat/completions", body)
    deltas = [c["choices"][0] for c in chunks]
    assert deltas[0]["delta"] == {"role": "assistant", "content": ""}  # the opening chunk, then one a token
    assert len(deltas) == 1 + n + 5 and deltas[-1]["finish_reason"] == "length"
    assert "".join(d["delta"].get("content", "") for d in deltas) == out["choices"][0]["message"]["content"]


@pytest.mark.parametrize("prompt, words", [
    ([1, 2, VOCAB], ["prompt[2]", f"token id {VOCAB}", f"vocabulary of {VOCAB}"]),
    ([-1], ["prompt[0]", "token id -1", f"ids 0..{VOCAB - 1}"]),
    (["one", "two"], ["list of prompts (2)", "one prompt per request"]),
    ([[1, 2], [3]], ["list of prompts (2)", "one prompt per request"]),
    ([1, 2.5], ["prompt[1]", "2.5", "integers"]),
    ([5, True], ["prompt[1]", "True", "integers"]),
    ([], ["empty"]),
    ("", ["empty"]),
])
def test_bad_prompts_get_a_400_that_says_what_is_wrong(server, prompt, words):
    handle, _, _ = server
    resp = post(handle, "/v1/completions", {"prompt": prompt, "max_tokens": 4})
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "prompt"
    assert all(w in err["message"] for w in words), err["message"]


@pytest.mark.parametrize("body, status, param, words", [
    ({"prompt": [7] * CONTEXT}, 400, "prompt", [f"{CONTEXT} tokens", f"at most {CONTEXT - 1}"]),
    ({"prompt": [7] * 250, "max_tokens": 16}, 400, "max_tokens", ["max_tokens <= 6"]),
    ({"prompt": [7], "max_tokens": 0}, 400, "max_tokens", []),
    ({"prompt": [7], "model": "gpt-9"}, 404, "model", ["gpt-9"]),
])
def test_context_and_model_checks_match_chat(server, body, status, param, words):
    handle, _, _ = server
    resp = post(handle, "/v1/completions", body)
    assert resp.status_code == status
    err = resp.json()["error"]
    assert err["param"] == param and all(w in err["message"] for w in words), err["message"]
