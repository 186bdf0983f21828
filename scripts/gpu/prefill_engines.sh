#!/usr/bin/env bash
# Goal 1 at small batch, across engines (docs/benchmarks/README.md "Run 7"): the batch-1 prefill of one
# and the same stock W8A8 checkpoint moves by up to 1.5x from one engine start to the next, so one
# FlexQuant engine against one W8A8 engine cannot resolve a 3% goal. This starts one round per word of
# MODES, of three engines -- stock W8A8, FlexQuant (tuned policy), stock W8A8 again (--control) -- each measuring
# the prefill of batches 1, 4 and 16 (REPEATS times) and a short 4 req/s window; scripts/engine_spread.py
# then compares the per-engine medians of all rounds. Resumable like bench_8b.sh: a call that runs out
# of time stops between engines, the next call (same machine) goes on.
# MODES names each round's prefill: "graphs" (bench's default: breakable CUDA graphs, every engine
# alike) or "eager" (--eager-prefill: op by op, as in runs 1-7); GPU clocks, power and throttle reasons
# are logged every 250 ms (read only) next to the rounds.
#   source /tmp/gpu-env.sh; bash scripts/gpu/setup.sh; bash scripts/gpu/prefill_engines.sh   # repeat
set -uo pipefail
cd "$(dirname "$0")/../.."
SHAPES=${SHAPES:-llama3-8b}
WORK=${WORK:-/tmp/fq}
MODES=${MODES:-graphs graphs graphs graphs}
REPEATS=${REPEATS:-5}
HARD_STOP=${HARD_STOP:-570}   # seconds from this script's start
source scripts/gpu/lib.sh
log_gpu_clocks /tmp/fqpe
synth_w8a8_merged
i=0
for mode in $MODES; do
  i=$((i + 1))
  res=/tmp/fqpe/round-$i-$mode
  flag="--prefill-graphs"; [ "$mode" = eager ] && flag="--eager-prefill"
  if [ -f "$res/results.json" ] && grep -q '"status": "complete"' "$res/results.json"; then continue; fi
  left=$(( HARD_STOP - $(elapsed) ))
  if [ "$left" -lt 90 ]; then echo "round $i: $left s left, next call goes on"; break; fi
  # a round that cannot finish here keeps its complete engines (--resume) and goes on in the next call
  timeout -s INT "$left" python3 -m workbench.cli --data-dir /tmp/fqpe/data --allow-root "$WORK" \
    bench --resume --time-budget "$(( left - 80 ))" \
    --baseline w8a8="$WORK/$SHAPES-w8a8" --checkpoint "$WORK/$SHAPES-merged" --control \
    --policy scripts/gpu/policies/tuned-h100.yaml --no-auto-policy $flag \
    --batches 1,4,16 --repeats "$REPEATS" --rates 4 --duration 3 \
    --prompt-len 1024 --output-len 16 --online-output-len 32 --out "$res" 2>&1 | grep -v "━" | tail -4
  echo "round $i: bench exit ${PIPESTATUS[0]} after $(elapsed) s"
done
# one tarball: the device tool brings back only a few files. FlexQuant's per-step telemetry (the prefill
# tokens of each step) shows whether a burst was split over two steps.
tar -czf "$OUT/prefill-engines.tar.gz" -C /tmp/fqpe --exclude='*.db*' $(cd /tmp/fqpe && ls -d round-* data/logs) \
  gpu-clocks.csv
for mode in $(echo $MODES | tr ' ' '\n' | sort -u); do
  echo "== $mode"; python3 scripts/engine_spread.py /tmp/fqpe/round-*-"$mode"/results.json || true
done
