"""The one error shape of the API, ``{"error": {"code", "message"}}``, and its exception handlers.

Codes are part of the public contract (clients branch on them); messages are for humans. Nothing
here ever returns a stack trace: unexpected failures are logged server-side and answered with
``internal``.
"""

from __future__ import annotations

import logging
import re

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import Scope

log = logging.getLogger(__name__)

#: HTTP status for pipeline error codes the API raises while validating an upload and the results
#: it asks for.
UPLOAD_ERROR_STATUS: dict[str, int] = {
    "invalid_image": 400,
    "unsupported_format": 415,
    "too_many_pixels": 413,
    "output_too_large": 413,
}


#: Redis errors that say the store cannot serve a request now, not that the request or our code is
#: wrong: unreachable or timing out (LOADING, a Redis still loading its data, is one of these for
#: redis-py), or refusing writes: out of memory (maxmemory with noeviction), a replica (after a
#: failover), a replica cut off from its primary, a transaction discarded for one of those.
_REDIS_REFUSALS = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.MasterDownError,
    redis.exceptions.ExecAbortError,
)
#: The same refusals by their reply's code, where redis-py has no class for them: MISCONF (its last
#: snapshot failed, so it refuses writes), NOREPLICAS (a primary with `min-replicas-to-write` that
#: has too few replicas connected: docs/scaling.md advises it), and any reply a script got from a
#: command it called (Redis
#: before 7.2 wraps it: `Error running script …: -READONLY …`). In a transaction redis-py puts the
#: command that got the reply before it.
_REFUSAL_REPLY = re.compile(
    r"(?:^|of pipeline caused error: |: -)(OOM|READONLY|MASTERDOWN|MISCONF|NOREPLICAS|LOADING) "
)


def redis_unavailable(exc: BaseException) -> bool:
    """Whether a Redis error means the job store is unavailable for now (503 `redis_unavailable`,
    retry later) rather than a bug (500 `internal`)."""
    return isinstance(exc, _REDIS_REFUSALS) or (
        isinstance(exc, redis.exceptions.ResponseError) and _REFUSAL_REPLY.search(str(exc)) is not None
    )


def brief_redis_error(exc: BaseException) -> str:
    """The error without the command redis-py quotes for a failed transaction step: its arguments
    can be an upload's bytes."""
    return re.sub(r"^Command # \d+ \(.*\) of pipeline caused error: ", "", str(exc), flags=re.S)[:300]


class ApiError(Exception):
    """An error answered to the client as-is: status, stable code, message, optional headers."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    """The JSON body of every error response."""
    return {"error": {"code": code, "message": message}}


#: Headers on every API response: browsers must never sniff a JSON body or a result image into HTML.
SAFE_HEADERS: dict[str, str] = {"X-Content-Type-Options": "nosniff"}


def _respond(
    request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    # For app.main's request counter (`answered_code`), which should not buffer and parse bodies.
    request.state.error_code = code
    return JSONResponse(
        error_body(code, message), status_code=status, headers={**SAFE_HEADERS, **(headers or {})}
    )


def answered_code(scope: Scope) -> str:
    """The code of the error body a handler answered this request with; "" for any other answer."""
    return scope.get("state", {}).get("error_code", "")


#: The request counter's `error_code` for a client that left before its request was read, with
#: status 499 (nginx's "client closed request"): counted, never answered to anyone.
CLIENT_CLOSED = "client_closed"

_HTTP_CODES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}


#: The methods an `Allow` header may name: every standard one a route could serve (HEAD follows GET).
_ALLOWABLE = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> str:
    """The `Allow` header of a 405 (RFC 9110 §15.5.6): every method some route serves at this path.
    Starlette names only those of the first route whose path matched, though one path can have
    several routes (a job's GET and DELETE); HEAD wherever GET (app.main `_as_get`)."""
    routes = request.app.router.routes
    methods = {
        m
        for m in _ALLOWABLE
        if any(route.matches({**request.scope, "method": m})[0] is Match.FULL for route in routes)
    }
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI) -> None:
    """Map every failure (ours, validation, routing, Redis, bugs) onto the error shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _respond(request, exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            # The field's name alone, wherever it came from (as `_invalid` names body fields).
            loc = ".".join(str(p) for p in err.get("loc", ())[1:])
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return _respond(request, 422, "invalid_option", "; ".join(parts) or "Invalid request.")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(request)
        return _respond(request, exc.status_code, code, str(exc.detail), headers)

    @app.exception_handler(redis.exceptions.RedisError)
    async def _redis_error(request: Request, exc: redis.exceptions.RedisError) -> JSONResponse:
        if not redis_unavailable(exc):
            raise exc  # a command Redis refused for what it was: a bug, answered by `_internal`
        log.warning("redis unavailable: %s: %s", type(exc).__name__, brief_redis_error(exc))
        return _respond(
            request,
            503,
            "redis_unavailable",
            "The job store is unavailable; retry shortly.",
            {"Retry-After": "5"},
        )

    @app.exception_handler(ClientDisconnect)
    async def _client_closed(request: Request, exc: ClientDisconnect) -> Response:
        # Not a bug (no traceback) nor a server error (not a 5xx in the error-ratio alert): the
        # client went away mid-upload. The answer only carries the status to the request counter.
        log.info("client closed the connection during %s %s", request.method, request.url.path)
        request.state.error_code = CLIENT_CLOSED
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return _respond(request, 500, "internal", "Internal server error.")
