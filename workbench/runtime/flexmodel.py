"""FlexModel: a merged FlexQuant checkpoint on the CPU, with per-step (and per-layer) variant switching.

The architecture comes from `config.json` (minus its `quantization_config`) through transformers;
shared tensors load as usual; every quantized `nn.Linear` becomes a `FlexLinear` that holds each
variant's weight dequantized by compressed-tensors' own compressors (int8 channel, packed int4
groups, fp8), so what we compute is what those formats mean. Dynamic input quantization (W8A8's
per-token int8 activations) is fake-quantized at forward time with compressed-tensors' functions,
so CPU accuracy matches what the int8 kernels compute.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp
from compressed_tensors.utils.match import is_match
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.initialization import no_init_weights

from workbench.ckpt_format import read_flexquant_config, split_variant_key
from workbench.policy import Policy, PolicyError, StepInfo, check_policy_for, decide
from workbench.runtime.memory import MemoryReport, variants_needed

log = logging.getLogger(__name__)

__all__ = ["FlexLinear", "FlexModel", "FlexModelError"]

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


class FlexModelError(ValueError):
    """The checkpoint cannot be loaded as a merged FlexQuant checkpoint; the message says why."""


class FlexLinear(nn.Module):
    """A linear layer holding one dequantized weight per variant; `active` picks which computes."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
        self.weights: dict[str, torch.Tensor] = {}
        self.input_args: dict[str, QuantizationArgs | None] = {}
        self.quant_bytes: dict[str, int] = {}  # checkpoint bytes of each variant's tensors
        self.active: str | None = None

    def add_variant(self, variant: str, weight: torch.Tensor, input_args: QuantizationArgs | None,
                    quant_bytes: int) -> None:
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise FlexModelError(f"variant {variant}: weight shape {tuple(weight.shape)} != "
                                 f"({self.out_features}, {self.in_features})")
        self.weights[variant] = weight
        self.input_args[variant] = input_args
        self.quant_bytes[variant] = quant_bytes

    def drop_variant(self, variant: str) -> int:
        """Free one variant's weight; returns its quantized byte count."""
        self.weights.pop(variant)
        self.input_args.pop(variant)
        if self.active == variant:
            self.active = None
        return self.quant_bytes.pop(variant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variant = self.active
        if variant is None:
            raise RuntimeError("FlexLinear has no active variant: call FlexModel.set_step or use_variant")
        args = self.input_args[variant]
        if args is not None and x.numel():
            # Dynamic per-token int8 (or fp8) activations: the same QDQ compressed-tensors runs.
            scale, zero_point = compute_dynamic_scales_and_zp(value=x, args=args, module=self)
            x = fake_quantize(x=x, scale=scale, zero_point=zero_point, args=args)
        return F.linear(x, self.weights[variant], self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, variants={list(self.weights)}, "
                f"active={self.active}")


def _open_tensors(ckpt_dir: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it."""
    files = sorted(ckpt_dir.glob("*.safetensors"))
    if not files:
        raise FlexModelError(f"{ckpt_dir}: no *.safetensors files; is this a checkpoint folder?")
    where: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                where[key] = path
    return where


def _load(where: dict[str, Path], keys: list[str]) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[str]] = defaultdict(list)
    for key in keys:
        by_file[where[key]].append(key)
    out: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            out.update({n: f.get_tensor(n) for n in names})
    return out


def _scheme_for(prefix: str, module: nn.Module, qcfg: QuantizationConfig,
                variant: str) -> tuple[QuantizationScheme, str]:
    """The compressed-tensors scheme (and storage format) this variant's config gives one linear."""
    for scheme in qcfg.config_groups.values():
        if is_match(prefix, module, scheme.targets, qcfg.ignore or ()):
            fmt = scheme.format or qcfg.format
            if fmt is None:
                raise FlexModelError(f"variant {variant}: no compression format for {prefix}")
            return scheme, str(getattr(fmt, "value", fmt))
    raise FlexModelError(
        f"variant {variant}: the checkpoint stores tensors for {prefix} but no config group of "
        f"quantization_config.variants.{variant} targets it; the config and the tensors disagree"
    )


class FlexModel:
    """A merged checkpoint loaded for CPU inference; see the module docstring."""

    def __init__(self, model: nn.Module, tokenizer, variants: list[str], linears: dict[str, FlexLinear],
                 shared_bytes: int, bf16_bytes: int, ckpt_dir: Path):
        self.model, self.tokenizer, self.variants = model, tokenizer, variants
        self.linears = linears
        self.layer_of = {p: (int(m.group(1)) if (m := _LAYER_RE.search(f".{p}.")) else None) for p in linears}
        self.num_layers = int(model.config.num_hidden_layers)
        self.shared_bytes, self.bf16_bytes, self.ckpt_dir = shared_bytes, bf16_bytes, ckpt_dir
        self.dropped: dict[str, int] = defaultdict(int)

    @classmethod
    def load(cls, ckpt_dir: Path, *, dtype: torch.dtype = torch.float32) -> FlexModel:
        """Load a merged FlexQuant checkpoint folder (FlexModelError if it is not one)."""
        ckpt_dir = Path(ckpt_dir)
        try:
            fq = read_flexquant_config(ckpt_dir)
        except (OSError, ValueError) as exc:
            raise FlexModelError(str(exc)) from None
        variants = list(fq["variants"])
        qcfgs = {v: QuantizationConfig.model_validate(c) for v, c in fq["variants"].items()}

        config = AutoConfig.from_pretrained(ckpt_dir)
        # The flexquant quantization_config means nothing to transformers; we do the quantized part.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.eval()

        where = _open_tensors(ckpt_dir)
        per_linear: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        shared_keys: list[str] = []
        for key in where:
            split = split_variant_key(key, variants)
            if split is None:
                shared_keys.append(key)
            else:
                per_linear[split[0]][split[1]].append(key)

        linears: dict[str, FlexLinear] = {}
        bf16_bytes = 0
        for prefix, by_variant in per_linear.items():
            try:
                old = model.get_submodule(prefix)
            except AttributeError:
                raise FlexModelError(f"{ckpt_dir}: tensors for {prefix!r}, which the architecture lacks; "
                                     "the config.json and the weights disagree") from None
            if not isinstance(old, nn.Linear):
                raise FlexModelError(f"{prefix} is a {type(old).__name__}, only nn.Linear can be quantized")
            flex = FlexLinear(old.in_features, old.out_features, old.bias is not None, dtype)
            for variant, keys in by_variant.items():
                tensors = _load(where, keys)
                local = {k[len(prefix) + len(variant) + 2:]: t for k, t in tensors.items()}
                # Dequantize in the compute dtype: int x bf16 scale rounded to bf16 would add an error
                # of its own on top of quantization (and differ from compressed-tensors' own load).
                local = {k: t.to(dtype) if k.endswith("_scale") else t for k, t in local.items()}
                scheme, fmt = _scheme_for(prefix, old, qcfgs[variant], variant)
                weight = BaseCompressor.get_value_from_registry(fmt).decompress(dict(local), scheme)["weight"]
                acts = scheme.input_activations
                args = acts if acts is not None and acts.dynamic else None
                flex.add_variant(variant, weight.to(dtype), args, sum(t.nbytes for t in tensors.values()))
            parent_name, _, child = prefix.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, flex)
            linears[prefix] = flex
            bf16_bytes += 2 * old.in_features * old.out_features

        stored = _load(where, shared_keys)
        shared_bytes = sum(t.nbytes for t in stored.values())  # as stored (bf16), not as computed
        bf16_bytes += sum(2 * t.numel() for t in stored.values())
        # assign=True keeps the tensors' dtypes: cast bf16 norms/embeddings to the compute dtype.
        shared = {k: t.to(dtype) if t.is_floating_point() else t for k, t in stored.items()}
        del stored
        missing, unexpected = model.load_state_dict(shared, strict=False, assign=True)
        if unexpected:
            raise FlexModelError(f"{ckpt_dir}: tensors the architecture does not have: {unexpected[:5]}")
        tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        if set(missing) - tied:
            raise FlexModelError(f"{ckpt_dir}: missing tensors {sorted(set(missing) - tied)[:5]}; "
                                 "the checkpoint is incomplete")
        if tied:
            model.tie_weights()
        has_tokenizer = any((ckpt_dir / n).exists() for n in ("tokenizer.json", "tokenizer_config.json"))
        tokenizer = AutoTokenizer.from_pretrained(ckpt_dir) if has_tokenizer else None
        if tokenizer is None:
            log.warning("%s has no tokenizer files; FlexModel.tokenizer is None", ckpt_dir)
        flex_model = cls(model, tokenizer, variants, linears, shared_bytes, bf16_bytes, ckpt_dir)
        flex_model.use_variant(variants[0])
        log.info("loaded %s: %d flex linears, variants %s", ckpt_dir, len(linears), variants)
        return flex_model

    # --- choosing the variant -------------------------------------------------------------------
    def check_policy(self, policy: Policy) -> None:
        """PolicyError unless every variant the policy can pick is in the checkpoint and resident."""
        check_policy_for(policy, self.variants, self.num_layers)
        for prefix, lin in self.linears.items():
            gone = variants_needed(policy, self.layer_of[prefix]) - set(lin.weights)
            if gone:
                raise PolicyError(f"policy {policy.name!r} needs {sorted(gone)} at {prefix}, which "
                                  "drop_unused() freed; reload the checkpoint to use this policy")

    def set_step(self, policy: Policy, step: StepInfo) -> dict[int, str]:
        """Configure every layer for this step via `decide`; returns layer -> variant."""
        chosen = {i: decide(policy, StepInfo(step.num_prefill_tokens, step.num_decode_reqs, layer=i))
                  for i in range(self.num_layers)}
        other = decide(policy, StepInfo(step.num_prefill_tokens, step.num_decode_reqs, layer=None))
        for prefix, lin in self.linears.items():
            layer = self.layer_of[prefix]
            variant = chosen[layer] if layer is not None else other
            if variant not in lin.weights:
                raise PolicyError(f"variant {variant!r} is not resident at {prefix}; check_policy first")
            lin.active = variant
        return chosen

    def use_variant(self, variant: str) -> None:
        """Run every quantized linear with one variant (the `all-<variant>` baseline)."""
        if variant not in self.variants:
            raise PolicyError(f"variant {variant!r} not in this checkpoint; it has {self.variants}")
        for prefix, lin in self.linears.items():
            if variant not in lin.weights:
                raise PolicyError(f"variant {variant!r} was dropped at {prefix}")
            lin.active = variant

    # --- memory ---------------------------------------------------------------------------------
    def weight_bytes(self) -> dict[str, int]:
        """Resident quantized bytes per variant (as stored in the checkpoint) plus "shared"."""
        out = {v: sum(lin.quant_bytes.get(v, 0) for lin in self.linears.values()) for v in self.variants}
        out["shared"] = self.shared_bytes
        return out

    def memory_report(self) -> MemoryReport:
        per_variant = {k: v for k, v in self.weight_bytes().items() if k != "shared"}
        return MemoryReport(per_variant=per_variant, shared=self.shared_bytes, bf16=self.bf16_bytes,
                            dropped=dict(self.dropped))

    def drop_unused(self, policy: Policy) -> int:
        """Free each layer's variants the policy can never pick there (layer rules pin some layers).

        Returns the quantized bytes freed. Afterwards only policies that fit the remaining variants
        pass `check_policy`.
        """
        self.check_policy(policy)
        freed = 0
        for prefix, lin in self.linears.items():
            for variant in set(lin.weights) - variants_needed(policy, self.layer_of[prefix]):
                n = lin.drop_variant(variant)
                self.dropped[variant] += n
                freed += n
        log.info("drop_unused(%s): freed %d quantized bytes", policy.name, freed)
        return freed
