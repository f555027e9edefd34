# syntax=docker/dockerfile:1
# The worker image: `moderation worker` (and the other `moderation` commands, e.g. `dlq replay`,
# `model build-tiny`, and `hf` for the weights Job). CPU only; FakeVLM runs in Triton.
# Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t registry.example.com/moderation/worker:0.1.0 .
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/moderation
ENV PATH=/opt/moderation/bin:$PATH
# The project depends on torch (the in-process backend and the tiny-checkpoint builder); take the
# CPU build, or pip would pull several GB of CUDA wheels that the worker never uses.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.4,<=2.13.0"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY moderation ./moderation
RUN pip install . && pip check

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
