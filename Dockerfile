# syntax=docker/dockerfile:1.7
# The engine's container image. Stages (README, "Docker and Kubernetes"):
#
#   deps         a virtualenv with PyTorch and the pinned runtime dependencies (cached apart from the source)
#   builder      compiles the Cython extension (ext/) and builds the wheel; the only stage with a compiler
#   development  build tools, dev dependencies and an editable install of the source
#   test         runs ruff, mypy and the test suite as its build step: docker build --target test .
#   production   the default target: the wheel and its runtime dependencies only, as a non-root user
#
# TORCH_INDEX picks the PyTorch build: CPU wheels by default, a CUDA build with e.g.
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t shm-inference-engine:0.1.0-cuda .
# (the CUDA wheels carry their CUDA libraries; the host needs only the NVIDIA driver and container toolkit).
# Run with --ipc=host or a --shm-size that holds the arenas: the engine checks /dev/shm at start-up.

ARG PYTHON_VERSION=3.11
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim-bookworm

# ---- base: Python, a virtualenv on PATH, no pip cache or bytecode litter -------------------------
FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

# ---- deps: PyTorch first (largest, changes least), then requirements.txt; no source yet ----------
FROM base AS deps
# Keep TORCH_VERSION equal to the torch pin of requirements.txt (a unit test checks it).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY requirements.txt /tmp/requirements/requirements.txt
# torch is already there, from TORCH_INDEX: drop its line so PyPI's (CUDA) build is never pulled in.
RUN sed -i '/^torch==/d' /tmp/requirements/requirements.txt \
 && pip install -r /tmp/requirements/requirements.txt

# ---- builder: compiler and build backend, then the source; builds the wheel into /dist -----------
FROM deps AS builder
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN pip install "Cython==3.3.1" "setuptools==84.2.1" "wheel==0.48.0"
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY ext ./ext
COPY protos ./protos
COPY engine ./engine
COPY servers ./servers
COPY bench ./bench
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /dist .

# ---- development: tools, dev dependencies, the source installed editable ------------------------
FROM deps AS development
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev make git \
 && rm -rf /var/lib/apt/lists/*
COPY requirements.txt requirements-dev.txt /tmp/requirements/
RUN sed -i '/^torch==/d' /tmp/requirements/requirements.txt \
 && pip install -r /tmp/requirements/requirements-dev.txt
WORKDIR /src
COPY . .
RUN pip install --no-deps --no-build-isolation -e . \
 && python setup.py -q build_ext --inplace
ENV ENGINE_IN_CONTAINER=1

# ---- test: the build fails when lint, types or a test fail --------------------------------------
FROM development AS test
# Build containers get a 64 MB /dev/shm: give the engines under test room for their arenas.
RUN --mount=type=tmpfs,target=/dev/shm,size=2g \
    ruff check . \
 && mypy \
 && ENGINE_BENCH_QUICK=1 python -m pytest -q -p no:randomly tests

# ---- production: wheel + runtime dependencies, non-root, configured by ENGINE_* variables -------
FROM base AS production
ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
LABEL org.opencontainers.image.title="shm-inference-engine" \
      org.opencontainers.image.description="Multiprocess shared-memory inference server for PyTorch models: gRPC (KServe v2) 7212, ZMQ 7211, REST 8008" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="shm-inference-engine"
RUN groupadd --system --gid 10001 engine \
 && useradd --system --uid 10001 --gid engine --create-home --home-dir /home/engine \
      --shell /usr/sbin/nologin engine
COPY --from=deps /opt/venv /opt/venv
RUN --mount=type=bind,from=builder,source=/dist,target=/dist \
    pip install --no-deps /dist/*.whl
WORKDIR /app
# Bind every interface (the default is 127.0.0.1). Any config key is an ENGINE_<KEY> variable, e.g.
# ENGINE_MODEL_REPOSITORY=/models, ENGINE_DEVICES=cuda:0, ENGINE_WORKER_ARENA_MB=512.
ENV ENGINE_IN_CONTAINER=1
USER 10001:10001
EXPOSE 7211 7212 8008
# Ready = admitting requests (503 while starting or draining). python, not curl: the image has no curl.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.build_opener(r.ProxyHandler({})).open('http://127.0.0.1:' + os.environ.get('ENGINE_REST_PORT', '8008') + '/v2/health/ready', timeout=4)"]
ENTRYPOINT ["python", "-m", "engine.launch"]
CMD []
