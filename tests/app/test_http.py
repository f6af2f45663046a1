"""HTTP semantics of the API (RFC 9110): HEAD wherever GET, a complete `Allow` on 405, no caching of
JSON answers, one URL per result, and terminal answers for the results of jobs that ended without
any. Needs Redis, no worker: jobs are ended through the job store, as a worker ends them."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.app.test_api import PNG, error_code, requests_counted, submit


def _succeeded(client: TestClient, outputs: str = "image,faces,crops") -> str:
    """A job that succeeded with one face: its id."""
    job_id = submit(client, outputs=outputs).json()["id"]
    produced = {"image": "image/png", "faces": ["image/png"], "crops": ["image/png"]}
    blobs = {"image": PNG, "face:0": PNG, "crop:0": PNG}
    assert client.app.state.services.store.finish(
        job_id, {"status": "succeeded", "outputs": produced}, blobs, owner="anonymous"
    )
    return job_id


def test_every_get_route_answers_head_as_its_get_without_a_body(client: TestClient) -> None:
    """RFC 9110 §9.3.2: a server MUST support HEAD for its GET resources; each answered 405."""
    job_id = _succeeded(client)
    spec = client.get("/openapi.json").json()
    paths = [p for p, ops in spec["paths"].items() if "get" in ops]
    # No HEAD twin of a GET operation in the document (FastAPI would give it the same operation id).
    assert all(set(ops) <= {"get", "post", "delete"} for ops in spec["paths"].values())
    urls = [p.replace("{job_id}", job_id).replace("{k}", "0") for p in paths]
    urls += ["/", "/static/app.js", f"/v1/restorations/{job_id}/comparison", "/v1/restorations/nope"]
    for url in urls:
        get, head = client.get(url), client.head(url)
        assert head.status_code == get.status_code != 405, (url, head.status_code, get.status_code)
        assert head.headers["content-type"] == get.headers["content-type"], url
        assert head.content == b"", url
        if get.status_code == 200 and url.startswith("/v1/restorations/"):
            assert head.headers["content-length"] == get.headers["content-length"] == str(len(get.content))
    for path in ("/healthz", "/v1/restorations/{job_id}/faces/{k}"):
        before = requests_counted(client, path, "HEAD", 200, "")
        client.head(path.replace("{job_id}", job_id).replace("{k}", "0"))
        assert requests_counted(client, path, "HEAD", 200, "") == before + 1  # labelled HEAD, not GET


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PATCH", "/v1/restorations/some-job", "DELETE, GET, HEAD"),  # said `GET` alone
        ("PUT", "/v1/restorations/some-job", "DELETE, GET, HEAD"),
        ("OPTIONS", "/v1/restorations/some-job", "DELETE, GET, HEAD"),
        ("GET", "/v1/restorations", "POST"),
        ("HEAD", "/v1/restorations", "POST"),
        ("POST", "/v1/restorations/some-job/image", "GET, HEAD"),
        ("DELETE", "/healthz", "GET, HEAD"),
        ("POST", "/", "GET, HEAD"),
    ],
)
def test_a_405_names_every_method_served_at_the_path(
    client: TestClient, method: str, path: str, allow: str
) -> None:
    r = client.request(method, path)
    assert r.status_code == 405 and r.headers["allow"] == allow, (r.status_code, r.headers)
    if method != "HEAD":
        assert error_code(r) == "method_not_allowed"


def test_json_answers_are_not_stored_by_caches(client: TestClient) -> None:
    """A job's JSON changes from one poll to the next, an error is the state of one moment: no cache
    (a browser's, a proxy's) may keep either. The result images keep their own private caching."""
    created = submit(client)
    job_id = created.json()["id"]
    answers = [
        created,  # 202
        client.get(f"/v1/restorations/{job_id}"),
        client.get(f"/v1/restorations/{job_id}/image"),  # 409 not_ready
        client.get("/v1/restorations/nope"),  # 404
        client.patch(f"/v1/restorations/{job_id}"),  # 405
        submit(client, upscale="9"),  # 422
        client.delete(f"/v1/restorations/{job_id}"),
        client.get("/v1/models"),
        client.get("/readyz"),  # 503: no worker
        client.get("/healthz"),
    ]
    for r in answers:
        assert r.headers["content-type"] == "application/json", r.request.url
        assert r.headers.get("cache-control") == "no-store", (r.request.method, r.request.url, r.status_code)
    image = client.get(f"/v1/restorations/{_succeeded(client)}/image")
    assert image.status_code == 200 and image.headers["cache-control"] == "private, max-age=3600"


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [
        ("failed", {"code": "no_face", "message": "No face."}, "job_failed"),
        ("canceled", None, "job_canceled"),
    ],
)
def test_the_results_of_a_job_that_ended_without_any_are_a_terminal_answer(
    client: TestClient, status: str, error: dict[str, str] | None, code: str
) -> None:
    """They were 409 `not_ready`, the answer a client polls through: it polled forever. The job JSON
    no longer points `urls.result` at a result that will never exist either."""
    job = submit(client, outputs="image,faces,crops,comparison").json()
    assert job["urls"]["result"] == job["urls"]["self"] + "/image"  # while it may still succeed
    ended = client.app.state.services.store.finish(job["id"], {"status": status, "error": error})
    assert ended is not None
    for path in ("image", "faces/0", "crops/0", "comparison"):
        r = client.get(f"/v1/restorations/{job['id']}/{path}")
        assert r.status_code == 409 and error_code(r) == code, (path, r.text)
    if error is not None:
        assert "no_face" in r.json()["error"]["message"]
    shown = client.get(f"/v1/restorations/{job['id']}").json()
    assert shown["status"] == status and shown["urls"]["result"] is None
    assert shown["urls"]["self"] == job["urls"]["self"] and shown["urls"]["cancel"] == job["urls"]["cancel"]


def test_a_result_index_has_one_spelling(client: TestClient) -> None:
    """`faces/abc` was a 422 `invalid_option`, and `faces/00` a second URL of face 0: an index that
    names no result is a 404 like one out of range, whatever the job's state."""
    job_id = _succeeded(client)
    for kind in ("faces", "crops"):
        assert client.get(f"/v1/restorations/{job_id}/{kind}/0").status_code == 200
        for k in ("00", "01", "+0", "-1", "abc", "0x0", "1e0", "%200", "1" * 10, "9" * 5000, "1"):
            r = client.get(f"/v1/restorations/{job_id}/{kind}/{k}")
            assert r.status_code == 404 and error_code(r) == "not_found", (kind, k[:20], r.text)
    queued = submit(client, outputs="faces").json()["id"]
    r = client.get(f"/v1/restorations/{queued}/faces/abc")
    assert r.status_code == 404 and error_code(r) == "not_found", r.text
    assert error_code(client.get(f"/v1/restorations/{queued}/faces/0")) == "not_ready"


def test_head_of_a_result_does_not_read_its_bytes(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HEAD of a result read the whole blob from Redis (up to hundreds of MB) to send none of it: it
    reads its length alone, and answers as the GET would (410 once the result is gone)."""
    job_id = _succeeded(client)
    store = client.app.state.services.store
    read = store.get_with_result

    def never(*args: object) -> object:
        raise AssertionError("HEAD read a result's bytes")

    monkeypatch.setattr(store, "get_with_result", never)
    head = client.head(f"/v1/restorations/{job_id}/image")
    assert head.status_code == 200 and head.headers["content-length"] == str(len(PNG))
    store.redis.delete(store.key("result", job_id, "image"))
    assert client.head(f"/v1/restorations/{job_id}/image").status_code == 410
    monkeypatch.setattr(store, "get_with_result", read)
    assert client.get(f"/v1/restorations/{job_id}/image").status_code == 410
