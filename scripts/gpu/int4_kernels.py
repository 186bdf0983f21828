"""Time the linear layers of one decoder layer under each int4 kernel on hand, at decode batch sizes.

Why: at 24 req/s about 30 requests decode together, and there W4A16-Marlin's steps are no faster than
W8A8's (runs 12-13). This measures, outside any engine, whether another int4 kernel would be: W4A16 on
Marlin, Machete and vLLM's Triton W4A16 kernel; torch's own tinygemm (`aten._weight_int4pack_mm`, what
gpt-fast uses); and Marlin with int8 activations (W4A8-INT8, vLLM's `VLLM_MARLIN_INPUT_DTYPE=int8`, the
same int4 weights and group scales); against W8A8-INT8 on CUTLASS, which the W8A8 variant runs.

Each op runs as vLLM's kernel classes call it (activation quantization included), many times in one
CUDA graph, cycling through enough weight copies that they do not sit in the 50 MB L2 cache.

Usage (GPU machine, after scripts/gpu/setup.sh installed the workbench):
  python3 scripts/gpu/int4_kernels.py --shapes llama3-8b --out $OUT/int4_kernels.json
`python scripts/kernel_report.py FILE.json` prints the table again (workbench.bench.kernel_survey).
"""

# ruff: noqa: T201  (a script: printing is its output)
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from workbench.bench import results_file
from workbench.bench.kernel_survey import GROUP, decoder_linears, survey_markdown
from workbench.quant.shapes import SHAPES

L2_DEFEAT_BYTES = 256 << 20  # weight copies per linear: at least this much, 5x the H100's 50 MB L2


def w8a8_op(k: int, n: int, copies: int):
    from vllm import _custom_ops as ops

    weights = [torch.randint(-127, 127, (n, k), dtype=torch.int8, device="cuda").t() for _ in range(copies)]
    scales = [torch.rand(1, n, device="cuda") / 100 for _ in range(copies)]

    def call(x: torch.Tensor, i: int) -> torch.Tensor:
        xq, xs, _ = ops.scaled_int8_quant(x)
        return ops.cutlass_scaled_mm(xq, weights[i], xs, scales[i], out_dtype=x.dtype)

    return call


def marlin_linear(w: torch.Tensor, act_int8: bool):
    """(x -> x @ w on Marlin, w's dequantized int4 values) for a bf16 [K, N] weight, as vLLM's
    MarlinLinearKernel prepares and calls it (with int8 activations: W4A8-INT8)."""
    from vllm.model_executor.layers.quantization.utils import marlin_utils as mu
    from vllm.model_executor.layers.quantization.utils.marlin_utils_test import marlin_quantize
    from vllm.scalar_type import scalar_types

    k, n = w.shape
    input_dtype = torch.int8 if act_int8 else None
    w_ref, q_w, s, _, _, _ = marlin_quantize(w, scalar_types.uint4b8, GROUP, act_order=False,
                                             input_dtype=input_dtype)
    global_scale = None
    if act_int8:  # what MarlinLinearKernel.process_weights_after_loading does for int8 activations
        s, global_scale = mu.marlin_act_int8_process_scales(s)
    workspace = mu.marlin_make_workspace_new(w.device)
    empty = mu.marlin_make_empty_g_idx(w.device)

    def call(x: torch.Tensor) -> torch.Tensor:
        return mu.apply_gptq_marlin_linear(
            input=x, weight=q_w, weight_scale=s, weight_zp=empty, g_idx=empty, g_idx_sort_indices=empty,
            workspace=workspace, wtype=scalar_types.uint4b8, output_size_per_partition=n,
            input_size_per_partition=k, is_k_full=True, input_global_scale=global_scale,
            input_dtype=input_dtype)

    return call, w_ref


def marlin_op(k: int, n: int, copies: int, act_int8: bool):
    linears = [marlin_linear(torch.randn(k, n, dtype=torch.bfloat16, device="cuda") / 50, act_int8)[0]
               for _ in range(copies)]
    return lambda x, i: linears[i](x)


def machete_op(k: int, n: int, copies: int):
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.quantization.utils.quant_utils import pack_quantized_values_into_int32
    from vllm.scalar_type import scalar_types

    wtype = scalar_types.uint4b8
    packed = []
    for _ in range(copies):
        q = torch.randint(0, 16, (k, n), dtype=torch.int32, device="cuda")
        b = pack_quantized_values_into_int32(q, wtype, packed_dim=0)
        b = ops.machete_prepack_B(b.t().contiguous().t(), a_type=torch.bfloat16, b_type=wtype,
                                  group_scales_type=torch.bfloat16)
        s = torch.rand(k // GROUP, n, dtype=torch.bfloat16, device="cuda") / 100
        packed.append((b, s))

    def call(x: torch.Tensor, i: int) -> torch.Tensor:
        b, s = packed[i]
        return ops.machete_mm(a=x, b_q=b, b_type=wtype, b_group_scales=s, b_group_size=GROUP)

    return call


def triton_op(k: int, n: int, copies: int):
    from vllm.model_executor.kernels.linear.mixed_precision.triton_w4a16 import triton_w4a16_gemm

    shifts = torch.arange(8, device="cuda", dtype=torch.int32) * 4
    packed = []
    for _ in range(copies):  # [K, N//8] int32, N packed, as TritonW4A16LinearKernel repacks it
        q = torch.randint(0, 16, (k, n // 8, 8), dtype=torch.int32, device="cuda")
        b = torch.sum(q << shifts, dim=2, dtype=torch.int32).contiguous()
        packed.append((b, torch.rand(k // GROUP, n, dtype=torch.bfloat16, device="cuda") / 100))

    def call(x: torch.Tensor, i: int) -> torch.Tensor:
        b, s = packed[i]
        return triton_w4a16_gemm(a=x, b_q=b, scales=s, qzeros=None, group_size=GROUP, zp_bias=8)

    return call


def tinygemm_linear(q: torch.Tensor, scale: torch.Tensor):
    """x -> x @ W on torch's own int4 kernel (tinygemm, what gpt-fast uses: aten._weight_int4pack_mm)
    for int4 values q [N, K] in 0..15 and bf16 group scales [K/128, N]; W = (q - 8) * scale."""
    b = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
    # tinygemm dequantizes (q - 8) * scale + zero: symmetric uint4b8 is zero = 0
    scales_and_zeros = torch.stack([scale, torch.zeros_like(scale)], dim=2).contiguous()
    return lambda x: torch.ops.aten._weight_int4pack_mm(x, b, GROUP, scales_and_zeros)


def tinygemm_op(k: int, n: int, copies: int):
    linears = [tinygemm_linear(torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda"),
                               torch.rand(k // GROUP, n, dtype=torch.bfloat16, device="cuda") / 100)
               for _ in range(copies)]
    return lambda x, i: linears[i](x)


KERNELS = {
    "w8a8-cutlass": lambda k, n, c: w8a8_op(k, n, c),
    "w4a16-marlin": lambda k, n, c: marlin_op(k, n, c, act_int8=False),
    "w4a8-marlin": lambda k, n, c: marlin_op(k, n, c, act_int8=True),
    "w4a16-machete": lambda k, n, c: machete_op(k, n, c),
    "w4a16-triton": lambda k, n, c: triton_op(k, n, c),
    "w4a16-tinygemm": lambda k, n, c: tinygemm_op(k, n, c),
}
BYTES_PER_WEIGHT = {kernel: 1.0 if kernel.startswith("w8") else 0.5 for kernel in KERNELS}


def time_op(call, k: int, copies: int, m: int, calls_per_graph: int = 48, replays: int = 7) -> float:
    """Median µs per call over `replays` replays of one CUDA graph of `calls_per_graph` calls."""
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (Triton JIT, workspace) outside the capture
        for i in range(copies):
            call(x, i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for j in range(calls_per_graph):
            call(x, j % copies)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls_per_graph)
    return statistics.median(times)


def check_agreement(k: int, n: int) -> dict[str, float | str]:
    """Each int4 path's relative error against x @ its own dequantized weights: the calls are wired right."""
    torch.manual_seed(0)
    w = torch.randn(k, n, dtype=torch.bfloat16, device="cuda") / 50
    x = torch.randn(16, k, dtype=torch.bfloat16, device="cuda")

    def relative_error(y: torch.Tensor, w_ref: torch.Tensor) -> float:
        ref = x.float() @ w_ref.float()
        return float((y.float() - ref).norm() / ref.norm())

    out: dict[str, float | str] = {}
    for name, act_int8 in (("w4a16", False), ("w4a8", True)):
        call, w_ref = marlin_linear(w, act_int8)
        out[f"{name}_rel_err_vs_dequantized"] = relative_error(call(x), w_ref)
    try:  # tinygemm's layout, checked the same way (its failure must not lose the timings)
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
        scale = torch.rand(k // GROUP, n, dtype=torch.bfloat16, device="cuda") / 100
        w_ref = (q.t().float() - 8) * scale.float().repeat_interleave(GROUP, dim=0)
        out["tinygemm_rel_err_vs_dequantized"] = relative_error(tinygemm_linear(q, scale)(x), w_ref)
    except Exception as exc:
        out["tinygemm_error"] = f"{type(exc).__name__}: {exc}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="llama3-8b", choices=["llama3-8b", "qwen2-7b"])
    parser.add_argument("--batches", default="1,4,8,16,24,32,40,48,64,96,128")
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    shape = SHAPES[args.shapes]
    linears = decoder_linears(shape)
    batches = [int(b) for b in args.batches.split(",")]
    result = {"shapes": args.shapes, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "group_size": GROUP, "batches": batches, "per_linear_us": {}, "per_step_ms": {}}
    import importlib.metadata as md

    result["vllm"] = md.version("vllm")
    result["agreement"] = check_agreement(*linears[0])
    print("agreement:", result["agreement"], flush=True)
    for kernel in args.kernels.split(","):
        per_linear = {}
        try:
            for k, n in linears:
                copies = max(2, -(-L2_DEFEAT_BYTES // int(k * n * BYTES_PER_WEIGHT[kernel])))
                call = KERNELS[kernel](k, n, copies)
                per_linear[f"{k}x{n}"] = {m: time_op(call, k, copies, m) for m in batches}
                torch.cuda.empty_cache()
        except Exception as exc:  # one kernel failing must not lose the others' numbers
            result.setdefault("errors", {})[kernel] = f"{type(exc).__name__}: {exc}"
            print(f"{kernel}: FAILED {exc}", flush=True)
            continue
        result["per_linear_us"][kernel] = per_linear
        result["per_step_ms"][kernel] = {
            m: shape.layers * sum(v[m] for v in per_linear.values()) / 1000 for m in batches}
        print(kernel, {m: round(t, 3) for m, t in result["per_step_ms"][kernel].items()}, flush=True)
    if "w8a8-cutlass" in result["per_step_ms"]:
        print("\n".join(["", *survey_markdown(result)]))
    results_file.write_json(Path(args.out), result)  # atomically: never half a file


if __name__ == "__main__":
    main()
