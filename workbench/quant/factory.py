"""`quantize_and_merge`: a bf16 HF model folder -> one merged multi-variant FlexQuant checkpoint.

Stages: load -> calibration data (`calibration.py`) -> SmoothQuant ONCE (llmcompressor
`SmoothQuantModifier`; it folds scales into the layer norms every variant shares) -> for each
variant, reload the SAME smoothed weights and quantize them (GPTQ, or data-free RTN for fp8) with
llmcompressor `oneshot`, saving a compressed-tensors folder (on a CPU, small models run the variants
side by side: `parallel.py`) -> merge -> validate -> publish atomically. Intermediates live in
`work_dir`. The two llmcompressor runs, `smooth_model` and `quantize_variant`, are in `stages.py`."""

from __future__ import annotations

import hashlib
import logging
import resource
import time
from pathlib import Path

import torch

from workbench.quant.calibration import calibration_dataset
from workbench.quant.ckpt_io import tool_versions
from workbench.quant.merge import merge_variants
from workbench.quant.parallel import quantize_variants_in_parallel, use_parallel_variants
from workbench.quant.recipe import IGNORED_MODULES, VARIANT_SPECS, QuantRecipe, choose_group_size
from workbench.quant.stages import compute_dtype, quantize_variant, smooth_model

__all__ = [
    "quantize_and_merge",
    "quantized_in_features",
]

log = logging.getLogger(__name__)

# Share of the job's 0..100 progress per stage (GPTQ dominates; merge and check are I/O).
LOAD_END, CALIB_END, SMOOTH_END, QUANT_END = 4.0, 6.0, 18.0, 90.0


def _peak_rss_bytes(who: int = resource.RUSAGE_SELF) -> int:
    return resource.getrusage(who).ru_maxrss * 1024  # Linux reports KiB


def quantized_in_features(model: torch.nn.Module) -> list[int]:
    """Input sizes of the linears that get quantized (every Linear but lm_head)."""
    return [
        m.in_features
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] not in IGNORED_MODULES
    ]


def _in_features(model_dir: Path) -> list[int]:
    """Input sizes of the model's quantized linears, from a weightless (meta device) instance."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        return quantized_in_features(AutoModelForCausalLM.from_config(config))


def _choose_group_sizes(recipe: QuantRecipe, in_features: list[int]) -> tuple[dict, list[str]]:
    """Group size per variant (None where ungrouped) and a note for each one lowered to fit."""
    group_sizes, notes = {}, []
    for v in recipe.variants:
        group_sizes[v] = None
        if VARIANT_SPECS[v].grouped:
            group_sizes[v] = choose_group_size(recipe.w4a16_group_size, in_features)
            if group_sizes[v] != recipe.w4a16_group_size:
                bad = sorted({d for d in in_features if d % recipe.w4a16_group_size})
                notes.append(
                    f"{v}: group size {group_sizes[v]} instead of {recipe.w4a16_group_size}, because "
                    f"input dimension(s) {bad} are not multiples of {recipe.w4a16_group_size}"
                )
    return group_sizes, notes


def quantize_and_merge(
    source_dir: Path,
    out_dir: Path,
    recipe: QuantRecipe,
    *,
    reporter,
    work_dir: Path,
    keep_intermediates: bool = False,
) -> Path:
    """Quantize `source_dir` (bf16 HF folder) to every variant of `recipe`; publish the merge at `out_dir`.

    Raises `FileExistsError` if `out_dir` exists, `ModelError` for an unusable source, `Cancelled`
    when the reporter says so (checked between stages and per layer).
    """
    from transformers import AutoTokenizer

    from workbench.models import inspect_model_dir

    source_dir, out_dir, work_dir = Path(source_dir), Path(out_dir), Path(work_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; pick another checkpoint name or delete that folder")
    info = inspect_model_dir(source_dir)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    reporter.update("load", 0.0, f"loading {source_dir.name}")
    tokenizer = AutoTokenizer.from_pretrained(str(source_dir))
    group_sizes, notes = _choose_group_sizes(recipe, _in_features(source_dir))
    for note in notes:
        reporter.log(note)
    timings["load"] = time.monotonic() - t0
    reporter.update("calibration", LOAD_END, "tokenizing calibration text")
    reporter.check_cancelled()
    data, calib = calibration_dataset(tokenizer, recipe) if recipe.needs_calibration else (None, None)
    if calib:
        reporter.log(
            f"calibration: {calib['num_samples']} samples from {calib['source']}, "
            f"{calib['num_tokens']} tokens (seq_len {recipe.seq_len})"
        )
    base_dir = source_dir
    if recipe.smoothquant_strength > 0:
        t = time.monotonic()
        reporter.update("smooth", CALIB_END, f"SmoothQuant (strength {recipe.smoothquant_strength})")
        base_dir = smooth_model(
            source_dir, work_dir / "smoothed", recipe, data, tokenizer, reporter, lo=CALIB_END, hi=SMOOTH_END
        )
        timings["smooth"] = time.monotonic() - t
    variant_dirs = {}
    step = (QUANT_END - SMOOTH_END) / len(recipe.variants)
    if use_parallel_variants(len(recipe.variants), (info.num_params or 0) * 2):
        reporter.check_cancelled()
        t = time.monotonic()
        variant_dirs, seconds = quantize_variants_in_parallel(
            base_dir,
            source_dir,
            work_dir / "variants",
            recipe=recipe,
            group_sizes=group_sizes,
            reporter=reporter,
            lo=SMOOTH_END,
            hi=QUANT_END,
        )
        timings.update(seconds)
        timings["variants_wall"] = time.monotonic() - t
        reporter.log(
            f"variants quantized side by side in {timings['variants_wall']:.1f} s "
            f"({', '.join(f'{v} {x:.1f} s' for v, x in seconds.items())})"
        )
    for i, v in enumerate(recipe.variants):
        if v in variant_dirs:
            continue
        reporter.check_cancelled()
        t = time.monotonic()
        lo = SMOOTH_END + i * step
        reporter.update(
            f"quantize {v}", lo, f"{VARIANT_SPECS[v].algorithm.upper()} {VARIANT_SPECS[v].preset}"
        )
        variant_dirs[v] = quantize_variant(
            base_dir,
            v,
            work_dir / "variants" / v,
            recipe=recipe,
            data=data,
            tokenizer=tokenizer,
            group_size=group_sizes[v],
            reporter=reporter,
            lo=lo,
            hi=lo + step,
        )
        timings[v] = time.monotonic() - t
        reporter.log(f"{v}: quantized in {timings[v]:.1f} s")
    reporter.check_cancelled()
    t = time.monotonic()
    reporter.update("merge", QUANT_END, "merging variants")
    manifest = {
        "source": {
            "path": str(source_dir.resolve()),
            "config_sha256": hashlib.sha256((source_dir / "config.json").read_bytes()).hexdigest(),
            "architecture": info.architecture,
            "num_params": info.num_params,
        },
        "recipe": recipe.model_dump(),
        "calibration": calib,
        "versions": tool_versions(),
        "compute_dtype": str(compute_dtype()).removeprefix("torch."),
        "group_sizes": group_sizes,
        "notes": notes,
        "variants": {
            v: {"scheme": VARIANT_SPECS[v].preset, "algorithm": VARIANT_SPECS[v].algorithm, "group_size": g}
            for v, g in group_sizes.items()
        },
        "timings_s": {k: round(x, 2) for k, x in timings.items()},
        "peak_rss_bytes": _peak_rss_bytes(),
        # Variants quantized side by side ran in child processes (the job worker's tree RSS counts all)
        "peak_rss_largest_child_bytes": _peak_rss_bytes(resource.RUSAGE_CHILDREN),
    }
    from jobs.progress import Span

    merge_variants(
        variant_dirs,
        out_dir,
        tokenizer_dir=source_dir,
        manifest=manifest,
        reporter=Span(reporter, QUANT_END, 99.0),
    )
    timings["merge"] = time.monotonic() - t
    if not keep_intermediates:
        import shutil

        for folder in (work_dir / "smoothed", work_dir / "variants"):
            shutil.rmtree(folder, ignore_errors=True)
    reporter.update("done", 100.0, f"published {out_dir.name} in {time.monotonic() - t0:.0f} s")
    return out_dir
