#!/usr/bin/env bash
# The prepared run of bench/triton_gpu.py on a lent GPU machine (torch and CUDA, no tritonserver, no
# tritonclient, no network), one command, under 8 minutes:
#   here:  python bench/triton_gpu.py --pack bench/.carry --python-version <the device's, e.g. 3.12>
#   there: bash bench/triton_gpu_device.sh        (the device tool: carry ["bench/.carry"], timeout_s 540)
# bench/.carry (ignored by git) holds nvidia-pytriton's tritonserver and the client's wheels; they are unpacked
# and installed under a temporary folder, never into the machine's Python. Figures land in bench/results/ and,
# when the device tool's $OUT is set, in $OUT with the Triton log.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=bench/.carry
[[ -f $CARRY/tritonserver.tar.xz ]] || { echo "no $CARRY: run bench/triton_gpu.py --pack $CARRY first" >&2; exit 2; }
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
tar -xJf "$CARRY/tritonserver.tar.xz" -C "$SITE"
python3 -m pip install --quiet --no-index --no-deps --target "$SITE" "$CARRY"/wheels/*.whl
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
timeout 480 python3 bench/triton_gpu.py "$@"
[[ -n "${OUT:-}" ]] && cp bench/results/triton_gpu-* "$OUT/"
exit 0
