"""API behaviour that needs Redis but no worker: validation, errors, limits, auth, idempotency,
queued-job cancellation, readiness and OpenAPI. Jobs stay queued here (no worker consumes them)."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from tests.conftest import ROOT, aligned_png

PNG = aligned_png()


def small_png(size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 80, 60)).save(buf, "PNG")
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


def test_submit_multipart_returns_queued_job(client: TestClient, redis_conn) -> None:
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


def test_queue_full(make_settings) -> None:
    with TestClient(create_app(make_settings(max_queue_depth=2, queue_full_retry_after_seconds=17))) as c:
        assert submit(c).status_code == 202
        assert submit(c).status_code == 202
        r = submit(c)
        assert r.status_code == 503 and error_code(r) == "queue_full"
        assert r.headers["retry-after"] == "17"


def test_rate_limited_per_key(make_settings) -> None:
    s = make_settings(rate_limit_per_minute=2, api_keys="key-a,key-b")
    with TestClient(create_app(s)) as c:
        a, b = {"X-API-Key": "key-a"}, {"Authorization": "Bearer key-b"}
        assert submit(c, headers=a).status_code == 202
        assert submit(c, headers=a).status_code == 202
        r = submit(c, headers=a)
        assert r.status_code == 429 and error_code(r) == "rate_limited"
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert submit(c, headers=b).status_code == 202  # the limit is per key


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


def test_cancel_queued_job(client: TestClient, redis_conn, settings) -> None:
    job = submit(client).json()
    r = client.delete(f"/v1/restorations/{job['id']}")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert r.json()["completed_at"] is not None
    assert redis_conn.llen(f"rq:queue:{settings.queue_name}") == 0
    assert not redis_conn.exists(f"{settings.key_prefix}:input:{job['id']}")
    again = client.delete(f"/v1/restorations/{job['id']}")
    assert again.status_code == 409 and error_code(again) == "not_cancelable"
    assert client.get(f"/v1/restorations/{job['id']}/image").status_code == 409


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


def test_prefer_wait_times_out_with_202(client: TestClient) -> None:
    r = submit(client, headers={"Prefer": "wait=1"})
    assert r.status_code == 202 and r.json()["status"] == "queued"
    assert r.headers["preference-applied"] == "wait=1"


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
        assert "dynface_redis_up 0.0" in c.get("/metrics").text


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
    line = next(
        x for x in out.splitlines() if x.startswith("dynface_http_requests_total") and "/healthz" in x
    )
    assert float(line.split()[-1]) == 2.0
    assert "dynface_queue_depth" in out
    json.dumps(out)  # plain text, nothing exotic
