# syntax=docker/dockerfile:1
# The worker image: `moderation worker` (and the other `moderation` commands, e.g. `dlq replay`, and `hf`
# for the weights Job; `model build-tiny` with LOCK=worker-model). CPU only; FakeVLM runs in Triton. With
# LOCK=review, the review console's image (`review serve`), without Faust. Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t registry.example.com/moderation/worker:0.1.0 .
#   docker build -f docker/worker.Dockerfile --build-arg LOCK=review -t registry.example.com/moderation/review:0.1.0 .
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# pdqhash (PDQ, the near-duplicate hashes) ships only as an sdist: its C++ extension is built here, in the
# build stage; the runtime stage gets the built venv without the compiler.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/moderation
ENV PATH=/opt/moderation/bin:$PATH
WORKDIR /src
# Every dependency from a hashed lock (docker/requirements/, generated from pyproject.toml by its compile.sh).
# LOCK=worker (the default): the core dependencies, Faust and `hf`; no torch, no transformers (FakeVLM runs
# in Triton). LOCK=review: the core dependencies and the review console's, no Faust. LOCK=worker-model: also
# the `model` extra, for MODERATION_DETECTOR=inprocess and `moderation model build-tiny` (dev's Triton init
# container), with PyTorch's CPU build from TORCH_INDEX_URL (PyPI's Linux
# torch would pull several GB of CUDA wheels): pinned by version, not by hash (docker/README.md).
ARG LOCK=worker
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY docker/requirements ./docker/requirements
RUN pip install --no-deps --require-hashes -r "docker/requirements/${LOCK}.txt" \
 && if [ "${LOCK}" = worker-model ]; then pip install --no-deps --index-url "${TORCH_INDEX_URL}" "torch==2.13.0+cpu"; fi
COPY pyproject.toml README.md ./
COPY moderation ./moderation
RUN pip install --no-deps . && pip check

FROM python:${PYTHON_VERSION}-slim-bookworm
RUN groupadd --system --gid 10001 moderation \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin moderation \
 && mkdir -p /var/lib/moderation && chown 10001:10001 /var/lib/moderation
COPY --from=build /opt/moderation /opt/moderation
ENV PATH=/opt/moderation/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HUB_OFFLINE=1 \
    MODERATION_DATA_DIR=/var/lib/moderation \
    MODERATION_METRICS_PORT=8080
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["moderation"]
CMD ["worker"]
