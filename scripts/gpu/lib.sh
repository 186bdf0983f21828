# Shared by the GPU run scripts (prefill_engines.sh, paired_engines.sh): sourced after `cd` to the
# repository and after SHAPES and WORK are set. Gives `elapsed` (seconds since sourcing), prints the
# card, and offers the GPU clock log and the W8A8 + merged synthetic checkpoints.
export VLLM_USE_FLASHINFER_SAMPLER=0
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# log_gpu_clocks DIR: SM/memory clocks, power, temperature and throttle reasons every 250 ms (read
# only) into DIR/gpu-clocks.csv until the calling script exits
log_gpu_clocks() {
  mkdir -p "$1"
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
    --format=csv,noheader -lms 250 >> "$1/gpu-clocks.csv" 2>&1 &
  clocks=$!
  trap 'kill $clocks 2>/dev/null' EXIT
}

# synth_w8a8_merged: the stock W8A8 export and the merged checkpoint of $SHAPES in $WORK, written on
# the GPU (~35-50 s) unless an earlier call on this machine left them complete
synth_w8a8_merged() {
  if [ ! -f "$WORK/.complete-w8a8,merged" ] && [ ! -f "$WORK/.complete-w8a8,w4a16,merged" ]; then
    rm -rf "$WORK"
    python3 -m workbench.cli synth --shapes "$SHAPES" --device cuda --out "$WORK" --layouts w8a8,merged \
      && touch "$WORK/.complete-w8a8,merged"
    echo "synth: $(elapsed) s"
  fi
}
