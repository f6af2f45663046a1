"""End-to-end jobs through a real worker process running the real `tiny` pipeline.

One worker serves the whole module (loading torch and the pipeline costs seconds on the shared test
machine); each test still submits its own jobs and checks its own records.
"""

from __future__ import annotations

import io
import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from rq.job import Job
from rq.serializers import JSONSerializer

from app.jobs import JobStore, connect
from app.main import create_app
from app.settings import Settings
from app.webhooks import verify
from tests.conftest import TESTDATA, WorkerProcess, aligned_png, base_settings, purge, start_workers, wait_for

TERMINAL = {"succeeded", "failed", "canceled"}


@pytest.fixture(scope="module")
def service(redis_conn, tmp_path_factory) -> Iterator[tuple[Settings, list[WorkerProcess]]]:
    # A non-default face batch and PNG level, to see the settings reach the worker's pipeline.
    settings = base_settings(uuid.uuid4().hex[:10], max_face_batch=3, png_compress_level=0)
    workers = start_workers(settings, tmp_path_factory.mktemp("workers"))
    yield settings, workers
    for w in workers:
        w.stop()
    purge(redis_conn, settings)


@pytest.fixture
def client(service) -> Iterator[TestClient]:
    with TestClient(create_app(service[0])) as c:
        yield c


def submit(client: TestClient, data: bytes | None = None, headers: dict | None = None, **fields: Any):
    fields.setdefault("aligned", "true")
    return client.post(
        "/v1/restorations",
        files={"image": ("face.png", data or aligned_png(), "image/png")},
        data={k: str(v) for k, v in fields.items()},
        headers=headers or {},
    )


def poll(client: TestClient, job_id: str, until, timeout: float = 60.0) -> dict:
    def check() -> dict | None:
        job = client.get(f"/v1/restorations/{job_id}").json()
        return job if until(job) else None

    return wait_for(check, timeout, interval=0.02, what=f"job {job_id}")


def test_round_trip_aligned_face(client: TestClient) -> None:
    r = submit(client, outputs="image,faces,comparison", format="png", seed=3, headers={"Prefer": "wait=60"})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "succeeded", job
    assert job["error"] is None and job["attempts"] == 1
    assert job["started_at"] and job["completed_at"] and job["stage"] is None
    assert job["queue_position"] is None
    assert job["created_at"] <= job["started_at"] <= job["completed_at"]
    t = job["timings"]
    assert t["queue_wait_seconds"] >= 0 and t["inference_seconds"] > 0
    stages = ("decode", "detect", "dblm", "sample", "paste", "encode")
    assert set(t["stages"]) == set(stages) and all(t["stages"][s] > 0 for s in stages), t
    assert t["inference_seconds"] >= t["stages"]["sample"]
    # progress counts diffusion steps and ends complete; the face's start step is that count
    (face,) = job["faces"]
    assert face["box"] == [0.0, 0.0, 512.0, 512.0] and face["score"] == 1.0
    assert face["start_step"] > 0 and 0 <= face["eta"] <= 1
    assert job["progress"] == {"step": face["start_step"], "total": face["start_step"]}
    # the same progress is mirrored into RQ's job meta
    svc = client.app.state.services
    meta = Job.fetch(job["id"], connection=svc.redis, serializer=JSONSerializer).meta
    assert meta["step"] == meta["total"] == face["start_step"] and meta["stage"] == "encode"
    # a non-real profile is flagged, exactly once
    assert len([w for w in job["warnings"] if "tiny" in w.lower()]) == 1, job["warnings"]
    assert job["outputs"]["image"] == job["urls"]["result"]
    assert len(job["outputs"]["faces"]) == 1 and job["outputs"]["comparison"]
    stored_bytes = 0
    for url in (job["outputs"]["image"], job["outputs"]["faces"][0], job["outputs"]["comparison"]):
        got = client.get(url)
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        stored_bytes += len(got.content)
        with Image.open(io.BytesIO(got.content)) as png:
            png.verify()
            # DYNFACE_PNG_COMPRESS_LEVEL=0 stores the scanlines: never smaller than them
            assert len(got.content) >= png.height * (png.width * 3 + 1), (url, png.size)
    assert client.get(f"/v1/restorations/{job['id']}/faces/1").status_code == 404
    # the input is gone once the job is done
    store = JobStore(connect(client.app.state.services.settings), client.app.state.services.settings)
    assert store.input(job["id"]) is None
    # its results count against its owner's stored bytes (DYNFACE_MAX_STORED_BYTES_PER_KEY)
    stored = store.redis.zrange(store.key("stored", "anonymous"), 0, -1)
    assert f"{job['id']}:{stored_bytes}".encode() in stored


def test_round_trip_json_jpeg(client: TestClient) -> None:
    import base64

    url = "data:image/png;base64," + base64.b64encode(aligned_png("0240.png")).decode()
    body = {"image": url, "aligned": True, "format": "jpeg", "fidelity": 0.2, "mode": "difface"}
    r = client.post("/v1/restorations", json=body, headers={"Prefer": "wait"})
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
    img = client.get(r.json()["outputs"]["image"])
    assert img.headers["content-type"] == "image/jpeg"
    assert r.json()["outputs"]["faces"] == [] and r.json()["outputs"]["comparison"] is None
    assert client.get(f"/v1/restorations/{r.json()['id']}/comparison").status_code == 404


def test_prefer_wait_with_accept_image_answers_with_the_photo(client: TestClient) -> None:
    """One request for a synchronous client: the photo itself when Accept prefers its type, else the
    job JSON (a failed job, a result type the client did not ask for)."""
    wait = {"Prefer": "wait=60"}
    r = submit(client, format="png", seed=3, headers={**wait, "Accept": "image/*"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text[:200]
    assert r.headers["preference-applied"] == "wait=50"  # DYNFACE_MAX_WAIT_SECONDS' default
    job = client.get(r.headers["location"]).json()
    assert job["status"] == "succeeded" and r.headers["content-location"] == job["outputs"]["image"]
    assert r.content == client.get(job["outputs"]["image"]).content
    assert Image.open(io.BytesIO(r.content)).size == (512, 512)

    other_type = submit(client, format="jpeg", headers={**wait, "Accept": "image/png"})
    assert other_type.status_code == 200 and other_type.json()["status"] == "succeeded"
    assert other_type.json()["outputs"]["image"].endswith("/image")

    buf = io.BytesIO()
    Image.new("RGB", (160, 120), (200, 200, 200)).save(buf, "PNG")
    failed = submit(client, data=buf.getvalue(), aligned="false", headers={**wait, "Accept": "image/*"})
    assert failed.status_code == 200 and failed.headers["content-type"] == "application/json"
    assert failed.json()["error"]["code"] == "no_face"


def test_whole_photo_with_detector(client: TestClient) -> None:
    photo = (TESTDATA / "photos" / "04.jpg").read_bytes()
    r = submit(
        client,
        data=photo,
        aligned="false",
        detector="retinaface_mobile0.25",
        format="same",
        outputs="image,faces",
        headers={"Prefer": "wait=60"},
    )
    job = r.json()
    assert r.status_code == 200 and job["status"] == "succeeded", job
    # 04.jpg holds one face (RetinaFace MobileNet at 0.97: ../shared/weights/SOURCES.md).
    (face,) = job["faces"]
    width, height = Image.open(TESTDATA / "photos" / "04.jpg").size
    x0, y0, x1, y1 = face["box"]
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, (face["box"], width, height)
    assert len(job["outputs"]["faces"]) == 1
    assert client.get(job["outputs"]["image"]).headers["content-type"] == "image/jpeg"
    assert job["timings"]["stages"]["detect"] > 0


def test_statuses_and_progress(client: TestClient) -> None:
    job_id = submit(client).json()["id"]
    seen = poll(
        client,
        job_id,
        lambda j: (
            j["status"] == "processing"
            and j["stage"] == "sample"
            and j["progress"]
            and j["progress"]["step"] > 0
        ),
    )
    assert seen["progress"]["total"] >= seen["progress"]["step"]
    assert seen["started_at"] is not None and seen["queue_position"] is None
    done = poll(client, job_id, lambda j: j["status"] in TERMINAL)
    assert done["status"] == "succeeded"


def test_no_face_fails_or_passes_through(client: TestClient) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (160, 120), (200, 200, 200)).save(buf, "PNG")
    flat = buf.getvalue()
    failed = submit(client, data=flat, aligned="false", headers={"Prefer": "wait=60"}).json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "no_face", failed
    assert failed["outputs"] is None
    assert client.get(f"/v1/restorations/{failed['id']}/image").status_code == 409
    passed = submit(
        client, data=flat, aligned="false", on_no_face="passthrough", headers={"Prefer": "wait=60"}
    ).json()
    assert passed["status"] == "succeeded" and passed["faces"] == [], passed
    assert any("no face" in w.lower() for w in passed["warnings"])


def test_cancel_running_job(client: TestClient) -> None:
    # The DifFace baseline always samples 100 steps (DynFaceRestore's start may be as few as 24), so
    # the DELETE sent at the start of sampling lands well before its end.
    job_id = submit(client, mode="difface").json()["id"]
    poll(client, job_id, lambda j: j["stage"] == "sample")
    r = client.delete(f"/v1/restorations/{job_id}")
    assert r.status_code == 202, r.text
    done = poll(client, job_id, lambda j: j["status"] in TERMINAL, timeout=30)
    assert done["status"] == "canceled" and done["completed_at"] and done["error"] is None
    # it stopped between diffusion steps instead of sampling to the end
    assert done["progress"]["step"] < done["progress"]["total"], done["progress"]
    assert client.get(f"/v1/restorations/{job_id}/image").status_code == 409


def test_cancel_queued_behind_running_job(client: TestClient) -> None:
    running = submit(client, mode="difface").json()["id"]  # 100 steps: still running below
    queued, behind = (submit(client).json() for _ in range(2))
    assert queued["status"] == behind["status"] == "queued"
    poll(client, running, lambda j: j["status"] == "processing")

    def position(job: dict) -> int:
        return client.get(f"/v1/restorations/{job['id']}").json()["queue_position"]

    # The module's one worker takes jobs in order, so whatever was queued before `running` has left
    # the queue once it runs: `queued` is first in line, and the running job is not counted.
    assert (position(queued), position(behind)) == (0, 1)
    assert client.delete(f"/v1/restorations/{queued['id']}").json()["status"] == "canceled"
    assert position(behind) == 0  # moved up
    assert client.delete(f"/v1/restorations/{behind['id']}").json()["status"] == "canceled"
    client.delete(f"/v1/restorations/{running}")  # no need to sample to the end: the worker goes on
    poll(client, running, lambda j: j["status"] in TERMINAL)
    for job in (queued, behind):
        assert client.get(f"/v1/restorations/{job['id']}").json()["status"] == "canceled"  # never ran


def test_results_expire(service) -> None:
    settings = service[0].model_copy(update={"result_ttl_seconds": 1})
    with TestClient(create_app(settings)) as c:
        job = submit(c, headers={"Prefer": "wait=60"}).json()
        assert job["status"] == "succeeded"
        url = job["outputs"]["image"]
        wait_for(lambda: c.get(url).status_code == 410, 10, interval=0.2, what="result expiry")
        r = c.get(url)
        assert r.json()["error"]["code"] == "expired"
        assert c.get(job["urls"]["self"]).json()["status"] == "succeeded"  # the record outlives results


class Receiver:
    """A local webhook receiver that fails the first ``failures`` deliveries with HTTP 500."""

    def __init__(self, failures: int) -> None:
        self.calls: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(500 if len(outer.calls) <= failures else 204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_webhook_signed_and_retried(client: TestClient, service) -> None:
    receiver = Receiver(failures=1)
    try:
        job = submit(client, webhook=receiver.url, headers={"Prefer": "wait=60"}).json()
        assert job["status"] == "succeeded"
        wait_for(lambda: len(receiver.calls) >= 2, 15, what="webhook retry")
    finally:
        receiver.server.shutdown()
    secret = service[0].webhook_secret.get_secret_value()
    ids = set()
    for headers, body in receiver.calls:
        assert verify(secret, headers, body)
        assert not verify(secret, headers, body + b" ")
        ids.add(headers["webhook-id"])
        final = json.loads(body)
        assert final["id"] == job["id"] and final["status"] == "succeeded" and final["outputs"]["image"]
    assert ids == {job["id"]}  # same message id on every retry


def test_readyz_and_models_with_worker(client: TestClient, service, redis_conn) -> None:
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ready"] and body["auth"] == "open"
    w = body["workers"][0]
    assert w["device"] == "cpu" and w["info"]["profile"] == "tiny" and "weights" in w["info"]
    assert w["info"]["max_batch"] == service[0].max_face_batch == 3  # DYNFACE_MAX_FACE_BATCH reached it
    # Between jobs RQ's worker key lives worker_ttl + 60 s, and run_worker sets worker_ttl to the job
    # timeout + 60 s (worker/main.py)
    assert redis_conn.ttl(f"rq:worker:{w['worker']}") > service[0].job_timeout_seconds
    models = client.get("/v1/models").json()
    assert models["models"][0]["real"] is False and models["warnings"]


def _types(text: str) -> dict[str, str]:
    return {line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE")}


def test_metrics_after_jobs(client: TestClient, service) -> None:
    settings = service[0]
    store = JobStore(connect(settings), settings)
    port = store.workers()[0]["metrics_port"]
    succeeded = 'dynface_jobs_total{outcome="succeeded",reason="ok"}'

    def scrape() -> str:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text

    def count(text: str) -> float:
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(succeeded))

    before = count(scrape())
    assert submit(client, headers={"Prefer": "wait=60"}).json()["status"] == "succeeded"
    # The wait returns once the job's end is in Redis, and the worker's /metrics counts it from then
    # on (worker/metrics.py): the first scrape has it.
    text = scrape()
    assert count(text) == before + 1
    expected = {
        "dynface_queue_wait_seconds": "histogram",
        "dynface_inference_seconds": "histogram",
        "dynface_job_duration_seconds": "histogram",
        "dynface_stage_seconds": "histogram",
        "dynface_jobs_total": "counter",
        "dynface_faces_per_image": "histogram",
        "dynface_jobs_per_batch": "histogram",
        "dynface_diffusion_steps_per_face": "histogram",
        "dynface_gpu_peak_memory_bytes": "gauge",
        "dynface_model_load_seconds": "gauge",
        "dynface_worker_ready": "gauge",
    }
    types = _types(text)
    for name, kind in expected.items():
        assert types.get(name) == kind, (name, types.get(name))
    assert 'dynface_stage_seconds_count{stage="sample"}' in text
    samples = [line.split(" ") for line in text.splitlines() if line.startswith("dynface_jobs_per_batch")]
    batches = {name: float(value) for name, value in samples}
    # batching is off by default: every job ran alone
    assert batches['dynface_jobs_per_batch_bucket{le="1.0"}'] == batches["dynface_jobs_per_batch_count"] > 0
    assert succeeded in text
    assert 'le="600.0"' in text
    assert "dynface_worker_ready 1.0" in text
    api = client.get("/metrics").text
    assert 'dynface_workers{state="ready"} 1.0' in api or 'dynface_workers{state="busy"} 1.0' in api
    assert _types(api)["dynface_queue_depth"] == "gauge"


# RQ's job_timeout on a real worker: tests/reliability/test_rel_faults.py
# (test_job_timeout_fails_with_timeout_and_worker_stays_healthy).


def test_photo_options_max_faces_min_size_colour_and_crops(client: TestClient) -> None:
    """00.jpg has 4 faces (shorter box sides 43, 35, 32, 39 px with MobileNet, left to right):
    min_face_size=35 ignores the 32 px one, max_faces=2 keeps the largest two of the other 3 (the
    outer ones, not the first two) and reports 1 dropped."""
    photo = (TESTDATA / "photos" / "00.jpg").read_bytes()
    r = submit(
        client,
        data=photo,
        aligned="false",
        max_faces=2,
        min_face_size=35,
        color_correction="adain",
        outputs="image,faces,crops",
        format="png",
        seed=1,
        headers={"Prefer": "wait=60"},
    )
    job = r.json()
    assert r.status_code == 200 and job["status"] == "succeeded", job
    assert job["options"]["max_faces"] == 2 and job["options"]["color_correction"] == "adain"
    left, right = job["faces"]
    assert 53 <= left["box"][0] <= 61 and 389 <= right["box"][0] <= 397, job["faces"]
    assert job["faces_dropped"] == 1
    assert any("3 faces were found; only the 2 largest" in w for w in job["warnings"]), job["warnings"]
    assert len(job["outputs"]["crops"]) == len(job["outputs"]["faces"]) == 2
    crop = client.get(job["outputs"]["crops"][0])
    assert crop.status_code == 200 and crop.headers["content-type"] == "image/png"
    restored = client.get(job["outputs"]["faces"][0])
    crop_px = np.asarray(Image.open(io.BytesIO(crop.content)).convert("RGB"), dtype=np.float64)
    face_px = np.asarray(Image.open(io.BytesIO(restored.content)).convert("RGB"), dtype=np.float64)
    assert crop_px.shape == face_px.shape == (512, 512, 3)
    # adain reached the pipeline: the restored face takes its input crop's per-channel mean and std
    # (up to clipping at 255 on this bright photo; uncorrected, the tiny model is ~75 levels off)
    np.testing.assert_allclose(face_px.mean(axis=(0, 1)), crop_px.mean(axis=(0, 1)), atol=8.0)
    np.testing.assert_allclose(face_px.std(axis=(0, 1)), crop_px.std(axis=(0, 1)), rtol=0.2)
    assert client.get(f"/v1/restorations/{job['id']}/crops/2").status_code == 404
