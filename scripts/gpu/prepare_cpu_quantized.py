"""Quantize a small model HERE (CPU, llmcompressor + compressed-tensors 0.19) for the GPU check that
vLLM 0.26 (compressed-tensors 0.17) loads what the CPU half writes (issue 2, "prove both halves").

    .venv/bin/python scripts/gpu/prepare_cpu_quantized.py .gpu-ckpt      # ~1 min, a few MB
    # then on the GPU machine (carry .gpu-ckpt): bash scripts/gpu/cpu_quantized_check.sh .gpu-ckpt

Source: random bf16 weights with `mini-llama` shapes (head_dim 64, which vLLM's attention takes;
dimensions W4A16 group 128 divides) and a real tiny BPE tokenizer. Output: the merged checkpoint and
both single-variant exports, quantized by the workbench's own QuantFactory (SmoothQuant + GPTQ).
"""

# ruff: noqa: T201  (a script: printing is its output)
from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from jobs.progress import Reporter  # noqa: E402
from workbench.quant.check import check_checkpoint  # noqa: E402
from workbench.quant.export import export_variant  # noqa: E402
from workbench.quant.factory import quantize_and_merge  # noqa: E402
from workbench.quant.recipe import QuantRecipe  # noqa: E402
from workbench.quant.shapes import make_tiny_source_model  # noqa: E402


def main(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    work = out.parent / f".{out.name}-work"
    shutil.rmtree(work, ignore_errors=True)
    source = make_tiny_source_model(work / "source", shapes="mini-llama")
    merged = quantize_and_merge(source, out / "merged", QuantRecipe(num_samples=16, seq_len=128),
                                reporter=Reporter(), work_dir=work / "q")
    for variant in ("w8a8", "w4a16"):
        export_variant(merged, variant, out / variant)
    shutil.rmtree(work, ignore_errors=True)
    for folder in sorted(out.iterdir()):
        report = check_checkpoint(folder)
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        print(f"{folder}: {report.kind}, ok={report.ok}, {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".gpu-ckpt"))
