"""OpenAI-compatible HTTP server for the CPU reference engine (FastAPI + uvicorn).

Endpoints: `POST /v1/chat/completions` and `POST /v1/completions` (SSE streaming and plain; the
latter takes a text or token-id prompt, and both take vLLM's `ignore_eos`), `GET /v1/models`,
`GET /health`, `GET/PUT /flexquant/policy` (live policy edit, same body as the vLLM server) and
`GET /flexquant/stats`. CLI:
    python -m workbench.runtime.cpu_server --checkpoint DIR --policy FILE --port N --db PATH [--run-id N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from workbench.policy import Policy, PolicyError, parse_policy, policy_from_dict
from workbench.runtime.cpu_engine import CpuEngine
from workbench.runtime.cpu_request import SamplingParams, TokenEvent
from workbench.runtime.openai_wire import (
    CHAT_WIRE,
    MAX_TOKENS_LIMIT,
    TEXT_WIRE,
    ApiError,
    ChatRequest,
    CompletionRequest,
    GenerationRequest,
    Wire,
    openai_error,
    token_prompt,
)

log = logging.getLogger(__name__)


def create_app(engine: CpuEngine, *, model_name: str, run_id: int | None = None,
               on_shutdown=None) -> FastAPI:
    """The FastAPI app around a started-on-startup `CpuEngine`."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        yield
        engine.stop()
        if on_shutdown is not None:
            on_shutdown()

    app = FastAPI(title="FlexQuant CPU reference runtime", lifespan=lifespan)
    tok = engine.tokenizer

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"] if p != "body")
        return openai_error(400, f"{loc or 'body'}: {err['msg']}", loc or None)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return openai_error(exc.status, exc.message, exc.param)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "runtime": "cpu"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "flexquant-workbench"}]}

    @app.get("/flexquant/policy")
    async def get_policy() -> dict:
        return {"policy": engine.policy.model_dump(exclude_none=True), "steps": engine.steps_done}

    @app.put("/flexquant/policy")
    async def put_policy(request: Request) -> JSONResponse:
        try:
            body = await request.json()
            raw = body.get("policy") if isinstance(body, dict) else None
            if isinstance(raw, str):
                policy = parse_policy(raw)
            elif isinstance(raw, dict):
                policy = policy_from_dict(raw)
            else:
                raise PolicyError('send {"policy": {...}} (a policy mapping or its YAML text)')
            step = engine.set_policy(policy)
        except (PolicyError, ValueError) as exc:  # ValueError: a body that is not JSON or not UTF-8
            message = f"policy rejected, the old one stays: {exc}"
            return JSONResponse(status_code=400, content={"error": message})
        except RecursionError:  # json.loads on "[[[[..." thousands deep
            message = "policy rejected, the old one stays: the JSON body nests too deeply to be a policy"
            return JSONResponse(status_code=400, content={"error": message})
        log.info("policy %s applies from step %d", policy.name, step)
        return JSONResponse({"applied_at_step": step, "policy": policy.name})

    @app.get("/flexquant/stats")
    async def stats() -> dict:
        report = engine.flex.memory_report()
        return {"runtime": "cpu", "model": model_name, "run_id": run_id, "policy": engine.policy.name,
                "variants": engine.flex.variants, **engine.counts(),
                "variant_steps": engine.variant_step_counts(),
                "weight_bytes": engine.flex.weight_bytes(), "memory": report.as_dict()}

    def chat_prompt_ids(req: ChatRequest) -> list[int]:
        if tok is None or not getattr(tok, "chat_template", None):
            raise ApiError(500, "this checkpoint has no tokenizer chat template; "
                                "re-export it with the source model's tokenizer files")
        text = tok.apply_chat_template([m.model_dump() for m in req.messages], tokenize=False,
                                       add_generation_prompt=True)
        return tok.encode(text, add_special_tokens=False)

    def text_prompt_ids(req: CompletionRequest) -> list[int]:
        if isinstance(req.prompt, list):
            return token_prompt(req.prompt, engine.vocab_size)
        if tok is None:
            raise ApiError(400, "this checkpoint has no tokenizer; send the prompt as a list of token ids",
                           "prompt")
        ids = tok.encode(req.prompt)  # with the tokenizer's special tokens (BOS), as vLLM does
        if not ids:
            raise ApiError(400, "prompt is empty; send some text or a list of token ids", "prompt")
        return ids

    def sampling(req: GenerationRequest, n_prompt: int, *, max_tokens: int | None,
                 default_max: int, prompt_param: str) -> SamplingParams:
        if req.model not in (None, "", model_name):
            raise ApiError(404, f"model {req.model!r} is not served here; this server serves {model_name!r}",
                           "model")
        room = engine.max_context - n_prompt
        if room < 1:
            raise ApiError(400, f"the prompt is {n_prompt} tokens; this model takes at most "
                           f"{engine.max_context - 1}. Shorten the {prompt_param}.", prompt_param)
        max_tokens = max_tokens or min(default_max, room)
        if max_tokens > room:
            raise ApiError(400, f"max_tokens={max_tokens} plus the {n_prompt}-token prompt exceeds the "
                           f"model's context of {engine.max_context}; use max_tokens <= {room}", "max_tokens")
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              seed=req.seed, ignore_eos=req.ignore_eos)

    async def respond(ids: list[int], params: SamplingParams, wire: Wire, *, stream: bool,
                      stream_options: dict | None) -> JSONResponse | StreamingResponse:
        """Run one request through the engine (its telemetry included) and answer it in `wire`'s format."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        rid = f"{wire.id_prefix}-{uuid.uuid4().hex[:24]}"
        handle = engine.submit(ids, params, request_id=rid,
                               on_event=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        created = int(time.time())
        if stream:
            usage = bool((stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(engine, handle, events, wire, created, model_name, usage),
                                     media_type="text/event-stream")
        try:
            while (ev := await events.get()).finish_reason is None:
                pass
        finally:
            engine.cancel(rid)  # no-op when finished; stops the work if the client went away
        if ev.finish_reason in ("error", "cancelled"):
            return openai_error(500, f"generation failed: {ev.error or ev.finish_reason}")
        return JSONResponse({
            "id": rid, "object": wire.object, "created": created, "model": model_name,
            "choices": [{"index": 0, **wire.whole(handle.text), "finish_reason": ev.finish_reason}],
            "usage": _usage(len(ids), len(handle.output_ids)),
        })

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatRequest) -> JSONResponse | StreamingResponse:
        ids = chat_prompt_ids(req)
        params = sampling(req, len(ids), max_tokens=req.max_completion_tokens or req.max_tokens,
                          default_max=256, prompt_param="messages")
        return await respond(ids, params, CHAT_WIRE, stream=req.stream, stream_options=req.stream_options)

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest) -> JSONResponse | StreamingResponse:
        ids = text_prompt_ids(req)
        params = sampling(req, len(ids), max_tokens=req.max_tokens, default_max=MAX_TOKENS_LIMIT,
                          prompt_param="prompt")
        return await respond(ids, params, TEXT_WIRE, stream=req.stream, stream_options=req.stream_options)

    return app


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _sse(engine: CpuEngine, handle, events: asyncio.Queue, wire: Wire, created: int, model: str,
               include_usage: bool) -> AsyncIterator[str]:
    """OpenAI `wire.chunk_object` events, one per token (the last one with the finish_reason; a stop
    on EOS gets a chunk of its own), then usage if asked for, and [DONE]."""
    rid = handle.request_id

    def chunk(choices: list[dict], **extra) -> str:
        body = {"id": rid, "object": wire.chunk_object, "created": created, "model": model,
                "choices": choices, **extra}
        return f"data: {json.dumps(body)}\n\n"

    try:
        if wire.opening is not None:
            yield chunk([{"index": 0, **wire.opening, "finish_reason": None}])
        while True:
            ev: TokenEvent = await events.get()
            if ev.finish_reason in ("error", "cancelled"):
                err = {"message": f"generation stopped: {ev.error or ev.finish_reason}",
                       "type": "server_error"}
                yield f"data: {json.dumps({'error': err})}\n\n"
            else:
                yield chunk([{"index": 0, **wire.piece(ev.text), "finish_reason": ev.finish_reason}])
                if ev.finish_reason is None:
                    continue
                if include_usage:
                    yield chunk([], usage=_usage(len(handle.prompt_ids), len(handle.output_ids)))
            yield "data: [DONE]\n\n"
            return
    finally:
        engine.cancel(rid)  # client disconnected mid-stream: free the slot at the next step


def main(argv: list[str] | None = None) -> None:
    import torch
    import uvicorn

    from storage.db import open_db
    from workbench.ckpt_format import read_flexquant_config
    from workbench.policy import DEFAULT_POLICY
    from workbench.runtime.flexmodel import FlexModel
    from workbench.runtime.telemetry import TelemetryWriter, create_run, end_run

    ap = argparse.ArgumentParser(prog="python -m workbench.runtime.cpu_server",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="merged FlexQuant checkpoint folder")
    ap.add_argument("--policy", type=Path, help="policy YAML/JSON file (default: the checkpoint's policy)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--db", type=Path, required=True, help="workbench SQLite DB for telemetry")
    ap.add_argument("--run-id", type=int, help="existing Run row to write telemetry to")
    ap.add_argument("--served-model-name", help="model id in the API (default: the checkpoint folder name)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    if args.policy is not None:
        policy: Policy = parse_policy(args.policy.read_text())
    else:
        default = read_flexquant_config(args.checkpoint).get("policy")
        policy = policy_from_dict(default) if default else DEFAULT_POLICY
    flex = FlexModel.load(args.checkpoint)
    flex.check_policy(policy)
    db = open_db(args.db)
    run_id = args.run_id or create_run(db, runtime="cpu", checkpoint_path=str(args.checkpoint.resolve()),
                                       policy_name=policy.name, config={"port": args.port, "host": args.host})
    writer = TelemetryWriter(db, run_id)
    engine = CpuEngine(flex, policy, telemetry=writer)

    def shutdown() -> None:
        writer.close()
        end_run(db, run_id)

    app = create_app(engine, model_name=args.served_model_name or args.checkpoint.resolve().name,
                     run_id=run_id, on_shutdown=shutdown)
    log.info("serving %s as run %d on http://%s:%d", args.checkpoint, run_id, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
