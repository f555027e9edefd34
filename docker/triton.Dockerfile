# syntax=docker/dockerfile:1
# Triton Inference Server with the fakevlm model repository: the Python backend running FakeVLM with
# transformers on the GPU (fakevlm for verdicts, fakevlm_explain for explanations), the path deploy/ serves.
# The weights are NOT in the image: Kubernetes mounts them at /models/fakevlm/weights (deploy/weights);
# fakevlm_explain reads them there too (../fakevlm/weights).
# Build from the repository root:
#   docker build -f docker/triton.Dockerfile -t registry.example.com/moderation/triton:0.1.0 .
#
# Base: NVIDIA's Triton image with the PyTorch and Python backends, pinned. Not the -trtllm- flavour: that one
# pins TensorRT-LLM's transformers (4.51.0 at TensorRT-LLM 0.19.0), which the transformers 5 this model's lock
# needs would break (pip check). The TensorRT-LLM path has its own image, docker/triton-trtllm.Dockerfile.
# 25.xx images have Python 3.12 (the `moderation` package needs 3.11 or later; 24.xx have 3.10). The local
# stack and the tests run tritonserver 2.51; the model uses only Python-backend features later releases keep.
ARG TRITON_TAG=25.05
FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}-pyt-python-py3

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1
# The model's Python dependencies from a hashed lock of the `model` extra (docker/requirements/compile.sh),
# which leaves out torch and numpy: the image's own CUDA builds of both stay. pip check fails the build
# if the lock disagrees with what NVIDIA's image pins.
COPY docker/requirements/triton.txt /tmp/triton.txt
RUN pip install --no-deps --require-hashes -r /tmp/triton.txt && rm /tmp/triton.txt && pip check
# triton_models/*/1/model.py import moderation.model (triton_model, fakevlm, imaging, identity, triton_io): the image
# carries that sub-package and what it imports (moderation/__init__.py, errors.py), not the worker.
COPY moderation/__init__.py moderation/errors.py /opt/moderation/moderation/
COPY moderation/model /opt/moderation/moderation/model
ENV PYTHONPATH=/opt/moderation
RUN python3 -c "import moderation.model.triton_model, moderation.model.triton_io, torch; print('torch', torch.__version__)"

# The model repository: fakevlm and fakevlm_explain with their default (CPU) and gpu configs; weights mount point.
COPY triton_models/fakevlm /models/fakevlm
COPY triton_models/fakevlm_explain /models/fakevlm_explain
RUN rm -rf /models/fakevlm/weights && mkdir -p /models/fakevlm/weights \
 && find /models -name __pycache__ -prune -exec rm -rf {} +

ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HOME=/tmp PYTHONDONTWRITEBYTECODE=1
WORKDIR /models
# uid 1000: the non-root user of the Triton images (triton-server); the Deployment runs as it too.
USER 1000:1000
EXPOSE 8000 8001 8002
CMD ["tritonserver", "--model-repository=/models", "--model-config-name=gpu", "--strict-readiness=true", "--exit-on-error=true"]
