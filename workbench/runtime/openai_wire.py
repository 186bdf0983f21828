"""The OpenAI wire format of the CPU reference server: request bodies, reply shapes and error replies.

Pydantic models of `POST /v1/chat/completions` and `POST /v1/completions` bodies (extra fields
ignored, as OpenAI clients send many), `Wire`: how each response format spells a reply,
`token_prompt`: the checks on a token-id prompt, and `ApiError` / `openai_error`: an error as OpenAI
clients expect it (`{"error": {"message", "type", "param", "code"}}`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

MAX_TOKENS_LIMIT = 4096
MAX_PROMPT_CHARS = 200_000


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class GenerationRequest(BaseModel):
    """The fields chat and text completions share."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use

    model: str | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: dict | None = None
    ignore_eos: bool = False  # vLLM extension: generate exactly max_tokens (benchmarks)


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)


class CompletionRequest(GenerationRequest):
    """`POST /v1/completions` as vLLM takes it, for one prompt: text or a list of token ids."""

    prompt: str | list = Field(max_length=MAX_PROMPT_CHARS)  # the list is checked by `token_prompt`
    max_tokens: int | None = Field(default=16, ge=1, le=MAX_TOKENS_LIMIT)  # None: all the room left


@dataclass(frozen=True)
class Wire:
    """How one OpenAI response format spells a reply: names, and the fields of its one choice."""

    object: str
    chunk_object: str
    id_prefix: str
    opening: dict | None  # a first streamed choice sent before any token (chat: the role)
    piece: Callable[[str], dict]  # a streamed piece of text
    whole: Callable[[str], dict]  # the whole text of a non-streamed reply


CHAT_WIRE = Wire("chat.completion", "chat.completion.chunk", "chatcmpl",
                 opening={"delta": {"role": "assistant", "content": ""}},
                 piece=lambda text: {"delta": {"content": text}},
                 whole=lambda text: {"message": {"role": "assistant", "content": text}})
TEXT_WIRE = Wire("text_completion", "text_completion", "cmpl", opening=None,
                 piece=lambda text: {"text": text, "logprobs": None},
                 whole=lambda text: {"text": text, "logprobs": None})


def token_prompt(prompt: list, vocab_size: int) -> list[int]:
    """The token ids of a list `prompt`, or ApiError(400) saying what is wrong with it."""
    if not prompt:
        raise ApiError(400, "prompt is an empty list; send a string or a list of token ids", "prompt")
    if isinstance(prompt[0], str | list):
        raise ApiError(400, f"prompt is a list of prompts ({len(prompt)}); this server takes one prompt "
                            "per request (a string or a list of token ids): send them as separate requests",
                       "prompt")
    for i, tid in enumerate(prompt):
        if type(tid) is not int:  # also refuses JSON true/false, which Python counts as ints
            raise ApiError(400, f"prompt[{i}] is {tid!r}; token ids are integers", "prompt")
        if not 0 <= tid < vocab_size:
            raise ApiError(400, f"prompt[{i}] is token id {tid}, outside the model's vocabulary of "
                                f"{vocab_size} (ids 0..{vocab_size - 1})", "prompt")
    return prompt


def openai_error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": kind, "param": param, "code": None}})


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
