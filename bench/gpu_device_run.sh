#!/usr/bin/env bash
# The prepared GPU check for a session lent a device (see the README, "Performance"): run it from the
# repository root there, e.g. `bash bench/gpu_device_run.sh` with timeout_s 600. That machine's own
# python3 holds torch and transformers, and this script installs nothing; the figures land in
# bench/results/gpu_fakevlm-<card>.txt and, when the device tool's $OUT is set, a copy in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
python3 bench/gpu_fakevlm.py "$@"
if [ -n "${OUT:-}" ]; then
  cp bench/results/gpu_fakevlm-*.txt "$OUT/"
fi
