"""`worker.tasks` in-process, for failures a CPU test machine cannot cause for real (and, without a
worker, the record of a job whose worker was lost).

CUDA out-of-memory cannot be provoked without a GPU, so the real `tiny` pipeline runs on the real
input until its first UNet evaluation, which raises `torch.cuda.OutOfMemoryError` exactly as a
full GPU would; everything around it (Redis record, result keys, metrics) is the production code.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from app import queued
from app.jobs import JobStore, connect, make_queue
from app.main import create_app
from app.settings import Settings
from models.pipeline import PhotoOutcome, RestorationPipeline
from tests.conftest import WEIGHTS, aligned_png
from worker import tasks


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


def _count(outcome: str, reason: str) -> float:
    return REGISTRY.get_sample_value("dynface_jobs_total", {"outcome": outcome, "reason": reason}) or 0.0


def test_cuda_oom_maps_to_cuda_oom(runtime: tasks.Runtime, settings: Settings, monkeypatch) -> None:
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
    """A DELETE answered 202 while the job was past its last diffusion step ends as canceled."""
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
        tasks.fail_lost(store, s, job_id, retries_left=1)
    record = store.get("requeued")
    assert record["status"] == "queued" and "was lost" in record["warnings"][0], record
    for key in (store.key("job", "requeued"), store.key("input", "requeued")):
        assert store.redis.ttl(key) > s.record_ttl_seconds - 60, key
    store.redis.hset(store.key("job", "requeued-long-ago"), "queued_at", json.dumps(now - 301))
    assert queued.sweep(store, queue, s) == ["requeued-long-ago"]
    assert store.get("requeued")["status"] == "queued"
