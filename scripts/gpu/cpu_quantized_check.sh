#!/usr/bin/env bash
# On the GPU machine: serve checkpoints quantized on the CPU (scripts/gpu/prepare_cpu_quantized.py)
# with vLLM 0.26 — FlexQuant on the merged one, stock vLLM on both exports — through `flexquant bench`
# (a short sweep and load, policy tuned from the stock pair). Results to $OUT/cpu-quantized.
#   carry .gpu-ckpt; source /tmp/gpu-env.sh; bash scripts/gpu/setup.sh; bash scripts/gpu/cpu_quantized_check.sh .gpu-ckpt
set -uo pipefail
cd "$(dirname "$0")/../.."
CKPT=$(realpath "${1:-.gpu-ckpt}")
export VLLM_USE_FLASHINFER_SAMPLER=0
python3 -m workbench.cli --data-dir /tmp/fqdata-cpuq --allow-root "$CKPT" bench \
  --baseline w8a8="$CKPT/w8a8" --baseline w4a16-marlin="$CKPT/w4a16" --checkpoint "$CKPT/merged" \
  --batches 1,4 --rates 4 --duration 4 --prompt-len 128 --output-len 16 --online-output-len 16 \
  --out "$OUT/cpu-quantized" 2>&1 | grep -v "━" | tail -40
mkdir -p "$OUT/cpu-quantized/logs"
for f in /tmp/fqdata-cpuq/logs/run-*.log; do [ -f "$f" ] && gzip -c "$f" > "$OUT/cpu-quantized/logs/$(basename "$f").gz"; done
