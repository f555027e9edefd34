# syntax=docker/dockerfile:1
# RECIPE image, not deployed (no kustomize overlay uses it until the layout has run on a GPU): Triton with
# TensorRT-LLM for triton_models/gpu, the engine path (triton_models/README.md). It carries the GPU layout and
# its build steps; the engines are built on the serving GPU, by the same image, before Triton starts:
#   docker build -f docker/triton-trtllm.Dockerfile -t registry.example.com/moderation/triton-trtllm:0.1.0 .
#   docker run --gpus 1 -v /models:/models IMAGE \
#     /opt/fakevlm/build/build_engines.sh /models/fakevlm-hf /models/repository /models/engines
#   docker run --gpus 1 -v /models:/models -p 8000-8002:8000-8002 IMAGE
#
# Pinned: TensorRT-LLM 0.19.0, the first release with first-token generation logits at the right step
# (NVIDIA/TensorRT-LLM#3205) and the last whose Triton backend carries the multimodal models in
# tensorrtllm_backend itself (all_models/multimodal, tag v0.19.0); 25.05 is the Triton release taken to
# ship it. That pairing is NOT verified here (NGC cannot be reached): the check below fails the build when
# the image holds another TensorRT-LLM.
FROM nvcr.io/nvidia/tritonserver:25.05-trtllm-python-py3

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1
RUN python3 -c "import tensorrt_llm as t; assert t.__version__ == '0.19.0', t.__version__"
# onnx and onnxscript for the vision tower's ONNX export (torch.onnx's exporter needs onnxscript), hash-locked
# against the image's own packages (docker/requirements/base/tritonserver-trtllm-0.19.0.txt); torch,
# transformers and numpy stay NVIDIA's. pip check: nothing installed here breaks TensorRT-LLM's pins.
COPY docker/requirements/triton-trtllm.txt /tmp/triton-trtllm.txt
RUN pip install --no-deps --require-hashes -r /tmp/triton-trtllm.txt && rm /tmp/triton-trtllm.txt && pip check

# The BLS model and the build import moderation.model (fakevlm's prompt builder, identity, manifest, bls_calls).
COPY moderation/__init__.py moderation/errors.py /opt/moderation/moderation/
COPY moderation/model /opt/moderation/moderation/model
ENV PYTHONPATH=/opt/moderation
# The GPU layout and its build steps; build_engines.sh copies the layout into the repository it serves.
COPY triton_models/gpu /opt/fakevlm/gpu
COPY triton_models/build /opt/fakevlm/build
RUN python3 -c "import moderation.model.bls_calls, moderation.model.manifest, moderation.model.fakevlm, onnxscript" \
 && find /opt -name __pycache__ -prune -exec rm -rf {} +

ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HOME=/tmp PYTHONDONTWRITEBYTECODE=1
USER 1000:1000
EXPOSE 8000 8001 8002
CMD ["tritonserver", "--model-repository=/models/repository", "--strict-readiness=true", "--exit-on-error=true"]
