"""A request to the CPU reference engine: what it asks for, what it streams back, and its token choice.

`SamplingParams` (the request's sampling settings), `TokenEvent` (what the engine streams to the
request's callback) and `Request` (a request's state while it runs, including its KV cache), plus
the per-request token choice that `cpu_engine.CpuEngine` applies each step: `sample_token` picks
the next token, `eos_token_ids` names the tokens that end a request.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from workbench.runtime.flexmodel import FlexModel
from workbench.runtime.telemetry import RequestTiming

__all__ = ["Request", "SamplingParams", "TokenEvent", "eos_token_ids", "sample_token"]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's benchmark flag: run to max_tokens whatever the model says


@dataclass(frozen=True)
class TokenEvent:
    """Streamed to the request's callback: new text (may be empty), and finish_reason on the last.

    The token that ends a request by length carries its finish_reason (as vLLM streams it); a stop
    on EOS, a cancel or an error comes as an event of its own with token_id None."""

    request_id: str
    token_id: int | None
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[TokenEvent], None] | None
    timing: RequestTiming
    output_ids: list[int] = field(default_factory=list)
    cache: DynamicCache | None = None
    emitted_text: str = ""
    generator: torch.Generator | None = None
    cancelled: bool = False
    finish_reason: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def text(self) -> str:
        return self.emitted_text


def sample_token(req: Request, logits: torch.Tensor) -> int:
    """The request's next token: greedy at temperature 0, else sampled (top-p) with its generator."""
    p = req.params
    if p.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < p.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=req.generator))


def eos_token_ids(flex: FlexModel) -> set[int]:
    """The token ids that end a request: the model's generation config and the tokenizer's EOS."""
    ids: set[int] = set()
    gen = getattr(flex.model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), getattr(flex.tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(i) for i in source)
    return ids
