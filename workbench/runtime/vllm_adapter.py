"""FlexQuant inside vLLM 0.26 (V2 model runner), the weights side: quantization method and linears.

vLLM internals are touched only here and in `vllm_dispatch` (the runner side: per-step dispatch,
CUDA graph banks, telemetry). Both are imported only inside vLLM's processes (`vllm_plugin`).

Weights. `FlexQuantConfig` is registered as quantization method `flexquant`. It parses every variant's
compressed-tensors config with vLLM's own `CompressedTensorsConfig`; for each linear `FlexLinearMethod`
registers one CHILD module per variant (`qkv_proj.w8a8`, `qkv_proj.w4a16`) and lets that variant's
stock scheme create, load and repack its tensors there, so the kernels are vLLM's (cutlass int8;
Machete or Marlin int4, chosen per variant by config `kernels` / env FLEXQUANT_KERNELS). The merged
keys `...q_proj.w4a16.weight_packed` go through the stock Llama/Qwen loaders, which rename
q/k/v -> qkv_proj and shard them. The bias stays on the parent (Marlin would permute a child's bias).
"""

from __future__ import annotations

import copy
import logging
import os
import re

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
from workbench.runtime.vllm_dispatch import STATE, install_runner_hooks
from workbench.runtime.vllm_state import FlexQuantError

logger = logging.getLogger(__name__)
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
KERNEL_CHOICES = ("machete", "marlin")


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
