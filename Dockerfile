# syntax=docker/dockerfile:1
#
# halfstep serving images (`halfstep serve` on port 8000).
#
#   docker build -t halfstep:0.1.0 .                       # GPU (default: the last stage)
#   docker build --target cpu -t halfstep:0.1.0-cpu .      # CPU only, slim Python base
#   docker build --build-arg WITH_TENSORRT=1 -t halfstep:0.1.0-trt .
#
#   docker run --gpus all -p 8000:8000 halfstep:0.1.0       # serves the embedded MNIST bundle
#   docker run --gpus all -p 8000:8000 -v "$PWD/bundle:/models:ro" \
#       -e HALFSTEP_BUNDLE=/models halfstep:0.1.0            # serves your own bundle
#
# Package indexes: pip's own configuration decides; no instruction names an index. Two build args
# pass one through when given: PIP_INDEX_URL (every pip install, read by pip itself) and
# TORCH_INDEX_URL (torch alone). The default index serves CUDA builds of torch for Linux x86_64;
# for a small CPU image pass PyTorch's CPU wheel index, e.g.
#   docker build --target cpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# Build args are recorded in the image history: pass URLs without credentials.
#
# Every server option is also an env var (HALFSTEP_BACKEND, HALFSTEP_MAX_BATCH, ...);
# HALFSTEP_API_KEY turns on bearer-token auth. /models is the documented mount point for
# bundles that are not baked in. This file is checked statically (tests/test_dockerfile.py).
#
# Stages: `wheel` builds the package; `runtime` holds the one script that sets up a serving
# image (virtualenv + torch + the wheel, the non-root user, the health probe); `cpu` and `gpu`
# each RUN that script on their own base. Docker has no include for instructions and a stage
# has one base, so each serving stage still ends with the same few USER/WORKDIR/EXPOSE/
# HEALTHCHECK/ENTRYPOINT lines; they only point at what the script set up.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG TORCH_VERSION=2.13.0

# ---- wheel: build the halfstep wheel once; the source tree never reaches a runtime image.
FROM ${PYTHON_IMAGE} AS wheel
ARG PIP_INDEX_URL
WORKDIR /src
# README.md* is a glob so that the build does not depend on the README being present.
COPY pyproject.toml README.md* ./
COPY halfstep ./halfstep
COPY distill ./distill
COPY export ./export
COPY engines ./engines
COPY server ./server
COPY bench ./bench
COPY eval ./eval
RUN pip wheel --no-cache-dir --disable-pip-version-check --no-deps --wheel-dir /wheels . \
    # The embedded bundle is package data: fail here, not at serve time, if it is missing.
    && python -c "import sys, zipfile, glob; \
names = zipfile.ZipFile(glob.glob('/wheels/halfstep-*.whl')[0]).namelist(); \
sys.exit(0 if any(n.endswith('server/bundles/mnist/bundle.json') for n in names) \
else 'embedded bundle server/bundles/mnist/bundle.json is not in the wheel')"

# ---- runtime: the set-up both serving stages share, written once.
#   halfstep-runtime install EXTRAS [REQUIREMENT...]  venv at /opt/venv, torch, the wheel (bind-
#                                                     mounted at /tmp/wheels) with EXTRAS
#   halfstep-runtime user                             UID/GID 10001, its home, /models
#   halfstep-runtime healthcheck                      exit 0 iff GET /healthz answers 2xx
FROM scratch AS runtime
COPY --chmod=0755 <<'EOF' /halfstep-runtime
#!/bin/sh
set -eu
VENV=/opt/venv
# A fixed numeric UID: Kubernetes' runAsNonRoot can only verify a numeric USER.
RUNTIME_UID=10001
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

case "${1:-}" in
install)
    [ $# -ge 2 ] || { echo "usage: halfstep-runtime install EXTRAS [REQUIREMENT...]" >&2; exit 2; }
    extras=$2
    shift 2
    python3 -m venv "$VENV"
    # Without TORCH_INDEX_URL, torch comes from wherever pip is configured to look.
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        "$VENV/bin/pip" install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION:?}"
    else
        "$VENV/bin/pip" install "torch==${TORCH_VERSION:?}"
    fi
    "$VENV/bin/pip" install "$(echo /tmp/wheels/halfstep-*.whl)[$extras]" "$@"
    ;;
user)
    groupadd --gid "$RUNTIME_UID" halfstep
    useradd --uid "$RUNTIME_UID" --gid "$RUNTIME_UID" \
        --create-home --home-dir /home/halfstep halfstep
    mkdir -p /models /home/halfstep/.cache
    chown -R "$RUNTIME_UID:$RUNTIME_UID" /models /home/halfstep
    ;;
healthcheck)
    # urllib raises on any non-2xx answer, so a failing /healthz exits non-zero.
    exec python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('HALFSTEP_PORT', '8000'), timeout=4)"
    ;;
*)
    echo "usage: halfstep-runtime install EXTRAS [REQUIREMENT...] | user | healthcheck" >&2
    exit 2
    ;;
esac
EOF

# ---- cpu: slim Python base, ONNX Runtime (the fastest CPU backend); pass TORCH_INDEX_URL (see
# the top of this file) for torch's CPU-only build.
FROM ${PYTHON_IMAGE} AS cpu
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
ARG PIP_INDEX_URL
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
COPY --from=runtime /halfstep-runtime /usr/local/bin/
RUN --mount=type=bind,from=wheel,source=/wheels,target=/tmp/wheels \
    halfstep-runtime install serve,onnx
# The embedded bundle plus ONNX exports of its students, made at build time as `make run` does
# (~1 minute): ONNX Runtime is 3-5x faster than eager torch at batch 1 on CPU, and the exports
# do not fit the package's 30 MB budget. HALFSTEP_BUNDLE (or the Helm chart's model source)
# still picks any other bundle.
ARG SERVED_BUNDLE=/opt/halfstep/mnist-onnx
RUN halfstep copy-bundle "$(python -c 'from halfstep.server.embedded import default_bundle_path; \
print(default_bundle_path())')" "${SERVED_BUNDLE}" \
    && halfstep export --bundle "${SERVED_BUNDLE}" --format onnx
RUN halfstep-runtime user
ENV HOME=/home/halfstep \
    HALFSTEP_HOST=0.0.0.0 \
    HALFSTEP_PORT=8000 \
    HALFSTEP_BUNDLE=${SERVED_BUNDLE}
LABEL org.opencontainers.image.title="halfstep (cpu)"
USER 10001:10001
WORKDIR /home/halfstep
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["halfstep-runtime", "healthcheck"]
ENTRYPOINT ["halfstep", "serve"]
CMD []

# ---- gpu (default target, so it must stay the last stage): CUDA runtime + cuDNN base, torch
# with CUDA, onnxruntime-gpu (the `gpu` extra, instead of `onnx`: both ship the `onnxruntime`
# module), TensorRT when WITH_TENSORRT=1. The base image already sets NVIDIA_VISIBLE_DEVICES
# and NVIDIA_DRIVER_CAPABILITIES.
FROM ${CUDA_IMAGE} AS gpu
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
ARG PIP_INDEX_URL
ARG WITH_TENSORRT=0
ARG TENSORRT_REQUIREMENT=tensorrt-cu12>=10
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY --from=runtime /halfstep-runtime /usr/local/bin/
RUN --mount=type=bind,from=wheel,source=/wheels,target=/tmp/wheels \
    if [ "${WITH_TENSORRT}" = "1" ]; then set -- "${TENSORRT_REQUIREMENT}"; else set --; fi \
    && halfstep-runtime install serve,gpu "$@"
RUN halfstep-runtime user
ENV HOME=/home/halfstep \
    HALFSTEP_HOST=0.0.0.0 \
    HALFSTEP_PORT=8000
LABEL org.opencontainers.image.title="halfstep (gpu)"
USER 10001:10001
WORKDIR /home/halfstep
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["halfstep-runtime", "healthcheck"]
ENTRYPOINT ["halfstep", "serve"]
CMD []
