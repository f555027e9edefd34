#!/usr/bin/env bash
# Build the two TensorRT engines of the GPU layout (triton_models/gpu) from a FakeVLM checkpoint, and their
# manifest (the WEIGHTS identity: moderation.model.identity).
#
# NEEDS AN NVIDIA GPU and the image docker/triton-trtllm.Dockerfile builds (FROM
# nvcr.io/nvidia/tritonserver:25.05-trtllm-python-py3: TensorRT-LLM 0.19.0, trtexec, trtllm-build, with
# this repository's model code and its hash-locked dependencies, onnxscript included). Engines are specific
# to the GPU model and the TensorRT version they were built with: build on the card that serves. It was NOT
# run in this repository's CI or on its development machines (no GPU there); see triton_models/README.md.
#
#   triton_models/build/build_engines.sh /models/fakevlm-hf /models/repository /models/engines
#
#   $1 HF_MODEL   FakeVLM in transformers format (lingcco/fakeVLM, downloaded beforehand)
#   $2 REPOSITORY where to assemble the Triton model repository (a copy of triton_models/gpu)
#   $3 ENGINES    where to write the engines: llm/ (TensorRT-LLM), vision/ (model.engine + config.json, the
#                 layout upstream's multimodal_encoders reads), manifest.json; intermediate files in .build/
#
# Tunables (environment): MAX_BATCH (64: verdict batches, and the LLM's inflight batch), OPT_BATCH (32),
# MAX_INPUT_LEN (1024 >= 576 image tokens + the prompt), MAX_NEW_TOKENS (256, explanations use 128),
# TRTLLM_EXAMPLES (TensorRT-LLM's examples directory, found in the image by default).
set -euo pipefail

HF_MODEL=${1:?usage: build_engines.sh HF_MODEL REPOSITORY ENGINES}
REPOSITORY=${2:?usage: build_engines.sh HF_MODEL REPOSITORY ENGINES}
ENGINES=${3:?usage: build_engines.sh HF_MODEL REPOSITORY ENGINES}
MAX_BATCH=${MAX_BATCH:-64}
OPT_BATCH=${OPT_BATCH:-32}
MAX_INPUT_LEN=${MAX_INPUT_LEN:-1024}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-256}
IMAGE_TOKENS=576                                   # (336 / 14)^2, CLS dropped
MAX_MULTIMODAL_LEN=$((MAX_BATCH * IMAGE_TOKENS))   # tensorrtllm_backend docs/multimodal.md: max_batch_size * 576
MAX_SEQ_LEN=$((MAX_INPUT_LEN + MAX_NEW_TOKENS))
MAX_NUM_TOKENS=$((MAX_BATCH * 640))                # a full batch of verdict prefills (~600 tokens each) in one step
TRTLLM_VERSION=0.19.0                              # the pinned release (triton_models/README.md says why)
HERE=$(cd "$(dirname "$0")" && pwd)
SOURCE=$(cd "$HERE/../gpu" && pwd)

for tool in nvidia-smi trtexec trtllm-build python3; do
  command -v "$tool" >/dev/null || { echo "build_engines.sh: $tool not found: run this in NVIDIA's TensorRT-LLM Triton image on a GPU" >&2; exit 2; }
done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
found=$(python3 -c 'import tensorrt_llm; print(tensorrt_llm.__version__)' 2>/dev/null | tail -1)
[[ "$found" == "$TRTLLM_VERSION" ]] || { echo "build_engines.sh: TensorRT-LLM $TRTLLM_VERSION required, found '${found}'" >&2; exit 2; }

if [[ -z "${TRTLLM_EXAMPLES:-}" ]]; then
  for candidate in /app/tensorrt_llm/examples /opt/tensorrt_llm/examples "$(python3 -c 'import tensorrt_llm, os; print(os.path.dirname(tensorrt_llm.__file__))')/../examples"; do
    [[ -d "$candidate" ]] && TRTLLM_EXAMPLES=$candidate && break
  done
fi
CONVERT=""
for script in models/core/llama/convert_checkpoint.py llama/convert_checkpoint.py; do
  [[ -f "${TRTLLM_EXAMPLES:-/nonexistent}/$script" ]] && CONVERT="$TRTLLM_EXAMPLES/$script" && break
done
[[ -n "$CONVERT" ]] || { echo "build_engines.sh: TensorRT-LLM's llama convert_checkpoint.py not found; set TRTLLM_EXAMPLES" >&2; exit 2; }

BUILD="$ENGINES/.build"                            # dot-directory: left out of the manifest and the identity
mkdir -p "$REPOSITORY" "$ENGINES/vision" "$BUILD"
cp -r "$SOURCE"/. "$REPOSITORY"/
find "$REPOSITORY" -name .gitkeep -delete

echo "== 1/4 vision tower + projector -> ONNX (opset 17, fp16, dynamic batch)"
python3 "$HERE/export_vision_onnx.py" "$HF_MODEL" "$BUILD/vision.onnx" --dtype float16 --device cuda \
  --max-batch "$MAX_BATCH"

echo "== 2/4 ONNX -> TensorRT engine (fp16, batch 1..$MAX_BATCH, optimised for $OPT_BATCH), run by multimodal_encoders"
trtexec --onnx="$BUILD/vision.onnx" \
  --saveEngine="$ENGINES/vision/model.engine" \
  --fp16 \
  --minShapes=input:1x3x336x336 \
  "--optShapes=input:${OPT_BATCH}x3x336x336" \
  "--maxShapes=input:${MAX_BATCH}x3x336x336" \
  --memPoolSize=workspace:8192
# What upstream's build_multimodal_engine.py writes beside the engine and multimodal_encoders reads.
printf '{"builder_config": {"model_type": "llava", "precision": "float16", "max_batch_size": %d}}\n' "$MAX_BATCH" \
  > "$ENGINES/vision/config.json"

echo "== 3/4 language model -> TensorRT-LLM engine (max_multimodal_len $MAX_MULTIMODAL_LEN)"
# The llama converter reads the language model out of the LlavaForConditionalGeneration checkpoint.
python3 "$CONVERT" --model_dir "$HF_MODEL" --output_dir "$BUILD/llm-checkpoint" --dtype float16
trtllm-build \
  --checkpoint_dir "$BUILD/llm-checkpoint" \
  --output_dir "$ENGINES/llm" \
  --gemm_plugin float16 \
  --gpt_attention_plugin float16 \
  --max_beam_width 1 \
  --max_batch_size "$MAX_BATCH" \
  --max_input_len "$MAX_INPUT_LEN" \
  --max_seq_len "$MAX_SEQ_LEN" \
  --max_num_tokens "$MAX_NUM_TOKENS" \
  --max_multimodal_len "$MAX_MULTIMODAL_LEN" \
  --gather_generation_logits \
  --use_paged_context_fmha enable \
  --paged_kv_cache enable \
  --remove_input_padding enable

echo "== 4/4 manifest: every engine file's sha256, builders, dtype, GPU, tokenizer and config hashes"
python3 -m moderation.model.manifest "$ENGINES" --tokenizer "$HF_MODEL" --dtype float16

# Point the copied configs at what was just built (the repository's files keep /models/... defaults).
sed -i "s#/models/engines#$ENGINES#" "$REPOSITORY"/{tensorrt_llm,multimodal_encoders,fakevlm,fakevlm_explain}/config.pbtxt
sed -i "s#/models/fakevlm-hf#$HF_MODEL#" "$REPOSITORY"/{fakevlm,fakevlm_explain}/config.pbtxt

cat <<EOF
Built ($ENGINES/manifest.json names it). Serve with (one GPU; the CUDA pool carries the prompt-embedding
tables between the models:
$MAX_BATCH x 576 x 4096 x 2 bytes = $((MAX_BATCH * IMAGE_TOKENS * 4096 * 2)) bytes):

  tritonserver --model-repository $REPOSITORY --cuda-memory-pool-byte-size 0:$((MAX_BATCH * IMAGE_TOKENS * 4096 * 2 * 2))

and point the workers at it: MODERATION_TRITON_URL=<host>:8001 MODERATION_TRITON_MODEL=fakevlm
EOF
