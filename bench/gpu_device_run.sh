#!/usr/bin/env bash
# The prepared GPU run for a session lent a device (see the README, "Performance"), one command:
#   bash bench/gpu_device_run.sh        # on the device, timeout_s 540: about 3-4 minutes on an H200
#   bash bench/gpu_device_run.sh --cpu  # a dry run here: tiny shapes on the CPU, same steps
#   bash bench/gpu_device_run.sh --experiments  # only bench/gpu_verdict_profile.py's three steps (~3 min)
#   bash bench/gpu_device_run.sh --compiled     # only bench/gpu_fakevlm.py --compile (~4 min)
# 1. bench/gpu_bls_check.py: the GPU Python model's scores vs the in-process CPU scores (tiny trained and
#    random checkpoints), late generation logits refused, `moderation.offline.modelcheck` on the tiny model;
# 2. bench/gpu_fakevlm.py: FakeVLM's 7B shape, random bf16 weights: verdict-first img/s at batch
#    1/16/64/96, explanations vs transformers generate, naive generate at batch 1.
# That machine's own python3 holds torch and transformers; this script installs nothing. The figures
# land in bench/results/ and, when the device tool's $OUT is set, copies and the whole log in $OUT.
# Each step has its own time limit and a failing step does not stop the next.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT_DIR="${OUT:-}"
status=0
step() {  # step SECONDS COMMAND...: run it under a time limit, remember a failure, go on
  local limit=$1
  shift
  echo "=== $* (limit ${limit}s) $(date -u +%T)"
  timeout "$limit" "$@" || { echo "=== FAILED ($?): $*"; status=1; }
}
run_all() {
  if [ "${1:-}" = "--cpu" ]; then
    step 300 python3 bench/gpu_bls_check.py --device cpu --dtype bfloat16 --images 8 --check-images 4 \
      --new-tokens 12 --output bench/results/gpu_bls_check-cpu-dry-run.txt
    step 300 python3 bench/gpu_fakevlm.py --tiny --verdict-batch 1 4 --explain-batch 2 --new-tokens 8 --repeat 1 \
      --generate-repeat 1 --output bench/results/gpu_fakevlm-cpu-dry-run.txt
    return
  fi
  if [ "${1:-}" = "--compiled" ]; then
    step 420 python3 bench/gpu_fakevlm.py --compile --verdict-batch 16 64 96 --explain-batch 32 --generate-repeat 1
    return
  fi
  if [ "${1:-}" = "--experiments" ]; then
    step 80 python3 bench/gpu_verdict_profile.py profile
    step 200 python3 bench/gpu_verdict_profile.py compile
    step 200 python3 bench/gpu_verdict_profile.py static
    return
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  step 150 python3 bench/gpu_bls_check.py
  step 330 python3 bench/gpu_fakevlm.py --verdict-batch 1 16 64 96 --explain-batch 1 32 --new-tokens 128
}
if [ -n "$OUT_DIR" ]; then
  run_all "$@" 2>&1 | tee "$OUT_DIR/gpu_device_run.log"
  cp bench/results/gpu_*.txt "$OUT_DIR/" 2>/dev/null
else
  run_all "$@"
fi
echo "=== done, status $status $(date -u +%T)"
exit $status
