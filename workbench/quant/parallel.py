"""Quantize the variants of one smoothed model side by side, one process per variant (CPU only).

On a CPU, GPTQ's time goes mostly to its column-by-column loop: Python-level work that one
interpreter runs on one core, whatever `torch.set_num_threads` says (docs/quantize-speed.md:
2 threads gave 1.27x the CPU time of the wall time). The variants are independent once the model
is smoothed, so N variants in N processes of `cores // N` threads each use all cores. Children are
spawned (a fresh interpreter: forking after torch's OpenMP pool ran is not safe with libgomp), read
the smoothed model from disk, rebuild the same calibration set, and send their progress and log
lines through a queue; the parent turns those into job progress and handles cancel by killing them.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path

from jobs.progress import Cancelled, Reporter
from workbench.quant.recipe import QuantRecipe

__all__ = [
    "PARALLEL_MAX_MODEL_BYTES",
    "PARALLEL_MIN_MODEL_BYTES",
    "quantize_variants_in_parallel",
    "use_parallel_variants",
]

log = logging.getLogger(__name__)

# Each child holds its own model copy plus GPTQ's Hessians; past ~2 GB of weights the memory
# doubling is not worth it, and large models spend their time in matmuls that use every core anyway.
PARALLEL_MAX_MODEL_BYTES = 2 * 1024**3
# Spawning a child costs ~10 s of imports (torch, transformers, llmcompressor): below this a model
# quantizes faster in-process, one variant after the other.
PARALLEL_MIN_MODEL_BYTES = 64 * 1024**2
ENV_SWITCH = "FLEXQUANT_PARALLEL_VARIANTS"  # "0": never; "1": always (2+ variants); unset: by size

_progress_queue = None  # set in each child by _init_child


def use_parallel_variants(n_variants: int, model_bytes: int) -> bool:
    """True where side-by-side variants pay: 2+ variants, 2+ cores, no CUDA, a model of 64 MB..2 GB."""
    import torch

    switch = os.environ.get(ENV_SWITCH)
    if switch == "0" or n_variants < 2:
        return False
    if switch == "1":
        return True
    if (os.cpu_count() or 1) < 2 or torch.cuda.is_available():
        return False
    return PARALLEL_MIN_MODEL_BYTES <= model_bytes <= PARALLEL_MAX_MODEL_BYTES


class _QueueReporter(Reporter):
    """The child's reporter: every update and log line goes to the parent; cancel is the parent's job."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant

    def on_update(self, stage: str, percent: float, message: str, eta_s: float | None) -> None:
        _progress_queue.put(("update", self.variant, percent, message))

    def log(self, line: str) -> None:
        _progress_queue.put(("log", self.variant, 0.0, line))


def _init_child(progress_queue, threads: int) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    from jobs.child import die_with_parent

    die_with_parent()  # a SIGKILLed job must not leave a child writing into its work dir
    import torch

    torch.set_num_threads(threads)


def _quantize_one(
    base_dir: str, tokenizer_dir: str, variant: str, out_dir: str, recipe_json: str, group_size: int | None
) -> tuple[str, float]:
    from transformers import AutoTokenizer

    from workbench.quant.calibration import calibration_dataset
    from workbench.quant.stages import quantize_variant

    t0 = time.monotonic()
    recipe = QuantRecipe.model_validate_json(recipe_json)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data, _ = calibration_dataset(tokenizer, recipe) if recipe.needs_calibration else (None, None)
    quantize_variant(
        Path(base_dir),
        variant,
        Path(out_dir),
        recipe=recipe,
        data=data,
        tokenizer=tokenizer,
        group_size=group_size,
        reporter=_QueueReporter(variant),
        lo=0.0,
        hi=100.0,
    )
    return variant, time.monotonic() - t0


def quantize_variants_in_parallel(
    base_dir: Path,
    tokenizer_dir: Path,
    out_root: Path,
    *,
    recipe: QuantRecipe,
    group_sizes: dict,
    reporter,
    lo: float,
    hi: float,
) -> tuple[dict, dict]:
    """Quantize every variant of `recipe` from `base_dir` at once; ({variant: folder}, {variant: seconds}).

    Progress maps the mean of the children's percentages onto [lo, hi]; `Cancelled` from the
    reporter kills the children and propagates; a child's error propagates with its variant named."""
    variants = list(recipe.variants)
    threads = max(1, (os.cpu_count() or 1) // len(variants))
    ctx = mp.get_context("spawn")
    progress_queue = ctx.Queue()
    percents = dict.fromkeys(variants, 0.0)
    messages = dict.fromkeys(variants, "starting")
    pool = ProcessPoolExecutor(
        max_workers=len(variants), mp_context=ctx, initializer=_init_child, initargs=(progress_queue, threads)
    )
    futures = {
        pool.submit(
            _quantize_one,
            str(base_dir),
            str(tokenizer_dir),
            v,
            str(out_root / v),
            recipe.model_dump_json(),
            group_sizes[v],
        ): v
        for v in variants
    }
    reporter.log(
        f"quantizing {', '.join(variants)} side by side: {len(variants)} processes x {threads} thread(s)"
    )
    stage = "quantize " + "+".join(variants)

    def report() -> None:
        overall = sum(percents.values()) / len(percents)
        reporter.update(
            stage, lo + (hi - lo) * overall / 100.0, " · ".join(f"{v} {messages[v]}" for v in variants)
        )

    try:
        pending = set(futures)
        report()
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
            _drain(progress_queue, percents, messages, reporter, report)
            for future in done:
                if future.exception() is not None:
                    variant = futures[future]
                    raise RuntimeError(
                        f"quantizing variant {variant} failed: {future.exception()}"
                    ) from future.exception()
            reporter.check_cancelled()
        _drain(progress_queue, percents, messages, reporter, report)
    except (Cancelled, RuntimeError, KeyboardInterrupt):
        _kill(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    results = dict(f.result() for f in futures)
    return {v: out_root / v for v in variants}, results


def _drain(progress_queue, percents: dict, messages: dict, reporter, report) -> None:
    """Forward what the children sent since the last poll: every update (each layer of each variant
    reaches the job's progress, none is overwritten unseen) and every log line."""
    while True:
        try:
            kind, variant, percent, text = progress_queue.get_nowait()
        except queue.Empty:
            return
        if kind == "log":
            reporter.log(f"{variant}: {text}")
        else:
            percents[variant], messages[variant] = percent, text
            report()


def _kill(pool: ProcessPoolExecutor) -> None:
    # Cancel must stop within seconds, and a child in the middle of GPTQ never looks at a flag.
    for process in list((pool._processes or {}).values()):  # noqa: SLF001 - no public handle to the workers
        if process.is_alive():
            process.kill()
