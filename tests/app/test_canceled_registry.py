"""RQ's canceled-job registry (`rq:canceled:<queue>`, a sorted set) does not grow with every job that
ends while queued. RQ's `Job.cancel()` files the job there, RQ never trims it (that registry's cleanup
does nothing) and the key has no TTL, so each DELETE of a queued job and each queue timeout used to
leave an entry for good, in a Redis that runs with maxmemory and noeviction. All against real Redis."""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi.testclient import TestClient
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from app import queued
from app.jobs import JobStore, connect, make_queue
from app.settings import Settings
from tests.app.test_api import submit


def registry_key(settings: Settings) -> str:
    return f"rq:canceled:{settings.queue_name}"


def rq_status(redis_conn, job_id: str) -> JobStatus:
    return Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer).get_status()


def test_deleting_queued_jobs_leaves_nothing_in_rqs_canceled_registry(
    client: TestClient, redis_conn, settings: Settings
) -> None:
    ids = [submit(client).json()["id"] for _ in range(3)]
    for job_id in ids:
        r = client.delete(f"/v1/restorations/{job_id}")
        assert r.status_code == 200 and r.json()["status"] == "canceled", r.text
    assert redis_conn.zcard(registry_key(settings)) == 0
    assert not redis_conn.exists(registry_key(settings))
    # The rest of RQ's cancel still happened: off the queue, its RQ job marked canceled.
    assert redis_conn.llen(f"rq:queue:{settings.queue_name}") == 0
    for job_id in ids:
        assert rq_status(redis_conn, job_id) == JobStatus.CANCELED


def test_a_queue_timeout_leaves_nothing_in_rqs_canceled_registry(
    make_settings: Callable[..., Settings], redis_conn
) -> None:
    s = make_settings(queue_timeout_seconds=600)
    store = JobStore(connect(s), s)
    queue = make_queue(store.redis, s)
    now = time.time()
    for job_id in ("waited-1", "waited-2"):
        store.create(job_id, b"x", {"id": job_id, "status": "queued", "created_at": now - 601}, queue)
    assert sorted(queued.sweep(store, queue, s)) == ["waited-1", "waited-2"]
    assert store.get("waited-1")["status"] == "failed"
    assert redis_conn.zcard(registry_key(s)) == 0
    assert queue.count == 0
    assert rq_status(redis_conn, "waited-1") == JobStatus.CANCELED


def test_the_sweep_trims_entries_earlier_versions_left(
    make_settings: Callable[..., Settings], redis_conn
) -> None:
    """Deployments that ran the leaking version hold one entry per cancel and queue timeout: each
    sweep round drops those older than the record TTL (their RQ jobs are gone), younger ones stay."""
    s = make_settings(queue_timeout_seconds=600)
    store = JobStore(connect(s), s)
    queue = make_queue(store.redis, s)
    now = time.time()
    ttl = s.record_ttl_seconds
    redis_conn.zadd(
        registry_key(s),
        {"old-1": now - ttl - 86_400 * 30, "old-2": now - ttl - 5, "young": now - ttl + 60, "new": now},
    )
    assert queued.sweep(store, queue, s) == []
    assert sorted(m.decode() for m in redis_conn.zrange(registry_key(s), 0, -1)) == ["new", "young"]
    # While another API process holds this round's lock, that one trims: this one leaves the set be.
    store.redis.set(store.key("queue-sweep-lock", queue.name), "another API process", px=60_000)
    redis_conn.zadd(registry_key(s), {"old-3": now - ttl - 5})
    assert queued.sweep(store, queue, s) == []
    assert redis_conn.zscore(registry_key(s), "old-3") is not None
