"""FastAPI application factory: wiring only (settings, Redis, routers, error handlers, metrics)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import anyio
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from redis import Redis
from rq import Queue
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics, webhooks
from app.completions import Completions
from app.deps import HEAD_AS_GET
from app.errors import answered_code, install_error_handlers
from app.jobs import JobStore, connect, make_queue
from app.queued import sweep_forever
from app.routers import docs, health, models, restorations, web
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
    #: Uploads being checked (fully decoded) at once: each holds its pixels (docs/scaling.md).
    image_checks: anyio.CapacityLimiter


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API. Tests pass their own Settings; production reads the environment."""
    settings = settings or get_settings()
    completions = Completions(settings)
    redis = connect(settings)
    store = JobStore(redis, settings)
    queue = make_queue(redis, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        completions.start()
        sweeping = asyncio.create_task(sweep_forever(store, queue, settings), name="dynface-queue-sweep")
        try:
            yield
        finally:
            sweeping.cancel()
            with suppress(asyncio.CancelledError):
                await sweeping
            await completions.stop()
            # Webhooks of jobs this process ended (cancels, the sweep's failures): off the event loop.
            await anyio.to_thread.run_sync(webhooks.drain)

    # FastAPIOffline: FastAPI with Swagger UI's and ReDoc's files mounted at DOCS_ASSETS_URL; the
    # pages themselves are app/routers/docs.py's.
    app = FastAPIOffline(
        title="dynface",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        static_url=docs.DOCS_ASSETS_URL,
    )
    limiter = anyio.CapacityLimiter(settings.max_concurrent_image_checks)
    app.state.services = Services(settings, redis, store, queue, completions, limiter)
    install_error_handlers(app)
    app.include_router(restorations.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(web.router)
    app.include_router(docs.router)
    app.add_middleware(_Measure)
    return app


#: The methods the API serves; any other is counted as "other", so a client cannot mint label values.
_METHODS = frozenset({"GET", "HEAD", "POST", "DELETE", "OPTIONS"})


class _Measure:
    """Request count (with the error code answered) and duration per route template; `nosniff` on
    every answer and `no-store` on JSON ones; HEAD answered wherever GET is (`_as_get`). Plain ASGI:
    Starlette's BaseHTTPMiddleware (`@app.middleware`) runs each request in an extra task and pipes
    the response body through a stream: about 0.8 ms of CPU a request on the 2-core test machine."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        inner = _as_get(scope)
        # What ServerErrorMiddleware, outside this one, answers when the app raises.
        status, error_code = 500, "internal"

        async def send_with_headers(message: Message) -> None:
            nonlocal status, error_code
            if message["type"] == "http.response.start":
                status = message["status"]
                error_code = answered_code(inner)
                headers = MutableHeaders(scope=message)
                # Browsers must never sniff an API body (JSON, metrics, results) into something runnable.
                headers.setdefault("X-Content-Type-Options", "nosniff")
                # A JSON answer (a job, an error, readiness) is the state of one moment: no cache keeps it.
                if headers.get("content-type", "").startswith("application/json"):
                    headers.setdefault("Cache-Control", "no-store")
            await send(message)

        abandoned = False
        try:
            await self.app(inner, receive, send_with_headers)
        except asyncio.CancelledError:
            # The server stopped it (a shutdown past uvicorn's graceful timeout): no answer was made
            # and no bug happened, so it is not counted, least of all as a 500.
            abandoned = True
            raise
        finally:
            if not abandoned:
                template = getattr(inner.get("route"), "path", "unmatched")
                method = scope["method"] if scope["method"] in _METHODS else "other"
                metrics.REQUESTS.labels(template, method, str(status), error_code).inc()
                metrics.REQUEST_SECONDS.labels(template, method).observe(time.perf_counter() - start)


def _as_get(scope: Scope) -> Scope:
    """A HEAD request as its GET (RFC 9110 §9.3.2: a server MUST answer HEAD wherever it answers GET),
    routed and answered as that GET: the server, which reads the method from its own scope (still
    HEAD), sends the headers only (uvicorn and the TestClient drop the body). Not HEAD added to each
    GET route: FastAPI would render every one into the OpenAPI document as a second operation with
    the same operation id. A copy, so the counter above still labels it HEAD; marked
    (`app.deps.is_head`) so a route can skip reading a body that is never sent."""
    return {**scope, "method": "GET", HEAD_AS_GET: True} if scope["method"] == "HEAD" else scope


def app_from_env() -> FastAPI:
    """Entry point for ``uvicorn --factory app.main:app_from_env``."""
    return create_app()
