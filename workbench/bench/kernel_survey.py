"""The int4 kernel survey: each kernel's decode-step linear time against W8A8's and the HBM roofline.

`scripts/gpu/int4_kernels.py` times one decoder layer's linears under every int4 kernel on hand and
under W8A8's CUTLASS kernel, outside any engine, and writes a JSON (`per_step_ms[kernel][rows]`: one
step's linear time for that many decode rows). These pure functions describe the shapes it times and
turn its JSON into a Markdown table with ratios to W8A8 and shares of the HBM roofline.
"""

from __future__ import annotations

from workbench.bench.weights import H100_HBM_TB_S, roofline_fraction
from workbench.quant.shapes import SHAPES, ShapeSpec

__all__ = ["GROUP", "decoder_linears", "int4_linear_bytes", "roofline_ms", "survey_markdown"]

GROUP = 128  # the W4A16 variant's group size (DESIGN.md)


def decoder_linears(shape: ShapeSpec) -> list[tuple[int, int]]:
    """(K, N) of one decoder layer's linears as vLLM fuses them: qkv, o, gate_up, down."""
    head_dim = shape.hidden // shape.heads
    return [
        (shape.hidden, (shape.heads + 2 * shape.kv_heads) * head_dim),
        (shape.hidden, shape.hidden),
        (shape.hidden, 2 * shape.ffn),
        (shape.ffn, shape.hidden),
    ]


def int4_linear_bytes(shape: ShapeSpec, group: int = GROUP) -> int:
    """Bytes one decode step reads for the int4 linears: packed weights plus bf16 group scales."""
    return shape.layers * sum(k * n // 2 + k // group * n * 2 for k, n in decoder_linears(shape))


def roofline_ms(shape: ShapeSpec, hbm_tb_s: float = H100_HBM_TB_S) -> float:
    """The least time a step's int4 linears can take: their bytes at the HBM bandwidth."""
    return int4_linear_bytes(shape) / (hbm_tb_s * 1e12) * 1000


def _step_ms(result: dict, kernel: str) -> dict[int, float]:
    return {int(rows): ms for rows, ms in result["per_step_ms"][kernel].items()}


def survey_markdown(result: dict, baseline: str = "w8a8-cutlass") -> list[str]:
    """One row per decode batch: each kernel's linear ms per step and its ratio to `baseline`; then
    each int4 kernel's share of the HBM roofline at a few batches."""
    shape = SHAPES[result["shapes"]]
    step_ms = {kernel: _step_ms(result, kernel) for kernel in result["per_step_ms"]}
    base = step_ms[baseline]
    lines = [
        f"Linear time of one decode step, {result['shapes']} shapes ({shape.layers} layers), "
        f"{result.get('device', '?')}, vLLM {result.get('vllm', '?')}: ms (× {baseline})",
        "",
        "| rows | " + " | ".join(step_ms) + " |",
        "|---|" + "---|" * len(step_ms),
    ]
    for rows in sorted(base):
        cells = [f"{ms[rows]:.3f} ({ms[rows] / base[rows]:.3f}×)" for ms in step_ms.values()]
        lines.append(f"| {rows} | " + " | ".join(cells) + " |")
    lines.append("")
    shown = [rows for rows in (1, 16, 32, 48) if rows in base]
    int4_bytes = int4_linear_bytes(shape)
    lines.append(f"int4 roofline: {int4_bytes / 1e9:.2f} GB of int4 weights and scales per step = "
                 f"{roofline_ms(shape):.3f} ms at {H100_HBM_TB_S} TB/s. Share of it reached at {shown} rows:")
    for kernel, ms in step_ms.items():
        if kernel != baseline:
            lines.append(f"- {kernel}: " + ", ".join(f"{roofline_fraction(int4_bytes, ms[rows]):.0%}"
                                                     for rows in shown))
    for kernel, error in (result.get("errors") or {}).items():
        lines.append(f"- {kernel}: failed: {error}")
    return lines
