#!/usr/bin/env bash
# The issue-5 benchmark on the GPU machine, in device calls of <= 10 min (docs/benchmarks/README.md).
# Writes the Llama-3-8B-shaped checkpoints on the GPU once, then measures the baselines and FlexQuant
# (policy tuned from the baselines) side by side; a call that runs out of time stops between engines
# and the next call resumes (same machine: /tmp keeps the checkpoints and the results).
#   source /tmp/gpu-env.sh; bash scripts/gpu/setup.sh; bash scripts/gpu/bench_8b.sh   # repeat until complete
# Runs (docs/benchmarks/README.md): H200 FULL=0 (W8A8 + W4A16-Marlin, batches to 128, one call); H100 FULL=1
# (two calls), SAME_ENGINE=1 (two calls), and SHAPES=qwen2-7b BATCHES=1,16,64 RATES=8 DURATION=6 (one call).
# FULL=1 adds BF16 and W4A16-Machete, batch 256 and 3 repeats of the large batches (about 3 calls);
# FULL=1 BF16=0 leaves the BF16 engine out (3 calls with DURATION=20). CONTROL=1 measures the
# stock W8A8 engine again after FlexQuant (engine-order control: how much the first and the last
# engine differ on the same workload; goals then use the faster of its two measurements).
# SAME_ENGINE=1: stock W8A8 and W4A16-Marlin, then FlexQuant under the tuned policy and the fixed
# policies in scripts/gpu/policies/ (every step W8A8 / W4A16) on ONE engine, so the policy's gain is
# measured without engine-to-engine differences; batches to 256, 3 repeats (2 calls: START_WITHIN=330
# keeps the FlexQuant engine for the second).
set -uo pipefail
cd "$(dirname "$0")/../.."
SHAPES=${SHAPES:-llama3-8b}
WORK=${WORK:-/tmp/fq}
DATA=/tmp/fqdata
RES=/tmp/fqbench
START_WITHIN=${START_WITHIN:-400}   # seconds from this script's start; no new engine after that
HARD_STOP=${HARD_STOP:-555}         # SIGINT to the bench: it stops its engine and marks the run
export VLLM_USE_FLASHINFER_SAMPLER=0
if [ "${FULL:-0}" = 1 ] && [ "${BF16:-1}" = 0 ]; then   # BF16=0: no BF16 engine (memory goal vs headers)
  LAYOUTS=w8a8,w4a16,merged; BATCHES=${BATCHES:-1,4,16,64,128,256}; REPEATS=${REPEATS:-3}
  EXTRA=(--baseline w4a16-machete="$WORK/$SHAPES-w4a16")
elif [ "${FULL:-0}" = 1 ]; then
  LAYOUTS=bf16,w8a8,w4a16,merged; BATCHES=${BATCHES:-1,4,16,64,128,256}; REPEATS=${REPEATS:-3}
  EXTRA=(--baseline bf16="$WORK/$SHAPES-bf16" --baseline w4a16-machete="$WORK/$SHAPES-w4a16")
elif [ "${SAME_ENGINE:-0}" = 1 ]; then
  LAYOUTS=w8a8,w4a16,merged; BATCHES=${BATCHES:-1,4,16,64,128,256}; REPEATS=${REPEATS:-3}
  EXTRA=(--policy scripts/gpu/policies/w8a8-only.yaml --policy scripts/gpu/policies/w4a16-only.yaml)
else
  LAYOUTS=w8a8,w4a16,merged; BATCHES=${BATCHES:-1,4,16,64,128}; REPEATS=${REPEATS:-1}; EXTRA=()
fi
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
df -h /tmp | tail -1
if [ ! -f "$WORK/.complete-$LAYOUTS" ]; then
  rm -rf "$WORK"
  python3 -m workbench.cli synth --shapes "$SHAPES" --device cuda --out "$WORK" --layouts "$LAYOUTS" \
    && touch "$WORK/.complete-$LAYOUTS"
  echo "synth: $(( $(date +%s) - t0 )) s"; du -sh "$WORK"/*
fi
left=$(( START_WITHIN - ($(date +%s) - t0) ))
timeout -s INT $(( HARD_STOP - ($(date +%s) - t0) )) python3 -m workbench.cli --data-dir "$DATA" --allow-root "$WORK" \
  bench --resume --time-budget "$(( left > 0 ? left : 0 ))" \
  --baseline w8a8="$WORK/$SHAPES-w8a8" --baseline w4a16-marlin="$WORK/$SHAPES-w4a16" "${EXTRA[@]}" \
  --checkpoint "$WORK/$SHAPES-merged" --repeats "$REPEATS" $([ "${CONTROL:-0}" = 1 ] && echo --control) \
  --batches "$BATCHES" --rates "${RATES:-4,12,24}" --duration "${DURATION:-8}" \
  --prompt-len 1024 --output-len 64 --online-output-len 128 --out "$RES" 2>&1 | grep -v "━" | tail -60
echo "bench exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"
mkdir -p "$OUT/bench" "$OUT/logs"
cp "$RES/results.json" "$OUT/bench/"
# engine logs, and FlexQuant's per-step telemetry (which variant ran each step, its tokens)
for f in "$DATA"/logs/run-*.log "$DATA"/logs/run-*-steps.jsonl; do
  [ -f "$f" ] && gzip -c "$f" > "$OUT/logs/$(basename "$f").gz"
done
python3 - "$RES/results.json" <<'PY'
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
