"""`worker.tasks` in-process, for failures a CPU test machine cannot cause for real (and, without a
worker, the record of a job whose worker was lost), and for interleavings a real worker cannot be
made to take (a scrape of its /metrics the moment a job's end is in Redis).

CUDA out-of-memory cannot be provoked without a GPU, so the real `tiny` pipeline runs on the real
input until its first UNet evaluation, which raises `torch.cuda.OutOfMemoryError` exactly as a
full GPU would; everything around it (Redis record, result keys, metrics) is the production code.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
import redis
import torch
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, CollectorRegistry, Gauge, generate_latest, make_wsgi_app
from prometheus_client.parser import text_string_to_metric_families
from rq.timeouts import JobTimeoutException

from app import lost, queued
from app.jobs import JobStore, connect, make_queue
from app.main import create_app
from app.settings import Settings
from models.pipeline import PhotoOutcome, RestorationPipeline
from tests.conftest import WEIGHTS, aligned_png
from tests.worker.test_batching import restored_photo
from worker import metrics, tasks
from worker.main import TALLY


@pytest.fixture(scope="module")
def pipe() -> RestorationPipeline:
    return RestorationPipeline.from_pretrained("tiny", device="cpu", dtype="fp32", weights_dir=WEIGHTS)


@pytest.fixture
def runtime(settings: Settings, pipe: RestorationPipeline, monkeypatch) -> Iterator[tasks.Runtime]:
    rt = tasks.Runtime(
        pipe=pipe,
        store=JobStore(connect(settings), settings),
        settings=settings,
        worker_name="t",
        device="cpu",
    )
    monkeypatch.setattr(tasks, "_runtime", rt)
    yield rt


def _queued_job(settings: Settings) -> str:
    with TestClient(create_app(settings)) as c:
        r = c.post(
            "/v1/restorations",
            files={"image": ("f.png", aligned_png(), "image/png")},
            data={"aligned": "true"},
        )
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _count(outcome: str, reason: str) -> float:
    return _sample("dynface_jobs_total", outcome=outcome, reason=reason)


def test_a_gpu_out_of_memory_in_the_pipeline_fails_the_job_cuda_oom(
    runtime: tasks.Runtime, settings: Settings, monkeypatch
) -> None:
    """The pipeline turns the allocator's error into its own `DeviceOutOfMemoryError`
    (tests/models/test_photo_batch.py), which the worker records, counts and cleans up after as a
    job-level failure with code `cuda_oom`."""
    calls: list[int] = []

    def oom(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(int(t[0]))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(runtime.pipe, "_eps", oom)
    job_id = _queued_job(settings)
    before = _count("failed", "cuda_oom")
    tasks.restore(job_id)
    assert calls, "the pipeline never reached the sampler"
    record = runtime.store.get(job_id)
    assert record["status"] == "failed" and record["error"]["code"] == "cuda_oom", record
    assert record["stage"] is None and record["completed_at"] >= record["started_at"]
    assert runtime.store.input(job_id) is None
    assert _count("failed", "cuda_oom") == before + 1


def test_unexpected_error_maps_to_internal_without_details(
    runtime: tasks.Runtime, settings: Settings, monkeypatch
) -> None:
    def boom(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(runtime.pipe, "_eps", boom)
    job_id = _queued_job(settings)
    tasks.restore(job_id)
    record = runtime.store.get(job_id)
    assert record["status"] == "failed" and record["error"]["code"] == "internal"
    assert "secret" not in record["error"]["message"]


def test_cancel_after_sampling_still_cancels(runtime: tasks.Runtime, settings: Settings, monkeypatch) -> None:
    """A DELETE answered 202 while the job was past the pipeline's last check (before encoding) ends
    as canceled."""
    job_id = _queued_job(settings)
    real = runtime.pipe.restore_photos

    def restore_then_cancel(*args: Any, **kwargs: Any) -> list[PhotoOutcome]:
        outcomes = real(*args, **kwargs)
        runtime.store.update(job_id, {"cancel_requested": True}, allowed=["processing"])
        return outcomes

    monkeypatch.setattr(runtime.pipe, "restore_photos", restore_then_cancel)
    tasks.restore(job_id)
    record = runtime.store.get(job_id)
    assert record["status"] == "canceled" and record.get("outputs") is None, record
    assert runtime.store.result(job_id, "image") is None


def test_a_requeued_job_waits_afresh_from_its_requeue(make_settings) -> None:
    """A job its lost worker started 400 s ago goes back to the queue now: it used to count its wait from
    that start, so a 300 s queue timeout failed it at the next sweep ("no worker started it"), and its
    record and input kept the TTL of that start. Its wait and both TTLs now restart at the re-queue."""
    s = make_settings(queue_timeout_seconds=300, job_timeout_seconds=600, max_retries=1)
    store = JobStore(connect(s), s)
    queue = make_queue(store.redis, s)
    now = time.time()
    for job_id in ("requeued", "requeued-long-ago"):
        store.create(job_id, b"x", {"id": job_id, "status": "queued", "created_at": now - 1000}, queue)
        assert store.start(job_id, {"status": "processing", "started_at": now - 400, "attempts": 1})
        for key in (store.key("job", job_id), store.key("input", job_id)):
            store.redis.expire(key, 5)  # as if that start's TTL had nearly run out
        lost.fail_lost(store, s, TALLY, job_id, retries_left=1)
    record = store.get("requeued")
    assert record["status"] == "queued" and "was lost" in record["warnings"][0], record
    for key in (store.key("job", "requeued"), store.key("input", "requeued")):
        assert store.redis.ttl(key) > s.record_ttl_seconds - 60, key
    store.redis.hset(store.key("job", "requeued-long-ago"), "queued_at", json.dumps(now - 301))
    assert queued.sweep(store, queue, s) == ["requeued-long-ago"]
    assert store.get("requeued")["status"] == "queued"


def test_a_requeued_jobs_queue_wait_counts_from_its_requeue(
    runtime: tasks.Runtime, settings: Settings, monkeypatch
) -> None:
    """A job submitted 1000 s ago whose worker was lost just now waits afresh, as the queue timeout
    counts it: its record's and the metric's queue wait leave out the lost attempt (they used to count
    from its submission)."""
    job_id = _queued_job(settings)
    store = runtime.store
    store.redis.hset(store.key("job", job_id), "created_at", json.dumps(time.time() - 1000))
    assert store.start(job_id, {"status": "processing", "started_at": time.time() - 900, "attempts": 1})
    lost.fail_lost(store, settings, TALLY, job_id, retries_left=1)  # back to `queued`, waiting from now
    monkeypatch.setattr(runtime.pipe, "restore_photos", lambda requests: [restored_photo() for _ in requests])
    waited = _sample("dynface_queue_wait_seconds_sum")
    tasks.restore(job_id)
    record = store.get(job_id)
    assert record["status"] == "succeeded" and record["attempts"] == 2, record
    assert 0 <= record["timings"]["queue_wait_seconds"] < 60, record["timings"]
    assert 0 <= _sample("dynface_queue_wait_seconds_sum") - waited < 60


class _Gate:
    """Stands in for worker.metrics' lock and says when someone had to wait for it."""

    def __init__(self, waited: threading.Event) -> None:
        self._lock = threading.Lock()
        self._waited = waited

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(blocking=False):
            return True
        self._waited.set()
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _scraped(text: str, name: str, **labels: str) -> float:
    families = text_string_to_metric_families(text)
    return sum(s.value for f in families for s in f.samples if s.name == name and s.labels == labels)


def test_a_job_is_counted_before_anyone_can_see_it_ended(
    runtime: tasks.Runtime, settings: Settings, monkeypatch
) -> None:
    """A client woken by a job's end (`Prefer: wait`, the done channel) that scrapes the worker's
    /metrics at once finds the job counted. It was counted just after `store.finish` published the end,
    so such a scrape could miss it. Here a scrape starts the moment the end is in Redis, and the worker
    goes on only once that scrape has its answer or is waiting for the worker."""
    job_id = _queued_job(settings)
    answered_or_waiting = threading.Event()
    monkeypatch.setattr(metrics, "ENDING", _Gate(answered_or_waiting))
    scrapes: list[str] = []

    def scrape() -> None:
        try:
            scrapes.append(generate_latest(metrics.SCRAPED).decode())  # what /metrics answers
        finally:
            answered_or_waiting.set()

    scraper = threading.Thread(target=scrape)
    real_finish = runtime.store.finish

    def finish_then_scrape(*args: Any, **kwargs: Any) -> dict[str, Any] | None:
        record = real_finish(*args, **kwargs)
        scraper.start()
        answered_or_waiting.wait()
        return record

    monkeypatch.setattr(runtime.store, "finish", finish_then_scrape)
    succeeded = _count("succeeded", "ok")
    sampled = _sample("dynface_stage_seconds_count", stage="sample")
    tasks.restore(job_id)
    scraper.join()
    assert runtime.store.get(job_id)["status"] == "succeeded"
    (text,) = scrapes
    assert _scraped(text, "dynface_jobs_total", outcome="succeeded", reason="ok") == succeeded + 1
    assert _scraped(text, "dynface_stage_seconds_count", stage="sample") == sampled + 1


def test_an_end_whose_reply_was_lost_is_counted_and_told_once(
    runtime: tasks.Runtime, settings: Settings, monkeypatch
) -> None:
    """The success's write lands but its reply is lost (a Redis timeout): the worker reads the record
    back, finds the success there, and counts it, once, and tells it. It used to end the job as
    `internal` instead, which found it already ended: counted nowhere and told to no one."""
    job_id = _queued_job(settings)
    real_finish = runtime.store.finish
    landed: list[str | None] = []

    def reply_lost_once(*args: Any, **kwargs: Any) -> dict[str, Any] | None:
        record = real_finish(*args, **kwargs)
        landed.append(record and record["status"])
        if len(landed) == 1:
            raise redis.exceptions.TimeoutError("Timeout reading from socket")
        return record

    told: list[str] = []
    monkeypatch.setattr(runtime.store, "finish", reply_lost_once)
    monkeypatch.setattr(tasks, "notify", lambda record, settings: told.append(record["status"]))
    succeeded, internal = _count("succeeded", "ok"), _count("failed", "internal")
    inference = _sample("dynface_inference_seconds_count")
    tasks.restore(job_id)
    assert landed == ["succeeded"]  # no `internal` end was written after it
    assert runtime.store.get(job_id)["status"] == "succeeded"
    assert _count("succeeded", "ok") == succeeded + 1 and _count("failed", "internal") == internal
    assert _sample("dynface_inference_seconds_count") == inference + 1
    assert told == ["succeeded"]


def _first_finish_lost(runtime: tasks.Runtime, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The job store's first `finish` fails before reaching Redis (a reset connection), later ones go
    through; returns the statuses the calls tried to write."""
    real_finish = runtime.store.finish
    tries: list[str] = []

    def lost_once(job_id: str, fields: dict[str, Any], *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        tries.append(fields["status"])
        if len(tries) == 1:
            raise redis.exceptions.ConnectionError("Connection reset by peer")
        return real_finish(job_id, fields, *args, **kwargs)

    monkeypatch.setattr(runtime.store, "finish", lost_once)
    return tries


def test_an_end_that_never_landed_is_not_counted(
    runtime: tasks.Runtime, settings: Settings, monkeypatch
) -> None:
    """The success's write never reaches Redis: the job ends `internal` and is counted as that alone.
    Its success metrics (stage times, inference share) used to be counted before the write, for a job
    that did not succeed."""
    job_id = _queued_job(settings)
    tries = _first_finish_lost(runtime, monkeypatch)
    succeeded, internal = _count("succeeded", "ok"), _count("failed", "internal")
    inference = _sample("dynface_inference_seconds_count")
    sampled = _sample("dynface_stage_seconds_count", stage="sample")
    tasks.restore(job_id)
    assert tries == ["succeeded", "failed"]
    record = runtime.store.get(job_id)
    assert record["status"] == "failed" and record["error"]["code"] == "internal", record
    assert _count("failed", "internal") == internal + 1 and _count("succeeded", "ok") == succeeded
    assert _sample("dynface_inference_seconds_count") == inference
    assert _sample("dynface_stage_seconds_count", stage="sample") == sampled


def test_an_end_that_cannot_be_read_back_keeps_its_error(runtime: tasks.Runtime, monkeypatch) -> None:
    """An end's write fails and reading the record back fails too: the write's error is what
    `_finish` raises (the job then ends `internal`), nothing is counted, and the lock that scrapes
    wait for is free again."""
    lost = redis.exceptions.ConnectionError("Connection reset by peer")

    def finish(*args: Any, **kwargs: Any) -> None:
        raise lost

    def get(job_id: str) -> None:
        raise redis.exceptions.TimeoutError("Timeout reading from socket")

    monkeypatch.setattr(runtime.store, "finish", finish)
    monkeypatch.setattr(runtime.store, "get", get)
    succeeded = _count("succeeded", "ok")
    with pytest.raises(redis.exceptions.ConnectionError) as raised:
        tasks._finish(runtime, "unread", tasks._End("succeeded"))
    assert raised.value is lost
    assert _count("succeeded", "ok") == succeeded
    assert metrics.ENDING.acquire(blocking=False)
    metrics.ENDING.release()


def test_a_timeout_while_an_end_is_read_back_ends_the_job_timeout(
    runtime: tasks.Runtime, settings: Settings, monkeypatch
) -> None:
    """RQ's job timeout (SIGALRM) strikes while a failed end is read back: the job ends `timeout`. The
    read-back swallowed it and re-raised the write's Redis error, so the job ended `internal`."""
    job_id = _queued_job(settings)
    real_get = runtime.store.get
    tries = _first_finish_lost(runtime, monkeypatch)

    def get(job_id: str) -> dict[str, Any] | None:
        if tries == ["succeeded"]:  # reading back the end that failed
            raise JobTimeoutException("Task exceeded maximum timeout value (120 seconds)")
        return real_get(job_id)

    monkeypatch.setattr(runtime.store, "get", get)
    tasks.restore(job_id)
    assert tries == ["succeeded", "failed"]
    record = runtime.store.get(job_id)
    assert record["status"] == "failed" and record["error"]["code"] == "timeout", record


def test_cancel_checks_that_redis_fails_do_not_fail_the_job(
    runtime: tasks.Runtime, settings: Settings, monkeypatch, caplog
) -> None:
    """The pipeline asks whether a job was canceled at every stage and background tile. A Redis error
    there is no PipelineError: it escaped `restore_photos` and ended every job of the batch `internal`.
    A check that cannot be read now means "not canceled", before storing the results too."""
    job_id = _queued_job(settings)
    checks: list[str] = []

    def unreadable(job_id: str) -> bool:
        checks.append(job_id)
        raise redis.exceptions.TimeoutError("Timeout reading from socket")

    monkeypatch.setattr(runtime.store, "cancel_requested", unreadable)
    tasks.restore(job_id)
    record = runtime.store.get(job_id)
    assert record["status"] == "succeeded", record
    assert len(checks) >= 3  # the pipeline's own checks, and the one before storing
    assert "cancel not checked" in caplog.text


def test_progress_that_redis_fails_to_store_does_not_fail_the_job(
    runtime: tasks.Runtime, settings: Settings, monkeypatch, caplog
) -> None:
    """Progress is written at every stage and diffusion step; a Redis error there (a blip, a Sentinel
    failover) escaped `restore_photos` and ended every job of the batch `internal`."""
    job_id = _queued_job(settings)
    writes: list[dict] = []

    def unwritable(job_id: str, fields: dict, rq_job: object) -> None:
        writes.append(fields)
        raise redis.exceptions.ConnectionError("Connection reset by peer")

    monkeypatch.setattr(runtime.store, "progress", unwritable)
    tasks.restore(job_id)
    record = runtime.store.get(job_id)
    assert record["status"] == "succeeded", record
    assert any(w["stage"] == "sample" for w in writes)
    assert "progress not stored" in caplog.text


def test_a_scrape_waits_for_a_job_end_only_so_long(monkeypatch, caplog) -> None:
    """A hung Redis can hold a job's end, and the lock scrapes wait for, for several redis timeouts:
    longer than Prometheus waits for a scrape (10 s by default). Past `SCRAPE_WAIT_SECONDS` a scrape
    is answered without the lock."""
    monkeypatch.setattr(metrics, "SCRAPE_WAIT_SECONDS", 0.05)
    held, release = threading.Event(), threading.Event()

    def a_hung_end() -> None:
        with metrics.ENDING:
            held.set()
            release.wait(30)  # a scrape that waits for the lock all the same answers only after this

    holder = threading.Thread(target=a_hung_end)
    holder.start()
    try:
        held.wait()
        text = generate_latest(metrics.SCRAPED).decode()
        answered_while_held = holder.is_alive()
    finally:
        release.set()
        holder.join()
    assert answered_while_held
    assert "dynface_jobs_total" in text
    assert "held /metrics" in caplog.text


def test_a_scrape_by_name_answers_that_metric_alone() -> None:
    """`/metrics?name[]=…` (prometheus_client's exposition) reads only the named metrics, of the
    registry served."""
    registry = CollectorRegistry()
    Gauge("wanted", "Asked for.", registry=registry).set(1)
    Gauge("other", "Not asked for.", registry=registry).set(2)
    app = make_wsgi_app(metrics._Scraped(registry))
    environ = {"QUERY_STRING": "name[]=wanted"}
    setup_testing_defaults(environ)
    body = b"".join(app(environ, lambda status, headers: None)).decode()
    assert [f.name for f in text_string_to_metric_families(body)] == ["wanted"]


def test_a_delete_during_detection_ends_the_job_before_dblm(
    runtime: tasks.Runtime, settings: Settings, monkeypatch
) -> None:
    """A DELETE answered while the photo's faces are detected and aligned: the job ends canceled before
    DBLM (R(y), then the sampler) runs on them. It used to run DBLM's first chunk before looking."""
    job_id = _queued_job(settings)
    pipe = runtime.pipe
    detect, guide = pipe._detect_and_align, pipe._guide
    guided: list[int] = []

    def detect_then_delete(*args: Any) -> Any:
        runtime.store.update(job_id, {"cancel_requested": True}, allowed=["processing"])
        return detect(*args)

    monkeypatch.setattr(pipe, "_detect_and_align", detect_then_delete)
    monkeypatch.setattr(pipe, "_guide", lambda y, *args: guided.append(len(y)) or guide(y, *args))
    canceled = _count("canceled", "canceled")
    tasks.restore(job_id)
    record = runtime.store.get(job_id)
    assert record["status"] == "canceled" and record.get("outputs") is None, record
    assert guided == []
    assert _count("canceled", "canceled") == canceled + 1
