"""FastAPI application factory: wiring only (settings, Redis, routers, error handlers, metrics)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request, Response
from redis import Redis
from rq import Queue

from app import metrics
from app.completions import Completions
from app.errors import install_error_handlers
from app.jobs import JobStore, connect, make_queue
from app.routers import health, models, restorations, web
from app.settings import Settings, get_settings

DESCRIPTION = """
Restore faces in photos with DynFaceRestore (a diffusion prior with dynamic blur-level mapping).

Submit a photo to `POST /v1/restorations`, then poll `GET /v1/restorations/{id}` (or send
`Prefer: wait`) and download the results. Jobs follow Replicate's prediction envelope.
Errors are always `{"error": {"code", "message"}}`.
"""


@dataclass
class Services:
    """Per-app singletons reached from routes via ``request.app.state.services``."""

    settings: Settings
    redis: Redis
    store: JobStore
    queue: Queue
    completions: Completions


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API. Tests pass their own Settings; production reads the environment."""
    settings = settings or get_settings()
    completions = Completions(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        completions.start()
        try:
            yield
        finally:
            await completions.stop()

    app = FastAPI(title="dynface", version="1.0.0", description=DESCRIPTION, lifespan=lifespan)
    redis = connect(settings)
    store = JobStore(redis, settings)
    app.state.services = Services(settings, redis, store, make_queue(redis, settings), completions)
    install_error_handlers(app)
    app.include_router(restorations.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(web.router)

    @app.middleware("http")
    async def _measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            # Browsers must never sniff an API body (JSON, metrics, results) into something runnable.
            response.headers.setdefault("X-Content-Type-Options", "nosniff")
            return response
        finally:
            route = request.scope.get("route")
            template = getattr(route, "path", "unmatched")
            metrics.REQUESTS.labels(template, request.method, str(status)).inc()
            metrics.REQUEST_SECONDS.labels(template, request.method).observe(time.perf_counter() - start)

    return app


def app_from_env() -> FastAPI:
    """Entry point for ``uvicorn --factory app.main:app_from_env``."""
    return create_app()
