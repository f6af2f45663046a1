# syntax=docker/dockerfile:1
# dynface GPU worker image: the pipeline on the pinned torch build, on an NVIDIA CUDA runtime base.
# Build from the repo root:
#   docker build -f docker/worker.Dockerfile -t dynface-worker .
# Weights are NOT in the image: they live in a volume filled by `dynface weights pull` (the
# compose `weights-init` service / the Kubernetes weights Job) and checked by sha256.

# torch 2.14.1+cu130 carries its own CUDA 13.0 user-space libraries (nvidia-* wheels); the base
# must match that major version so the driver compatibility check and nvidia-smi agree with it.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

# The PyTorch index that serves the +cu130 builds of the pins in pyproject.toml. Build machines
# with a local wheel store override it (--build-arg TORCH_INDEX_URL=...).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    DYNFACE_WEIGHTS_DIR=/weights \
    DYNFACE_WORKER_METRICS_PORT=9100

# Ubuntu 24.04's python3 is 3.12 (pyproject: >=3.11). libgl1/libglib: opencv-python (a facexlib
# dependency) links them even though we never open a window. Versions are left to the base image's
# snapshot: pinning Ubuntu point releases breaks every rebuild after a security update.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv libgl1 libglib2.0-0t64 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# torch first, from the CUDA index, so the dependency install below finds the pin satisfied and
# does not fetch a different build from PyPI.
RUN python3 -m venv /opt/venv \
 && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /src
# The project's pinned dependencies (base + `worker` extra, read from pyproject.toml) in a layer of
# their own that only a pyproject.toml change rebuilds; then the project itself, without
# dependencies, so a code change reinstalls nothing else.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['worker']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt
COPY README.md ./
COPY app app
COPY worker worker
COPY models models
RUN pip install --no-deps . \
 && python -c "import torch, worker.main; assert torch.__version__.startswith('${TORCH_VERSION}'), torch.__version__"

COPY docker/worker-entrypoint.sh /usr/local/bin/dynface-gpu-worker

# Fixed uid: volume ownership and Kubernetes runAsUser must agree across rebuilds. The weights and
# GPU-claim directories are created here, owned by that uid, so fresh named volumes inherit it.
RUN groupadd --system --gid 10001 dynface \
 && useradd --system --uid 10001 --gid dynface --create-home --home-dir /home/dynface dynface \
 && mkdir -p /weights /run/dynface-gpus \
 && chown 10001:10001 /weights /run/dynface-gpus \
 && chmod 0755 /usr/local/bin/dynface-gpu-worker
# Numeric, so Kubernetes runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/dynface
VOLUME ["/weights"]
EXPOSE 9100

# Healthy = the model is loaded and the worker takes jobs (dynface_worker_ready 1 on its own
# /metrics). Loading the real weights onto a GPU takes minutes on a cold disk: long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; p = os.environ.get('DYNFACE_WORKER_METRICS_PORT', '9100'); t = u.urlopen('http://127.0.0.1:' + p + '/metrics', timeout=4).read().decode(); raise SystemExit(0 if 'dynface_worker_ready 1.0' in t else 1)"]

# One worker process per GPU; the entrypoint claims a free GPU of this host (see the script).
CMD ["dynface-gpu-worker"]
