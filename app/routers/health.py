"""Liveness, readiness and metrics endpoints (unauthenticated: probes and scrapers have no keys; with
API keys configured, /readyz keeps worker details to callers that send one)."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app import metrics
from app.deps import services
from app.schemas import ModelInfo, ReadyResponse
from app.security import is_authenticated

router = APIRouter(tags=["operations"])


def worker_model(w: dict[str, Any]) -> ModelInfo:
    """A worker registry entry as public model info."""
    return ModelInfo(
        worker=w.get("name", "?"),
        state=w.get("state", "?"),
        device=w.get("device"),
        profile=w.get("profile"),
        real=w.get("real"),
        info=w.get("info") or {},
        missing_weights=w.get("missing_weights") or [],
        weights_command=w.get("weights_command"),
        config_error=w.get("config_error"),
    )


def _missing_reason(w: ModelInfo) -> str:
    """Why a worker waits: the exact files and the command that fetches them (it retries itself)."""
    files = ", ".join(f"{m.name} ({m.path})" for m in w.missing_weights)
    return (
        f"worker {w.worker} cannot load its model: missing weight files {files}; "
        f"fetch them with: {w.weights_command} (the worker retries on its own)"
    )


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    summary="Readiness",
    description="200 only when Redis answers and at least one worker has its model loaded; "
    "else 503 with the reasons (a worker lacking weight files names them and the `dynface weights pull` "
    "command that fetches them; a misconfigured one says which setting or file it cannot use). Reports "
    "each worker's device and weight versions, and whether the API is open (no API keys configured). "
    "With API keys configured, a caller without a valid key "
    "gets only `ready`, `auth`, `queue_depth` and short reasons: no workers, paths or commands.",
    responses={503: {"model": ReadyResponse}},
)
def readyz(request: Request) -> JSONResponse:
    svc = services(request)
    # Worker names, weight paths and pull commands describe the deployment: not for anonymous callers.
    detailed = is_authenticated(request, svc.settings)
    reasons: list[str] = []
    workers: list[ModelInfo] = []
    depth = None
    try:
        svc.redis.ping()
        depth = svc.queue.count
        workers = [worker_model(w) for w in svc.store.workers()]
        if not any(w.state in ("ready", "busy") for w in workers):
            reasons.append("no worker has its model loaded" if workers else "no worker is running")
            missing = [w for w in workers if w.missing_weights]
            misconfigured = [w for w in workers if w.config_error]
            if detailed:
                reasons += [_missing_reason(w) for w in missing]
                reasons += [
                    f"worker {w.worker} cannot load its model: {w.config_error} (fix the setting or its "
                    "file; the worker retries on its own)"
                    for w in misconfigured
                ]
            else:
                if missing:
                    reasons.append(f"{len(missing)} worker(s) lack weight files (details with an API key)")
                if misconfigured:
                    reasons.append(
                        f"{len(misconfigured)} worker(s) are misconfigured (details with an API key)"
                    )
    except Exception as e:  # any Redis failure means "not ready", never a 500
        reasons.append(f"redis unreachable: {type(e).__name__}")
    body = ReadyResponse(
        ready=not reasons,
        reasons=reasons,
        auth="api_key" if svc.settings.auth_enabled else "open",
        queue_depth=depth,
        workers=workers if detailed else [],
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if body.ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus_metrics(request: Request) -> Response:
    svc = services(request)
    body = await anyio.to_thread.run_sync(metrics.render, svc.store, svc.settings.queue_name)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
