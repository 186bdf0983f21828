"""What to quantize into a merged checkpoint (`QuantRecipe`) and how each variant is built.

A variant name (`w8a8`, `w4a16`, `fp8`) maps to one llmcompressor preset scheme. The
compressed-tensors `quantization_config` of a variant is built by ONE function,
`variant_quant_config`, used by the real quantize path (which checks that llmcompressor wrote exactly
this) and by the synthetic-checkpoint writer, so the two layouts cannot drift apart.

compressed-tensors imports torch, so those imports stay inside functions: a job's `validate` hook
parses recipes in the UI process, which should not pay for torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "VARIANT_SPECS",
    "VariantSpec",
    "QuantRecipe",
    "parse_recipe",
    "choose_group_size",
    "variant_scheme",
    "variant_quant_config",
    "configs_equivalent",
    "expected_layout",
    "linear_shapes",
]

SCALE_DTYPES = {"BF16", "F16", "F32"}
# Module layout of the decoder families we write and read (all Llama-like).
LLAMA_LIKE = {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"}
# lm_head stays in bf16: it is small next to the body and very sensitive to quantization.
IGNORED_MODULES = ("lm_head",)
MIN_GROUP_SIZE = 16


@dataclass(frozen=True)
class VariantSpec:
    """How one variant is produced: llmcompressor preset, algorithm and on-disk format."""

    preset: str  # compressed-tensors preset scheme name
    algorithm: str  # "gptq" (needs calibration data) or "rtn" (data-free round-to-nearest)
    format: str  # compressed-tensors CompressionFormat value
    grouped: bool  # weights use GROUP strategy (group size is chosen per model)


VARIANT_SPECS: dict[str, VariantSpec] = {
    "w8a8": VariantSpec("W8A8", "gptq", "int-quantized", grouped=False),
    "w4a16": VariantSpec("W4A16", "gptq", "pack-quantized", grouped=True),
    "fp8": VariantSpec("FP8_DYNAMIC", "rtn", "float-quantized", grouped=False),
}


class QuantRecipe(BaseModel):
    """One quantization job: which variants, SmoothQuant strength and calibration budget.

    SmoothQuant (strength 0 disables it) runs once on the bf16 model; every variant is then
    quantized from the same smoothed weights, because the smoothing is folded into the layer norms
    that all variants share.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    variants: list[str] = Field(default_factory=lambda: ["w8a8", "w4a16"], min_length=1, max_length=4)
    smoothquant_strength: float = Field(default=0.8, ge=0.0, lt=1.0)
    w4a16_group_size: int = Field(default=128, ge=MIN_GROUP_SIZE, le=1024)
    calibration_path: str | None = None
    # 32 x 256 rather than 64 x 512: ~2.5x fewer calibration tokens, about half the CPU time of
    # quantize+merge on SmolLM2, the same accuracy within noise (docs/quantize-speed.md).
    num_samples: int = Field(default=32, ge=1, le=4096)
    seq_len: int = Field(default=256, ge=16, le=8192)

    @field_validator("variants")
    @classmethod
    def _known_variants(cls, variants: list[str]) -> list[str]:
        unknown = [v for v in variants if v not in VARIANT_SPECS]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; choose from {sorted(VARIANT_SPECS)}")
        if len(set(variants)) != len(variants):
            raise ValueError(f"variants {variants} name one variant twice")
        return variants

    @field_validator("w4a16_group_size")
    @classmethod
    def _power_of_two(cls, size: int) -> int:
        if size & (size - 1):
            raise ValueError(f"w4a16_group_size {size} must be a power of two (e.g. 64 or 128)")
        return size

    @property
    def needs_calibration(self) -> bool:
        return self.smoothquant_strength > 0 or any(
            VARIANT_SPECS[v].algorithm == "gptq" for v in self.variants
        )


def parse_recipe(data: dict | None) -> QuantRecipe:
    """Validate a recipe dict (from a job's params or the UI); `ValueError` naming each bad field."""
    try:
        return QuantRecipe.model_validate(data or {})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'recipe'}: {err['msg']}" for err in exc.errors()
        )
        raise ValueError(f"invalid quantization recipe: {problems}") from None


def choose_group_size(requested: int, in_features: Iterable[int]) -> int:
    """Largest power-of-two group size <= `requested` that divides every quantized input dimension.

    Example: SmolLM2's hidden size 576 is not a multiple of 128, so W4A16 uses 64 there.
    """
    dims = sorted(set(in_features))
    size = requested
    while size >= MIN_GROUP_SIZE:
        if all(d % size == 0 for d in dims):
            return size
        size //= 2
    raise ValueError(
        f"no group size between {MIN_GROUP_SIZE} and {requested} divides the input dimensions {dims}; "
        "this model cannot be quantized to grouped W4A16"
    )


def variant_scheme(variant: str, group_size: int | None = None):  # -> QuantizationScheme
    """The compressed-tensors `QuantizationScheme` a variant is quantized with (targets Linear).

    The fields llmcompressor fills in while quantizing (the weight observer, GPTQ's activation
    ordering) are set here too, so the scheme equals the one that ends up in the saved config.
    """
    from compressed_tensors.quantization import preset_name_to_scheme

    spec = VARIANT_SPECS[variant]
    scheme = preset_name_to_scheme(spec.preset, ["Linear"])
    if spec.grouped:
        if group_size is None:
            raise ValueError(f"variant {variant!r} needs a group size")
        scheme.weights.group_size = group_size
    scheme.weights.observer = "memoryless_minmax"
    if spec.algorithm == "gptq":
        scheme.weights.actorder = "static"
    scheme.format = spec.format
    return scheme


def variant_quant_config(variant: str, group_size: int | None = None) -> dict:
    """The variant's compressed-tensors `quantization_config` dict, as a saved checkpoint holds it."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig

    spec = VARIANT_SPECS[variant]
    config = QuantizationConfig(
        config_groups={"group_0": variant_scheme(variant, group_size)},
        format=spec.format,
        quantization_status="compressed",
        ignore=list(IGNORED_MODULES),
    )
    data = config.model_dump(mode="json", exclude={"quant_method"})
    # The same envelope ModelCompressor.update_config writes around the config.
    return {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **data,
    }


def configs_equivalent(a: dict, b: dict) -> bool:
    """Two variant configs describe the same quantization (ignoring the writer's version string)."""
    strip = lambda c: {k: v for k, v in c.items() if k != "version"}  # noqa: E731
    return strip(a) == strip(b)


def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """`[out, in]` of each quantized linear of one decoder layer, by name; {} for unknown families."""
    if not set(config.get("architectures") or []) & LLAMA_LIKE:
        return {}
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    ffn = config["intermediate_size"]
    return {
        "self_attn.q_proj": (heads * head_dim, hidden),
        "self_attn.k_proj": (kv * head_dim, hidden),
        "self_attn.v_proj": (kv * head_dim, hidden),
        "self_attn.o_proj": (hidden, heads * head_dim),
        "mlp.gate_proj": (ffn, hidden),
        "mlp.up_proj": (ffn, hidden),
        "mlp.down_proj": (hidden, ffn),
    }


def expected_layout(variant_config: dict, out_f: int, in_f: int) -> dict[str, tuple[set[str], list[int]]]:
    """Tensor name -> (allowed dtypes, shape) of one linear stored in a variant's format."""
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig.model_validate(variant_config)
    scheme = next(iter(qc.config_groups.values()))
    w = scheme.weights
    form = scheme.format or qc.format
    strategy = str(getattr(w.strategy, "value", w.strategy))
    groups = -(-in_f // w.group_size) if strategy == "group" else 1
    scale_shape = [1] if strategy == "tensor" else [out_f, groups]
    layout: dict[str, tuple[set[str], list[int]]] = {"weight_scale": (SCALE_DTYPES, scale_shape)}
    if form == "pack-quantized":
        layout["weight_packed"] = ({"I32"}, [out_f, -(-in_f * w.num_bits // 32)])
        layout["weight_shape"] = ({"I64", "I32"}, [2])
    elif form == "int-quantized":
        layout["weight"] = ({"I8"}, [out_f, in_f])
    elif form == "float-quantized":
        layout["weight"] = ({"F8_E4M3"}, [out_f, in_f])
    else:
        raise ValueError(f"compressed-tensors format {form!r} is not one the checker knows")
    if not w.symmetric:
        layout["weight_zero_point"] = ({"I8", "I32", "BF16", "F16", "F32"}, None)  # type: ignore[assignment]
    return layout
