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
# Every server option is also an env var (HALFSTEP_BACKEND, HALFSTEP_MAX_BATCH, ...);
# HALFSTEP_API_KEY turns on bearer-token auth. /models is the documented mount point for
# bundles that are not baked in. This file is checked statically (tests/test_dockerfile.py);
# no image was built on the development machine, which has no Docker engine.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG TORCH_VERSION=2.13.0

# ---- wheel: build the halfstep wheel once; the source tree never reaches a runtime image.
FROM ${PYTHON_IMAGE} AS wheel
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

# ---- cpu: slim Python base, CPU build of torch, ONNX Runtime (the fastest CPU backend).
FROM ${PYTHON_IMAGE} AS cpu
ARG TORCH_VERSION
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
    && pip install torch==${TORCH_VERSION} --index-url https://download.pytorch.org/whl/cpu
COPY --from=wheel /wheels /tmp/wheels
RUN pip install "$(echo /tmp/wheels/halfstep-*.whl)[serve,onnx]" && rm -rf /tmp/wheels
# The embedded bundle plus ONNX exports of its students, made at build time as `make run` does
# (~1 minute): ONNX Runtime is 3-5x faster than eager torch at batch 1 on CPU, and the exports
# do not fit the package's 30 MB budget. HALFSTEP_BUNDLE (or the Helm chart's model source)
# still picks any other bundle.
ARG SERVED_BUNDLE=/opt/halfstep/mnist-onnx
RUN halfstep copy-bundle "$(python -c 'from halfstep.server.embedded import default_bundle_path; \
print(default_bundle_path())')" "${SERVED_BUNDLE}" \
    && halfstep export --bundle "${SERVED_BUNDLE}" --format onnx
# A fixed numeric UID: Kubernetes' runAsNonRoot can only verify a numeric USER.
RUN groupadd --gid 10001 halfstep \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/halfstep halfstep \
    && mkdir -p /models /home/halfstep/.cache \
    && chown -R 10001:10001 /models /home/halfstep
ENV HOME=/home/halfstep \
    XDG_CACHE_HOME=/home/halfstep/.cache \
    HALFSTEP_HOST=0.0.0.0 \
    HALFSTEP_PORT=8000 \
    HALFSTEP_BACKEND=auto \
    HALFSTEP_BUNDLE=${SERVED_BUNDLE}
LABEL org.opencontainers.image.title="halfstep (cpu)" \
      org.opencontainers.image.description="halfstep serve; mount bundles at /models and set HALFSTEP_BUNDLE"
WORKDIR /home/halfstep
USER 10001:10001
EXPOSE 8000
# urllib raises on any non-2xx answer, so a failing /healthz exits non-zero.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('HALFSTEP_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["halfstep", "serve"]
CMD []

# ---- gpu (default target, so it must stay the last stage): CUDA runtime + cuDNN base,
# CUDA build of torch, onnxruntime-gpu, TensorRT when WITH_TENSORRT=1.
FROM ${CUDA_IMAGE} AS gpu
ARG TORCH_VERSION
# The torch wheels on PyPI for Linux x86_64 are CUDA builds that carry their own CUDA libraries;
# point this at https://download.pytorch.org/whl/cuXYZ to choose another CUDA version.
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG WITH_TENSORRT=0
ARG TENSORRT_REQUIREMENT=tensorrt-cu12>=10
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install torch==${TORCH_VERSION} --index-url ${TORCH_INDEX_URL}
COPY --from=wheel /wheels /tmp/wheels
# The `onnx` extra brings the CPU `onnxruntime`, which shares its import name with
# `onnxruntime-gpu`: remove it before installing the GPU build, or the two overwrite each other.
RUN pip install "$(echo /tmp/wheels/halfstep-*.whl)[serve,onnx]" \
    && pip uninstall -y onnxruntime \
    && pip install "onnxruntime-gpu>=1.18" \
    && if [ "${WITH_TENSORRT}" = "1" ]; then pip install "${TENSORRT_REQUIREMENT}"; fi \
    && rm -rf /tmp/wheels
RUN groupadd --gid 10001 halfstep \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/halfstep halfstep \
    && mkdir -p /models /home/halfstep/.cache \
    && chown -R 10001:10001 /models /home/halfstep
ENV HOME=/home/halfstep \
    XDG_CACHE_HOME=/home/halfstep/.cache \
    CUDA_CACHE_PATH=/home/halfstep/.cache/nv \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HALFSTEP_HOST=0.0.0.0 \
    HALFSTEP_PORT=8000 \
    HALFSTEP_BACKEND=auto
LABEL org.opencontainers.image.title="halfstep (gpu)" \
      org.opencontainers.image.description="halfstep serve; mount bundles at /models and set HALFSTEP_BUNDLE"
WORKDIR /home/halfstep
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('HALFSTEP_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["halfstep", "serve"]
CMD []
