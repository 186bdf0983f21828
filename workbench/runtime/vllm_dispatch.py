"""FlexQuant inside vLLM 0.26 (V2 model runner), the runner side: per-step dispatch, graph banks, telemetry.

The weights side (quantization method, one child module per variant in each linear) is `vllm_adapter`;
these two are the only modules that touch vLLM internals. `FlexLinearMethod.apply` there reads the
variant this module chose for the step from `STATE`.

Dispatch. Once per engine step, a hook on the runner's `execute_model` reads the step composition
from the `SchedulerOutput` (prefill tokens; decode requests) and calls `workbench.policy.decide`,
per layer when the policy pins layers. `FlexLinearMethod.apply` only looks the answer up. The
scheduler output is exact, while the forward context is not: FlashAttention metadata cannot tell
decodes from 1-token prefills without a GPU sync, and FULL-graph replays run no Python at all.

CUDA graphs and torch.compile. Python in `apply` runs only when a graph is captured, so a plain
FULL graph would freeze one variant per captured size, and a live policy edit would not reach it.
We capture one GRAPH BANK per variant instead: `capture_model` runs once per variant with that
variant forced, and before each step the hook points the graph manager at the bank that `decide`
picked for the step's real (unpadded) composition. Replays stay exactly as fast as stock graphs; a
policy edit that changes only prefill/decode rules swaps banks on the next step, with no capture and
no weight reload. An edit of the per-layer pins (or of the capture sizes, which do not change) needs
new banks: they are re-captured between two steps (seconds). Cost: capture time and graph memory
x number of variants (decode graphs are small). torch.compile (compilation mode != 0) would trace
`apply` once with its guards dropped and bake one variant into every size, so it is refused; use
`{"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}`: decode runs in graphs, prefill/mixed steps
run eagerly (H100 baseline: 2-5% TPOT vs compile + graphs, prefill unchanged). Prefill and mixed
steps can run in graphs too, without torch.compile: vLLM's breakable CUDA graphs
(VLLM_USE_BREAKABLE_CUDAGRAPH=1, `"cudagraph_mode": "FULL_AND_PIECEWISE"`) capture everything but
attention, which runs eagerly between graph segments. Those captures live in the manager's
`breakable_cg_runner.entries`, so a bank is the pair (FULL graphs, breakable entries).

Telemetry (rank 0, env FLEXQUANT_TELEMETRY): one JSON line per real step (`vllm_state`), with
`cudagraph` (replayed a bank?) and `executed` (variants whose kernels ran: recorded by `apply` in
eager steps, and at capture time for a bank) next to the contract keys.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from workbench.runtime import vllm_plugin
from workbench.runtime.vllm_state import (
    EngineState,
    FlexQuantError,
    PolicyWatcher,
    StepTelemetry,
    initial_policy,
)

logger = logging.getLogger(__name__)

STATE = EngineState()


class _Runtime:
    """The per-process glue around vLLM's V2 model runner: step plans, graph banks, telemetry."""

    def __init__(self) -> None:
        self.installed = False
        self.started = False
        # variant -> ({BatchExecutionDescriptor: FULL graph}, {BatchDescriptor: breakable entry})
        self.banks: dict[str, tuple[dict, dict]] = {}
        self.bank_executed: dict[str, set[str]] = {}
        self.bank_layers: object = None  # the policy's layer pins the banks were captured with
        self.graph_used = False
        self.capturing = False  # inside `capture`: breakable graphs are being recorded, not replayed
        self.prompt_lens: dict[str, int] = {}
        self.telemetry: StepTelemetry | None = None
        self.watcher: PolicyWatcher | None = None
        self._open: tuple[dict, float, float] | None = None

    def install(self, variants: list[str], default_policy: dict | None) -> None:
        """Check the engine settings and wrap the runner's methods (once per process)."""
        if self.installed:
            return
        from vllm.config import get_current_vllm_config_or_none
        from vllm.config.compilation import CompilationMode
        from vllm.v1.worker.gpu import model_runner as mrv2

        vcfg = get_current_vllm_config_or_none()
        if vcfg is None:
            raise FlexQuantError("FlexQuant: no vLLM config in scope while building the model")
        if vcfg.compilation_config.mode != CompilationMode.NONE:
            raise FlexQuantError(
                "FlexQuant chooses a variant per step in Python, which torch.compile would freeze; start vLLM "
                'with --compilation-config \'{"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}\'')
        if not vcfg.use_v2_model_runner:
            raise FlexQuantError("FlexQuant needs vLLM's V2 model runner: set VLLM_USE_V2_MODEL_RUNNER=1")
        policy_file = os.environ.get(vllm_plugin.ENV_POLICY_FILE)
        policy_path = Path(policy_file) if policy_file else None
        STATE.variants, STATE.num_layers = list(variants), vcfg.model_config.hf_text_config.num_hidden_layers
        STATE.configure(variants, STATE.num_layers, initial_policy(default_policy, STATE, policy_path))
        _wrap_runner(mrv2.GPUModelRunner)
        self.installed = True

    def start(self) -> None:
        """First real call in the worker process: start the policy watcher and the telemetry writer."""
        import atexit

        from vllm.distributed import get_tensor_model_parallel_rank

        self.started = True
        rank0 = get_tensor_model_parallel_rank() == 0
        policy_file = os.environ.get(vllm_plugin.ENV_POLICY_FILE)
        if policy_file:
            self.watcher = PolicyWatcher(Path(policy_file), STATE, write_acks=rank0).start()
        telemetry = os.environ.get(vllm_plugin.ENV_TELEMETRY)
        if telemetry and rank0:
            self.telemetry = StepTelemetry(Path(telemetry))
            atexit.register(self.telemetry.close)

    def composition(self, so) -> tuple[int, int]:
        """(prefill tokens, decode requests) of a SchedulerOutput; a request is in prefill while its
        computed tokens are still inside its prompt (new, chunked or resumed after preemption)."""
        lens = self.prompt_lens
        for rid in so.finished_req_ids:
            lens.pop(rid, None)
        new_ids = set()
        for req in so.scheduled_new_reqs:
            new_ids.add(req.req_id)
            lens[req.req_id] = len(req.prompt_token_ids or ())
        cached = so.scheduled_cached_reqs
        computed = dict(zip(cached.req_ids, cached.num_computed_tokens, strict=False)) if cached.req_ids else {}
        prefill = decode = 0
        for rid, n in so.num_scheduled_tokens.items():
            if rid in new_ids or computed.get(rid, 1 << 62) < lens.get(rid, 0):
                prefill += n
            else:
                decode += 1
        return prefill, decode

    def before_execute(self, runner, so, dummy: bool) -> None:
        if not self.started:
            self.start()
        ids = so.num_scheduled_tokens
        real = not dummy and so.total_num_scheduled_tokens > 0 and not any(r.startswith("_") for r in ids)
        if STATE.begin_step(real=real) is not None and self.banks and STATE.policy.layers != self.bank_layers:
            self.recapture(runner)
        prefill, decode = (so.total_num_scheduled_tokens, 0) if dummy else self.composition(so)
        variant = STATE.choose(prefill, decode)
        if self.banks:
            _use_bank(runner.cudagraph_manager, self.banks[variant])
        self.graph_used = False
        self._open = None
        if real and self.telemetry is not None and not self.telemetry.paused:
            t_start = time.perf_counter()
            record = {"step": STATE.step, "ts": round(time.time(), 6), "num_prefill_tokens": prefill,
                      "num_decode_reqs": decode, "variant": variant, "policy_name": STATE.policy.name}
            self._open = (record, t_start, time.perf_counter() - t_start)

    def after_sample(self) -> None:
        if self._open is None:
            return
        record, t_start, begin_cost = self._open
        t_end = time.perf_counter()
        self._open = None
        record["cudagraph"] = self.graph_used
        ran = self.bank_executed.get(record["variant"], set()) if self.graph_used else STATE.executed
        record["executed"] = sorted(ran)
        self.telemetry.submit(record, t_start, t_end)
        self.telemetry.add_main_cost(int((time.perf_counter() - t_end + begin_cost) * 1e9))

    def capture(self, runner, original) -> int:
        """Capture one graph bank per variant (see the module docstring)."""
        manager = runner.cudagraph_manager
        if manager is None or not manager.needs_capture():
            return original(runner)
        if not getattr(manager, "_flexquant_wrapped", False):
            self._mark_replays(manager)
        self.capturing = True
        try:
            total, banks, executed = self._capture_banks(runner, original)
        finally:
            self.capturing = False
        self.banks, self.bank_executed, self.bank_layers = banks, executed, STATE.policy.layers
        _use_bank(manager, banks[STATE.policy.prefill])
        STATE.force(STATE.policy.prefill)
        full, pieces = banks[STATE.policy.prefill]
        logger.info("FlexQuant captured %d full and %d breakable graphs in each of %d banks %s",
                    len(full), len(pieces), len(banks), list(banks))
        return total

    def _capture_banks(self, runner, original) -> tuple[int, dict, dict]:
        """Run vLLM's capture once per variant, that variant forced, each into an empty bank."""
        manager = runner.cudagraph_manager
        total, banks, executed = 0, {}, {}
        for variant in STATE.variants:
            STATE.force(variant)
            expected = set(STATE.plan or [variant])
            _use_bank(manager, ({}, {}))
            total += original(runner) or 0  # no thread of ours makes CUDA calls (global capture mode)
            banks[variant], executed[variant] = _bank_of(manager), set(STATE.executed)
            if executed[variant] != expected:
                raise FlexQuantError(f"FlexQuant: graphs for {variant!r} captured kernels of "
                                     f"{sorted(executed[variant])}, expected {sorted(expected)}")
        return total, banks, executed

    def _mark_replays(self, manager) -> None:
        """Note in `graph_used` that a step replayed graphs (FULL or breakable): no Python ran in `apply`."""
        from vllm.forward_context import get_forward_context

        replay_full, run_pieces = manager.run_fullgraph, manager.run_pw_graph

        def run_fullgraph(desc):
            self.graph_used = True
            return replay_full(desc)

        def run_pw_graph(model, model_inputs):
            pieces = manager.breakable_cg_runner
            missing = pieces is not None and get_forward_context().batch_descriptor not in pieces.entries
            if missing and not self.capturing:
                # this bank has no breakable graphs (dropped by a live layer-pin change): op by op
                self.graph_used = False
                return model(**model_inputs)
            # breakable graphs replay captured segments; compiled piecewise graphs never get here,
            # FlexQuant refuses torch.compile
            self.graph_used = manager.use_breakable_cg
            return run_pieces(model, model_inputs)

        manager.run_fullgraph, manager.run_pw_graph = run_fullgraph, run_pw_graph
        manager._flexquant_wrapped = True

    def recapture(self, runner) -> None:
        """New layer pins: drop the banks and capture again, between two steps.

        Breakable (prefill) graphs are not captured again: in a running engine torch 2.11's capture of
        their segments fails (CachingHostAllocator assert, seen on the H100 with vLLM 0.26), so after
        a pin change prefill and mixed steps run op by op until the engine restarts."""
        from vllm.config import CUDAGraphMode

        started = time.perf_counter()
        torch.cuda.synchronize()  # nothing in flight may still read the buffers capture overwrites
        manager = runner.cudagraph_manager
        _use_bank(manager, ({}, {}))
        self.banks = {}
        pieces = manager._capture_descs.pop(CUDAGraphMode.PIECEWISE, None)
        try:
            runner.capture_model()
        finally:
            if pieces is not None:
                manager._capture_descs[CUDAGraphMode.PIECEWISE] = pieces
        logger.info("FlexQuant re-captured graph banks for new layer pins in %.1f s%s",
                    time.perf_counter() - started,
                    "; prefill graphs dropped, prefill runs eagerly until a restart" if pieces else "")


RUNTIME = _Runtime()


def _use_bank(manager, bank: tuple[dict, dict]) -> None:
    """Point vLLM's graph manager at one variant's graphs: FULL graphs and, if on, breakable captures."""
    manager.graphs = bank[0]
    if manager.breakable_cg_runner is not None:
        manager.breakable_cg_runner.entries = bank[1]


def _bank_of(manager) -> tuple[dict, dict]:
    pieces = manager.breakable_cg_runner
    return manager.graphs, (pieces.entries if pieces is not None else {})


def install_runner_hooks(variants: list[str], default_policy: dict | None) -> None:
    RUNTIME.install(variants, default_policy)


def _wrap_runner(cls) -> None:
    """Wrap execute_model / sample_tokens / capture_model of vLLM's V2 `GPUModelRunner` class."""
    if getattr(cls, "_flexquant_wrapped", False):
        return
    execute_model, sample_tokens, capture_model = cls.execute_model, cls.sample_tokens, cls.capture_model

    def flex_execute_model(self, scheduler_output, *args, **kwargs):
        RUNTIME.before_execute(self, scheduler_output, bool(kwargs.get("dummy_run", False)))
        return execute_model(self, scheduler_output, *args, **kwargs)

    def flex_sample_tokens(self, *args, **kwargs):
        out = sample_tokens(self, *args, **kwargs)
        RUNTIME.after_sample()
        return out

    def flex_capture_model(self):
        return RUNTIME.capture(self, capture_model)

    cls.execute_model, cls.sample_tokens, cls.capture_model = (
        flex_execute_model, flex_sample_tokens, flex_capture_model)
    cls._flexquant_wrapped = True
