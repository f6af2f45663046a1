# syntax=docker/dockerfile:1
# dynface API image: FastAPI + uvicorn, no torch (app/ never imports it). Build from the repo root:
#   docker build -f docker/api.Dockerfile -t dynface-api .
# Weights are not needed here: the API only validates uploads and queues jobs.

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies first, in a layer of their own that only a pyproject.toml change rebuilds: the pinned
# base dependencies (the API's; torch & co. are the `worker` extra, not installed here), read from
# pyproject.toml. Then the project itself, without dependencies.
COPY pyproject.toml ./
RUN python -m venv /opt/venv \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && /opt/venv/bin/pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt
COPY README.md ./
COPY app app
COPY worker worker
COPY models models
RUN /opt/venv/bin/pip install --no-deps . \
 && /opt/venv/bin/pip check

FROM python:3.11-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# A fixed uid so volume permissions and Kubernetes runAsUser agree across rebuilds.
RUN groupadd --system --gid 10001 dynface \
 && useradd --system --uid 10001 --gid dynface --create-home --home-dir /home/dynface dynface
COPY --from=build /opt/venv /opt/venv
# Numeric, so Kubernetes runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/dynface
EXPOSE 8000
# /healthz is liveness only (no Redis round trip), so a Redis outage does not restart the API;
# /readyz is what a load balancer should use. The slim image has no curl: use Python's urllib.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
# Two uvicorn processes (prometheus multiprocess mode is set up by `dynface serve` itself).
# REDIS_URL (or DYNFACE_REDIS_SENTINELS) must be set: without either `dynface serve` would try the
# embedded Redis, not installed here.
# --workers 0: workers run in their own (GPU) containers; this image has no torch.
CMD ["dynface", "serve", "--host", "0.0.0.0", "--port", "8000", "--api-workers", "2", "--workers", "0"]
