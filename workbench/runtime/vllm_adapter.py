"""FlexQuant inside vLLM 0.26 (V2 model runner): the only module that touches vLLM internals.

Weights. `FlexQuantConfig` is registered as quantization method `flexquant`. It parses every variant's
compressed-tensors config with vLLM's own `CompressedTensorsConfig`; for each linear `FlexLinearMethod`
registers one CHILD module per variant (`qkv_proj.w8a8`, `qkv_proj.w4a16`) and lets that variant's
stock scheme create, load and repack its tensors there, so the kernels are vLLM's (cutlass int8;
Machete or Marlin int4, chosen per variant by config `kernels` / env FLEXQUANT_KERNELS). The merged
keys `...q_proj.w4a16.weight_packed` go through the stock Llama/Qwen loaders, which rename
q/k/v -> qkv_proj and shard them. The bias stays on the parent (Marlin would permute a child's bias).

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
run eagerly (H100 baseline: 2-5% TPOT vs compile + graphs, prefill unchanged).

Telemetry (rank 0, env FLEXQUANT_TELEMETRY): one JSON line per real step (`vllm_state`), with
`cudagraph` (replayed a bank?) and `executed` (variants whose kernels ran: recorded by `apply` in
eager steps, and at capture time for a bank) next to the contract keys.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import time
from pathlib import Path

import torch
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
    CompressedTensorsConfig,
)

from workbench.ckpt_format import FORMAT_VERSION, QUANT_METHOD
from workbench.runtime import vllm_plugin
from workbench.runtime.vllm_state import EngineState, PolicyWatcher, StepTelemetry, initial_policy

logger = logging.getLogger(__name__)
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
KERNEL_CHOICES = ("machete", "marlin")


class FlexQuantError(ValueError):
    """A FlexQuant checkpoint or launch setting vLLM cannot serve; the message says how to fix it."""


def register_quantization() -> None:
    """Register `flexquant` with vLLM (safe to call more than once, as plugins are)."""
    register_quantization_config(QUANT_METHOD)(FlexQuantConfig)
    # Our INFO lines (banks captured, policy applied) belong in the engine log next to vLLM's own.
    ours, theirs = logging.getLogger("workbench.runtime"), logging.getLogger("vllm")
    if not ours.handlers and theirs.handlers:
        for handler in theirs.handlers:
            ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


def parse_kernels(spec: str | None) -> dict[str, str]:
    """`"w4a16=marlin,w4g64=machete"` -> {"w4a16": "marlin", ...}; FlexQuantError on a bad entry."""
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        variant, _, kernel = item.partition("=")
        if kernel not in KERNEL_CHOICES:
            raise FlexQuantError(f"{vllm_plugin.ENV_KERNELS}: {item!r} must be VARIANT=machete|marlin")
        out[variant.strip()] = kernel
    return out


class FlexQuantConfig(QuantizationConfig):
    """`quantization_config = {"quant_method": "flexquant", "variants": {name: <ct cfg>}, ...}`."""

    def __init__(self, variants: dict[str, CompressedTensorsConfig], kernels: dict[str, str],
                 default_policy: dict | None) -> None:
        super().__init__()
        self.variants = variants
        self.kernels = kernels
        self.default_policy = default_policy
        self.packed_modules_mapping = self._packed  # now share the one dict with every variant

    # Models either .update() this dict (SupportsQuant) or assign a new one (configure_quant_config):
    # a property keeps every variant's config looking at the same mapping, so fused names resolve.
    @property
    def packed_modules_mapping(self) -> dict[str, list[str]]:
        return self._packed

    @packed_modules_mapping.setter
    def packed_modules_mapping(self, value: dict[str, list[str]]) -> None:
        self._packed = value
        for cfg in getattr(self, "variants", {}).values():
            cfg.packed_modules_mapping = value

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 75  # int8 tensor cores (cutlass W8A8); Machete additionally needs 90 and says so

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict) -> FlexQuantConfig:
        if config.get("format_version") != FORMAT_VERSION:
            raise FlexQuantError(
                f"FlexQuant checkpoint format_version {config.get('format_version')!r}; this plugin reads "
                f"{FORMAT_VERSION}. Re-export the checkpoint with this workbench version.")
        variants = config.get("variants")
        if not isinstance(variants, dict) or not variants:
            raise FlexQuantError("FlexQuant quantization_config has no 'variants' mapping in config.json")
        parsed = {}
        for name, ct_cfg in variants.items():
            try:  # from_config edits its input: keep config.json's dict intact
                parsed[name] = CompressedTensorsConfig.from_config(copy.deepcopy(ct_cfg))
            except Exception as exc:
                raise FlexQuantError(f"FlexQuant variant {name!r}: compressed-tensors config rejected: "
                                     f"{exc}") from exc
        kernels = {**(config.get("kernels") or {}), **parse_kernels(os.environ.get(vllm_plugin.ENV_KERNELS))}
        unknown = sorted(set(kernels) - set(parsed))
        if unknown:
            raise FlexQuantError(f"FlexQuant kernels name unknown variant(s) {unknown}; have {sorted(parsed)}")
        return cls(parsed, kernels, config.get("policy"))

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        for cfg in self.variants.values():
            cfg.apply_vllm_mapper(hf_to_vllm_mapper)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            # Attention KV scales, embeddings, lm_head: identical in every variant; stock handling.
            return next(iter(self.variants.values())).get_quant_method(layer, prefix)
        schemes = {name: cfg.get_scheme(layer=layer, layer_name=prefix) for name, cfg in self.variants.items()}
        if all(s is None for s in schemes.values()):
            return UnquantizedLinearMethod()
        missing = sorted(name for name, s in schemes.items() if s is None)
        if missing:
            raise FlexQuantError(f"FlexQuant: linear {prefix} is not quantized in variant(s) {missing}; "
                                 "every variant must quantize the same linears (check the 'ignore' lists)")
        install_runner_hooks(list(self.variants), self.default_policy)
        match = _LAYER_RE.search(prefix)
        return FlexLinearMethod(prefix, int(match.group(1)) if match else None, schemes, self.kernels)


def _tracking_loader(loader):
    """Wrap a weight loader so we can tell afterwards which child tensors the checkpoint filled."""
    def load(param, loaded_weight, *args, **kwargs):
        param._flexquant_loaded = True
        return loader(param, loaded_weight, *args, **kwargs)
    return load


def _override_int4_kernel(prefix: str, variant: str, scheme, kernel: str) -> None:
    """Swap the mixed-precision kernel vLLM picked (Machete on H100) for the one the config names."""
    from vllm.model_executor.kernels.linear import MacheteLinearKernel, MarlinLinearKernel
    from vllm.platforms import current_platform

    wanted = {"machete": MacheteLinearKernel, "marlin": MarlinLinearKernel}[kernel]
    current = getattr(scheme, "kernel", None)
    if current is None or not hasattr(current, "w_q_name"):
        raise FlexQuantError(f"FlexQuant: variant {variant!r} is not a 4-bit weight-only variant; "
                             f"remove it from 'kernels'")
    if type(current) is wanted:
        return
    cap = current_platform.get_device_capability()
    ok, why = wanted.can_implement(current.config)
    if cap is not None and wanted.get_min_capability() > cap.to_int():
        ok, why = False, f"needs compute capability {wanted.get_min_capability()}, GPU has {cap.to_int()}"
    if not ok:
        raise FlexQuantError(f"FlexQuant: the {kernel} kernel cannot run {prefix} of variant {variant!r}: {why}")
    scheme.kernel = wanted(current.config, w_q_param_name=current.w_q_name, w_s_param_name=current.w_s_name,
                           w_zp_param_name=current.w_zp_name, w_gidx_param_name=current.w_gidx_name)
    if (variant, kernel) not in _ANNOUNCED:
        _ANNOUNCED.add((variant, kernel))
        logger.info("FlexQuant: variant %s uses %s instead of %s", variant, wanted.__name__, type(current).__name__)


_ANNOUNCED: set[tuple[str, str]] = set()


@register_weight_loader_v2_supported_method
class FlexLinearMethod(LinearMethodBase):
    """One linear holding every variant as a child module; `apply` runs the variant of this step."""

    def __init__(self, prefix: str, layer_idx: int | None, schemes: dict, kernels: dict[str, str]) -> None:
        self.prefix = prefix
        self.layer_idx = layer_idx
        self.schemes = schemes
        self.kernels = kernels

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size,
                       output_size, params_dtype, **extra_weight_attrs) -> None:
        loader = _tracking_loader(extra_weight_attrs["weight_loader"])
        for variant, scheme in self.schemes.items():
            holder = torch.nn.Module()
            layer.register_module(variant, holder)
            scheme.create_weights(layer=holder, input_size=input_size,
                                  input_size_per_partition=input_size_per_partition,
                                  output_partition_sizes=output_partition_sizes, output_size=output_size,
                                  params_dtype=params_dtype, weight_loader=loader)
            if variant in self.kernels:
                _override_int4_kernel(self.prefix, variant, scheme, self.kernels[variant])

    def process_weights_after_loading(self, layer) -> None:
        # vLLM skips its missing-weight check for quantized models; an unfilled child would serve
        # garbage from torch.empty, so refuse to start instead.
        missing = [f"{self.prefix}.{variant}.{name}" for variant in self.schemes
                   for name, p in getattr(layer, variant).named_parameters(recurse=False)
                   if not getattr(p, "_flexquant_loaded", False)]
        if missing:
            raise FlexQuantError(f"FlexQuant checkpoint is missing {len(missing)} tensor(s), e.g. "
                                 f"{missing[:3]}; re-run the quantize job or check the merge")
        for variant, scheme in self.schemes.items():
            scheme.process_weights_after_loading(getattr(layer, variant))

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        plan = STATE.plan
        variant = STATE.step_variant if plan is None or self.layer_idx is None else plan[self.layer_idx]
        STATE.executed.add(variant)
        out = self.schemes[variant].apply_weights(getattr(layer, variant), x, None)
        return out if bias is None else out + bias


STATE = EngineState()


class _Runtime:
    """The per-process glue around vLLM's V2 model runner: step plans, graph banks, telemetry."""

    def __init__(self) -> None:
        self.installed = False
        self.started = False
        self.banks: dict[str, dict] = {}  # variant -> that variant's {BatchExecutionDescriptor: graph}
        self.bank_executed: dict[str, set[str]] = {}
        self.bank_layers: object = None  # the policy's layer pins the banks were captured with
        self.graph_used = False
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
            runner.cudagraph_manager.graphs = self.banks[variant]
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
            replay = manager.run_fullgraph

            def run_fullgraph(desc):
                self.graph_used = True
                return replay(desc)

            manager.run_fullgraph = run_fullgraph
            manager._flexquant_wrapped = True
        total, banks, executed = 0, {}, {}
        for variant in STATE.variants:
            STATE.force(variant)
            expected = set(STATE.plan or [variant])
            manager.graphs = {}
            total += original(runner) or 0  # no thread of ours makes CUDA calls (global capture mode)
            banks[variant], executed[variant] = manager.graphs, set(STATE.executed)
            if executed[variant] != expected:
                raise FlexQuantError(f"FlexQuant: graphs for {variant!r} captured kernels of "
                                     f"{sorted(executed[variant])}, expected {sorted(expected)}")
        self.banks, self.bank_executed, self.bank_layers = banks, executed, STATE.policy.layers
        manager.graphs = banks[STATE.policy.prefill]
        STATE.force(STATE.policy.prefill)
        logger.info("FlexQuant captured %d graphs in each of %d banks %s",
                    len(manager.graphs), len(banks), list(banks))
        return total

    def recapture(self, runner) -> None:
        """New layer pins: drop the banks and capture again, between two steps."""
        started = time.perf_counter()
        torch.cuda.synchronize()  # nothing in flight may still read the buffers capture overwrites
        runner.cudagraph_manager.graphs = {}
        self.banks = {}
        runner.capture_model()
        logger.info("FlexQuant re-captured graph banks for new layer pins in %.1f s",
                    time.perf_counter() - started)


RUNTIME = _Runtime()


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
