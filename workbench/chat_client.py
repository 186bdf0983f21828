"""A small streaming client for the runtime's OpenAI-compatible API, timing each reply client-side.

TTFT is measured from sending the request to the first chunk carrying text, TPOT as the time between
the first and the last token divided by the tokens after the first: the numbers a user of the chat
sees, network and HTTP included. Both runtimes (vLLM and the CPU reference) speak the same API, and
both accept `PUT /flexquant/policy`, so this module also applies policies and reads stats.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx

from workbench.policy import Policy

__all__ = [
    "ChatError",
    "ChatStats",
    "ChatUpdate",
    "StreamTimer",
    "chat_body",
    "stream_chat",
    "astream_chat",
    "chat_once",
    "list_models",
    "get_policy",
    "put_policy",
    "get_stats",
]

log = logging.getLogger(__name__)


class ChatError(RuntimeError):
    """The server could not be reached or refused the request; the message says what to do."""


@dataclass
class ChatStats:
    """Client-side timings of one streamed reply."""

    request_id: str = ""
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    output_tokens: int = 0
    total_ms: float = 0.0
    finish_reason: str | None = None


@dataclass
class ChatUpdate:
    """One step of a streamed reply: the new text, all text so far, and the stats up to now."""

    delta: str
    text: str
    stats: ChatStats
    done: bool = False


@dataclass
class StreamTimer:
    """Feeds on SSE lines of a chat completion stream and keeps text and timings up to date."""

    started: float = field(default_factory=time.perf_counter)
    text: str = ""
    first_at: float | None = None
    last_at: float | None = None
    chunks_with_text: int = 0
    usage_tokens: int | None = None
    stats: ChatStats = field(default_factory=ChatStats)

    def feed(self, line: str) -> str | None:
        """Consume one line; return the new text it carried (None for non-text lines)."""
        if not line.startswith("data:"):
            return None
        payload = line[5:].strip()
        if payload == "[DONE]":
            return None
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError:
            return None
        if "error" in chunk:
            raise ChatError(f"the server stopped the reply: {_error_text(chunk)}")
        self.stats.request_id = self.stats.request_id or str(chunk.get("id", ""))
        usage = chunk.get("usage") or {}
        if usage.get("completion_tokens") is not None:
            self.usage_tokens = int(usage["completion_tokens"])
        delta = ""
        for choice in chunk.get("choices") or []:
            delta += (choice.get("delta") or {}).get("content") or ""
            self.stats.finish_reason = choice.get("finish_reason") or self.stats.finish_reason
        if not delta:
            return None
        now = time.perf_counter()
        self.first_at = self.first_at or now
        self.last_at = now
        self.chunks_with_text += 1
        self.text += delta
        self._update(now)
        return delta

    def _update(self, now: float) -> None:
        s = self.stats
        # Servers send one chunk per token; the usage count, when sent, is the exact one.
        s.output_tokens = self.usage_tokens if self.usage_tokens is not None else self.chunks_with_text
        s.total_ms = (now - self.started) * 1000
        if self.first_at is not None:
            s.ttft_ms = (self.first_at - self.started) * 1000
            if s.output_tokens > 1 and self.last_at is not None:
                s.tpot_ms = (self.last_at - self.first_at) * 1000 / (s.output_tokens - 1)

    def finish(self) -> ChatStats:
        self._update(self.last_at or time.perf_counter())
        self.stats.total_ms = (time.perf_counter() - self.started) * 1000
        return self.stats


def _error_text(body: object) -> str:
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body))
        if isinstance(err, dict):
            err = err.get("message", err)
        return str(err)
    return str(body)


def _http_error(resp: httpx.Response, what: str) -> ChatError:
    try:
        reason = _error_text(resp.json())
    except (json.JSONDecodeError, ValueError):
        reason = resp.text[:300] or resp.reason_phrase
    return ChatError(f"{what} failed with HTTP {resp.status_code}: {reason}")


def _unreachable(base_url: str, exc: Exception) -> ChatError:
    return ChatError(
        f"cannot reach the model server at {base_url} ({type(exc).__name__}: {exc}); "
        "start the runtime in the Runtime tab or check its log"
    )


def chat_body(
    messages: list[dict],
    *,
    model: str,
    max_tokens: int = 256,
    temperature: float = 0.0,
    extra: dict | None = None,
) -> dict:
    """The JSON body of a streamed chat completion that also asks for the token count."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body.update(extra or {})
    return body


def list_models(base_url: str, *, timeout: float = 5.0) -> list[str]:
    """Model ids served at `base_url` (GET /v1/models)."""
    try:
        resp = httpx.get(f"{base_url}/v1/models", timeout=timeout)
    except httpx.HTTPError as exc:
        raise _unreachable(base_url, exc) from None
    if resp.status_code != 200:
        raise _http_error(resp, "listing models")
    return [m["id"] for m in resp.json().get("data", [])]


def stream_chat(
    base_url: str,
    messages: list[dict],
    *,
    model: str | None = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    timeout: float = 300.0,
    extra: dict | None = None,
) -> Iterator[ChatUpdate]:
    """Stream a chat reply, yielding a `ChatUpdate` per text chunk and a final one with `done=True`.

    Closing the generator (a Stop button) closes the HTTP stream, which aborts the request."""
    model = model or list_models(base_url)[0]
    timer = StreamTimer()
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout, connect=5.0)) as client:
            with client.stream(
                "POST",
                f"{base_url}/v1/chat/completions",
                json=chat_body(
                    messages, model=model, max_tokens=max_tokens, temperature=temperature, extra=extra
                ),
            ) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise _http_error(resp, "the chat request")
                for line in resp.iter_lines():
                    delta = timer.feed(line)
                    if delta:
                        yield ChatUpdate(delta, timer.text, timer.stats)
    except httpx.HTTPError as exc:
        raise _unreachable(base_url, exc) from None
    yield ChatUpdate("", timer.text, timer.finish(), done=True)


async def astream_chat(client: httpx.AsyncClient, base_url: str, body: dict) -> AsyncIterator[ChatUpdate]:
    """Async twin of `stream_chat` for the load generator; `body` from `chat_body`."""
    timer = StreamTimer()
    async with client.stream("POST", f"{base_url}/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            raise _http_error(resp, "the chat request")
        async for line in resp.aiter_lines():
            delta = timer.feed(line)
            if delta:
                yield ChatUpdate(delta, timer.text, timer.stats)
    yield ChatUpdate("", timer.text, timer.finish(), done=True)


def chat_once(base_url: str, messages: list[dict], **kwargs) -> tuple[str, ChatStats]:
    """The whole reply and its stats (the streamed request, consumed)."""
    updates = list(stream_chat(base_url, messages, **kwargs))
    return updates[-1].text, updates[-1].stats


def _json_call(method: str, url: str, what: str, base_url: str, **kwargs) -> dict:
    try:
        resp = httpx.request(method, url, timeout=10.0, **kwargs)
    except httpx.HTTPError as exc:
        raise _unreachable(base_url, exc) from None
    if resp.status_code != 200:
        raise _http_error(resp, what)
    return resp.json()


def get_policy(base_url: str) -> dict:
    """The policy the server runs now (GET /flexquant/policy)."""
    return _json_call("GET", f"{base_url}/flexquant/policy", "reading the live policy", base_url)


def put_policy(base_url: str, policy: Policy) -> dict:
    """Apply `policy` on the running server (PUT /flexquant/policy); returns `{"applied_at_step": N}`."""
    return _json_call(
        "PUT",
        f"{base_url}/flexquant/policy",
        f"applying policy {policy.name!r}",
        base_url,
        json={"policy": policy.model_dump(exclude_none=True)},
    )


def get_stats(base_url: str) -> dict:
    """The server's stats (GET /flexquant/stats): resident bytes per variant and counters."""
    return _json_call("GET", f"{base_url}/flexquant/stats", "reading server stats", base_url)
