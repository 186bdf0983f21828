#!/usr/bin/env bash
# The issue-5 benchmark on the GPU machine in ONE device call of <= 10 min (docs/benchmarks/README.md):
# writes the Llama-3-8B-shaped checkpoints (W8A8, W4A16, merged) on the GPU, then measures stock
# W8A8, stock W4A16-Marlin and FlexQuant under the policy tuned from those two, side by side.
#   source /tmp/gpu-env.sh; bash scripts/gpu/setup.sh; bash scripts/gpu/bench_8b.sh
# Results go straight to $OUT/bench (rewritten after every measurement), engine logs to $OUT/logs.
set -uo pipefail
cd "$(dirname "$0")/../.."
SHAPES=${SHAPES:-llama3-8b}
WORK=${WORK:-/tmp/fq}
DATA=/tmp/fqdata
START_WITHIN=${START_WITHIN:-420}   # seconds from this script's start; no new engine after that
HARD_STOP=${HARD_STOP:-560}         # SIGINT to the bench: it stops its engine and marks the run
export VLLM_USE_FLASHINFER_SAMPLER=0
fq() { python3 -m workbench.cli --data-dir "$DATA" --allow-root "$WORK" "$@"; }
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
df -h /tmp | tail -1
if [ ! -f "$WORK/.complete" ]; then
  fq synth --shapes "$SHAPES" --device cuda --out "$WORK" --layouts w8a8,w4a16,merged && touch "$WORK/.complete"
  echo "synth: $(( $(date +%s) - t0 )) s"; du -sh "$WORK"/*
fi
left=$(( START_WITHIN - ($(date +%s) - t0) ))
timeout -s INT $(( HARD_STOP - ($(date +%s) - t0) )) python3 -m workbench.cli --data-dir "$DATA" --allow-root "$WORK" \
  bench --time-budget "$(( left > 0 ? left : 0 ))" \
  --baseline w8a8="$WORK/$SHAPES-w8a8" --baseline w4a16-marlin="$WORK/$SHAPES-w4a16" \
  --checkpoint "$WORK/$SHAPES-merged" \
  --batches "${BATCHES:-1,4,16,64,128}" --rates "${RATES:-4,12,24}" --duration "${DURATION:-8}" \
  --prompt-len 1024 --output-len 64 --online-output-len 128 --out "$OUT/bench" 2>&1 | grep -v "━" | tail -60
echo "bench exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"
mkdir -p "$OUT/logs"
for f in "$DATA"/logs/run-*.log; do [ -f "$f" ] && gzip -c "$f" > "$OUT/logs/$(basename "$f").gz"; done
python3 - "$OUT/bench/results.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print("status", r["status"], r["errors"])
for t in r["targets"]:
    print(t["label"], "start", t["engine_start_s"], "s, weights", t["weight_memory_gib"], "GiB, error", t["error"])
for row in r["sweep"]:
    print("sweep", row["label"], row["batch"], round(row["prefill_s"], 4), round(row["tpot_ms"], 3), row["variant_share"])
for row in r["online"]:
    print("online", row["label"], row["rate"], row["completed"], "/", row["requests"], "ttft p50", row["ttft_ms"]["p50"], "tpot p50", row["tpot_ms"]["p50"])
PY
