"""The CPU reference engine: one scheduler thread, continuous batching, one policy decision per step.

Each loop iteration is one engine *step*. Requests join and leave between steps. A step either
prefills the newly admitted requests (only prefills: PD-aware and simple) or decodes one token for
every running request. Before the step, `FlexModel.set_step` asks the policy (the same `decide()`
the vLLM plugin uses) which variant computes it, per layer if the policy has layer rules. Each
request keeps its own transformers `DynamicCache`, so the compute is per request, but the step,
and therefore the variant choice, is shared, which is what the policy is about. The request types
and the per-request token choice (sampling, EOS) live in `cpu_request`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter

import torch
from transformers import DynamicCache

from workbench.policy import Policy, StepInfo, decide
from workbench.runtime.cpu_request import Request, SamplingParams, TokenEvent, eos_token_ids, sample_token
from workbench.runtime.flexmodel import FlexModel
from workbench.runtime.telemetry import RequestTiming, TelemetryWriter

log = logging.getLogger(__name__)

__all__ = ["CpuEngine"]


class CpuEngine:
    """Runs a FlexModel for many concurrent requests; see the module docstring."""

    def __init__(self, flex: FlexModel, policy: Policy, *, telemetry: TelemetryWriter | None = None,
                 max_running: int = 32):
        flex.check_policy(policy)
        self.flex, self.telemetry, self.max_running = flex, telemetry, max_running
        self.tokenizer = flex.tokenizer
        self.max_context = int(getattr(flex.model.config, "max_position_embeddings", 2048))
        self.vocab_size = int(flex.model.get_input_embeddings().num_embeddings)
        self.eos_ids = eos_token_ids(flex)
        self._policy, self._pending_policy = policy, None
        self._waiting: list[Request] = []
        self._running: list[Request] = []
        self._by_id: dict[str, Request] = {}
        self._cond = threading.Condition()
        self._steps_done = 0
        self._in_step = False
        self._stop = False
        self.variant_steps: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._loop, name="cpu-engine", daemon=True)

    # --- public API (any thread) ----------------------------------------------------------------
    def start(self) -> CpuEngine:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Finish the loop; requests still in flight end with finish_reason "cancelled"."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    @property
    def policy(self) -> Policy:
        with self._cond:
            return self._pending_policy or self._policy

    @property
    def steps_done(self) -> int:
        return self._steps_done

    def counts(self) -> dict[str, int]:
        with self._cond:
            return {"waiting": len(self._waiting), "running": len(self._running), "steps": self._steps_done}

    def variant_step_counts(self) -> dict[str, int]:
        """Steps run so far per (step-level) variant."""
        with self._cond:
            return dict(self.variant_steps)

    def submit(self, prompt_ids: list[int], params: SamplingParams, *, on_event=None,
               request_id: str | None = None) -> Request:
        """Queue a request; it is admitted at the next step. Tokens go to `on_event` (engine thread)."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_context:
            raise ValueError(f"prompt is {len(prompt_ids)} tokens; this model takes at most "
                             f"{self.max_context - 1} (leave room for the reply)")
        if (bad := next((t for t in prompt_ids if not 0 <= t < self.vocab_size), None)) is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (ids 0..{self.vocab_size - 1})")
        rid = request_id or f"req-{uuid.uuid4().hex[:12]}"
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        req = Request(rid, list(prompt_ids), params, on_event,
                      RequestTiming(rid, time.time(), prompt_tokens=len(prompt_ids)), generator=gen)
        with self._cond:
            if self._stop:
                raise RuntimeError("the engine is stopped")
            self._waiting.append(req)
            self._by_id[rid] = req
            self._cond.notify_all()
        return req

    def cancel(self, request_id: str) -> bool:
        """Stop a request at the next step boundary (client gone, Stop button). False if unknown/done."""
        with self._cond:
            req = self._by_id.get(request_id)
            if req is None or req.done.is_set():
                return False
            req.cancelled = True
            self._cond.notify_all()
            return True

    def set_policy(self, policy: Policy) -> int:
        """Validate against the checkpoint (PolicyError if it does not fit) and apply from the next
        step on; returns that step's index."""
        self.flex.check_policy(policy)
        with self._cond:
            self._pending_policy = policy
            return self._steps_done + (1 if self._in_step else 0)

    # --- the loop (engine thread) ---------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stop:
                    break
                if self._pending_policy is not None:
                    self._policy, self._pending_policy = self._pending_policy, None
                self._drop_cancelled()
                room = self.max_running - len(self._running)
                admitted, self._waiting = self._waiting[:room], self._waiting[room:]
                batch = admitted or list(self._running)
                policy, step = self._policy, self._steps_done
                self._in_step = bool(batch)
            if not batch:
                continue
            try:
                if admitted:
                    self._prefill_step(step, policy, admitted)
                else:
                    self._decode_step(step, policy, batch)
            except Exception as exc:  # noqa: BLE001 - one bad step must not kill the server
                log.exception("engine step %d failed", step)
                for req in batch:
                    self._finish(req, "error", error=f"{type(exc).__name__}: {exc}")
            with self._cond:
                self._steps_done += 1
                self._in_step = False
                self._running = [r for r in self._running if not r.done.is_set()]
        with self._cond:
            leftovers = self._waiting + self._running
            self._waiting, self._running = [], []
        for req in leftovers:
            self._finish(req, "cancelled", error="engine stopped")

    def _drop_cancelled(self) -> None:
        for req in [r for r in self._waiting + self._running if r.cancelled]:
            self._finish(req, "cancelled", error="cancelled by the client")
        self._waiting = [r for r in self._waiting if not r.done.is_set()]
        self._running = [r for r in self._running if not r.done.is_set()]

    def _configure(self, policy: Policy, info: StepInfo) -> tuple[str, dict[int, str] | None]:
        layers = self.flex.set_step(policy, info)
        variant = decide(policy, info)
        with self._cond:
            self.variant_steps[variant] += 1
        return variant, (layers if any(v != variant for v in layers.values()) else None)

    def _prefill_step(self, step: int, policy: Policy, reqs: list[Request]) -> None:
        info = StepInfo(num_prefill_tokens=sum(len(r.prompt_ids) for r in reqs), num_decode_reqs=0)
        t0, ts = time.perf_counter(), time.time()
        variant, layers = self._configure(policy, info)
        for req in reqs:
            req.cache = DynamicCache()
            logits = self.flex.model(torch.tensor([req.prompt_ids]), past_key_values=req.cache,
                                     use_cache=True).logits[0, -1]
            self._accept(req, sample_token(req, logits))
        with self._cond:
            self._running.extend(r for r in reqs if not r.done.is_set())
        self._record_step(step, ts, t0, info, variant, layers, policy)

    def _decode_step(self, step: int, policy: Policy, reqs: list[Request]) -> None:
        info = StepInfo(num_prefill_tokens=0, num_decode_reqs=len(reqs))
        t0, ts = time.perf_counter(), time.time()
        variant, layers = self._configure(policy, info)
        for req in reqs:
            logits = self.flex.model(torch.tensor([[req.output_ids[-1]]]), past_key_values=req.cache,
                                     use_cache=True).logits[0, -1]
            req.timing.variant_mix[variant] = req.timing.variant_mix.get(variant, 0) + 1
            self._accept(req, sample_token(req, logits))
        self._record_step(step, ts, t0, info, variant, layers, policy)

    def _record_step(self, step, ts, t0, info: StepInfo, variant, layers, policy: Policy) -> None:
        if self.telemetry is not None:
            self.telemetry.step(step=step, ts=ts, duration_ms=(time.perf_counter() - t0) * 1000,
                                num_prefill_tokens=info.num_prefill_tokens,
                                num_decode_reqs=info.num_decode_reqs,
                                variant=variant, policy_name=policy.name, layer_variants=layers)

    def _accept(self, req: Request, token: int) -> None:
        now = time.time()
        if req.timing.first_token_ts is None:
            req.timing.first_token_ts = now
        if token in self.eos_ids and not req.params.ignore_eos:
            self._finish(req, "stop")
            return
        req.output_ids.append(token)
        req.timing.output_tokens = len(req.output_ids)
        if (len(req.output_ids) >= req.params.max_tokens
                or len(req.prompt_ids) + len(req.output_ids) >= self.max_context):
            self._finish(req, "length", token=token)
        else:
            self._emit(req, token, None)

    def _emit(self, req: Request, token: int | None, finish: str | None, error: str | None = None) -> None:
        text = ""
        if self.tokenizer is not None and req.output_ids:
            full = self.tokenizer.decode(req.output_ids, skip_special_tokens=True)
            # Hold back a half-decoded multi-byte character until its last byte arrives.
            if finish is not None or not full.endswith("\ufffd"):
                text, req.emitted_text = full[len(req.emitted_text):], full
        if req.on_event is None:
            return
        try:
            req.on_event(TokenEvent(req.request_id, token, text, finish, error))
        except Exception:  # noqa: BLE001 - a broken consumer cancels its own request only
            log.exception("token callback of %s failed; cancelling it", req.request_id)
            req.cancelled = True

    def _finish(self, req: Request, reason: str, *, error: str | None = None,
                token: int | None = None) -> None:
        if req.done.is_set():
            return
        req.finish_reason = reason
        req.timing.finished_ts = time.time()
        req.timing.error = error
        req.cache = None  # free the KV cache now, not when the last reference goes
        self._emit(req, token, reason, error)
        req.done.set()
        with self._cond:
            self._by_id.pop(req.request_id, None)
        if self.telemetry is not None:
            self.telemetry.request(req.timing)

