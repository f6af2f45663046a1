"""/v1/restorations: submit, inspect, download and cancel jobs."""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app import metrics
from app.deps import is_head, services
from app.errors import SAFE_HEADERS, UPLOAD_ERROR_STATUS, ApiError, brief_redis_error, redis_unavailable
from app.jobs import TERMINAL, JobStore
from app.queued import end_queued
from app.schemas import (
    ERROR_DOC,
    RETRY_AFTER_DOC,
    UNAVAILABLE_DOC,
    Restoration,
    RestorationOptions,
    RestorationRequest,
    profile_notice,
    restoration_view,
)
from app.security import Caller, authenticate, check_rate_limit, check_webhook_url
from app.settings import Settings
from models.errors import PipelineError
from models.images import check_image, check_output_sizes, output_sizes, resolve_format

router = APIRouter(prefix="/v1/restorations", tags=["restorations"])
log = logging.getLogger(__name__)

#: Room for multipart headers/boundaries and JSON framing on top of the image itself.
_FRAMING_BYTES = 64 * 1024
#: A JSON body's base64 text over the image's plain base64: encoders may escape `/` (PHP: `\/`, +1.6 %)
#: or `+` (.NET: `\u002B`, +7.8 %). The decoded image is measured against the limit anyway.
_JSON_ESCAPE_ROOM = 1.1
_DATA_URL = re.compile(r"^data:image/[A-Za-z0-9.+-]+(;[^,;]*)*;base64,", re.ASCII)
#: One element of the `Prefer` list (RFC 7240 §2: `1#preference`): a comma inside a quoted-string
#: does not split it, nor does one in an unclosed quoted-string (never a backtrack: linear time).
_PREFERENCE = re.compile(r'(?:[^,"]|"(?:[^"\\]|\\.)*"?)+')
#: An element that is the `wait` preference: bare, or with a token or quoted-string value (`wait=10`,
#: `wait="10"`), then its own `;` parameters or nothing. A `wait` after a `;` is a parameter of
#: another preference (`foo; wait=2`), not a wait.
_WAIT = re.compile(r'\s*+wait\s*+(?:=\s*+(?:"([0-9]+)"|([0-9]+)))?\s*+(?:;|$)', re.IGNORECASE)
#: A result index as its URL writes it: decimal, with no sign or leading zero (one URL per result), and
#: short enough for int() (a list output never has a billion items).
_INDEX = re.compile(r"0|[1-9][0-9]{0,8}")
#: Age after which an Idempotency-Key bound to a job that does not exist is taken over by a retry:
#: longer than any submission takes between claiming the key and storing its job (image check,
#: webhook DNS, Redis round trips with their timeouts), so the claimer is known to have failed.
IDEMPOTENCY_TAKEOVER_SECONDS = 60.0
#: Longest pause between re-reads of a record that a `Prefer: wait` request waits on.
_MAX_POLL_SECONDS = 1.0
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_IMAGE_CONTENT = {"image/png": _BINARY, "image/jpeg": _BINARY, "image/webp": _BINARY}
_PARAMETERS = [
    {
        "name": "Prefer",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "example": "wait=30"},
        "description": "`wait` or `wait=N` (RFC 7240): wait up to N seconds (at most the server's limit, "
        "DYNFACE_MAX_WAIT_SECONDS; larger values are clamped) for the job to finish, counted from when the "
        "request has been received (checking and storing the upload count in it). `Preference-Applied` "
        "echoes the wait actually used.",
    },
    {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
        "description": "The same key and body within the idempotency window (DYNFACE_RECORD_TTL_SECONDS "
        "from the first submission) return the same job (header "
        "`Idempotent-Replayed: true`); the same key with another body is a 409 `idempotency_conflict`; a "
        "retry while the first request is still storing its job is a 409 `idempotency_in_progress` "
        "(`Retry-After`). A replay (the key's own body, its job stored) does not count against the rate "
        "limit, and its image is not checked again; any other request with a bound key counts. 1 to 255 "
        "characters, not blank (else 400 `invalid_request`).",
    },
]

_OPTIONS_SCHEMA = RestorationOptions.model_json_schema(ref_template="#/components/schemas/{model}")
_REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "properties": {
                    "image": {"type": "string", "format": "binary"},
                    **{k: v for k, v in _OPTIONS_SCHEMA["properties"].items()},
                },
            },
            "encoding": {"outputs": {"style": "form", "explode": True}},
        },
        "application/json": {"schema": RestorationRequest.model_json_schema()},
    },
}


async def _limited(request: Request, limit: int, max_bytes: int) -> AsyncIterator[bytes]:
    """Yield the body, counting bytes as they arrive: Content-Length is never trusted. ``limit`` is
    the body's cut-off (the image's ``max_bytes`` plus encoding and framing room); the message names
    the image limit, the one a client can act on."""
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise ApiError(413, "too_large", f"The image exceeds {max_bytes} bytes.")
        yield chunk


def _options_from_form(form: Any) -> dict[str, Any]:
    """Multipart fields → option dict (``outputs`` may repeat or be comma-separated)."""
    data: dict[str, Any] = {}
    for key in form:
        if key == "image":
            continue
        # HTML forms send an empty field for "no value"; every option is optional, so "" is its default.
        values = [v for v in form.getlist(key) if isinstance(v, str) and v != ""]
        if not values:
            continue
        if key == "outputs":
            data[key] = [p.strip() for v in values for p in v.split(",") if p.strip()]
        else:
            data[key] = values[-1]
    return data


async def _read_submission(request: Request, max_bytes: int) -> tuple[bytes, RestorationOptions]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        body = _limited(request, max_bytes + _FRAMING_BYTES, max_bytes)
        parser = MultiPartParser(request.headers, body, max_files=1, max_fields=32)
        try:
            form = await parser.parse()
        except MultiPartException as e:
            # The framing is broken (or over a field/part limit), not the image: invalid_request.
            raise ApiError(400, "invalid_request", f"Malformed multipart body: {e.message}") from e
        try:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise ApiError(422, "invalid_option", "image: a file field named 'image' is required")
            data = await upload.read()
            try:
                options = RestorationOptions.model_validate(_options_from_form(form))
            except ValidationError as e:
                raise _invalid(e) from e
        finally:
            await form.close()
    elif ctype == "application/json":
        cut_off = int(max_bytes * 4 / 3 * _JSON_ESCAPE_ROOM) + _FRAMING_BYTES
        raw = b"".join([c async for c in _limited(request, cut_off, max_bytes)])
        try:
            body = RestorationRequest.model_validate_json(raw)
        except ValidationError as e:
            raise _invalid(e) from e
        # Each copy of the base64 text is 4/3 of the image: the body, its str, its ASCII bytes. Each
        # is let go once the next exists, and the bytes are decoded in place (no slice, no copy).
        del raw
        match = _DATA_URL.match(body.image)
        if not match:
            raise ApiError(400, "invalid_image", "image must be a data URL: data:image/<type>;base64,<data>")
        start = match.end()
        options = RestorationOptions.model_validate(body.model_dump(exclude={"image"}))
        try:
            text = body.image.encode("ascii")
        except UnicodeEncodeError as e:  # a data URL is ASCII (RFC 2397); its parameters too
            raise ApiError(400, "invalid_image", "image: a data URL holds ASCII characters only") from e
        del body, match
        try:
            data = binascii.a2b_base64(memoryview(text)[start:], strict_mode=True)
        except binascii.Error as e:
            raise ApiError(400, "invalid_image", "image: invalid base64 data") from e
        del text
    else:
        raise ApiError(
            415,
            "unsupported_format",
            "Send multipart/form-data with an 'image' file, or application/json with a data URL.",
        )
    if len(data) > max_bytes:
        raise ApiError(413, "too_large", f"The image exceeds {max_bytes} bytes.")
    return data, options


def _invalid(e: ValidationError) -> ApiError:
    """A pydantic error as ``invalid_option`` (422), or a JSON syntax error as 400."""
    errs = e.errors()
    if any(err["type"] == "json_invalid" for err in errs):
        return ApiError(400, "invalid_request", "The body is not valid JSON.")
    parts = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in errs]
    return ApiError(422, "invalid_option", "; ".join(parts))


def _wait_seconds(prefer: list[str], cap: int) -> int | None:
    """``Prefer: wait`` → cap; ``wait=N`` → min(N, cap); absent → None (RFC 7240 preferences).

    ``prefer`` holds every `Prefer` header line: RFC 7240 lets a client split its preferences over
    several, and the first `wait` in order counts."""
    waits = (_WAIT.match(e.group()) for e in _PREFERENCE.finditer(", ".join(prefer)))
    m = next((w for w in waits if w is not None), None)
    if m is None:
        return None
    digits = m.group(1) or m.group(2)
    if digits is None:
        return cap
    # A value longer than the cap could ever be is clamped unparsed: int() refuses over 4300 digits.
    digits = digits.lstrip("0") or "0"
    return cap if len(digits) > len(str(cap)) else min(int(digits), cap)


def _base_url(request: Request) -> str:
    configured = services(request).settings.public_base_url
    return (configured or str(request.base_url)).rstrip("/")


def _view(request: Request, record: dict[str, Any]) -> Restoration:
    position = None
    if record["status"] == "queued":
        position = services(request).queue.get_job_position(record["id"])
    return restoration_view(record, position)


def _stored_view(request: Request, record: dict[str, Any]) -> Restoration:
    """`_view` of the job a submission stored (or replayed). The job exists whatever Redis does now:
    a failed queue-position read leaves `queue_position` null, where a 503 (no Location) would have
    the client submit it again."""
    try:
        return _view(request, record)
    except RedisError as e:
        if not redis_unavailable(e):
            raise
        log.warning("job %s: queue position unknown, Redis unavailable: %s", record["id"], e)
        return restoration_view(record)


def _respond(view: Restoration, status: int, **headers: str) -> JSONResponse:
    return JSONResponse(
        view.model_dump(mode="json"),
        status_code=status,
        headers={**SAFE_HEADERS, "Location": view.urls.self, **headers},
    )


def _owned(request: Request, job_id: str, owner: str) -> dict[str, Any]:
    """The caller's job or 404 (other keys' jobs are indistinguishable from unknown ones)."""
    return _own(services(request).store.get(job_id), job_id, owner)


def _own(record: dict[str, Any] | None, job_id: str, owner: str) -> dict[str, Any]:
    if record is None or record.get("owner") != owner:
        raise ApiError(404, "not_found", f"No restoration {job_id!r} (unknown or expired).")
    return record


async def _await_terminal(request: Request, record: dict[str, Any], deadline: float) -> dict[str, Any]:
    """The job's ``record`` once it is terminal, or at ``deadline`` (`time.monotonic()`; no thread is
    held while waiting).

    Woken by the job's completion message (app/completions.py) within ms of its end. The record is
    also re-read every second while the listener is subscribed, and on an interval growing from
    5 ms to 1 s while it is not (reconnecting), so a message lost in a reconnect only delays the
    answer; re-reading more often while subscribed would only cost the API and Redis work.

    A read that Redis fails ends the wait with the record as last read: the job is stored, and a 503
    (no Location) would have the client submit it again.
    """
    svc = services(request)
    job_id = record["id"]
    interval = 0.005
    with svc.completions.watch(job_id) as ended:
        while True:
            try:
                fresh = await anyio.to_thread.run_sync(svc.store.get, job_id)
            except RedisError as e:
                if not redis_unavailable(e):
                    raise
                log.warning("job %s: Prefer: wait ended early, Redis unavailable: %s", job_id, e)
                return record
            if fresh is None:  # expired while we waited (only with a record TTL shorter than the wait)
                raise ApiError(404, "not_found", f"No restoration {job_id!r} (unknown or expired).")
            record = fresh
            if record["status"] in TERMINAL or time.monotonic() >= deadline:
                return record
            pause = _MAX_POLL_SECONDS if svc.completions.subscribed.is_set() else interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), min(pause, max(0.0, deadline - time.monotonic())))
            interval = min(interval * 2, _MAX_POLL_SECONDS)


@router.post(
    "",
    status_code=202,
    response_model=Restoration,
    summary="Submit a photo",
    description=(
        "Multipart `image` file plus option fields, or JSON with `image` as a data URL. Answers 202 "
        "with the queued job and a Location header. `Prefer: wait[=N]` waits for the result (N up to "
        "DYNFACE_MAX_WAIT_SECONDS; a larger N is clamped, `Preference-Applied` says the wait used): 200 "
        "with the finished job, or 202 "
        "if it is not done in time. With `Prefer: wait` and an `Accept` that rates the result's image "
        "type above JSON (`Accept: image/*`), a succeeded job is answered with the restored photo itself "
        "(200, image bytes; `Location` is the job) — one request instead of two; any other outcome is the "
        "job JSON as above, so check `Content-Type`. `Idempotency-Key`: the same key "
        "and body within the idempotency window (DYNFACE_RECORD_TTL_SECONDS) return the same job; the "
        "same key with a different body is a 409."
    ),
    openapi_extra={"requestBody": _REQUEST_BODY, "parameters": _PARAMETERS},
    responses={
        200: {
            "model": Restoration,
            "description": "Finished job (Prefer: wait, or an Idempotency-Key replay of a job that has "
            "ended); the restored photo itself when `Accept` prefers it.",
            "content": _IMAGE_CONTENT,
            "headers": {"Location": {"description": "URL of the job.", "schema": {"type": "string"}}},
        },
        202: {
            "description": "Accepted (queued, or not finished within the Prefer: wait time).",
            "headers": {"Location": {"description": "URL of the job.", "schema": {"type": "string"}}},
        },
        400: ERROR_DOC,
        401: ERROR_DOC,
        409: ERROR_DOC,
        413: ERROR_DOC,
        415: ERROR_DOC,
        422: ERROR_DOC,
        429: {**ERROR_DOC, "headers": RETRY_AFTER_DOC},
        500: ERROR_DOC,
        503: UNAVAILABLE_DOC,
    },
)
async def create_restoration(request: Request) -> Response:
    try:
        return await _create(request)
    except ApiError as e:
        metrics.JOBS_REJECTED.labels(e.code).inc()
        raise
    except RedisError as e:
        if redis_unavailable(e):
            metrics.JOBS_REJECTED.labels("redis_unavailable").inc()  # answered by app.errors' handler
        raise


async def _create(request: Request) -> Response:
    svc = services(request)
    s = svc.settings
    owner = authenticate(request, s)
    idem = _idempotency_key(request)
    binding = await anyio.to_thread.run_sync(_charge, svc.store, owner, idem, s)
    try:
        data, options = await _read_submission(request, s.max_upload_bytes)
    except ApiError:
        if binding is not None:  # not counted yet (`_charge`), and a bad body replays no job
            await anyio.to_thread.run_sync(check_rate_limit, svc.store, owner, s.rate_limit_per_minute)
        raise
    # RFC 7240 §4.3: `wait` bounds the time the request takes once it has been received, so checking
    # and storing the upload count in it.
    received = time.monotonic()
    wait = _wait_seconds(request.headers.getlist("prefer"), s.max_wait_seconds)
    record, replayed, view = await _store(request, owner, data, options, binding, answer_now=wait is None)
    del data  # the upload (up to DYNFACE_MAX_UPLOAD_BYTES) is not held while the job is waited on
    extra = {"Idempotent-Replayed": "true"} if replayed else {}
    if wait is not None:
        extra["Preference-Applied"] = f"wait={wait}"
        record = await _await_terminal(request, record, received + wait)
        image = await _image_answer(request, record, extra)
        if image is not None:
            return image
        view = await anyio.to_thread.run_sync(_stored_view, request, record)  # queue position: a Redis call
    assert view is not None  # set by one of the two branches above
    status = 200 if record["status"] in TERMINAL else 202
    return _respond(view, status, **extra)


#: Longest Idempotency-Key accepted: a UUID or a hash fits many times (the key is stored hashed).
MAX_IDEMPOTENCY_KEY_LENGTH = 255


def _idempotency_key(request: Request) -> str | None:
    """The request's Idempotency-Key, or 400: an empty one would bind every such request of its
    owner to one job (a replay of another request's job), and an unbounded one is hashed whole for
    every request that sends it."""
    idem = request.headers.get("idempotency-key")
    if idem is not None and not (idem.strip() and len(idem) <= MAX_IDEMPOTENCY_KEY_LENGTH):
        raise ApiError(
            400,
            "invalid_request",
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters, not blank.",
        )
    return idem


def _charge(store: JobStore, owner: str, idem: str | None, s: Settings) -> dict[str, Any] | None:
    """Count a submission against its caller's rate limit (429 past it) and refuse it when its key
    is at its limits (`_admit`: active jobs, stored bytes), before its body is read, unless its
    Idempotency-Key is bound already: then that binding is returned, and the submission is counted
    once its body is read unless it replays the binding's job (`_replay_or_charge`), or once its body
    fails to read (`_create`)."""
    binding = store.idempotency_binding(f"{owner}:{idem}") if idem is not None else None
    if binding is None:
        check_rate_limit(store, owner, s.rate_limit_per_minute)
        if _limits_keys(s):  # the upload of a key at its limits is neither read nor decoded
            _admit(store, owner, None, 0, s)
    return binding


def _limits_keys(s: Settings) -> bool:
    """Whether submissions count against the per-key limits (DYNFACE_MAX_ACTIVE_JOBS_PER_KEY,
    DYNFACE_MAX_STORED_BYTES_PER_KEY): not on an open API, whose callers are one anonymous owner,
    bounded by the queue depth alone."""
    return s.auth_enabled and (s.max_active_jobs_per_key > 0 or s.max_stored_bytes_per_key > 0)


def _admit(store: JobStore, owner: str, job_id: str | None, upload_bytes: int, s: Settings) -> None:
    """Count ``job_id`` (None: only check) against its key's limits, or 429: too_many_active_jobs, or
    too_many_stored_bytes (Retry-After: until its first stored result expires)."""
    refusal = store.admit(
        owner,
        job_id,
        max_active=s.max_active_jobs_per_key,
        max_bytes=s.max_stored_bytes_per_key,
        upload_bytes=upload_bytes,
        storing_grace=IDEMPOTENCY_TAKEOVER_SECONDS,
    )
    if refusal is None:
        return
    if refusal.limit == "active_jobs":
        raise ApiError(
            429,
            "too_many_active_jobs",
            f"This API key has {refusal.amount} jobs queued or running, its limit "
            f"(DYNFACE_MAX_ACTIVE_JOBS_PER_KEY = {s.max_active_jobs_per_key}); submit again once one has "
            "ended.",
            {"Retry-After": str(s.queue_full_retry_after_seconds)},
        )
    limit = f"its limit (DYNFACE_MAX_STORED_BYTES_PER_KEY = {s.max_stored_bytes_per_key})"
    held = f"This API key's uploads and results hold {refusal.amount} bytes in the job store"
    # Checked before the upload is read (0 bytes): the key is over its share already.
    reason = (
        f"{held}, over {limit}"
        if not upload_bytes
        else f"{held}; this upload ({upload_bytes} bytes) would pass {limit}"
    )
    if refusal.expires_in:
        when = f"Results are kept {s.result_ttl_seconds} s; the next expire in {refusal.expires_in} s."
    else:  # only uploads of queued or running jobs: they go as their jobs end
        when = "No result is stored: its queued uploads are dropped as their jobs end."
    retry = refusal.expires_in or s.queue_full_retry_after_seconds
    raise ApiError(429, "too_many_stored_bytes", f"{reason}. {when}", {"Retry-After": str(retry)})


def _replay_or_charge(
    store: JobStore, owner: str, binding: dict[str, Any], body_hash: str, per_minute: int
) -> dict[str, Any] | None:
    """The job of a submission that replays ``binding``, its Idempotency-Key's binding when it came in:
    same body, job stored. A replay is not counted against the rate limit (the key's first submission
    was) and its upload is not checked again (it was before its job was stored). Any other submission
    is counted now, before its upload is decoded: one with another body is then answered 409
    idempotency_conflict, and one whose job does not exist (yet) goes on as a new one (None)."""
    try:
        record = _replayed(store, binding, body_hash, patience=0.0)
    except ApiError:
        check_rate_limit(store, owner, per_minute)
        raise
    if record is None:
        check_rate_limit(store, owner, per_minute)
    return record


async def _store(
    request: Request,
    owner: str,
    data: bytes,
    options: RestorationOptions,
    binding: dict[str, Any] | None,
    *,
    answer_now: bool,
) -> tuple[dict[str, Any], bool, Restoration | None]:
    """Check the upload and store its job, or find the one its Idempotency-Key is bound to (``binding``
    when the request came in): (record, replayed, and with ``answer_now`` the job as answered, queue
    position included)."""
    svc = services(request)
    with_key = request.headers.get("idempotency-key") is not None
    body_hash = _body_hash(data, options) if with_key else None

    def answer(record: dict[str, Any]) -> Restoration | None:
        # The answer's queue position is read in the same hop.
        return _stored_view(request, record) if answer_now else None

    if binding is not None and body_hash is not None:

        def replay() -> tuple[dict[str, Any] | None, Restoration | None]:
            per_minute = svc.settings.rate_limit_per_minute
            record = _replay_or_charge(svc.store, owner, binding, body_hash, per_minute)
            return record, answer(record) if record is not None else None

        found, view = await anyio.to_thread.run_sync(replay)
        if found is not None:
            return found, True, view
    # Its own hop, behind the limiter: each check holds a whole decoded image.
    warnings = await anyio.to_thread.run_sync(
        _check_upload, data, options, svc.settings, limiter=svc.image_checks
    )

    def submit() -> tuple[dict[str, Any], bool, Restoration | None]:
        record, replayed = _submit(request, owner, data, options, body_hash, warnings)
        # The answer's queue position is read in the same hop.
        return record, replayed, answer(record)

    # One worker-thread hop for the rest of the blocking work: webhook DNS, Redis.
    return await anyio.to_thread.run_sync(submit)


async def _image_answer(request: Request, record: dict[str, Any], headers: dict[str, str]) -> Response | None:
    """The restored photo itself as the answer to a `Prefer: wait` submission whose `Accept` prefers
    its image type to JSON: one request instead of two for a synchronous client. None (answer with
    the job JSON) when the job did not succeed in time, has no `image` output, it has expired, or
    Redis fails the read (the job JSON then says where to fetch it)."""
    media_type = (record.get("outputs") or {}).get("image")
    if record["status"] != "succeeded" or media_type is None:
        return None
    if not prefers_over_json(request.headers.get("accept"), media_type):
        return None
    try:
        blob = await anyio.to_thread.run_sync(services(request).store.result, record["id"], "image")
    except RedisError as e:
        if not redis_unavailable(e):
            raise
        log.warning("job %s: image not read, Redis unavailable: %s", record["id"], e)
        return None
    if blob is None:
        return None
    job_url = restoration_view(record).urls.self
    return Response(
        blob,
        media_type=media_type,
        headers={
            **_image_headers(record["id"], "image", media_type),
            "Location": job_url,
            "Content-Location": f"{job_url}/image",
            **headers,
        },
    )


def prefers_over_json(accept: str | None, media_type: str) -> bool:
    """Whether an `Accept` header (RFC 9110 §12.5.1) rates ``media_type`` above `application/json`:
    each type takes the q of its most specific matching range; a tie (no header, `*/*`) is JSON's."""

    def quality(wanted: str) -> float:
        kind = wanted.split("/")[0]
        best: tuple[int, float] = (-1, 0.0)  # (specificity, q)
        for part in (accept or "").split(","):
            media_range, *params = (p.strip() for p in part.split(";"))
            specificity = {wanted: 2, f"{kind}/*": 1, "*/*": 0}.get(media_range.lower())
            if specificity is None or specificity <= best[0]:
                continue
            q = 1.0
            for param in params:
                name, _, value = param.partition("=")
                if name.strip().lower() == "q":
                    try:
                        q = min(max(float(value), 0.0), 1.0)
                    except ValueError:
                        q = 0.0
            best = (specificity, q)
        return best[1]

    image_q = quality(media_type)
    return image_q > 0 and image_q > quality("application/json")


def _check_upload(data: bytes, options: RestorationOptions, s: Settings) -> list[str]:
    """The upload and the results it asks for, checked before anything is stored: a broken upload or
    a result too large to make (`max_output_pixels`) or to write in its format is a 4xx now, not a
    job that fails after the whole restoration. Returns the upload's warnings."""
    try:
        # Every pixel is decoded, as the worker will.
        checked = check_image(data, max_pixels=s.max_pixels)
        sizes = output_sizes(
            checked.size, aligned=options.aligned, upscale=options.upscale, outputs=options.outputs
        )
        fmt = resolve_format(options.format, checked.format)
        check_output_sizes(sizes, fmt, max_pixels=s.max_output_pixels)
    except PipelineError as e:
        raise ApiError(UPLOAD_ERROR_STATUS.get(e.code, 400), e.code, e.message) from e
    return checked.warnings


def _body_hash(data: bytes, options: RestorationOptions) -> str:
    """What an Idempotency-Key is bound to besides its job: the upload and its options."""
    canonical = json.dumps(options.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(hashlib.sha256(data).digest() + canonical).hexdigest()


def _submit(
    request: Request,
    owner: str,
    data: bytes,
    options: RestorationOptions,
    body_hash: str | None,
    warnings: list[str],
) -> tuple[dict[str, Any], bool]:
    """Webhook check, idempotency, queue limit, the key's limits (`_admit`), then store + enqueue
    (the upload has passed `_check_upload`, which gave its ``warnings``; ``body_hash`` is its
    `_body_hash` when it came with an Idempotency-Key). Returns (record, replayed)."""
    svc = services(request)
    s, store = svc.settings, svc.store
    if options.webhook is not None:
        try:
            check_webhook_url(options.webhook, s)
        except ValueError as e:
            raise ApiError(422, "invalid_option", f"webhook: {e}") from e
    job_id = uuid.uuid4().hex
    idem = request.headers.get("idempotency-key")
    if idem is not None:
        assert body_hash is not None  # `_store` hashes every upload sent with a key
        earlier = store.claim_idempotency(f"{owner}:{idem}", job_id, body_hash)
        while earlier is not None:
            record = _replayed(store, earlier, body_hash)
            if record is not None:
                return record, True
            # Its age when the claim script ran (Redis' clock), before `_replayed`'s wait of up to
            # 2 s: errs towards 409, never towards a second job.
            if earlier["age"] < IDEMPOTENCY_TAKEOVER_SECONDS:
                # The request that claimed the key may still be creating its job: taking the key
                # over now could make a second one.
                raise ApiError(
                    409,
                    "idempotency_in_progress",
                    "A request with this Idempotency-Key is still being processed; retry shortly.",
                    {"Retry-After": "5"},
                )
            # The submission that claimed the key never created its job (it failed, perhaps with
            # the outcome unknown to its client): this retry takes the key over.
            earlier = store.rebind_idempotency(f"{owner}:{idem}", earlier["job_id"], job_id, body_hash)
    storing = False  # set as the job's transaction is sent: a lost reply then leaves its outcome unknown
    admitted = False
    try:
        if svc.queue.count >= s.max_queue_depth:
            raise ApiError(
                503,
                "queue_full",
                f"The queue is full ({s.max_queue_depth} jobs); retry later.",
                {"Retry-After": str(s.queue_full_retry_after_seconds)},
            )
        if _limits_keys(s):
            try:
                _admit(store, owner, job_id, len(data), s)
            except RedisError:
                admitted = True  # its reply lost, it may have been admitted: given back below
                raise
            admitted = True
        record = {
            "id": job_id,
            "status": "queued",
            "owner": owner,
            "base_url": _base_url(request),
            "created_at": time.time(),
            "result_ttl": s.result_ttl_seconds,
            "options": options.model_dump(mode="json"),
            "warnings": warnings + _profile_warnings(request),
            "attempts": 0,
        }
        storing = True
        store.create(job_id, data, record, svc.queue)
    except Exception as e:
        # No job exists, so the key is freed for a retry, unless the transaction storing it may have
        # run unanswered (connection lost, no reply in time): the key then stays bound, and a retry
        # either finds the job or, when there is none, takes the key over (above).
        unknown = storing and isinstance(e, RedisConnectionError | RedisTimeoutError)
        if not unknown:
            _undo_claims(store, owner, job_id, idem, admitted)
        raise
    metrics.JOBS_SUBMITTED.inc()
    metrics.UPLOAD_BYTES.observe(len(data))
    return record, False


def _undo_claims(store: JobStore, owner: str, job_id: str, idem: str | None, admitted: bool) -> None:
    """Free what a submission that stored no job claimed: its Idempotency-Key, for a retry, and its
    place among its key's active jobs. Failing that (Redis down), a retry takes the key over once the
    claim is IDEMPOTENCY_TAKEOVER_SECONDS old, and the place is freed as long after its admission
    (`JobStore.admit`); the submission's own error is answered."""
    try:
        if idem is not None:
            store.release_idempotency(f"{owner}:{idem}", job_id)
        if admitted:
            store.unadmit(owner, job_id)
    except RedisError as e:
        log.warning("job %s: claims not released: %s", job_id, brief_redis_error(e))


def _replayed(
    store: JobStore, earlier: dict[str, Any], body_hash: str, patience: float = 2.0
) -> dict[str, Any] | None:
    """The job that a submission whose body hashes to ``body_hash`` replays: the one bound by its
    Idempotency-Key's binding ``earlier``, or None when that job does not exist (within ``patience``
    seconds, `_bound_record`). 409 idempotency_conflict when the key was bound with another body."""
    if earlier["body_sha256"] != body_hash:
        raise ApiError(
            409, "idempotency_conflict", "This Idempotency-Key was used with a different request body."
        )
    return _bound_record(store, earlier["job_id"], patience)


def _bound_record(store: JobStore, job_id: str, patience: float = 2.0) -> dict[str, Any] | None:
    """The job an Idempotency-Key is bound to. A concurrent request with the same key may have
    claimed the key a moment ago and not yet written the record, so its absence is retried briefly."""
    deadline = time.monotonic() + patience
    while (record := store.get(job_id)) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return record


def _profile_warnings(request: Request) -> list[str]:
    """Warn up front when the workers run a non-real (test) profile."""
    notices = {profile_notice(w.get("info") or {}) for w in services(request).store.workers()}
    return sorted(n for n in notices if n)


@router.get(
    "/{job_id}",
    response_model=Restoration,
    summary="Get a job",
    responses={401: ERROR_DOC, 404: ERROR_DOC, 422: ERROR_DOC, 503: UNAVAILABLE_DOC},
)
def get_restoration(job_id: str, request: Request, owner: Caller) -> JSONResponse:
    return _respond(_view(request, _owned(request, job_id, owner)), 200)


@router.delete(
    "/{job_id}",
    response_model=Restoration,
    summary="Cancel a job",
    description="Queued jobs are canceled at once (200). A running job is asked to stop: 202 with the "
    "job still `processing`. It stops at its next check (between its stages, diffusion steps and "
    "background tiles, and before its results are stored) and ends `canceled`; in a batch with other "
    "jobs (worker batching), the face restoration they share goes on unless all of them are canceled, "
    "and it stops right after. One that was already storing its results, or failed first, ends "
    "`succeeded` or `failed`: poll until it ends. Already canceled jobs: 200 again (a retried DELETE "
    "is safe). Succeeded or failed jobs: 409 `not_cancelable`.",
    responses={
        202: {"model": Restoration},
        401: ERROR_DOC,
        404: ERROR_DOC,
        409: ERROR_DOC,
        422: ERROR_DOC,
        503: UNAVAILABLE_DOC,
    },
)
def cancel_restoration(job_id: str, request: Request, owner: Caller) -> JSONResponse:
    svc = services(request)
    record = _owned(request, job_id, owner)
    store = svc.store
    # Again while the job moves between queued and processing in between (a worker takes it, or a
    # lost worker's job goes back to the queue): each step is atomic, the pair is not.
    for _ in range(3):
        canceled = end_queued(store, svc.queue, svc.settings, job_id, {"status": "canceled"})
        if canceled is not None:
            return _respond(_view(request, canceled), 200)
        if store.update(job_id, {"cancel_requested": True}, allowed=["processing"]):
            return _respond(_view(request, store.get(job_id) or record), 202)
        record = store.get(job_id) or record
        if record["status"] in TERMINAL:
            break
    if record["status"] == "canceled":  # a retried DELETE (or one racing another): same answer
        return _respond(_view(request, record), 200)
    raise ApiError(409, "not_cancelable", f"The job is already {record['status']}.")


def _result(
    request: Request, owner: str, job_id: str, name: str, kind: str, index: int | None = None
) -> Response:
    svc = services(request)
    blob: bytes | None = None
    if is_head(request):  # its length alone: a result is up to hundreds of MB that HEAD never sends
        found, length = svc.store.get_with_result_length(job_id, name)
    else:
        found, blob = svc.store.get_with_result(job_id, name)  # one round trip for both
        length = None if blob is None else len(blob)
    record = _own(found, job_id, owner)
    # Distinct codes for the ends without results: a client polling through `not_ready` must stop.
    if record["status"] == "failed":
        cause = (record.get("error") or {}).get("code", "internal")
        raise ApiError(409, "job_failed", f"The job failed ({cause}): it has no results.")
    if record["status"] == "canceled":
        raise ApiError(409, "job_canceled", "The job was canceled: it has no results.")
    if record["status"] != "succeeded":
        raise ApiError(
            409, "not_ready", f"The job is {record['status']}; results exist only once it succeeded."
        )
    produced = record.get("outputs") or {}
    media_type = produced.get(kind)
    if index is not None:  # a list output (faces, crops): one media type per item
        items = produced.get(kind) or []
        media_type = items[index] if 0 <= index < len(items) else None
    if media_type is None:
        raise ApiError(404, "not_found", f"This job has no {name.replace(':', ' ')} output.")
    if length is None:
        raise ApiError(
            410,
            "expired",
            # The job's own TTL, fixed at submission (app/jobs.py `_FINISH` falls back the same way).
            f"The result has expired (results are kept for "
            f"{record.get('result_ttl', svc.settings.result_ttl_seconds)} s).",
        )
    headers = _image_headers(job_id, name, media_type)
    if blob is None:  # a HEAD: the GET's headers, its length included
        return Response(media_type=media_type, headers={**headers, "Content-Length": str(length)})
    return Response(blob, media_type=media_type, headers=headers)


def _image_headers(job_id: str, name: str, media_type: str) -> dict[str, str]:
    # nosniff + an explicit inline filename with the image's own extension: a browser shows the
    # bytes as the declared image type and never renders them as a page.
    ext = _EXTENSIONS.get(media_type, "bin")
    return {
        **SAFE_HEADERS,
        "Cache-Control": "private, max-age=3600",
        "Content-Disposition": f'inline; filename="{job_id}-{name.replace(":", "-")}.{ext}"',
    }


_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


_BYTES = {
    200: {"content": _IMAGE_CONTENT},
    401: ERROR_DOC,
    404: ERROR_DOC,
    409: ERROR_DOC,
    410: ERROR_DOC,
    422: ERROR_DOC,
    503: UNAVAILABLE_DOC,
}


@router.get("/{job_id}/image", summary="The restored photo", response_class=Response, responses=_BYTES)
def get_image(job_id: str, request: Request, owner: Caller) -> Response:
    return _result(request, owner, job_id, "image", "image")


def _index(k: str, name: str) -> int:
    """Result index ``k`` of a list output, or 404: any other spelling names no result."""
    if not _INDEX.fullmatch(k):
        raise ApiError(404, "not_found", f"No {name} {k!r}: results are numbered 0, 1, 2, …")
    return int(k)


#: The index parameter of a list output's URL, documented as the decimals it accepts.
_IndexParam = Annotated[
    str,
    Path(
        description="Index in the job's list output: 0, 1, 2, … (any other spelling is a 404).",
        json_schema_extra={"pattern": "^(0|[1-9][0-9]*)$"},
    ),
]


@router.get("/{job_id}/faces/{k}", summary="Restored face crop k", response_class=Response, responses=_BYTES)
def get_face(job_id: str, k: _IndexParam, request: Request, owner: Caller) -> Response:
    index = _index(k, "face")
    return _result(request, owner, job_id, f"face:{index}", "faces", index)


@router.get(
    "/{job_id}/crops/{k}",
    summary="Aligned input face k",
    description="The aligned 512x512 input face that restored face k came from (output `crops`).",
    response_class=Response,
    responses=_BYTES,
)
def get_crop(job_id: str, k: _IndexParam, request: Request, owner: Caller) -> Response:
    index = _index(k, "crop")
    return _result(request, owner, job_id, f"crop:{index}", "crops", index)


@router.get(
    "/{job_id}/comparison", summary="Side-by-side comparison", response_class=Response, responses=_BYTES
)
def get_comparison(job_id: str, request: Request, owner: Caller) -> Response:
    return _result(request, owner, job_id, "comparison", "comparison")
