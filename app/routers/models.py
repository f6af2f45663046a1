"""/v1/models: what the live workers have loaded (profile, device, dtype, weight versions)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.deps import services
from app.routers.health import worker_model
from app.schemas import ERROR_DOC, UNAVAILABLE_DOC, ModelsResponse, profile_notice
from app.security import Caller

router = APIRouter(prefix="/v1", tags=["models"])


@router.get(
    "/models",
    response_model=ModelsResponse,
    summary="Loaded models",
    responses={401: ERROR_DOC, 503: UNAVAILABLE_DOC},
)
def list_models(request: Request, _: Caller) -> ModelsResponse:
    workers = services(request).store.workers()
    warnings = sorted({n for w in workers if (n := profile_notice(w.get("info") or {}))})
    return ModelsResponse(models=[worker_model(w) for w in workers], warnings=warnings)
