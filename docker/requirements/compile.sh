#!/usr/bin/env bash
# Regenerates the image locks from pyproject.toml (run from anywhere; needs uv: `pip install uv`, and PyPI).
# tests/test_packaging.py fails when pyproject's dependencies and these locks drift apart.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=docker/requirements
# Every wheel's and sdist's hash of each pinned version, for x86-64 Linux (the images' platform).
compile=(uv pip compile --quiet --generate-hashes --python-platform x86_64-manylinux_2_28
  --custom-compile-command "docker/requirements/compile.sh" "$@")  # e.g. --upgrade: newer pins within the ranges
extra() { python3 -c 'import sys, tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"][sys.argv[1]]))' "$1"; }

# worker.Dockerfile: the core dependencies, `worker` (Faust), `hub` (the weights Job's `hf`) and `tracing` (OTLP);
# no torch, no transformers.
"${compile[@]}" --python-version 3.11 pyproject.toml --extra worker --extra hub --extra tracing -o "$out/worker.txt"

# worker.Dockerfile --build-arg LOCK=review: the review console's image, the core dependencies and `review`;
# no Faust (tests/test_packaging.py checks that `moderation review serve` runs without it).
"${compile[@]}" --python-version 3.11 pyproject.toml --extra review -o "$out/review.txt"

# worker.Dockerfile --build-arg LOCK=worker-model: also the `model` extra, for the in-process detector and
# `moderation model build-tiny` (dev's Triton init container). torch itself is left out: the Dockerfile takes
# the CPU build from TORCH_INDEX_URL (PyPI's Linux torch is the CUDA one); its dependencies are resolved
# here from the CPU wheel's metadata, found in TORCH_FIND_LINKS (default: the CPU index).
"${compile[@]}" --python-version 3.11 pyproject.toml --extra worker --extra hub --extra tracing --extra model --no-emit-package torch \
  --find-links "${TORCH_FIND_LINKS:-https://download.pytorch.org/whl/cpu/torch/}" -o "$out/worker-model.txt"

# triton.Dockerfile: the `model` extra alone, for the image's Python (3.12 in the 25.xx images), without
# torch and numpy and what they pull in: the NGC image's own CUDA builds stay (see docker/README.md). The
# versions the worker-model lock pins win, so that every image runs the same transformers.
"${compile[@]}" --python-version 3.12 <(extra model) --override "$out/triton-overrides.txt" \
  --constraint "$out/worker-model.txt" -o "$out/triton.txt"

# triton-trtllm.Dockerfile (the TensorRT-LLM recipe): what the ONNX export needs beyond NVIDIA's image (onnx and
# onnxscript, from the `onnx` extra; onnxruntime only checks an export and stays out), resolved against the
# image's own packages as NVIDIA's sources state them (base/tritonserver-trtllm-0.19.0.txt) and numpy<2
# (pyproject's pin, which TensorRT-LLM's CUDA builds share), and leaving out everything that image provides:
# torch and its dependencies, transformers, numpy stay NVIDIA's.
base=$out/base/tritonserver-trtllm-0.19.0.txt
provided=(--no-emit-package numpy --no-emit-package mpmath --no-emit-package typing-extensions)
for name in $(grep -oE '^[A-Za-z0-9._-]+' "$base"); do provided+=(--no-emit-package "$name"); done
"${compile[@]}" --python-version 3.12 <(extra onnx | grep -E '^(onnx|onnxscript)[<>=]') \
  --constraint "$base" --constraint <(echo 'numpy<2') "${provided[@]}" -o "$out/triton-trtllm.txt"
