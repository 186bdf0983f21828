#!/usr/bin/env bash
# Stock W8A8 and FlexQuant side by side on one GPU, measured in alternation (docs/benchmarks/README.md
# "Run 12"; scripts/gpu/paired_engines.py says what it measures). One device call after staging:
#   source /tmp/gpu-env.sh; bash scripts/gpu/setup.sh; bash scripts/gpu/paired_engines.sh
# Synthesises the W8A8 and merged Llama-3-8B-shaped checkpoints if missing (~35 s), starts both
# engines (~4-5 min), runs prefill cycles until CYCLES_UNTIL s, then one online window at RATE per
# policy on FlexQuant and one on W8A8; GPU clocks are logged every 250 ms (read only) beside them.
set -uo pipefail
cd "$(dirname "$0")/../.."
SHAPES=${SHAPES:-llama3-8b}
WORK=${WORK:-/tmp/fq}
RATE=${RATE:-24}
DURATION=${DURATION:-20}
CYCLES_UNTIL=${CYCLES_UNTIL:-400}   # seconds from the python script's start
HARD_STOP=${HARD_STOP:-585}         # seconds from this script's start; the run is stopped (SIGINT) after
# Each engine's share of the card. vLLM sizes the KV cache from it, but an engine holds more after
# its first 16-request bursts (stock W8A8: 39.4 GiB against a 33.3 GiB share): at 0.42 each the second
# engine ran out of memory in its first one (docs/gpu-runs, run 12's first call).
GPU_MEM=${GPU_MEM:-0.36}
ONLINE=${ONLINE:-1}                 # 0: no long online windows
PAIRS=${PAIRS:-0}                   # >0: that many pairs of PAIR_WINDOW s online windows per PAIR_RATES rate
PAIR_RATES=${PAIR_RATES:-12,24}
PAIR_WINDOW=${PAIR_WINDOW:-5}
source scripts/gpu/lib.sh
log_gpu_clocks /tmp/fqpair
synth_w8a8_merged
timeout -s INT $(( HARD_STOP - $(elapsed) )) python3 scripts/gpu/paired_engines.py \
  --w8a8 "$WORK/$SHAPES-w8a8" --merged "$WORK/$SHAPES-merged" \
  --policy scripts/gpu/policies/tuned-h100.yaml --policy scripts/gpu/policies/w8a8-only.yaml \
  --policy scripts/gpu/policies/w4a16-to-48.yaml --gpu-memory "$GPU_MEM" --rate "$RATE" --online-duration "$DURATION" --cycles-until $(( CYCLES_UNTIL - $(elapsed) )) --out /tmp/fqpair/run \
  --online-pairs "$PAIRS" --pair-rates "$PAIR_RATES" --pair-window "$PAIR_WINDOW" \
  $([ "$ONLINE" = 0 ] && echo --skip-online)
echo "paired exit $? after $(elapsed) s"
tar -czf "$OUT/paired-engines.tar.gz" -C /tmp/fqpair --exclude='*.db*' run gpu-clocks.csv
