#!/usr/bin/env bash
# Goal 3 at 24 req/s (docs/benchmarks/README.md "Run 11"): where the serving time goes. One FlexQuant
# engine serves the same Poisson load under the tuned policy and under `w8a8-only`, with FlexQuant's
# per-step telemetry on: the steps inside each online row's `window` split the time into steps that
# carry a prefill chunk (W8A8 under both policies: the fastest prefill) and decode-only steps, and
# compare the two variants' decode steps at the same batch on the same engine. Run 11 used it before
# `flexquant bench` gave online loads room beyond the sweep's batches (its engine ran 16 requests at
# once, so the load queued). Runs 12-13 measured this split with scripts/gpu/paired_engines.sh, which
# also runs stock W8A8 beside it; this script is kept as run 11's record. One device call after staging:
#   source /tmp/gpu-env.sh; bash scripts/gpu/setup.sh; bash scripts/gpu/online_steps.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
SHAPES=${SHAPES:-llama3-8b}
WORK=${WORK:-/tmp/fq}
RATE=${RATE:-24}
DURATION=${DURATION:-20}
HARD_STOP=${HARD_STOP:-230}   # seconds from this script's start; the bench is stopped (SIGINT) after
export VLLM_USE_FLASHINFER_SAMPLER=0
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ ! -f "$WORK/$SHAPES-merged/config.json" ]; then
  python3 -m workbench.cli synth --shapes "$SHAPES" --device cuda --out "$WORK" --layouts merged
  echo "synth: $(elapsed) s"
fi
mkdir -p /tmp/fqos
timeout -s INT $(( HARD_STOP - $(elapsed) )) python3 -m workbench.cli --data-dir /tmp/fqos/data --allow-root "$WORK" \
  bench --checkpoint "$WORK/$SHAPES-merged" --no-auto-policy \
  --policy scripts/gpu/policies/tuned-h100.yaml --policy scripts/gpu/policies/w8a8-only.yaml \
  --batches 1 --rates "$RATE" --duration "$DURATION" --prompt-len 1024 --output-len 16 \
  --online-output-len 128 --out /tmp/fqos/bench 2>&1 | grep -v "━" | tail -4
echo "bench exit ${PIPESTATUS[0]} after $(elapsed) s"
tar -czf "$OUT/online-steps.tar.gz" -C /tmp/fqos --exclude='*.db*' bench data/logs
