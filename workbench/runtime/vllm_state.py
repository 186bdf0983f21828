"""Per-process FlexQuant engine state for vLLM: live policy, per-step plan, step telemetry (no vLLM here).

`vllm_dispatch` feeds this module the composition of each engine step; everything that does not need
vLLM's internals lives here so it can be unit-tested on a CPU:

- `EngineState`: the current policy, the variant of the running step (`step_variant`, and `plan`, one
  variant per layer when the policy pins layers), the step counter, and a pending policy handed over
  by the watcher thread. Every decision is `workbench.policy.decide` (the one shared implementation).
- `PolicyWatcher`: a thread polling FLEXQUANT_POLICY_FILE; it validates a new policy, queues it for
  the next step and acknowledges the step number at which it will apply (or the error).
- `StepTelemetry`: one JSON object per real step, appended to FLEXQUANT_TELEMETRY by a background
  thread; the engine thread only timestamps and queues (about a microsecond per step).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path

from workbench.policy import Policy, PolicyError, StepInfo, check_policy_for, decide, policy_from_dict
from workbench.runtime import vllm_plugin

logger = logging.getLogger(__name__)
STARTUP_VERSION = "startup"


class FlexQuantError(ValueError):
    """A FlexQuant checkpoint or launch setting vLLM cannot serve; the message says how to fix it."""


class EngineState:
    """What the engine's linears need to know about the running step (one instance per process)."""

    def __init__(self) -> None:
        self.variants: list[str] = []
        self.num_layers: int = 0
        self.policy: Policy | None = None
        self.step_variant: str = ""
        self.plan: list[str] | None = None  # per-layer variants, only when the policy pins layers
        self.executed: set[str] = set()  # variants whose kernels ran since the last begin_step
        self.step = 0  # real (non-warmup) steps so far
        self._pending: Policy | None = None
        self._lock = threading.Lock()
        self._decode_cache: dict[int, str] = {}

    def configure(self, variants: list[str], num_layers: int, policy: Policy) -> None:
        self.variants, self.num_layers = list(variants), num_layers
        check_policy_for(policy, variants, num_layers)
        self.set_policy(policy)

    def set_policy(self, policy: Policy) -> None:
        self.policy = policy
        self._decode_cache = {}
        self.force(policy.prefill)

    def validate(self, data: object) -> Policy:
        """A policy dict -> `Policy` that fits this model; `PolicyError` otherwise."""
        if not isinstance(data, dict):
            raise PolicyError("policy must be a mapping with keys name, prefill, decode (and optional layers)")
        policy = policy_from_dict(data)
        check_policy_for(policy, self.variants, self.num_layers)
        return policy

    def offer(self, policy: Policy) -> int:
        """Queue `policy` for the next step (any thread); returns the step number it will apply at."""
        with self._lock:
            self._pending = policy
            return self.step + 1

    def begin_step(self, *, real: bool) -> Policy | None:
        """Start a step: adopt a pending policy first. Returns the replaced policy, if one was."""
        with self._lock:
            pending, self._pending = self._pending, None
            if real:
                self.step += 1
        if pending is None:
            return None
        old = self.policy
        self.set_policy(pending)
        logger.info("FlexQuant policy %r applies from step %d", pending.name, self.step + (0 if real else 1))
        return old

    def choose(self, num_prefill_tokens: int, num_decode_reqs: int) -> str:
        """Decide this step's variant (and per-layer plan) from its composition."""
        policy = self.policy
        assert policy is not None, "EngineState.configure() was not called"
        if num_prefill_tokens == 0:  # decode steps repeat the same few batch sizes: memoize
            variant = self._decode_cache.get(num_decode_reqs)
            if variant is None:
                variant = self._decode_cache[num_decode_reqs] = decide(policy, StepInfo(0, num_decode_reqs))
        else:
            variant = decide(policy, StepInfo(num_prefill_tokens, num_decode_reqs))
        if policy.layers:
            self.plan = [decide(policy, StepInfo(num_prefill_tokens, num_decode_reqs, layer=i))
                         for i in range(self.num_layers)]
        else:
            self.plan = None
        self.step_variant = variant
        self.executed = set()
        return variant

    def force(self, variant: str) -> None:
        """Run `variant` wherever the policy does not pin a layer (graph capture, warm-up)."""
        policy = self.policy
        self.step_variant = variant
        self.executed = set()
        if policy is None or not policy.layers:
            self.plan = None
            return
        # A prefill step of a policy whose prefill is `variant` gives exactly "pins, else variant".
        as_prefill = policy.model_copy(update={"prefill": variant})
        self.plan = [decide(as_prefill, StepInfo(1, 0, layer=i)) for i in range(self.num_layers)]


def initial_policy(default_policy: dict | None, state: EngineState, policy_file: Path | None) -> Policy:
    """The policy at engine start: FLEXQUANT_POLICY_JSON, else the policy file, else the checkpoint's."""
    env_json = os.environ.get(vllm_plugin.ENV_POLICY_JSON)
    file_msg = vllm_plugin.read_json(policy_file) if policy_file else None
    for source, data in ((vllm_plugin.ENV_POLICY_JSON, json.loads(env_json) if env_json else None),
                         (str(policy_file), (file_msg or {}).get("policy")),
                         ("config.json quantization_config.policy", default_policy)):
        if data is not None:
            try:
                return state.validate(data)
            except PolicyError as exc:
                raise PolicyError(f"FlexQuant start-up policy from {source}: {exc}") from None
    raise PolicyError(f"no FlexQuant policy: set {vllm_plugin.ENV_POLICY_JSON} or put 'policy' into "
                      "config.json quantization_config")


class PolicyWatcher:
    """Polls the policy file; validates, queues and acknowledges each new version exactly once."""

    def __init__(self, policy_file: Path, state: EngineState, *, interval_s: float = 0.05,
                 write_acks: bool = True) -> None:
        self.policy_file = Path(policy_file)
        self.state = state
        self.interval_s = interval_s
        self.write_acks = write_acks
        self._last_version: str | None = STARTUP_VERSION
        self._last_stat: tuple | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flexquant-policy", daemon=True)

    def start(self) -> PolicyWatcher:
        if self.write_acks:  # make GET /flexquant/policy show the policy actually running
            assert self.state.policy is not None
            vllm_plugin.publish_policy(self.policy_file, self.state.policy, STARTUP_VERSION)
            vllm_plugin.write_ack(self.policy_file, version=STARTUP_VERSION, ok=True,
                                  step=self.state.step + 1, policy_name=self.state.policy.name)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def poll_once(self) -> None:
        try:
            st = os.stat(self.policy_file)
        except OSError:
            return
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if key == self._last_stat:
            return
        self._last_stat = key
        msg = vllm_plugin.read_json(self.policy_file)
        if not msg or msg.get("version") in (None, self._last_version):
            return
        version = str(msg["version"])
        self._last_version = version
        try:
            policy = self.state.validate(msg.get("policy"))
        except PolicyError as exc:
            logger.warning("FlexQuant policy version %s rejected: %s", version, exc)
            if self.write_acks:
                vllm_plugin.write_ack(self.policy_file, version=version, ok=False, error=str(exc))
            return
        step = self.state.offer(policy)
        if self.write_acks:
            vllm_plugin.write_ack(self.policy_file, version=version, ok=True, step=step, policy_name=policy.name)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll_once()
            except Exception:  # a broken poll must not kill the engine; the next one retries
                logger.exception("FlexQuant policy watcher failed")


class StepTelemetry:
    """Appends one JSON line per step; a thread builds the lines and flushes every `interval_s`.

    `duration_ms` is the wall time from a step's start to the next step's start: with vLLM's async
    scheduling the CPU runs at most one step ahead, so in a busy engine this is the step's share of
    GPU time (for decode: the TPOT). A step followed by an idle gap gets its own CPU time instead.
    No CUDA call happens here: per step the engine thread only appends a dict to a deque (the
    first version, with two CUDA events per step, measured ~97 µs/step of engine-thread time on an H200).

    While a file `<path>.pause` exists, `paused` is True and the engine records nothing: this lets one
    engine measure its own telemetry cost with interleaved on/off blocks.
    """

    IDLE_GAP_S = 0.05  # a later step starting this long after the previous one ended = engine was idle

    def __init__(self, path: Path, *, interval_s: float = 0.1) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the engine
        self._queue: deque = deque()
        self.drain_lock = threading.Lock()
        self.interval_s = interval_s
        self.pause_file = Path(str(self.path) + ".pause")
        self.meta_file = Path(str(self.path) + ".meta.json")
        self.main_ns = self.main_steps = self.drain_ns = self.lines = 0  # self-timing of our own cost
        self.paused = self.pause_file.exists()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flexquant-telemetry", daemon=True)
        self._thread.start()

    def submit(self, record: dict, t_start: float, t_end: float) -> None:
        """Queue a step record with its `time.perf_counter()` start and end (cheap: one append)."""
        self._queue.append((record, t_start, t_end))

    def drain(self, *, final: bool = False) -> int:
        """Write every step whose duration is known (all of them if `final`); returns lines written."""
        with self.drain_lock:
            t0 = time.perf_counter_ns()
            now = time.perf_counter()
            lines = []
            queue = self._queue
            while queue:
                record, start, end = queue[0]
                nxt = queue[1][1] if len(queue) > 1 else None
                if nxt is not None and nxt - end <= self.IDLE_GAP_S:
                    duration = nxt - start
                elif nxt is not None or final or now - end > self.IDLE_GAP_S:
                    duration = end - start
                else:
                    break  # the next step may still come and tell this one's duration
                queue.popleft()
                record["duration_ms"] = round(duration * 1000.0, 4)
                lines.append(json.dumps(record, separators=(",", ":")))
            if lines:
                self._fh.write("\n".join(lines) + "\n")
                self._fh.flush()
                self.drain_ns += time.perf_counter_ns() - t0
                self.lines += len(lines)
            return len(lines)

    def add_main_cost(self, ns: int) -> None:
        """Account time the engine's own thread spent on telemetry (reported in the meta file)."""
        self.main_ns += ns
        self.main_steps += 1

    def _run(self) -> None:
        rounds = 0
        while not self._stop.wait(self.interval_s):
            try:
                self.paused = self.pause_file.exists()
                if self.drain():
                    rounds += 1
                    if rounds % 20 == 0:
                        self.write_meta()
            except Exception:
                logger.exception("FlexQuant telemetry writer failed")

    def close(self) -> None:
        self._stop.set()
        self.drain(final=True)
        self._fh.close()
        self.write_meta()

    def write_meta(self) -> None:
        """Our own cost so far, next to the JSONL: engine-thread µs per step, writer µs per line."""
        vllm_plugin.write_json_atomic(self.meta_file, {
            "steps": self.main_steps, "lines": self.lines,
            "engine_thread_us_per_step": round(self.main_ns / max(1, self.main_steps) / 1000, 3),
            "writer_thread_us_per_line": round(self.drain_ns / max(1, self.lines) / 1000, 3)})
