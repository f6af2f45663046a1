"""API behaviour that needs Redis but no worker: validation, errors, limits, auth, idempotency,
queued-job cancellation, readiness and OpenAPI. Jobs stay queued here (no worker consumes them)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import re
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from http.server import BaseHTTPRequestHandler
from typing import Any

import anyio
import numpy as np
import pytest
import redis
import rq.utils
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.serializers import JSONSerializer
from starlette.requests import Request
from starlette.types import Message, Scope

from app import lost, queued, webhooks
from app.jobs import JobStore, connect, make_queue
from app.main import create_app
from app.routers import health, models, restorations
from app.schemas import RestorationOptions, restoration_view
from app.settings import Settings
from models.images import CheckedImage
from tests.conftest import ROOT, aligned_png, http_server, wait_for

PNG = aligned_png()


def small_png(size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 80, 60)).save(buf, "PNG")
    return buf.getvalue()


def noise_png(side: int) -> bytes:
    """A square PNG of random pixels: it does not compress, so its bytes are about 3 × side²."""
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def submit(client: TestClient, data: bytes = PNG, headers: dict | None = None, **fields: str):
    return client.post(
        "/v1/restorations",
        files={"image": ("x.png", data, "image/png")},
        data={"aligned": "true", **fields},
        headers=headers or {},
    )


def error_code(r) -> str:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return body["error"]["code"]


def test_submit_multipart_returns_queued_job(client: TestClient, redis_conn, settings) -> None:
    r = submit(client, outputs="image,faces")
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["queue_position"] == 0
    assert r.headers["location"] == job["urls"]["self"]
    assert set(job["urls"]) == {"self", "result", "cancel"}
    assert job["options"]["outputs"] == ["image", "faces"] and job["options"]["aligned"] is True
    got = client.get(f"/v1/restorations/{job['id']}")
    assert got.status_code == 200 and got.json()["status"] == "queued"
    # the RQ job holds only the id, JSON-serialised (zlib-compressed by RQ): never a pickle
    raw = redis_conn.hget(f"rq:job:{job['id']}", "data")
    assert json.loads(zlib.decompress(raw)) == ["worker.tasks.restore", None, [job["id"]], {}]
    # explicit limits on every job, from the settings
    limits = redis_conn.hmget(f"rq:job:{job['id']}", "timeout", "result_ttl", "failure_ttl", "retries_left")
    expected = (settings.job_timeout_seconds, settings.result_ttl_seconds, settings.record_ttl_seconds, 2)
    assert [int(v) for v in limits] == list(expected)
    # results do not exist yet
    for path in ("image", "comparison", "faces/0"):
        assert client.get(f"/v1/restorations/{job['id']}/{path}").status_code == 409


def test_submit_json_data_url(client: TestClient) -> None:
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    r = client.post("/v1/restorations", json={"image": url, "aligned": True, "fidelity": 0.3, "seed": 7})
    assert r.status_code == 202, r.text
    assert r.json()["options"]["fidelity"] == 0.3


def test_second_job_has_queue_position_one(client: TestClient) -> None:
    submit(client)
    assert submit(client).json()["queue_position"] == 1


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"upscale": "9"}, "upscale"),
        ({"fidelity": "1.5"}, "fidelity"),
        ({"mode": "gfpgan"}, "mode"),
        ({"outputs": "image,video"}, "outputs"),
        ({"format": "gif"}, "format"),
        ({"detector": "yolo"}, "detector"),
        ({"on_no_face": "ignore"}, "on_no_face"),
        ({"colour": "red"}, "colour"),
        ({"webhook": "ftp://example.com/hook"}, "webhook"),
    ],
)
def test_invalid_options_are_422(client: TestClient, fields: dict, field: str) -> None:
    r = submit(client, **fields)
    assert r.status_code == 422, r.text
    assert error_code(r) == "invalid_option" and field in r.json()["error"]["message"]


def test_webhook_to_private_address_refused_by_default(make_settings) -> None:
    s = make_settings(webhook_allow_private=False, webhook_allow_http=False)
    with TestClient(create_app(s)) as c:
        for url in (
            "https://127.0.0.1/hook",
            "https://10.0.0.1/hook",
            "http://example.com/hook",
            "https://localhost/hook",
        ):
            r = submit(c, webhook=url)
            assert r.status_code == 422 and error_code(r) == "invalid_option", (url, r.text)


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"", 400, "invalid_image"),
        (b"definitely not an image", 400, "invalid_image"),
        (PNG[: len(PNG) // 2], 400, "invalid_image"),
    ],
)
def test_bad_images(client: TestClient, data: bytes, status: int, code: str) -> None:
    r = submit(client, data=data)
    assert r.status_code == status and error_code(r) == code, r.text


def test_unsupported_image_format_is_415(client: TestClient) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, "ICO")
    r = submit(client, data=buf.getvalue())
    assert r.status_code == 415 and error_code(r) == "unsupported_format"


def test_unsupported_content_type_is_415(client: TestClient) -> None:
    r = client.post("/v1/restorations", content=PNG, headers={"content-type": "image/png"})
    assert r.status_code == 415 and error_code(r) == "unsupported_format"


def test_json_errors(client: TestClient) -> None:
    r = client.post("/v1/restorations", json={"image": "https://example.com/a.png"})
    assert r.status_code == 400 and error_code(r) == "invalid_image"
    r = client.post("/v1/restorations", json={"image": "data:image/png;base64,@@@"})
    assert r.status_code == 400 and error_code(r) == "invalid_image"
    r = client.post("/v1/restorations", json={"image": "data:image/png;name=é;base64,QUJD"})
    assert r.status_code == 400 and "ASCII characters only" in r.json()["error"]["message"]
    r = client.post("/v1/restorations", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = client.post("/v1/restorations", json={"aligned": True})
    assert r.status_code == 422 and error_code(r) == "invalid_option"


def test_too_many_pixels(make_settings) -> None:
    with TestClient(create_app(make_settings(max_pixels=100 * 100))) as c:
        r = submit(c, data=small_png((200, 200)))
        assert r.status_code == 413 and error_code(r) == "too_many_pixels"


def test_too_large_counts_streamed_bytes_not_content_length(make_settings) -> None:
    s = make_settings(max_upload_bytes=100_000)
    with TestClient(create_app(s)) as c:
        big = submit(c, data=PNG + b"\0" * 200_000)  # honest Content-Length
        assert big.status_code == 413 and error_code(big) == "too_large"
        # A lying Content-Length (claims 100 bytes) with a streamed, oversized body.
        boundary = "b0undary"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        body = head + b"\0" * 300_000 + f"\r\n--{boundary}--\r\n".encode()

        def chunks():
            for i in range(0, len(body), 16_384):
                yield body[i : i + 16_384]

        lying = {"content-type": f"multipart/form-data; boundary={boundary}", "content-length": "100"}
        r = c.post("/v1/restorations", content=chunks(), headers=lying)
        assert r.status_code == 413 and error_code(r) == "too_large"
        # JSON: the decoded image is measured too
        url = "data:image/png;base64," + base64.b64encode(PNG + b"\0" * 120_000).decode()
        r = c.post("/v1/restorations", json={"image": url})
        assert r.status_code == 413 and error_code(r) == "too_large"


# Sides whose noise PNG's escapes outgrow the 64 KiB framing room: `+` is 1/64 of base64's
# characters and grows 6×, `/` as often and 2×.
@pytest.mark.parametrize(("escaped", "side"), [("+", 480), ("/", 1300)])
def test_a_json_upload_at_the_limit_with_escaped_base64_is_accepted(
    make_settings, escaped: str, side: int
) -> None:
    """JSON encoders escape some of base64's characters (.NET writes `+` as `\\u002B`, PHP `/` as
    `\\/`): a body's base64 text is then longer than 4/3 of its image, and an image within the limit
    was cut off as 413 too_large."""
    image = noise_png(side)
    with TestClient(create_app(make_settings(max_upload_bytes=len(image)))) as c:
        url = "data:image/png;base64," + base64.b64encode(image).decode()
        text = json.dumps({"image": url}).replace(escaped, "\\u002B" if escaped == "+" else "\\/")
        assert len(text) > len(image) * 4 / 3 + 64 * 1024
        r = c.post("/v1/restorations", content=text, headers={"content-type": "application/json"})
        assert r.status_code == 202, r.text


def test_a_json_upload_holds_few_copies_of_its_base64_text() -> None:
    """A JSON upload's base64 text (4/3 of the image) was held in up to three copies at once (its str,
    a slice of it, the slice's ASCII bytes) beside the decoded image: 5.3x the image at the peak
    (tracemalloc), where multipart holds about 1x. Now each copy is let go once the next exists and
    the bytes are decoded in place: two copies at most, 2.7x."""
    image = bytes(range(256)) * (3 * 2**20 // 256)
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    payload = json.dumps({"image": url, "seed": 5}).encode()
    body = [payload[i : i + 65536] for i in range(0, len(payload), 65536)]  # streamed, as uvicorn does
    del payload, url
    messages = iter([{"type": "http.request", "body": b, "more_body": True} for b in body])

    async def receive() -> Message:
        return next(messages, {"type": "http.request", "body": b"", "more_body": False})

    scope: Scope = {"type": "http", "method": "POST", "headers": [(b"content-type", b"application/json")]}

    async def read() -> tuple[bytes, RestorationOptions, int]:
        # Measured in here: asyncio.run's own shutdown allocates megabytes after the read.
        before = tracemalloc.get_traced_memory()[0]
        data, options = await restorations._read_submission(Request(scope, receive), 20 * 2**20)
        return data, options, tracemalloc.get_traced_memory()[1] - before

    tracemalloc.start()
    try:
        data, options, peak = asyncio.run(read())
    finally:
        tracemalloc.stop()
    assert data == image and options.seed == 5
    text = len(image) * 4 / 3
    assert peak < 2 * text + len(image), f"peak {peak / len(image):.2f}x the image"


def test_queue_full(make_settings) -> None:
    with TestClient(create_app(make_settings(max_queue_depth=2, queue_full_retry_after_seconds=17))) as c:
        assert submit(c).status_code == 202
        assert submit(c).status_code == 202
        before = requests_counted(c, "/v1/restorations", "POST", 503, "queue_full")
        r = submit(c)
        assert r.status_code == 503 and error_code(r) == "queue_full"
        assert r.headers["retry-after"] == "17"
        # Back-pressure, which the error-ratio alert tells from other 503s by this label alone.
        assert requests_counted(c, "/v1/restorations", "POST", 503, "queue_full") == before + 1


def test_active_jobs_are_limited_per_key(make_settings, monkeypatch) -> None:
    """One key could fill the whole queue (and Redis) for every other: its queued and running jobs
    are capped, and past the cap its uploads are refused before they are decoded. An ended job frees
    its place; a replay is its job, not a new one; other keys and an open API (one anonymous owner,
    bounded by the queue) are not held by it."""
    checks = count_upload_checks(monkeypatch)
    s = make_settings(api_keys="key-a,key-b", max_active_jobs_per_key=2, queue_full_retry_after_seconds=13)
    with TestClient(create_app(s)) as c:
        a, b = {"X-API-Key": "key-a"}, {"X-API-Key": "key-b"}
        first = submit(c, headers={**a, "Idempotency-Key": "first"})
        assert first.status_code == 202 and submit(c, headers=a).status_code == 202
        before = metric(c, 'dynface_jobs_rejected_total{reason="too_many_active_jobs"}')
        r = submit(c, headers=a)
        assert r.status_code == 429 and error_code(r) == "too_many_active_jobs", r.text
        assert r.headers["retry-after"] == "13" and "(DYNFACE_MAX_ACTIVE_JOBS_PER_KEY = 2)" in r.text
        assert metric(c, 'dynface_jobs_rejected_total{reason="too_many_active_jobs"}') == before + 1
        assert len(checks) == 2  # the refused upload was not decoded
        replay = submit(c, headers={**a, "Idempotency-Key": "first"})
        assert replay.status_code == 202 and replay.json()["id"] == first.json()["id"]
        assert submit(c, headers=b).status_code == 202  # the limit is per key
        assert c.delete(first.headers["location"], headers=a).json()["status"] == "canceled"
        assert submit(c, headers=a).status_code == 202  # the canceled job's place is free
        assert submit(c, headers=a).status_code == 429
        assert c.app.state.services.queue.count == 3  # 4 stored, 1 canceled; the refused stored nothing
    with TestClient(create_app(make_settings(max_active_jobs_per_key=1))) as c:
        assert [submit(c).status_code for _ in range(2)] == [202, 202]


def test_stored_bytes_are_limited_per_key(make_settings, monkeypatch) -> None:
    """One key's results (kept DYNFACE_RESULT_TTL_SECONDS) and queued uploads could fill Redis, which
    then refuses every key's submissions: past its share a key's submission is 429
    too_many_stored_bytes, Retry-After saying when its first result expires, before its upload is
    decoded once the key is over; other keys go on."""
    checks = count_upload_checks(monkeypatch)
    s = make_settings(
        api_keys="key-a,key-b",
        max_active_jobs_per_key=0,
        max_stored_bytes_per_key=3 * len(PNG),
        max_upload_bytes=3 * len(PNG),
        result_ttl_seconds=90,
    )
    with TestClient(create_app(s)) as c:
        a, b = {"X-API-Key": "key-a"}, {"X-API-Key": "key-b"}
        first, second = (submit(c, headers=a).json()["id"] for _ in range(2))  # 2 x len(PNG) queued
        store = c.app.state.services.store
        owner = store.get(first)["owner"]
        store.finish(first, {"status": "succeeded"}, {"image": PNG, "comparison": PNG}, owner=owner)
        r = submit(c, headers=a)  # 1 upload queued + 2 results + this one: 4 x len(PNG)
        assert r.status_code == 429 and error_code(r) == "too_many_stored_bytes", r.text
        assert 85 <= int(r.headers["retry-after"]) <= 90 and f"hold {3 * len(PNG)} bytes" in r.text
        assert submit(c, headers=b).status_code == 202
        # The key's results alone now pass its share: refused before its upload is read.
        store.finish(second, {"status": "succeeded"}, {"image": b"\0" * (3 * len(PNG))}, owner=owner)
        decoded = len(checks)
        r = submit(c, headers=a)
        assert (
            r.status_code == 429 and f"hold {5 * len(PNG)} bytes in the job store, over its limit" in r.text
        )
        assert len(checks) == decoded
    open_api = make_settings(max_stored_bytes_per_key=len(PNG), max_upload_bytes=len(PNG))
    with TestClient(create_app(open_api)) as c:
        assert [submit(c).status_code for _ in range(2)] == [202, 202]  # an open API has no per-key share


@pytest.mark.usefixtures("rate_window")
def test_rate_limited_per_key(make_settings) -> None:
    s = make_settings(rate_limit_per_minute=2, api_keys="key-a,key-b")
    with TestClient(create_app(s)) as c:
        a, b = {"X-API-Key": "key-a"}, {"Authorization": "Bearer key-b"}
        assert submit(c, headers=a).status_code == 202
        assert submit(c, headers=a).status_code == 202
        r = submit(c, headers=a)
        assert r.status_code == 429 and error_code(r) == "rate_limited"
        assert r.headers["retry-after"] == "40"  # to the end of the pinned window
        assert submit(c, headers=b).status_code == 202  # the limit is per key


@pytest.mark.usefixtures("rate_window")
def test_a_retry_whose_idempotency_key_is_bound_is_not_rate_limited(make_settings) -> None:
    """The rate limit was charged before the Idempotency-Key was looked at: a client retrying a
    submission it had made (a lost answer, say) used up its limit and got 429 instead of its job."""
    with TestClient(create_app(make_settings(rate_limit_per_minute=3))) as c:
        h = {"Idempotency-Key": "order-77"}
        first = submit(c, headers=h)
        assert first.status_code == 202, first.text
        for _ in range(3):
            again = submit(c, headers=h)
            assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true", again.text
            assert again.json()["id"] == first.json()["id"]
        # Another body under the key is not a replay: counted (the second of three), then the key's
        # check answers.
        other_body = submit(c, headers=h, seed="5")
        assert other_body.status_code == 409 and error_code(other_body) == "idempotency_conflict"
        # New submissions are still counted: this one is the third of three, the next is refused.
        assert submit(c, headers={"Idempotency-Key": "order-78"}).status_code == 202
        r = submit(c)
        assert r.status_code == 429 and error_code(r) == "rate_limited", r.text


def count_upload_checks(monkeypatch: pytest.MonkeyPatch) -> list[None]:
    """One entry per `_check_upload` call (a full decode behind the process-wide image-check limiter)."""
    calls: list[None] = []
    real = restorations._check_upload

    def counted(*args: Any, **kwargs: Any) -> list[str]:
        calls.append(None)
        return real(*args, **kwargs)

    monkeypatch.setattr(restorations, "_check_upload", counted)
    return calls


@pytest.mark.usefixtures("rate_window")
def test_a_bound_key_with_other_bodies_is_rate_limited_before_any_decode(make_settings, monkeypatch) -> None:
    """A request whose Idempotency-Key was bound skipped the rate limit whatever its body: a client
    could send any number of uploads under one key, each decoded before its 409. Only a replay goes
    uncounted; another body is counted (429 past the limit) and answered without a decode."""
    checks = count_upload_checks(monkeypatch)
    with TestClient(create_app(make_settings(rate_limit_per_minute=3))) as c:
        h = {"Idempotency-Key": "order-flood"}
        assert submit(c, headers=h).status_code == 202
        answers = [submit(c, headers=h, seed=str(seed)) for seed in range(5)]
        assert [(r.status_code, error_code(r)) for r in answers] == [(409, "idempotency_conflict")] * 2 + [
            (429, "rate_limited")
        ] * 3
        assert len(checks) == 1  # the first submission's only


def test_a_blank_or_overlong_idempotency_key_is_refused(client: TestClient) -> None:
    """An empty key was a key like any other: every request sent with one shared its binding, so the
    second got another request's job (or a 409). Refused before anything is claimed or stored."""
    limit = restorations.MAX_IDEMPOTENCY_KEY_LENGTH
    for idem in ("", "  ", "k" * (limit + 1)):
        r = submit(client, headers={"Idempotency-Key": idem})
        assert r.status_code == 400 and error_code(r) == "invalid_request", r.text
        assert "Idempotency-Key" in r.json()["error"]["message"]
    assert client.app.state.services.queue.count == 0
    first = submit(client, headers={"Idempotency-Key": "k" * limit})
    again = submit(client, headers={"Idempotency-Key": "k" * limit})
    assert first.status_code == again.status_code == 202 and again.json()["id"] == first.json()["id"]


@pytest.mark.usefixtures("rate_window")
def test_a_bound_key_with_a_body_that_does_not_read_is_rate_limited(make_settings) -> None:
    """A bound key's submission is counted once its body is read (`_replay_or_charge`), so one whose
    body could not be read (malformed JSON, a missing image, too large) went uncounted: any number of
    them, each read and parsed in full, under one key."""
    with TestClient(create_app(make_settings(rate_limit_per_minute=3))) as c:
        h = {"Idempotency-Key": "order-malformed"}
        assert submit(c, headers=h).status_code == 202
        bad = {**h, "Content-Type": "application/json"}
        answers = [c.post("/v1/restorations", content=b'{"image": ', headers=bad) for _ in range(4)]
        assert [(r.status_code, error_code(r)) for r in answers] == [(400, "invalid_request")] * 2 + [
            (429, "rate_limited")
        ] * 2


def test_a_key_being_stored_is_judged_by_redis_clock_not_the_api_hosts(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replica A claimed a key a moment ago and is still storing its job; a retry reaches replica B,
    whose clock runs two minutes ahead. The claim's age was B's clock minus A's, past the 60 s
    takeover: B made a second job for the key. Both are Redis' clock now: B answers 409."""
    options = RestorationOptions.model_validate({"aligned": "true"})  # what `submit` sends
    store = client.app.state.services.store
    body_hash = restorations._body_hash(PNG, options)
    assert store.claim_idempotency("anonymous:order-slow", "being-stored", body_hash) is None
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 120)
    r = submit(client, headers={"Idempotency-Key": "order-slow"})
    assert r.status_code == 409 and error_code(r) == "idempotency_in_progress", r.text
    assert client.app.state.services.queue.count == 0


@pytest.mark.usefixtures("rate_window")
def test_a_bound_key_whose_job_was_never_stored_is_counted_before_any_decode(
    make_settings, monkeypatch
) -> None:
    """A retry taking over a key whose first submission never stored its job makes a new job: it is
    counted like one (429 past the limit), before its upload is decoded."""
    checks = count_upload_checks(monkeypatch)
    monkeypatch.setattr(restorations, "IDEMPOTENCY_TAKEOVER_SECONDS", 0.0)  # the claim is old
    with TestClient(create_app(make_settings(rate_limit_per_minute=1))) as c:
        assert submit(c).status_code == 202  # the window's one submission
        options = RestorationOptions.model_validate({"aligned": "true"})  # what `submit` sends
        body_hash = restorations._body_hash(PNG, options)
        store = c.app.state.services.store
        assert store.claim_idempotency("anonymous:order-lost", "never-stored", body_hash) is None
        r = submit(c, headers={"Idempotency-Key": "order-lost"})
        assert r.status_code == 429 and error_code(r) == "rate_limited", r.text
        assert len(checks) == 1


@pytest.mark.usefixtures("rate_window")
def test_a_replay_is_neither_counted_nor_checked_again(make_settings, monkeypatch) -> None:
    """A replay (the key's own body, its job stored) answers the job without decoding the upload
    again: it was checked before the job was stored. Nor is it counted against the rate limit."""
    checks = count_upload_checks(monkeypatch)
    with TestClient(create_app(make_settings(rate_limit_per_minute=1))) as c:
        h = {"Idempotency-Key": "order-replayed"}
        first = submit(c, headers=h)
        assert first.status_code == 202, first.text
        for extra in ({}, {"Prefer": "wait=0"}):
            again = submit(c, headers={**h, **extra})
            assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true", again.text
            assert (
                again.json()["id"] == first.json()["id"]
                and again.headers["location"] == first.headers["location"]
            )
        assert again.headers["preference-applied"] == "wait=0"
        assert len(checks) == 1
        r = submit(c)  # the window's one submission was the first
        assert r.status_code == 429 and error_code(r) == "rate_limited", r.text


def test_auth_on(make_settings) -> None:
    s = make_settings(api_keys="s3cret-key")
    with TestClient(create_app(s)) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "s3cret-ke"}):
            r = submit(c, headers=headers)
            assert r.status_code == 401 and error_code(r) == "unauthorized"
        assert c.get("/v1/models").status_code == 401
        ok = submit(c, headers={"Authorization": "Bearer s3cret-key"})
        assert ok.status_code == 202
        job_id = ok.json()["id"]
        assert c.get(f"/v1/restorations/{job_id}").status_code == 401
        assert c.get(f"/v1/restorations/{job_id}", headers={"X-API-Key": "s3cret-key"}).status_code == 200
        assert c.get("/readyz").json()["auth"] == "api_key"
        assert c.get("/healthz").status_code == 200  # probes need no key


def test_jobs_are_private_to_their_key(make_settings) -> None:
    with TestClient(create_app(make_settings(api_keys="ka,kb"))) as c:
        job_id = submit(c, headers={"X-API-Key": "ka"}).json()["id"]
        assert c.get(f"/v1/restorations/{job_id}", headers={"X-API-Key": "kb"}).status_code == 404
        assert c.delete(f"/v1/restorations/{job_id}", headers={"X-API-Key": "kb"}).status_code == 404


def test_auth_off_is_reported_open(client: TestClient) -> None:
    assert submit(client).status_code == 202
    assert client.get("/readyz").json()["auth"] == "open"


def test_idempotency(client: TestClient, redis_conn, settings) -> None:
    h = {"Idempotency-Key": "order-42"}
    first = submit(client, headers=h, seed="1")
    again = submit(client, headers=h, seed="1")
    assert first.status_code == 202 and again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers.get("idempotent-replayed") == "true"
    assert redis_conn.llen(f"rq:queue:{settings.queue_name}") == 1  # never a second job
    other = submit(client, headers=h, seed="2")
    assert other.status_code == 409 and error_code(other) == "idempotency_conflict"
    other_image = submit(client, data=small_png(), headers=h, seed="1")
    assert other_image.status_code == 409
    fresh = submit(client, headers={"Idempotency-Key": "order-43"}, seed="1")
    assert fresh.json()["id"] != first.json()["id"]


@pytest.mark.parametrize("job_was_created", [True, False])
def test_idempotent_retry_after_an_unknown_outcome(
    client: TestClient, redis_conn, settings, monkeypatch: pytest.MonkeyPatch, job_was_created: bool
) -> None:
    """A Redis timeout while the job is stored leaves its outcome unknown (503): the client's retry
    with the same key gets the job if it was stored; else, once the claim is older than any submission
    takes (before that: 409 idempotency_in_progress), a new one — never two jobs."""
    store_type = type(client.app.state.services.store)
    create = store_type.create

    def create_then_time_out(self, *args: Any, **kwargs: Any) -> None:
        monkeypatch.setattr(store_type, "create", create)  # only the first submission fails
        if job_was_created:
            create(self, *args, **kwargs)
        raise redis.exceptions.TimeoutError("Timeout reading from socket")

    monkeypatch.setattr(store_type, "create", create_then_time_out)
    h = {"Idempotency-Key": "order-unknown"}
    first = submit(client, headers=h)
    assert first.status_code == 503 and error_code(first) == "redis_unavailable", first.text
    if not job_was_created:
        early = submit(client, headers=h)
        assert early.status_code == 409 and error_code(early) == "idempotency_in_progress", early.text
        # Delta-seconds, at least 1 and no longer than the claim takes to become old: after that
        # wait the retry can take the key over (or find the job).
        wait = early.headers["retry-after"]
        assert wait.isdigit() and 1 <= int(wait) <= restorations.IDEMPOTENCY_TAKEOVER_SECONDS, wait
        monkeypatch.setattr(restorations, "IDEMPOTENCY_TAKEOVER_SECONDS", 0.0)  # the claim is now old
    retry = submit(client, headers=h)
    assert retry.status_code == 202, retry.text
    assert (retry.headers.get("idempotent-replayed") == "true") == job_was_created
    assert redis_conn.llen(f"rq:queue:{settings.queue_name}") == 1
    assert submit(client, headers=h).json()["id"] == retry.json()["id"]  # and the key now holds it


def test_a_retry_while_the_first_request_still_stores_its_job_makes_no_second_job(
    client: TestClient, redis_conn, settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first request has claimed the key but is slow to store its job (a Redis failover, say): a
    retry meanwhile is told to come back (409 idempotency_in_progress) instead of taking the key over;
    the first then finishes, and the key replays its job."""
    store_type = type(client.app.state.services.store)
    create = store_type.create
    release = threading.Event()

    def slow_create(self, *args: Any, **kwargs: Any) -> None:
        assert release.wait(30)
        create(self, *args, **kwargs)

    monkeypatch.setattr(store_type, "create", slow_create)
    h = {"Idempotency-Key": "order-slow"}
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(submit, client, headers=h)
        wait_for(lambda: redis_conn.keys(f"{settings.key_prefix}:idem:*"), 10, what="the key claimed")
        retry = submit(client, headers=h)
        release.set()
        assert retry.status_code == 409 and error_code(retry) == "idempotency_in_progress", retry.text
        assert first.result(30).status_code == 202
    assert redis_conn.llen(f"rq:queue:{settings.queue_name}") == 1
    replay = submit(client, headers=h)
    assert (
        replay.json()["id"] == first.result().json()["id"] and replay.headers["idempotent-replayed"] == "true"
    )


def test_a_submission_that_fails_before_storing_its_job_frees_its_idempotency_key(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a refusal of ours (ApiError) freed the key: any other failure before the job's transaction
    was sent (a Redis read that failed, say) left it bound, and the client's retry got 409
    `idempotency_in_progress` for IDEMPOTENCY_TAKEOVER_SECONDS though no job could exist."""
    store = client.app.state.services.store

    def redis_down() -> None:
        raise redis.exceptions.ConnectionError("connection lost")

    monkeypatch.setattr(store, "workers", redis_down)  # read while the job's record is made
    h = {"Idempotency-Key": "order-early-failure"}
    first = submit(client, headers=h)
    assert first.status_code == 503 and error_code(first) == "redis_unavailable", first.text
    monkeypatch.undo()
    retry = submit(client, headers=h)
    assert retry.status_code == 202 and "idempotent-replayed" not in retry.headers, retry.text


def test_a_key_that_cannot_be_freed_does_not_change_the_answer(make_settings, monkeypatch) -> None:
    """Freeing the key after a refusal is a Redis call too: when it fails, the refusal is still what
    the client is told (here `queue_full`, not `redis_unavailable`)."""
    with TestClient(create_app(make_settings(max_queue_depth=1))) as c:
        assert submit(c).status_code == 202

        def redis_down(*args: Any) -> None:
            raise redis.exceptions.ConnectionError("connection lost")

        monkeypatch.setattr(c.app.state.services.store, "release_idempotency", redis_down)
        r = submit(c, headers={"Idempotency-Key": "order-queue-full"})
        assert r.status_code == 503 and error_code(r) == "queue_full", r.text


def metric(client: TestClient, series: str) -> float:
    """One series' value in the API's /metrics (0 while it has not been written)."""
    line = series + " "
    found = [ln for ln in client.get("/metrics").text.splitlines() if ln.startswith(line)]
    return float(found[0].removeprefix(line)) if found else 0.0


def requests_counted(client: TestClient, route: str, method: str, status: int, code: str) -> float:
    """dynface_http_requests_total of one route, method, status and error_code (0 while unwritten)."""
    wanted = {"route": route, "method": method, "status": str(status), "error_code": code}
    samples = (
        s
        for fam in text_string_to_metric_families(client.get("/metrics").text)
        if fam.name == "dynface_http_requests"
        for s in fam.samples
    )
    return next((s.value for s in samples if s.labels == wanted), 0.0)


CANCELED = 'dynface_jobs_total{outcome="canceled",reason="canceled"}'


def test_cancel_queued_job(client: TestClient, redis_conn, settings) -> None:
    before = metric(client, CANCELED)
    job = submit(client).json()
    r = client.delete(f"/v1/restorations/{job['id']}")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert r.json()["completed_at"] is not None
    assert redis_conn.llen(f"rq:queue:{settings.queue_name}") == 0
    assert not redis_conn.exists(f"{settings.key_prefix}:input:{job['id']}")
    again = client.delete(f"/v1/restorations/{job['id']}")  # a retried DELETE: the same answer
    assert again.status_code == 200 and again.json() == r.json()
    assert client.get(f"/v1/restorations/{job['id']}/image").status_code == 409
    # No worker ever sees it, so the API counts its end (once, though DELETE came twice).
    assert metric(client, CANCELED) == before + 1


def test_cancel_of_a_finished_job_is_409(client: TestClient) -> None:
    job_id = submit(client).json()["id"]
    client.app.state.services.store.finish(job_id, {"status": "failed"})
    r = client.delete(f"/v1/restorations/{job_id}")
    assert r.status_code == 409 and error_code(r) == "not_cancelable" and "failed" in r.text


def test_cancel_survives_a_failing_rq_cleanup(client: TestClient, monkeypatch) -> None:
    """The record says canceled before RQ's job is touched: a Redis or RQ failure there must not turn
    the cancel into a 5xx, lose its webhook, or make the retried DELETE a 409."""
    hooks: list[dict[str, Any]] = []

    def redis_down(*args: Any, **kwargs: Any) -> None:
        raise redis.exceptions.ConnectionError("connection lost")

    with http_server(hook_receiver(hooks)) as base:
        job_id = submit(client, webhook=f"{base}/hook").json()["id"]
        monkeypatch.setattr(lost.Job, "fetch", redis_down)
        r = client.delete(f"/v1/restorations/{job_id}")
        assert r.status_code == 200 and r.json()["status"] == "canceled", r.text
        wait_for(lambda: hooks, 10, what="webhook")
        assert hooks[0]["id"] == job_id and hooks[0]["status"] == "canceled"
        again = client.delete(f"/v1/restorations/{job_id}")
        assert again.status_code == 200 and again.json() == r.json()
        # A retried DELETE changes nothing, so it sends nothing. A delivery it started would be a
        # `webhook-<job id>` thread running by the time DELETE answered: once every such thread has
        # returned, every delivery made for this job has been received.
        for t in threading.enumerate():
            if t.name == f"webhook-{job_id}":
                t.join(10)
                assert not t.is_alive()
        assert len(hooks) == 1


def test_unknown_job_is_404(client: TestClient) -> None:
    for method, path in (
        ("GET", ""),
        ("GET", "/image"),
        ("GET", "/faces/0"),
        ("GET", "/comparison"),
        ("DELETE", ""),
    ):
        r = client.request(method, f"/v1/restorations/nope{path}")
        assert r.status_code == 404 and error_code(r) == "not_found"


def test_the_expired_message_gives_the_result_ttl_of_the_job(make_settings) -> None:
    """The TTL a job's results were kept for was fixed at its submission: a later change of the
    setting does not change what the 410 says."""
    with TestClient(create_app(make_settings(result_ttl_seconds=120))) as c:
        job_id = submit(c).json()["id"]
        c.app.state.services.store.finish(job_id, {"status": "succeeded", "outputs": {"image": "image/png"}})
    with TestClient(create_app(make_settings(result_ttl_seconds=600))) as c:
        r = c.get(f"/v1/restorations/{job_id}/image")
    assert r.status_code == 410 and error_code(r) == "expired"
    assert "kept for 120 s" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize(
    ("prefer", "wait"),
    [
        ([], None),
        (["respond-async"], None),
        (["wait"], 30),
        (["wait=7"], 7),
        (['wait="7"'], 7),  # RFC 7240 allows a quoted-string value
        (["WAIT = 7"], 7),
        (["wait=" + "9" * 5000], 30),  # beyond int()'s 4300-digit limit: clamped, never parsed
        (["wait=" + "0" * 5000 + "7"], 7),
        (["respond-async", "wait=7"], 7),  # preferences spread over several header lines
        (["wait=7", "wait=9"], 7),  # the first one counts
        (['wait="7'], None),  # unbalanced quote: not a wait preference
        # RFC 7240: only top-level, comma-separated preferences; after `;` come a preference's parameters
        (["foo; wait=2"], None),
        (["respond-async;wait=2"], None),
        (["wait=3; foo=bar"], 3),
        (["handling=lenient; wait=1, wait=4"], 4),
        (['x="y wait=2"'], None),  # inside a quoted-string
        (['x="a, wait=2"'], None),  # a comma inside a quoted-string splits nothing
        (['x="a\\", b", wait=6'], 6),  # an escaped quote does not end the string
    ],
)
def test_prefer_wait_parsing(prefer: list[str], wait: int | None) -> None:
    assert restorations._wait_seconds(prefer, 30) == wait


@pytest.mark.timeout(60)  # quadratic backtracking: 16k spaces took 2-3 s, so this would take minutes
def test_prefer_parsing_of_an_adversarial_header_ends() -> None:
    """Space runs around `wait`, inside and outside quotes, parse in linear time (the event loop
    parses them: a backtracking pattern would stall every request the process serves)."""
    spaces = " " * 160_000
    for header in (
        f"wait{spaces}x",
        f"{spaces}wait{spaces}={spaces}",
        f'x="{spaces}, wait=2',
        f"wait=1{spaces}x",
    ):
        assert restorations._wait_seconds([header], 30) is None


def test_prefer_wait_huge_or_on_several_lines_is_applied(make_settings) -> None:
    with TestClient(create_app(make_settings(max_wait_seconds=1))) as c:
        for headers, applied in (
            ({"Prefer": "wait=" + "9" * 5000}, "wait=1"),  # was a 500 (int() digit limit)
            ([("Prefer", "respond-async"), ("Prefer", 'wait="0"')], "wait=0"),
        ):
            r = submit(c, headers=headers)
            assert r.status_code == 202 and r.headers["preference-applied"] == applied, r.text


def test_queue_position_is_read_off_the_event_loop(client: TestClient, monkeypatch) -> None:
    """get_job_position is a blocking Redis call: it must run in a worker thread, never on the loop."""
    queue = client.app.state.services.queue
    real = queue.get_job_position
    on_loop: list[bool] = []

    def spy(job_id: str) -> int | None:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # no running loop: a worker thread
            on_loop.append(False)
        return real(job_id)

    monkeypatch.setattr(queue, "get_job_position", spy)
    for headers in ({}, {"Prefer": "wait=0"}):
        r = submit(client, headers=headers)
        assert r.status_code == 202 and r.json()["queue_position"] is not None
    assert on_loop == [False, False]


def test_empty_form_fields_mean_the_defaults(client: TestClient) -> None:
    """An HTML form sends "" for a field left blank: every option then takes its default."""
    fields = {name: "" for name in RestorationOptions.model_fields}
    r = client.post("/v1/restorations", files={"image": ("x.png", PNG, "image/png")}, data=fields)
    assert r.status_code == 202, r.text
    assert r.json()["options"] == RestorationOptions().model_dump(mode="json")


def test_result_url_points_to_an_output_the_job_has(client: TestClient) -> None:
    for outputs, path in (
        ("image,faces", "/image"),
        ("faces,comparison", "/comparison"),
        ("crops", "/crops/0"),
    ):
        job = submit(client, outputs=outputs).json()
        assert job["urls"]["result"] == job["urls"]["self"] + path, outputs
    record = {
        "id": "j",
        "status": "succeeded",
        "base_url": "http://h",
        "created_at": 0.0,
        "options": RestorationOptions(outputs=["faces"]).model_dump(mode="json"),
    }
    produced = restoration_view({**record, "outputs": {"faces": ["image/png"]}})
    assert produced.urls.result == "http://h/v1/restorations/j/faces/0"
    assert restoration_view({**record, "outputs": {"faces": []}}).urls.result is None  # no face found


def test_openapi_texts_do_not_hard_code_settings(make_settings) -> None:
    """The wait cap and the idempotency window are settings: the docs name them, not their defaults."""
    with TestClient(create_app(make_settings(max_wait_seconds=5, record_ttl_seconds=3600))) as c:
        post = c.get("/openapi.json").json()["paths"]["/v1/restorations"]["post"]
    texts = [post["description"], *(p["description"] for p in post["parameters"])]
    for text in texts:
        assert not re.search(r"24 h|≤ 60|at most 60", text), text
    assert "DYNFACE_MAX_WAIT_SECONDS" in texts[0] and "DYNFACE_RECORD_TTL_SECONDS" in texts[0]


def test_prefer_wait_times_out_with_202(client: TestClient) -> None:
    r = submit(client, headers={"Prefer": "wait=1"})
    assert r.status_code == 202 and r.json()["status"] == "queued"
    assert r.headers["preference-applied"] == "wait=1"


def test_prefer_wait_counts_from_when_the_request_was_received(client: TestClient, monkeypatch) -> None:
    """RFC 7240 §4.3: `wait` bounds the time the request takes once received. The wait began only
    after the upload had been checked and stored: a slow check (a large photo) came on top of it."""
    real = restorations.check_image

    def slow(data: bytes, *, max_pixels: int) -> CheckedImage:
        time.sleep(1.5)
        return real(data, max_pixels=max_pixels)

    monkeypatch.setattr(restorations, "check_image", slow)
    start = time.monotonic()
    r = submit(client, headers={"Prefer": "wait=2"})
    took = time.monotonic() - start
    assert r.status_code == 202 and r.headers["preference-applied"] == "wait=2", r.text
    assert 1.5 <= took < 3.4, took  # was 1.5 s of checking + the whole 2 s wait: 3.5 s and more


def _frames_holding(size: int) -> list[str]:
    """The functions whose running coroutine frames (each task's await chain) hold a bytes object of
    ``size``: call on the event loop."""
    holding = []
    for task in asyncio.all_tasks():
        coro: Any = task.get_coro()
        while coro is not None:
            frame = getattr(coro, "cr_frame", None)
            if frame is not None and any(
                isinstance(v, bytes) and len(v) == size for v in frame.f_locals.values()
            ):
                holding.append(frame.f_code.co_name)
            coro = getattr(coro, "cr_await", None)
    return holding


def test_the_upload_is_not_held_while_its_job_is_waited_on(client: TestClient, monkeypatch) -> None:
    """A `Prefer: wait` request held its upload (up to DYNFACE_MAX_UPLOAD_BYTES) for the whole wait,
    after the job had stored it: memory that many waiting clients multiply."""
    checking, release = threading.Event(), threading.Event()
    real = restorations.check_image

    def held(data: bytes, *, max_pixels: int) -> CheckedImage:
        checking.set()
        assert release.wait(30)
        return real(data, max_pixels=max_pixels)

    async def holders() -> list[str]:
        return _frames_holding(len(PNG))

    monkeypatch.setattr(restorations, "check_image", held)
    queue = client.app.state.services.queue
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(submit, client, headers={"Prefer": "wait=30"})
        assert checking.wait(30)
        assert client.portal.call(holders)  # while it is checked, the request holds it: the probe sees it
        release.set()
        wait_for(lambda: queue.count == 1, 10, what="the job stored")
        wait_for(lambda: not client.portal.call(holders), 5, what="the upload let go during the wait")
        assert client.delete(f"/v1/restorations/{queue.job_ids[0]}").status_code == 200  # ends the wait
        r = answer.result(30)
    assert r.status_code == 200 and r.json()["status"] == "canceled", r.text


@pytest.mark.parametrize(
    ("accept", "image"),
    [
        (None, False),  # no header: the job JSON, as always
        ("*/*", False),  # a tie is JSON's
        ("image/*", True),
        ("image/png", True),
        ("IMAGE/PNG;q=0.5", True),
        ("image/jpeg", False),  # another image type is not this one
        ("application/json, image/*", False),
        ("application/json;q=0.5, image/png", True),
        ("image/*;q=0.8, */*;q=0.9", False),  # JSON only through */*, but rated higher
        ("image/png;q=0, image/*", False),  # the most specific range decides: refused
        ("image/*, text/html", True),
        ("image/png;q=oops", False),  # an unreadable q counts as 0
    ],
)
def test_accept_decides_image_or_json(accept: str | None, image: bool) -> None:
    assert restorations.prefers_over_json(accept, "image/png") is image


def test_readyz_without_workers(client: TestClient) -> None:
    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["ready"] is False and "no worker is running" in r.json()["reasons"]
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/v1/models").json() == {"models": [], "warnings": []}


def test_redis_down_is_503_without_stack_trace(make_settings) -> None:
    s = make_settings(redis_url="redis://127.0.0.1:1/0", redis_timeout_seconds=0.5)
    with TestClient(create_app(s), raise_server_exceptions=False) as c:
        r = submit(c)
        assert r.status_code == 503 and error_code(r) == "redis_unavailable"
        assert "Traceback" not in r.text
        assert c.get("/v1/restorations/abc").status_code == 503
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "redis unreachable" in ready.json()["reasons"][0]
        assert c.get("/healthz").status_code == 200
        text = c.get("/metrics").text
        assert "dynface_redis_up 0.0" in text
        # No figure is better than a made-up one: the Redis gauges have no sample while it is down.
        assert not [
            ln for ln in text.splitlines() if ln.startswith(("dynface_redis_memory", "dynface_queue"))
        ]


def test_openapi_documents_both_bodies(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/v1/restorations"]["post"]
    content = post["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(content)
    assert "fidelity" in content["multipart/form-data"]["schema"]["properties"]
    assert {"202", "413", "415", "422", "429", "503"} <= set(post["responses"])
    for path in (
        "/v1/restorations/{job_id}",
        "/v1/restorations/{job_id}/image",
        "/healthz",
        "/readyz",
        "/v1/models",
        "/metrics",
    ):
        assert path in spec["paths"]


def test_api_metrics_types(client: TestClient) -> None:
    submit(client)
    submit(client, data=b"junk")
    text = client.get("/metrics").text
    types = {line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE")}
    expected = {
        "dynface_http_requests_total": "counter",
        "dynface_http_request_duration_seconds": "histogram",
        "dynface_upload_bytes": "histogram",
        "dynface_jobs_submitted_total": "counter",
        "dynface_jobs_rejected_total": "counter",
        "dynface_queue_depth": "gauge",
        "dynface_queue_oldest_age_seconds": "gauge",
        "dynface_workers": "gauge",
        "dynface_redis_memory_used_bytes": "gauge",
        "dynface_redis_memory_max_bytes": "gauge",
    }
    for name, kind in expected.items():
        assert types.get(name) == kind, (name, types.get(name))
    assert 'dynface_jobs_rejected_total{reason="invalid_image"}' in text
    assert 'route="/v1/restorations",status="202"' in text
    assert "_created" not in text  # created-timestamp series are disabled (they double the series)
    assert "id=" not in text  # no job ids in labels


def test_app_never_imports_torch() -> None:
    code = "import sys, app.main, app.jobs, app.webhooks; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_prometheus_multiprocess_mode(tmp_path, settings) -> None:
    """Two API processes writing metrics into one PROMETHEUS_MULTIPROC_DIR are aggregated."""
    from app.metrics import WORKER_STATES
    from tests.conftest import settings_env

    env = {**settings_env(settings), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    code = (
        "from fastapi.testclient import TestClient; from app.main import create_app; "
        "c = TestClient(create_app()); c.get('/healthz'); print(c.get('/metrics').text)"
    )
    out = ""
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True, text=True
        ).stdout
    # Each process wrote its own files (named by its pid) into the shared folder.
    assert len(list(tmp_path.glob("counter_*.db"))) == 2, sorted(p.name for p in tmp_path.iterdir())
    # The second process's scrape, parsed as Prometheus would (a malformed exposition raises).
    families = {f.name: f for f in text_string_to_metric_families(out)}
    requests = families["dynface_http_requests"]
    assert requests.type == "counter"
    counted = {
        (s.labels["route"], s.labels["method"], s.labels["status"], s.labels["error_code"]): s.value
        for s in requests.samples
    }
    # /healthz: one request in each process. /metrics: the first process's scrape; the second's own
    # is counted only once it has answered.
    assert counted == {("/healthz", "GET", "200", ""): 2.0, ("/metrics", "GET", "200", ""): 1.0}
    durations = families["dynface_http_request_duration_seconds"]
    assert durations.type == "histogram"
    counts = {s.labels["route"]: s.value for s in durations.samples if s.name.endswith("_count")}
    assert counts == {"/healthz": 2.0, "/metrics": 1.0}
    assert [s.value for s in families["dynface_jobs_submitted"].samples] == [0.0]
    # The Redis-backed gauges, read at scrape time.
    depth = families["dynface_queue_depth"]
    assert depth.type == "gauge"
    assert [(s.labels, s.value) for s in depth.samples] == [({"queue": settings.queue_name}, 0.0)]
    workers = {s.labels["state"]: s.value for s in families["dynface_workers"].samples}
    assert workers == dict.fromkeys(WORKER_STATES, 0.0)
    assert [s.value for s in families["dynface_redis_up"].samples] == [1.0]


@pytest.mark.timeout(60)  # an unclamped wait=600 would hang here, not pass slowly
def test_prefer_wait_above_the_cap_is_clamped(make_settings) -> None:
    """Decision: `wait=N` above DYNFACE_MAX_WAIT_SECONDS is clamped (RFC 7240 lets a server honour a
    preference in part), and Preference-Applied says which wait was used."""
    with TestClient(create_app(make_settings(max_wait_seconds=1))) as c:
        for prefer, applied in (
            ("wait=600", "wait=1"),
            ("wait", "wait=1"),
            ("respond-async, wait=0", "wait=0"),
        ):
            r = submit(c, headers={"Prefer": prefer})
            # no worker: the job is still queued when the (clamped) wait ends
            assert r.status_code == 202 and r.json()["status"] == "queued", r.text
            assert r.headers["preference-applied"] == applied
        assert "preference-applied" not in submit(c).headers


def test_concurrent_requests_with_one_idempotency_key_make_one_job(
    client: TestClient, redis_conn, settings
) -> None:
    h = {"Idempotency-Key": "burst-1"}
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: submit(client, headers=h), range(4)))
    assert [r.status_code for r in responses] == [202] * 4, [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 3
    assert redis_conn.llen(f"rq:queue:{settings.queue_name}") == 1


def test_api_key_is_not_accepted_by_prefix_or_case(make_settings) -> None:
    with TestClient(create_app(make_settings(api_keys="Key-One,key-two-longer"))) as c:
        for bad in ("Key-On", "key-one", "Key-One ", "key-two-longer-x", "Key-One,key-two-longer"):
            r = c.get("/v1/models", headers={"X-API-Key": bad})
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", bad
        for good in ({"X-API-Key": "Key-One"}, {"Authorization": "bearer key-two-longer"}):
            assert c.get("/v1/models", headers=good).status_code == 200


def _doc_default_matches(doc: str, default: object) -> bool:
    if isinstance(default, bool):
        return doc == str(default).lower()
    if isinstance(default, int | float):
        return float(doc) == default
    if isinstance(default, list):
        return [float(v) for v in doc.split(",")] == [float(v) for v in default]
    return doc == default


def _documented_variables() -> tuple[dict[str, str], set[str]]:
    """docs/configuration.md's variables → documented default: dynface's settings, and the names
    in its deployment section (read by compose and the worker image, not by dynface)."""
    settings: dict[str, str] = {}
    deployment: set[str] = set()
    section = ""
    for line in (ROOT / "docs" / "configuration.md").read_text().splitlines():
        if line.startswith("## "):
            section = line
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| `") or len(cells) < 3:
            continue
        for name in re.findall(r"`(DYNFACE_[A-Z0-9_]+)`", cells[0]):
            if section.startswith("## Deployment"):
                deployment.add(name)
            else:
                settings[name] = cells[1]
    return settings, deployment


def test_every_deployment_variable_is_documented() -> None:
    """Every DYNFACE_* name compose, the env example or the worker entrypoint reads that is not a
    setting has a row in the deployment section (docker/env.example points there for all)."""
    settings, deployment = _documented_variables()
    used = set()
    for path in (
        ROOT / "docker-compose.yml",
        ROOT / "docker" / "env.example",
        ROOT / "docker" / "worker-entrypoint.sh",
    ):
        used |= set(re.findall(r"\b(DYNFACE_[A-Z0-9_]+)", path.read_text()))
    assert used - set(settings) == deployment


def test_every_setting_is_documented_with_its_default() -> None:
    """docs/configuration.md and app.settings.Settings list the same variables with the same defaults."""
    documented, _ = _documented_variables()
    fields = {f"DYNFACE_{name.upper()}": info for name, info in Settings.model_fields.items()}
    assert set(documented) == set(fields), (set(fields) - set(documented), set(documented) - set(fields))
    for env, info in fields.items():
        default = info.get_default(call_default_factory=True)
        literal = re.fullmatch(r"`([^`]*)`.*", documented[env])
        if default is None or default == []:
            assert literal is None, f"{env}: documented default {documented[env]!r}, actual {default!r}"
        else:
            assert literal and _doc_default_matches(literal.group(1), default), (
                env,
                documented[env],
                default,
            )
    assert "REDIS_URL" in (ROOT / "docs" / "configuration.md").read_text()  # the un-prefixed alias


def test_openapi_documents_every_route_and_the_error_envelope(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    routes = [r for m in (restorations, models, health) for r in m.router.routes if isinstance(r, APIRoute)]
    assert len(routes) == 11
    assert set(spec["paths"]) == {r.path for r in routes}
    for route in routes:
        for method in route.methods - {"HEAD"}:
            assert method.lower() in spec["paths"].get(route.path, {}), (method, route.path)
    schemas = spec["components"]["schemas"]
    assert schemas["ErrorResponse"]["properties"]["error"]["$ref"].endswith("/ErrorInfo")
    assert set(schemas["ErrorInfo"]["required"]) == {"code", "message"}
    assert "HTTPValidationError" not in schemas  # FastAPI's own 422 shape is never what we answer
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for status, resp in op["responses"].items():
                if int(status) < 400 or path == "/readyz":  # /readyz 503 is the readiness report
                    continue
                ref = resp["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorResponse"), (method, path, status)
    post = spec["paths"]["/v1/restorations"]["post"]
    assert {p["name"] for p in post["parameters"]} == {"Prefer", "Idempotency-Key"}
    assert "Retry-After" in post["responses"]["429"]["headers"]
    assert "Retry-After" in post["responses"]["503"]["headers"]
    assert "Location" in post["responses"]["202"]["headers"]
    body = post["requestBody"]["content"]
    assert body["multipart/form-data"]["schema"]["required"] == ["image"]
    json_props = body["application/json"]["schema"]["properties"]
    assert {
        "image",
        "fidelity",
        "mode",
        "aligned",
        "upscale",
        "only_center_face",
        "detector",
        "outputs",
    } <= set(json_props)
    assert {"format", "seed", "on_no_face", "webhook"} <= set(json_props)
    job = schemas["Restoration"]["properties"]
    for field in (
        "id",
        "status",
        "stage",
        "progress",
        "queue_position",
        "created_at",
        "started_at",
        "completed_at",
        "timings",
        "faces",
        "warnings",
        "error",
        "outputs",
        "urls",
    ):
        assert field in job, field
    assert set(schemas["StageTimings"]["properties"]) == {
        "decode",
        "detect",
        "dblm",
        "sample",
        "paste",
        "encode",
    }
    assert {"box", "score", "start_step", "eta"} <= set(schemas["Face"]["properties"])
    face_bytes = spec["paths"]["/v1/restorations/{job_id}/faces/{k}"]["get"]["responses"]["200"]["content"]
    assert {"image/png", "image/jpeg", "image/webp"} <= set(face_bytes)


def test_record_ttl_must_outlive_every_attempt_of_a_job() -> None:
    short = {"result_ttl_seconds": 60, "job_timeout_seconds": 100, "max_retries": 2}
    with pytest.raises(ValueError, match=r"must exceed \(max_retries \+ 1\) x job_timeout_seconds = 300"):
        Settings(record_ttl_seconds=300, **short)
    assert Settings(record_ttl_seconds=301, **short).record_ttl_seconds == 301


def test_an_upload_must_fit_a_keys_share_of_stored_bytes() -> None:
    """A share below the upload limit would answer uploads in between "429, retry later" forever."""
    with pytest.raises(
        ValueError, match=r"MAX_STORED_BYTES_PER_KEY \(999\) must be 0 \(no limit\) or at least"
    ):
        Settings(max_stored_bytes_per_key=999, max_upload_bytes=1000, api_keys="k")
    open_api = Settings(max_stored_bytes_per_key=999, max_upload_bytes=1000)  # no per-key share to fit
    assert open_api.max_stored_bytes_per_key == 999
    assert Settings(max_stored_bytes_per_key=0, max_upload_bytes=1000).max_stored_bytes_per_key == 0
    assert Settings(max_stored_bytes_per_key=1000, max_upload_bytes=1000).max_stored_bytes_per_key == 1000


def test_results_must_not_outlive_their_record() -> None:
    """Results kept longer than their job's record could never be fetched (404 instead of 410)."""
    with pytest.raises(ValueError, match=r"DYNFACE_RESULT_TTL_SECONDS \(3601\) must not exceed "):
        Settings(result_ttl_seconds=3601, record_ttl_seconds=3600)
    assert Settings(result_ttl_seconds=3600, record_ttl_seconds=3600).result_ttl_seconds == 3600


def test_heartbeats_must_come_before_their_ttl_runs_out() -> None:
    """A heartbeat interval of the TTL or more lets a live worker's entry expire: its job would be
    re-queued and run twice."""
    for interval in (45, 45.5, 60):
        with pytest.raises(ValueError, match=r"DYNFACE_HEARTBEAT_INTERVAL_SECONDS \(\S+\) must be below "):
            Settings(heartbeat_interval_seconds=interval, heartbeat_ttl_seconds=45)
    assert Settings(heartbeat_interval_seconds=44.9, heartbeat_ttl_seconds=45).heartbeat_ttl_seconds == 45


def test_starting_a_job_renews_its_record_and_input_ttl(client: TestClient, settings: Settings) -> None:
    """A job that waited in the queue must not expire while it runs: start() (called by the worker
    when it takes a job) restarts both TTLs."""
    store = client.app.state.services.store
    store.create("renew-me", b"bytes", {"status": "queued", "created_at": time.time()})
    for key in (store.key("job", "renew-me"), store.key("input", "renew-me")):
        store.redis.expire(key, 5)
    assert store.start("renew-me", {"status": "processing"})
    assert store.get("renew-me")["status"] == "processing"
    for key in (store.key("job", "renew-me"), store.key("input", "renew-me")):
        assert store.redis.ttl(key) > settings.record_ttl_seconds - 5, key


def test_a_job_end_wakes_its_waiting_requests_through_redis(client: TestClient) -> None:
    """JobStore.finish publishes the job's end; the API's one subscription sets the events of the
    requests waiting for it (Prefer: wait answers at once instead of at its next poll)."""
    svc = client.app.state.services
    wait_for(svc.completions.subscribed.is_set, 10, what="completion listener subscribed")
    svc.store.create("wake-me", b"x", {"status": "queued", "created_at": time.time()})

    async def ended_by_message() -> bool:
        with svc.completions.watch("wake-me") as ended, svc.completions.watch("other-job") as unrelated:
            await anyio.to_thread.run_sync(lambda: svc.store.finish("wake-me", {"status": "canceled"}))
            await asyncio.wait_for(ended.wait(), 10)
            return not unrelated.is_set()

    assert client.portal.call(ended_by_message)


def image_bytes(size: tuple[int, int], fmt: str = "PNG", orientation: int | None = None) -> bytes:
    """A plain image, optionally with an EXIF Orientation tag."""
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.new("RGB", size, (120, 80, 60)).save(buf, fmt, exif=exif)
    return buf.getvalue()


def test_a_result_over_max_output_pixels_is_refused_at_submission(make_settings) -> None:
    """`upscale` multiplies the result's pixels by its square: checked at submission, not by a job
    that fails (or exhausts the worker) after the restoration."""
    with TestClient(create_app(make_settings(max_output_pixels=300_000))) as c:
        photo = image_bytes((400, 400))  # 160 000 px: 640 000 at upscale 2
        assert submit(c, data=photo, aligned="false").status_code == 202
        r = submit(c, data=photo, aligned="false", upscale="2")
        assert r.status_code == 413 and error_code(r) == "output_too_large", r.text
        assert "image would have 800×800" in r.text and "300000" in r.text
        # The comparison is a result too: the photo beside itself, 800 x 400.
        r = submit(c, data=photo, aligned="false", outputs="image,comparison")
        assert r.status_code == 413 and "comparison would have 800×400" in r.text, r.text
        # An aligned face is restored at 512 x 512 whatever its own size.
        assert submit(c, data=image_bytes((1024, 1024))).status_code == 202
        r = submit(c, data=image_bytes((64, 64)), upscale="2")
        assert r.status_code == 413 and error_code(r) == "output_too_large", r.text


def test_an_upload_is_opened_once_at_submission(client: TestClient, monkeypatch) -> None:
    """`check_image` tells the API the upload's format and upright size: opening it again to read
    them decoded a PNG a second time (reading its EXIF loads its pixels)."""
    opened: list[object] = []
    real = Image.open

    def counted(*args: Any, **kwargs: Any) -> Image.Image:
        opened.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counted)
    assert submit(client, outputs="image,comparison").status_code == 202
    assert len(opened) == 1


@pytest.mark.parametrize(
    ("size", "fields"),
    [
        # Sized as a square face by the API, as the input's aspect beside it by the pipeline, the
        # comparison fitted a WebP for one and not the other; the worker refuses the input anyway.
        ((4000, 250), {"format": "webp", "upscale": "4", "outputs": "comparison"}),
        ((250, 4000), {"format": "png", "outputs": "image"}),
    ],
)
def test_an_aligned_input_that_is_not_square_is_refused_at_submission(
    client: TestClient, size: tuple[int, int], fields: dict[str, str]
) -> None:
    """An aligned input is the face itself, which is square: the worker would fail any other."""
    r = submit(client, data=image_bytes(size), **fields)
    assert r.status_code == 400 and error_code(r) == "invalid_image", r.text
    assert f"square face crop, got {size[0]}×{size[1]}" in r.text


@pytest.mark.parametrize(
    ("size", "source", "orientation", "fields", "refused"),
    [
        ((4100, 8), "PNG", None, {"format": "webp", "upscale": "4"}, True),  # 16 400 px wide
        ((4100, 8), "PNG", None, {"format": "png", "upscale": "4"}, False),
        ((4100, 8), "WEBP", None, {"upscale": "4"}, True),  # format "same": WebP
        ((4100, 8), "PNG", None, {"format": "webp", "upscale": "3"}, False),
        ((2100, 8), "PNG", None, {"format": "webp", "upscale": "4", "outputs": "image,comparison"}, True),
        ((2100, 8), "PNG", None, {"format": "webp", "upscale": "4"}, False),
        # Stored 8 x 2100, turned upright by EXIF Orientation 6: its comparison is 16 800 px wide.
        ((8, 2100), "JPEG", 6, {"format": "webp", "upscale": "4", "outputs": "comparison"}, True),
        ((8, 2100), "JPEG", 1, {"format": "webp", "upscale": "4", "outputs": "comparison"}, False),
    ],
)
def test_an_output_its_format_cannot_hold_is_refused_at_submission(
    client: TestClient,
    size: tuple[int, int],
    source: str,
    orientation: int | None,
    fields: dict[str, str],
    refused: bool,
) -> None:
    r = submit(client, data=image_bytes(size, source, orientation), aligned="false", **fields)
    if refused:
        assert r.status_code == 413 and error_code(r) == "output_too_large", r.text
        assert "WEBP allows at most 16383 pixels a side" in r.text
    else:
        assert r.status_code == 202, r.text


def test_too_large_message_names_the_configured_limit(make_settings) -> None:
    """The body's cut-off has room for framing and base64; the message names the image limit."""
    with TestClient(create_app(make_settings(max_upload_bytes=100_000))) as c:
        url = "data:image/png;base64," + base64.b64encode(PNG + b"\0" * 200_000).decode()
        for r in (submit(c, data=PNG + b"\0" * 200_000), c.post("/v1/restorations", json={"image": url})):
            assert r.status_code == 413 and error_code(r) == "too_large"
            assert r.json()["error"]["message"] == "The image exceeds 100000 bytes."


def test_image_checks_beyond_the_limit_wait_their_turn(make_settings, monkeypatch) -> None:
    """DYNFACE_MAX_CONCURRENT_IMAGE_CHECKS=1: while one upload is being checked, the next waits for
    the limiter (not for a thread), and runs once the first is done."""
    lock, release = threading.Lock(), threading.Event()
    seen = {"running": 0, "most": 0, "entered": 0}
    real = restorations.check_image

    def held(data: bytes, *, max_pixels: int) -> CheckedImage:
        with lock:
            seen["running"] += 1
            seen["entered"] += 1
            seen["most"] = max(seen["most"], seen["running"])
        try:
            assert release.wait(30)
            return real(data, max_pixels=max_pixels)
        finally:
            with lock:
                seen["running"] -= 1

    monkeypatch.setattr(restorations, "check_image", held)
    app = create_app(make_settings(max_concurrent_image_checks=1))
    with TestClient(app) as c, ThreadPoolExecutor(2) as pool:
        limiter = c.app.state.services.image_checks
        futures = [pool.submit(submit, c) for _ in range(2)]
        wait_for(
            lambda: seen["entered"] == 1 and c.portal.call(limiter.statistics).tasks_waiting == 1,
            20,
            what="one check running, one waiting for the limiter",
        )
        release.set()
        assert [f.result(30).status_code for f in futures] == [202, 202]
    assert seen["entered"] == 2 and seen["most"] == 1


def test_readyz_keeps_worker_details_from_callers_without_a_key(make_settings) -> None:
    """With API keys on, /readyz tells anyone whether the service is ready, but worker names, weight
    paths and pull commands only to a caller with a valid key; an open API shows them to all."""
    secret_path = "/srv/secret-weights/unet.pth"
    worker = {
        "name": "gpu-host-7",
        "state": "missing_weights",
        "missing_weights": [{"name": "unet", "path": secret_path, "command": "dynface weights pull"}],
        "weights_command": "dynface weights pull --only unet",
    }
    for keys, with_key, detailed in (
        ("k1", {}, False),
        ("k1", {"X-API-Key": "wrong"}, False),
        ("k1", {"X-API-Key": "k1"}, True),
        ("", {}, True),
    ):
        s = make_settings(api_keys=keys, heartbeat_ttl_seconds=60)
        with TestClient(create_app(s)) as c:
            c.app.state.services.store.register_worker(worker["name"], worker)
            r = c.get("/readyz", headers=with_key)
        body = r.json()
        assert r.status_code == 503 and body["ready"] is False and body["queue_depth"] == 0, body
        assert "no worker has its model loaded" in body["reasons"]
        assert (secret_path in r.text) is detailed and ("gpu-host-7" in r.text) is detailed, (keys, with_key)
        assert len(body["workers"]) == (1 if detailed else 0)
        if not detailed:
            assert body["reasons"][1:] == ["1 worker(s) lack weight files (details with an API key)"]


def test_http_methods_the_api_does_not_serve_share_one_metric_label(client: TestClient) -> None:
    """Any method name reaches the app with h11: used verbatim as a label, each would be a new series."""
    for method in ("PROPFIND", "X-MADE-UP-1", "X-MADE-UP-2"):
        assert client.request(method, "/healthz").status_code == 405
    text = client.get("/metrics").text
    assert 'method="other"' in text
    assert "PROPFIND" not in text and "X-MADE-UP" not in text


def test_a_submission_answered_redis_unavailable_counts_as_rejected(make_settings) -> None:
    series = 'dynface_jobs_rejected_total{reason="redis_unavailable"}'
    s = make_settings(redis_url="redis://127.0.0.1:1/0", redis_timeout_seconds=0.5)
    with TestClient(create_app(s), raise_server_exceptions=False) as c:
        before = metric(c, series), requests_counted(c, "/v1/restorations", "POST", 503, "redis_unavailable")
        assert error_code(submit(c)) == "redis_unavailable"
        assert metric(c, series) == before[0] + 1
        assert requests_counted(c, "/v1/restorations", "POST", 503, "redis_unavailable") == before[1] + 1


@pytest.mark.parametrize(
    ("method", "path", "sent", "route", "status", "code"),
    [
        ("GET", "/healthz", {}, "/healthz", 200, ""),
        (
            "POST",
            "/v1/restorations",
            {"files": {"image": ("x.png", PNG)}, "data": {"aligned": "true"}},
            "/v1/restorations",
            202,
            "",
        ),
        (
            "POST",
            "/v1/restorations",
            {"files": {"image": ("x.png", b"junk")}},
            "/v1/restorations",
            400,
            "invalid_image",
        ),
        (
            "POST",
            "/v1/restorations",
            {"content": b"x", "headers": {"Content-Type": "text/plain"}},
            "/v1/restorations",
            415,
            "unsupported_format",
        ),
        ("GET", "/v1/restorations/nope", {}, "/v1/restorations/{job_id}", 404, "not_found"),
        # Answered by FastAPI/Starlette themselves, under the codes app.errors maps them onto.
        ("GET", "/no/such/path", {}, "unmatched", 404, "not_found"),
        ("DELETE", "/healthz", {}, "/healthz", 405, "method_not_allowed"),
        (
            "GET",
            "/v1/restorations/nope/faces/x",
            {},
            "/v1/restorations/{job_id}/faces/{k}",
            404,
            "not_found",
        ),
    ],
)
def test_requests_are_counted_with_the_error_code_they_answer(
    client: TestClient, method: str, path: str, sent: dict[str, Any], route: str, status: int, code: str
) -> None:
    before = requests_counted(client, route, method, status, code)
    r = client.request(method, path, **sent)
    assert r.status_code == status, r.text
    assert (error_code(r) if status >= 400 else "") == code
    assert requests_counted(client, route, method, status, code) == before + 1


def test_an_unexpected_exception_is_counted_as_internal(settings: Settings) -> None:
    """ServerErrorMiddleware answers it outside the counting middleware, which never sees the answer."""
    app = create_app(settings)

    def boom() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/boom", boom)
    with TestClient(app, raise_server_exceptions=False) as c:
        before = requests_counted(c, "/boom", "GET", 500, "internal")
        r = c.get("/boom")
        assert r.status_code == 500 and error_code(r) == "internal"
        assert requests_counted(c, "/boom", "GET", 500, "internal") == before + 1


_BOUNDARY = "dynface-test-boundary"
#: The start of a multipart upload of PNG: its part's headers and the image's first KiB.
_UPLOAD_START = (
    f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
    "Content-Type: image/png\r\n\r\n"
).encode() + PNG[:1024]


def _upload_scope() -> Scope:
    """The ASGI scope uvicorn gives a multipart POST /v1/restorations."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/restorations",
        "raw_path": b"/v1/restorations",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", f"multipart/form-data; boundary={_BOUNDARY}".encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }


def test_a_client_that_leaves_mid_upload_is_counted_499_not_as_a_bug(settings: Settings, caplog) -> None:
    """The client closes the connection while its upload arrives: uvicorn's receive() then says
    `http.disconnect`, and Starlette raises ClientDisconnect in the body read. The catch-all handler
    took it for a bug: "unhandled error" with a traceback, counted as a 500 `internal` (the error-ratio
    alert's numerator), and re-raised to the server."""
    app = create_app(settings)
    messages: list[Message] = [
        {"type": "http.request", "body": _UPLOAD_START, "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return messages.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    with TestClient(app) as c:
        before = requests_counted(c, "/v1/restorations", "POST", 499, "client_closed")
        internal = requests_counted(c, "/v1/restorations", "POST", 500, "internal")
        with caplog.at_level(logging.INFO):
            c.portal.call(app, _upload_scope(), receive, send)
        assert messages == []  # the body was read up to the disconnect
        assert requests_counted(c, "/v1/restorations", "POST", 499, "client_closed") == before + 1
        assert requests_counted(c, "/v1/restorations", "POST", 500, "internal") == internal
    assert sent[0]["status"] == 499  # what the counter saw; uvicorn drops it (the client is gone)
    logged = [(r.levelno, r.exc_info) for r in caplog.records if r.name == "app.errors"]
    assert logged == [(logging.INFO, None)]  # no "unhandled error", no traceback


def test_a_request_the_server_abandons_is_not_counted_as_a_bug(settings: Settings) -> None:
    """At shutdown, past its graceful timeout, uvicorn cancels the requests still running: an
    asyncio.CancelledError (not an Exception) through the counting middleware, which counted the
    request as a 500 `internal` though nothing was answered and nothing went wrong."""
    app = create_app(settings)

    async def abandon() -> None:
        reading = asyncio.Event()

        async def receive() -> Message:
            reading.set()
            await asyncio.Event().wait()  # the rest of the body never comes
            raise AssertionError("unreachable")

        async def send(message: Message) -> None:
            raise AssertionError(f"answered {message}")

        request = asyncio.ensure_future(app(_upload_scope(), receive, send))
        await reading.wait()
        request.cancel()  # as uvicorn's shutdown does
        with contextlib.suppress(asyncio.CancelledError):
            await request

    with TestClient(app) as c:
        internal = requests_counted(c, "/v1/restorations", "POST", 500, "internal")
        c.portal.call(abandon)
        assert requests_counted(c, "/v1/restorations", "POST", 500, "internal") == internal


@pytest.mark.parametrize(
    ("prefer", "broken"),
    [
        (None, "queue position"),
        ("wait=2", "record"),  # the wait's re-read
        ("wait=2", "record and queue position"),
    ],
)
def test_a_redis_failure_after_the_job_is_stored_still_answers_with_the_job(
    client: TestClient, monkeypatch, prefer: str | None, broken: str
) -> None:
    """Once the job is stored, a failed read (the wait's, the queue position) answers 202 with the job
    as last known and its Location, not a 503 without one that would have the client submit again."""
    svc = client.app.state.services
    submitted = "dynface_jobs_submitted_total"
    rejected = 'dynface_jobs_rejected_total{reason="redis_unavailable"}'
    before = metric(client, submitted), metric(client, rejected)

    def down(*args: Any) -> None:
        raise (redis.TimeoutError if "queue" in broken else redis.ConnectionError)("Redis went away")

    if "record" in broken:
        monkeypatch.setattr(svc.store, "get", down)
    if "queue position" in broken:
        monkeypatch.setattr(svc.queue, "get_job_position", down)
    r = submit(client, headers={"Prefer": prefer} if prefer else {})
    monkeypatch.undo()
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and r.headers["location"] == job["urls"]["self"]
    assert job["queue_position"] == (None if "queue position" in broken else 0)
    assert svc.queue.count == 1  # the one job, which the client can now poll
    assert (metric(client, submitted), metric(client, rejected)) == (before[0] + 1, before[1])


def test_a_redis_failure_reading_the_image_answers_with_the_job(client: TestClient, monkeypatch) -> None:
    """`Prefer: wait` + `Accept: image/*` on a succeeded job (here an Idempotency-Key replay) whose
    image read fails: the job JSON, which says where to fetch the image, not a 503."""
    headers = {"Idempotency-Key": "image-read", "Prefer": "wait=1", "Accept": "image/*"}
    job_id = submit(client, headers={"Idempotency-Key": "image-read"}).json()["id"]
    store = client.app.state.services.store
    store.finish(
        job_id, {"status": "succeeded", "outputs": {"image": "image/png"}}, {"image": PNG}, owner="anonymous"
    )
    assert submit(client, headers=headers).headers["content-type"] == "image/png"

    def down(*args: Any) -> None:
        raise redis.ConnectionError("Redis went away")

    monkeypatch.setattr(store, "result", down)
    r = submit(client, headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    assert r.json()["outputs"]["image"] == r.headers["location"] + "/image"


def test_every_worker_state_is_a_metrics_series(client: TestClient) -> None:
    """`dynface_workers` has a series, 0 when no worker is in it, for every state a worker announces
    (a missing one would be absent, not 0, and an alert on it would never see a value)."""
    source = (ROOT / "worker" / "main.py").read_text()
    calls = re.findall(r"announce\(([^()]*)\)", source)  # e.g. announce("stopping" if ... else "ready")
    announced = {state for call in calls for state in re.findall(r'"(\w+)"', call)}
    assert {"loading", "missing_weights", "ready", "busy", "stopping"} <= announced  # the scan reads them
    text = client.get("/metrics").text
    for state in announced:
        assert f'dynface_workers{{state="{state}"}} 0.0' in text, state


def test_the_cancel_docs_say_a_running_job_may_still_end_otherwise(client: TestClient) -> None:
    """A DELETE of a running job is a request: the job is checked between its stages, diffusion steps
    and background tiles, and before it stores its results, so one that is already storing them (or
    failed first) does not end canceled."""
    text = client.get("/openapi.json").json()["paths"]["/v1/restorations/{job_id}"]["delete"]["description"]
    assert "poll until `canceled`" not in text
    assert all(f"`{status}`" in text for status in ("canceled", "succeeded", "failed")), text


def test_a_request_without_a_valid_key_is_401_before_its_path_is_validated(make_settings) -> None:
    with TestClient(create_app(make_settings(api_keys="k1"))) as c:
        for headers in ({}, {"X-API-Key": "wrong"}):
            r = c.get("/v1/restorations/some-job/faces/not-a-number", headers=headers)
            assert r.status_code == 401 and error_code(r) == "unauthorized", r.text
        r = c.get("/v1/restorations/some-job/faces/not-a-number", headers={"X-API-Key": "k1"})
        assert r.status_code == 404 and error_code(r) == "not_found", r.text


def test_openapi_documents_retry_after_on_every_503_and_binary_images(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if "503" in op["responses"] and path != "/readyz":
                assert "Retry-After" in op["responses"]["503"].get("headers", {}), (method, path)
            ok = op["responses"].get("200", {}).get("content", {})
            for media in ("image/png", "image/jpeg", "image/webp"):
                if media in ok:
                    assert ok[media]["schema"] == {"type": "string", "format": "binary"}, (method, path)
    image = spec["paths"]["/v1/restorations/{job_id}/image"]["get"]["responses"]["200"]["content"]
    assert "image/png" in image


def hook_receiver(hooks: list[dict[str, Any]]) -> type[BaseHTTPRequestHandler]:
    """A webhook endpoint that records each delivery's JSON body."""

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            hooks.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    return Receiver


def test_a_job_no_worker_takes_fails_with_queue_timeout(make_settings, redis_conn) -> None:
    """With no worker, a queued job used to wait until its record expired and then vanish (404, no
    webhook). The API's sweep fails it once it has waited DYNFACE_QUEUE_TIMEOUT_SECONDS: time is made
    to pass by backdating its record."""
    s = make_settings(queue_timeout_seconds=600, reaper_interval_seconds=0.1)
    series = 'dynface_jobs_total{outcome="failed",reason="queue_timeout"}'
    hooks: list[dict[str, Any]] = []
    with http_server(hook_receiver(hooks)) as base, TestClient(create_app(s)) as c:
        before = metric(c, series)
        old = submit(c, webhook=f"{base}/hook").json()["id"]
        young = submit(c).json()["id"]
        store = c.app.state.services.store
        store.redis.hset(store.key("job", old), "created_at", json.dumps(time.time() - 601))
        job = wait_for(
            lambda: (j := c.get(f"/v1/restorations/{old}").json())["status"] != "queued" and j,
            20,
            what="the old job ended",
        )
        assert job["status"] == "failed" and job["error"]["code"] == "queue_timeout", job
        wait_for(lambda: hooks, 20, what="webhook")
        assert hooks[0]["id"] == old and hooks[0]["error"]["code"] == "queue_timeout"
        assert metric(c, series) == before + 1
        # The round that failed it saw the young job too, and left it queued.
        assert c.get(f"/v1/restorations/{young}").json()["status"] == "queued"
        assert [j.decode() for j in redis_conn.lrange(f"rq:queue:{s.queue_name}", 0, -1)] == [young]
        # A worker that dequeued the old job anyway would not start it (worker.tasks._start).
        assert store.start(old, {"status": "processing"}) is False


def test_one_sweep_round_per_lock_and_a_requeued_job_waits_from_its_requeue(make_settings) -> None:
    """Several API processes share the work through a Redis lock; a job re-queued after its worker
    was lost counts its wait from that re-queue (`queued_at`), not from its submission."""
    s = make_settings(queue_timeout_seconds=600)
    store = JobStore(connect(s), s)
    queue = make_queue(store.redis, s)
    now = time.time()
    for job_id, requeued in (("waited", {}), ("requeued", {"queued_at": now - 10})):
        record = {"id": job_id, "status": "queued", "created_at": now - 601, **requeued}
        store.create(job_id, b"x", record, queue)
    lock = store.key("queue-sweep-lock", queue.name)
    store.redis.set(lock, "another API process", px=60_000)
    assert queued.sweep(store, queue, s) == []
    assert store.get("waited")["status"] == "queued"
    store.redis.delete(lock)
    assert queued.sweep(store, queue, s) == ["waited"]
    assert store.get("waited")["status"] == "failed" and store.get("requeued")["status"] == "queued"


def lose_a_running_job(store: JobStore, queue: Queue, ttl: int = 1) -> str:
    """The next queued job, taken as a worker takes it (its RQ execution registered, its record
    `processing` and naming that execution) by a worker then lost with it: the execution (TTL `ttl`
    seconds) is never renewed. Plain RQ calls, no worker code (the API runs none)."""
    dequeued = Queue.dequeue_any([queue], None, connection=queue.connection, serializer=JSONSerializer)
    assert dequeued is not None
    job = dequeued[0]
    with store.redis.pipeline() as pipe:
        execution = Execution.create(job, ttl, pipeline=pipe, worker_name="lost-worker")
        job.prepare_for_execution("lost-worker", pipe)
        pipe.lrem(queue.intermediate_queue_key, 1, job.id)
        pipe.execute()
    fields = {"status": "processing", "attempts": 1, "worker": "lost-worker"}
    assert store.start(job.id, {**fields, "execution": execution.composite_key})
    return job.id


@pytest.mark.parametrize("max_retries", [1, 0])
def test_a_lost_workers_job_is_requeued_or_failed_by_the_api_when_no_worker_reaps(
    make_settings, max_retries: int
) -> None:
    """Only workers used to reap lost workers' jobs: with none left (`dynface serve` stopped, a pool
    scaled to zero), the job stayed `processing` until its record expired (a 404, no webhook, no
    count; a DELETE answered 202 and it never ended). The API's sweep reaps as a worker does: back
    to the queue with a retry spent, where a worker (and KEDA, which counts that list) finds it and a
    DELETE ends it at once; or, retries spent, failed with `worker_lost`, counted and told."""
    s = make_settings(heartbeat_ttl_seconds=1, reaper_interval_seconds=0.2, max_retries=max_retries)
    series = 'dynface_jobs_total{outcome="failed",reason="worker_lost"}'
    hooks: list[dict[str, Any]] = []
    with http_server(hook_receiver(hooks)) as base, TestClient(create_app(s)) as c:
        svc = c.app.state.services
        before = metric(c, series)
        job_id = submit(c, webhook=f"{base}/hook").json()["id"]
        assert lose_a_running_job(svc.store, svc.queue) == job_id
        job = wait_for(
            lambda: (j := c.get(f"/v1/restorations/{job_id}").json())["status"] != "processing" and j,
            20,
            what="the lost job moved on",
        )
        rq_job = Job.fetch(job_id, connection=svc.redis, serializer=JSONSerializer)
        if max_retries:
            assert job["status"] == "queued" and job["attempts"] == 1, job
            assert any("attempt 1 was lost" in w for w in job["warnings"]), job["warnings"]
            assert svc.queue.job_ids == [job_id] and rq_job.retries_left == 0
            r = c.delete(f"/v1/restorations/{job_id}")
            assert r.status_code == 200 and r.json()["status"] == "canceled", r.text
        else:
            assert job["status"] == "failed" and job["error"]["code"] == "worker_lost", job
            assert metric(c, series) == before + 1
            wait_for(lambda: hooks, 20, what="webhook")
            assert [(h["id"], h["error"]["code"]) for h in hooks] == [(job_id, "worker_lost")]
            assert svc.queue.job_ids == [] and rq_job.get_status() == JobStatus.FAILED


def skew_clock(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """This process's clock `seconds` ahead of Redis' and the workers': `time.time`, and RQ's `now`,
    from which its registries' default cutoffs come (`rq.utils.current_timestamp`)."""
    real_time, real_now = time.time, rq.utils.now
    monkeypatch.setattr(time, "time", lambda: real_time() + seconds)
    monkeypatch.setattr(rq.utils, "now", lambda: real_now() + timedelta(seconds=seconds))


def test_a_reaper_whose_clock_runs_ahead_still_leaves_live_jobs_alone(make_settings, monkeypatch) -> None:
    """RQ's execution expiries are written with the workers' clocks, and the reaper compared them with
    its own: one (an API pod on another node) whose clock ran ahead by more than heartbeat_ttl −
    heartbeat_interval re-queued live workers' jobs. It judges by Redis' clock (`TIME`): a job whose
    execution was just renewed stays `processing`, even with a second entry of its id in the queue
    (`reconcile`), and one whose execution expired is still re-queued."""
    s = make_settings(heartbeat_ttl_seconds=60, max_retries=1)
    store = JobStore(connect(s), s)
    queue = make_queue(store.redis, s)
    for job_id in ("live", "expired"):
        store.create(job_id, b"x", {"id": job_id, "status": "queued", "created_at": time.time()}, queue)
    live, expired = (lose_a_running_job(store, queue, ttl=60) for _ in range(2))
    registry = queue.started_job_registry
    store.redis.zadd(registry.key, {store.get(expired)["execution"]: lost.redis_time(store.redis) - 1})
    store.redis.rpush(queue.key, live)  # a second entry of its id (docs/design.md)
    running = store.get(live)

    skew_clock(monkeypatch, 120)
    lost.reap(store, queue, s, lost.Tally(Counter("jobs", "", ["outcome", "reason"], registry=None)))
    assert store.get(live) == running
    assert registry.get_job_ids(cleanup=False) == [live]
    record = store.get(expired)
    assert record["status"] == "queued" and any("attempt 1 was lost" in w for w in record["warnings"]), record
    assert queue.job_ids == [live, expired]


@pytest.mark.parametrize("max_retries", [1, 0])
@pytest.mark.parametrize("rq_cleans_first", [False, True])
def test_a_lost_workers_job_whose_cancel_was_requested_ends_canceled(
    make_settings, max_retries: int, rq_cleans_first: bool
) -> None:
    """A running job's DELETE (202) asks its worker to stop. Lost then, its worker's job was re-queued
    like any other, and with no worker left failed `queue_timeout` an hour later instead of ending
    `canceled`. One reaper round ends it `canceled`, as its worker would have: counted once, its
    webhook sent, out of RQ's queue; whether our reaper's cleanup found it or RQ's own, without our
    handler (`rq info`), had re-queued or failed it first."""
    s = make_settings(heartbeat_ttl_seconds=60, max_retries=max_retries)
    hooks: list[dict[str, Any]] = []
    with http_server(hook_receiver(hooks)) as base:
        with TestClient(create_app(s)) as c:
            job_id = submit(c, webhook=f"{base}/hook").json()["id"]
            svc = c.app.state.services
            assert lose_a_running_job(svc.store, svc.queue, ttl=60) == job_id
            r = c.delete(f"/v1/restorations/{job_id}")
            assert r.status_code == 202 and r.json()["status"] == "processing", r.text
        store = JobStore(connect(s), s)
        queue = make_queue(store.redis, s)
        store.redis.zadd(queue.started_job_registry.key, {store.get(job_id)["execution"]: 1})  # lost
        if rq_cleans_first:
            queue.started_job_registry.count  # noqa: B018 — RQ's cleanup, as `rq info` runs it
        registry = CollectorRegistry()
        jobs = Counter("dynface_jobs", "", ["outcome", "reason"], registry=registry)

        for _ in range(2):  # the second round finds nothing left to do
            lost.reap(store, queue, s, lost.Tally(jobs))
            record = store.get(job_id)
            assert record["status"] == "canceled" and record["error"] is None, record
            assert queue.job_ids == []
            counted = {
                (x.labels["outcome"], x.labels["reason"]): x.value
                for family in registry.collect()
                for x in family.samples
                if x.name.endswith("_total")
            }
            assert counted == {("canceled", "canceled"): 1.0}, counted
        wait_for(lambda: hooks, 20, what="webhook")
        assert [(h["id"], h["status"]) for h in hooks] == [(job_id, "canceled")]


@pytest.mark.parametrize("max_retries", [1, 0])
def test_a_cancel_landing_while_a_lost_job_is_reaped_ends_it_canceled(
    make_settings, monkeypatch, max_retries: int
) -> None:
    """The reaper reads a lost worker's record (no cancel asked), then the client's DELETE marks it
    (`cancel_requested`, as the API does for a running job), then the reaper puts it back to the
    queue, or, no retries left, fails it: it went back `queued` still marked, to be canceled only by
    a worker taking it (with none left, failed `queue_timeout` an hour later), or ended `failed
    worker_lost` though its client had asked to stop it. The re-queue and the failure refuse a marked
    job, which ends `canceled` in the same round, counted once and out of RQ's queue."""
    s = make_settings(heartbeat_ttl_seconds=60, max_retries=max_retries)
    store = JobStore(connect(s), s)
    queue = make_queue(store.redis, s)
    store.create("j", b"x", {"id": "j", "status": "queued", "created_at": time.time()}, queue)
    assert lose_a_running_job(store, queue, ttl=60) == "j"
    store.redis.zadd(queue.started_job_registry.key, {store.get("j")["execution"]: 1})  # lost
    step = "requeue" if max_retries else "finish"
    real_step = getattr(store, step)

    def delete_lands_first(job_id: str, *args: Any, **kwargs: Any) -> Any:
        if not store.get(job_id).get("cancel_requested"):  # the DELETE, once
            assert store.update(job_id, {"cancel_requested": True}, allowed=["processing"])
        return real_step(job_id, *args, **kwargs)

    monkeypatch.setattr(store, step, delete_lands_first)
    registry = CollectorRegistry()
    jobs = Counter("dynface_jobs", "", ["outcome", "reason"], registry=registry)
    lost.reap(store, queue, s, lost.Tally(jobs))
    record = store.get("j")
    assert record["status"] == "canceled" and record["error"] is None, record
    assert queue.job_ids == []
    assert registry.get_sample_value("dynface_jobs_total", {"outcome": "canceled", "reason": "canceled"}) == 1


def test_a_delete_racing_a_lost_jobs_requeue_cancels_it(make_settings, monkeypatch) -> None:
    """A DELETE tries the queued job's cancel, then the running job's; a lost worker's job re-queued
    by a reaper between the two (processing, then queued) got 409 "already queued" and ran on. The
    DELETE tries again and the job ends canceled at once (200)."""
    s = make_settings(heartbeat_ttl_seconds=60, max_retries=1)
    with TestClient(create_app(s)) as c:
        svc = c.app.state.services
        job_id = submit(c).json()["id"]
        assert lose_a_running_job(svc.store, svc.queue, ttl=60) == job_id
        svc.store.redis.zadd(svc.queue.started_job_registry.key, {svc.store.get(job_id)["execution"]: 1})
        real_end_queued = restorations.end_queued

        def reaper_requeues_meanwhile(store: JobStore, *args: Any, **kwargs: Any) -> Any:
            ended = real_end_queued(store, *args, **kwargs)
            if store.get(job_id)["status"] == "processing":
                lost.reap(
                    store, svc.queue, s, lost.Tally(Counter("jobs", "", ["outcome", "reason"], registry=None))
                )
                assert store.get(job_id)["status"] == "queued"
            return ended

        monkeypatch.setattr(restorations, "end_queued", reaper_requeues_meanwhile)
        r = c.delete(f"/v1/restorations/{job_id}")
        assert r.status_code == 200 and r.json()["status"] == "canceled", r.text


def test_a_record_whose_wait_does_not_parse_is_skipped_and_the_sweep_goes_on(make_settings, caplog) -> None:
    """One odd record (a field missing, not a number, not JSON) used to raise out of every round, so
    no queued job was failed any more; it is now logged and left to its TTL, and the others fail."""
    s = make_settings(queue_timeout_seconds=600)
    store = JobStore(connect(s), s)
    queue = make_queue(store.redis, s)
    old = time.time() - 601
    odd = {
        "no-created-at": {},
        "text-created-at": {"created_at": "yesterday"},
        "text-queued-at": {"created_at": old, "queued_at": "later"},
        "not-json": {"created_at": old},
    }
    for job_id, fields in (*odd.items(), ("waited", {"created_at": old})):
        store.create(job_id, b"x", {"id": job_id, "status": "queued", **fields}, queue)
    store.redis.hset(store.key("job", "not-json"), "created_at", b"{")
    with caplog.at_level(logging.WARNING, logger="app.jobs"):
        assert queued.sweep(store, queue, s) == ["waited"]
    assert {store.redis.hget(store.key("job", job_id), "status") for job_id in odd} == {b'"queued"'}
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert all(f"job {job_id}:" in logged for job_id in odd), logged


def test_a_reap_that_redis_refuses_is_a_warning_not_a_bug(make_settings, caplog, monkeypatch) -> None:
    """A Redis that refuses writes (a failed snapshot, a read-only replica) failed the reap with
    a logged traceback, as for a bug; it is a warning, as the API's own 503s are."""
    s = make_settings()
    store = JobStore(connect(s), s)
    queue = make_queue(store.redis, s)

    def refused(*args: object) -> None:
        raise redis.exceptions.ResponseError("MISCONF Redis is configured to save RDB snapshots, but …")

    monkeypatch.setattr(queued.lost, "reap", refused)
    with caplog.at_level(logging.WARNING, logger="app.queued"):
        assert queued.sweep(store, queue, s) == []
    (warned,) = [r for r in caplog.records if r.name == "app.queued"]
    assert warned.levelno == logging.WARNING and warned.exc_info is None
    assert "reaping lost workers' jobs failed" in warned.getMessage() and "MISCONF" in warned.getMessage()


def test_a_reap_that_fails_does_not_stop_the_queue_timeouts(make_settings, caplog) -> None:
    """The sweep reaps lost workers' jobs first: a reap that raised (here on a queued record whose
    status is not JSON, which `lost.reconcile` reads) ended the round, so while it kept failing no
    queued job ever failed `queue_timeout`. It is logged with its traceback and the round goes on."""
    s = make_settings(queue_timeout_seconds=600)
    store = JobStore(connect(s), s)
    queue = make_queue(store.redis, s)
    old = time.time() - 601
    for job_id in ("odd", "waited"):
        store.create(job_id, b"x", {"id": job_id, "status": "queued", "created_at": old}, queue)
    store.redis.hset(store.key("job", "odd"), "status", b"{")
    with caplog.at_level(logging.ERROR, logger="app.queued"):
        assert queued.sweep(store, queue, s) == ["waited"]
    assert store.get("waited")["status"] == "failed"
    assert store.get("waited")["error"]["code"] == "queue_timeout"
    (reap_failed,) = [r for r in caplog.records if r.name == "app.queued"]
    assert "reaping lost workers' jobs failed" in reap_failed.getMessage()
    assert reap_failed.exc_info is not None and reap_failed.exc_info[0] is json.JSONDecodeError


def test_the_api_waits_for_its_webhooks_before_it_exits(make_settings, monkeypatch) -> None:
    """A queued job's cancel sends its webhook from an API thread, a daemon the interpreter would end
    mid-delivery: the app's shutdown drains it (bounded), as a worker's does."""
    started, release = threading.Event(), threading.Event()
    delivered: list[str] = []

    def deliver(url: str, msg_id: str, body: bytes, settings: Settings, **_: Any) -> bool:
        started.set()
        release.wait(30)
        delivered.append(msg_id)
        return True

    real_drain = webhooks.drain

    def drain(timeout: float = webhooks.DRAIN_SECONDS) -> None:
        release.set()  # the delivery ends only once shutdown is draining: before, it must still run
        real_drain(timeout)

    monkeypatch.setattr(webhooks, "deliver", deliver)
    monkeypatch.setattr(webhooks, "drain", drain)
    with TestClient(create_app(make_settings())) as c:
        job_id = submit(c, webhook="http://127.0.0.1:9/hook").json()["id"]
        assert c.delete(f"/v1/restorations/{job_id}").status_code == 200
        assert started.wait(30)
        assert delivered == []
    assert delivered == [job_id]


def test_the_queue_timeout_leaves_the_sweep_time_before_the_record_expires() -> None:
    ttl = {
        "record_ttl_seconds": 3000,
        "result_ttl_seconds": 600,
        "job_timeout_seconds": 100,
        "reaper_interval_seconds": 15.0,
    }
    assert Settings(**ttl).queue_timeout == 2970  # unset: an hour, capped by the record TTL
    assert Settings().queue_timeout == 3600
    assert Settings(**ttl, queue_timeout_seconds=2970).queue_timeout == 2970
    with pytest.raises(ValueError, match=r"at least DYNFACE_QUEUE_TIMEOUT_SECONDS \(2971\)"):
        Settings(**ttl, queue_timeout_seconds=2971)
    # Unset, the message gives the value in effect (it used to say "None").
    too_short = {
        "record_ttl_seconds": 30,
        "result_ttl_seconds": 30,
        "job_timeout_seconds": 5,
        "max_retries": 0,
    }
    with pytest.raises(ValueError, match=r"DYNFACE_QUEUE_TIMEOUT_SECONDS \(unset, so 0\)"):
        Settings(**too_short, reaper_interval_seconds=15.0)
