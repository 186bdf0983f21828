#!/usr/bin/env bash
# Is FlexQuant's engine slower than stock vLLM when it runs the very same W8A8 kernels, or was that
# measurement order / engine noise? One call on the GPU machine: stock W8A8, then ONE FlexQuant engine
# measuring, in turn, w8a8-only, tuned, w8a8-only again, tuned again (docs/benchmarks/README.md).
#   source /tmp/gpu-env.sh; bash scripts/gpu/setup.sh; bash scripts/gpu/bench_order_check.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
WORK=/tmp/fq
P=/tmp/fq-policies
export VLLM_USE_FLASHINFER_SAMPLER=0
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
[ -f "$WORK/.complete-w8a8,merged" ] || { rm -rf "$WORK"; python3 -m workbench.cli synth --shapes llama3-8b \
  --device cuda --out "$WORK" --layouts w8a8,merged && touch "$WORK/.complete-w8a8,merged"; }
mkdir -p "$P"  # the same two policies twice, renamed so every measurement keeps its own label
for n in 1 2; do
  sed "s/^name: .*/name: w8a8-only-$n/" scripts/gpu/policies/w8a8-only.yaml > "$P/w8a8-only-$n.yaml"
  sed "s/^name: .*/name: tuned-$n/" scripts/gpu/policies/tuned-h100.yaml > "$P/tuned-$n.yaml"
done
timeout -s INT $(( 570 - ($(date +%s) - t0) )) python3 -m workbench.cli --data-dir /tmp/fqdata-order \
  --allow-root "$WORK" bench --no-auto-policy --baseline w8a8="$WORK/llama3-8b-w8a8" \
  --checkpoint "$WORK/llama3-8b-merged" --policy "$P/w8a8-only-1.yaml" --policy "$P/tuned-1.yaml" \
  --policy "$P/w8a8-only-2.yaml" --policy "$P/tuned-2.yaml" --batches 1,4,64 --repeats 3 \
  --rates 4,12,24 --duration 12 --prompt-len 1024 --output-len 64 --online-output-len 128 \
  --out "$OUT/order" 2>&1 | grep -v "━" | tail -30
echo "bench exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"
mkdir -p "$OUT/order/logs"
for f in /tmp/fqdata-order/logs/run-*.log; do [ -f "$f" ] && gzip -c "$f" > "$OUT/order/logs/$(basename "$f").gz"; done
python3 - "$OUT/order/results.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print("status", r["status"], r["errors"])
for row in r["sweep"]:
    print("sweep", row["label"], row["batch"], [round(x * 1000, 1) for x in row["prefill_s_samples"]], round(row["tpot_ms"], 3))
for row in r["online"]:
    print("online", row["label"], row["rate"], row["completed"], "ttft p50", round(row["ttft_ms"]["p50"], 1),
          "p90", round(row["ttft_ms"]["p90"], 1), "tpot p50", round(row["tpot_ms"]["p50"], 3))
PY
