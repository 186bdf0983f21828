"""The two model stages of a quantize job, each an llmcompressor `oneshot` run on a freshly loaded model.

`smooth_model` applies SmoothQuant once and saves the smoothed weights in bf16; `quantize_variant`
quantizes a model to one variant (GPTQ, or data-free RTN for fp8) and saves it as compressed-tensors,
refusing a saved quantization_config that differs from `variant_quant_config`. The job around them
(calibration data, group sizes, merge, manifest) is `workbench.quant.factory.quantize_and_merge`;
`workbench.quant.parallel` runs `quantize_variant` in child processes.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch

from workbench.quant.calibration import LayerProgress
from workbench.quant.recipe import (
    IGNORED_MODULES,
    VARIANT_SPECS,
    QuantRecipe,
    configs_equivalent,
    variant_quant_config,
    variant_scheme,
)

__all__ = ["compute_dtype", "quantize_variant", "smooth_model"]

STORAGE_DTYPE = torch.bfloat16


def compute_dtype() -> torch.dtype:
    """Calibration/GPTQ arithmetic dtype: bf16 on a GPU; fp32 on a CPU, where bf16 matmuls without
    native bf16 instructions (AVX2) run ~6x slower than fp32. Checkpoints are stored in bf16 either way."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def _load(model_dir: Path, dtype: torch.dtype | None = None):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype or compute_dtype())


def _cast_for_storage(model: torch.nn.Module, dtype: torch.dtype = STORAGE_DTYPE) -> None:
    """Cast everything but the quantized weights to the storage dtype before compressing.

    The quantized `weight` stays in the compute dtype: compression computes round(w / scale), and
    with w = q * scale_fp32 and a bf16-rounded scale (relative error <= 2^-9) that still rounds back
    to exactly the integers GPTQ chose (|q| * 2^-9 < 0.5 for |q| <= 127), so only the scales carry
    bf16 rounding, as they would had the whole run been in bf16.
    """
    for module in model.modules():
        quantized = hasattr(module, "quantization_scheme")
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and not (quantized and name == "weight"):
                param.data = param.data.to(dtype)
    model.config.dtype = dtype


def _oneshot(model, tokenizer, modifier, data, recipe: QuantRecipe, **extra) -> None:
    from llmcompressor import oneshot

    kwargs = {}
    if data is not None:
        kwargs = dict(
            dataset=data,
            num_calibration_samples=len(data),
            max_seq_length=recipe.seq_len,
            shuffle_calibration_samples=False,  # same samples, same order: reproducible variants
            **extra,
        )
    oneshot(model=model, processor=tokenizer, recipe=[modifier], **kwargs)


def smooth_model(
    source_dir: Path,
    out_dir: Path,
    recipe: QuantRecipe,
    data,
    tokenizer,
    reporter,
    *,
    lo: float = 0.0,
    hi: float = 100.0,
) -> Path:
    """Apply SmoothQuant once to the model and save the smoothed weights (bf16) to `out_dir`.

    Smoothing leaves every layer's output unchanged, so the pipeline's second (error-propagating)
    pass per layer would only repeat the first: `propagate_error=False` halves the cost.
    """
    from llmcompressor.modifiers.transform import SmoothQuantModifier

    model = _load(source_dir)
    progress = LayerProgress(model, reporter, "smooth", lo, hi)
    try:
        _oneshot(
            model,
            tokenizer,
            SmoothQuantModifier(smoothing_strength=recipe.smoothquant_strength),
            data,
            recipe,
            propagate_error=False,
        )
    finally:
        progress.remove()
    # Round to bf16 once, here: every variant then starts from the same stored smoothed weights.
    model.to(STORAGE_DTYPE)
    model.config.dtype = STORAGE_DTYPE
    model.save_pretrained(str(out_dir), save_compressed=False)
    # llmcompressor 0.14 writes a recipe.yaml it cannot parse back (python/tuple tags); the recipe is
    # in our manifest, and a stale one would break the next save_pretrained that merges recipes.
    (Path(out_dir) / "recipe.yaml").unlink(missing_ok=True)
    del model
    gc.collect()
    return Path(out_dir)


def quantize_variant(
    model_dir: Path,
    variant: str,
    out_dir: Path,
    *,
    recipe: QuantRecipe,
    data,
    tokenizer,
    group_size: int | None,
    reporter=None,
    lo: float = 0.0,
    hi: float = 100.0,
) -> Path:
    """Quantize the model at `model_dir` to `variant` and save it compressed to `out_dir`."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    spec = VARIANT_SPECS[variant]
    scheme = variant_scheme(variant, group_size)
    kwargs = dict(config_groups={"group_0": scheme}, ignore=list(IGNORED_MODULES))
    if spec.algorithm == "gptq":
        # On a CPU the GPTQ column loop (Python overhead per column) dominates, not the matmuls;
        # solving same-shape linears together (q+o, k+v, gate+up) cuts ~15% of a variant's time.
        # llmcompressor's "auto" batches only on CUDA (it sizes batches from free GPU memory).
        modifier = GPTQModifier(**kwargs, batched_quantization="auto" if torch.cuda.is_available() else 4)
    else:
        modifier = QuantizationModifier(**kwargs)
    model = _load(model_dir)
    progress = (
        LayerProgress(model, reporter, f"quantize {variant}", lo, lo + (hi - lo) * 0.9) if reporter else None
    )
    try:
        _oneshot(model, tokenizer, modifier, data if spec.algorithm == "gptq" else None, recipe)
    finally:
        if progress:
            progress.remove()
    if reporter:
        reporter.update(f"save {variant}", lo + (hi - lo) * 0.9, f"writing {variant} (compressed-tensors)")
    _cast_for_storage(model)
    model.save_pretrained(str(out_dir), save_compressed=True)
    (Path(out_dir) / "recipe.yaml").unlink(missing_ok=True)
    del model
    gc.collect()
    saved = json.loads((Path(out_dir) / "config.json").read_text())["quantization_config"]
    if not configs_equivalent(saved, variant_quant_config(variant, group_size)):
        # Synthetic checkpoints are built from variant_quant_config: refuse to let the layouts drift.
        raise RuntimeError(
            f"llmcompressor saved a {variant} quantization_config that differs from "
            "workbench.quant.recipe.variant_quant_config; update variant_scheme to match this llmcompressor"
        )
    return Path(out_dir)
