"""A job whose id is in RQ's queue twice runs once, with real RQ worker code in this process on real
Redis (the pipeline stands in). A second entry can come from two cleanups of one expired execution
(a worker's reaper and RQ's own maintenance in another worker, or `rq info`), each re-queueing the
job; here it is pushed by hand. Whatever takes the second entry — another worker while the first
runs the job, the same worker's batch, any worker after the job ended — must neither run the job
again nor disturb the attempt that runs it: its record, RQ's job and its execution stay as that
attempt has them (so a later loss of its worker is still found), nothing is failed or counted.

Two real worker processes taking both entries at once: tests/worker/test_recovery.py."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from app import lost
from app.main import create_app
from app.settings import Settings
from tests.conftest import aligned_png
from tests.worker.test_batching import (
    RestoresEveryPhoto,
    bind_runtime,
    in_process_worker,
    rq_status,
    run_next_job,
    submit,
)
from worker.main import TALLY


class CountingPipeline(RestoresEveryPhoto):
    """`RestoresEveryPhoto`, counting the photos it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.photos = 0

    def restore_photos(self, requests: list[Any]) -> list[Any]:
        self.photos += len(requests)
        return super().restore_photos(requests)


def _jobs_counted() -> float:
    """Every job end this process's worker metrics counted, and every start (queue wait observed)."""
    ends = sum(s.value for m in REGISTRY.collect() if m.name == "dynface_jobs" for s in m.samples)
    return ends + (REGISTRY.get_sample_value("dynface_queue_wait_seconds_count") or 0.0)


def test_a_second_entry_of_a_running_jobs_id_neither_runs_it_nor_disturbs_it(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker A runs the job (its execution kept alive, as its heartbeat does) when the job's id is
    in the queue a second time. A reaper round leaves the running job's record alone (it used to put
    it back to `queued`), and worker B, dequeuing that entry, skips it (it used to run the job a second
    time, as "attempt 2"). Then A's worker is lost: RQ still finds that, and the job is re-queued."""
    settings = make_settings(heartbeat_ttl_seconds=60, max_retries=1)
    with TestClient(create_app(settings)) as c:
        job_id = submit(c, aligned_png(), aligned="true")
    store, queue, a = in_process_worker(settings, "a")
    _, _, b = in_process_worker(settings, "b")
    dequeued = Queue.dequeue_any([queue], None, connection=queue.connection, serializer=JSONSerializer)
    assert dequeued is not None
    job = dequeued[0]
    execution = a.prepare_execution(job)
    a.prepare_job_execution(job, remove_from_intermediate_queue=True)
    fields = {"status": "processing", "attempts": 1, "worker": a.name, "execution": execution.composite_key}
    assert store.start(job_id, fields)
    running = store.get(job_id)
    store.redis.rpush(queue.key, job_id)  # the second entry
    counted = _jobs_counted()

    lost.reap(store, queue, settings, TALLY)
    assert store.get(job_id) == running

    pipe = CountingPipeline()
    bind_runtime(monkeypatch, b, pipe)
    assert run_next_job(b, queue) == job_id
    assert pipe.photos == 0
    assert store.get(job_id) == running
    assert rq_status(queue, job_id) == JobStatus.STARTED
    assert StartedJobRegistry(queue=queue).get_job_ids(cleanup=False) == [job_id]  # A's execution alone
    assert queue.job_ids == [] and FailedJobRegistry(queue=queue).get_job_ids(cleanup=False) == []
    assert _jobs_counted() == counted

    # A's worker is lost: its execution expires, and the job goes back to the queue once.
    store.redis.zadd(StartedJobRegistry(queue=queue).key, {execution.composite_key: 1})
    lost.reap(store, queue, settings, TALLY)
    record = store.get(job_id)
    assert record["status"] == "queued" and any("attempt 1 was lost" in w for w in record["warnings"]), record
    assert queue.job_ids == [job_id]
    assert run_next_job(b, queue) == job_id
    record = store.get(job_id)
    assert record["status"] == "succeeded" and record["attempts"] == 2 and record["worker"] == b.name, record
    assert pipe.photos == 1


def test_a_second_entry_runs_neither_in_the_same_batch_nor_after_the_job_ended(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both entries of a waiting job's id are within reach of a batching worker's claim: the job
    rides along once (it used to be started twice in the batch, as "attempt 2"), and the claim takes
    every entry of its id. One left behind (pushed again after the job succeeded) is skipped: no
    second run, no failure in RQ, no count."""
    settings = make_settings(worker_batch_max_jobs=3, worker_batch_wait_seconds=0)
    with TestClient(create_app(settings)) as c:
        first, job_id = (submit(c, aligned_png(), aligned="true") for _ in range(2))
    store, queue, worker = in_process_worker(settings)
    store.redis.rpush(queue.key, job_id)
    pipe = CountingPipeline()
    bind_runtime(monkeypatch, worker, pipe)

    assert run_next_job(worker, queue) == first
    assert pipe.photos == 2
    record = store.get(job_id)
    assert record["status"] == "succeeded" and record["attempts"] == 1, record
    assert record["timings"]["batch_jobs"] == 2 and not any("lost" in w for w in record["warnings"]), record
    assert queue.job_ids == []

    store.redis.rpush(queue.key, job_id)
    counted = _jobs_counted()
    assert run_next_job(worker, queue) == job_id
    assert pipe.photos == 2 and store.get(job_id) == record
    assert rq_status(queue, job_id) == JobStatus.FINISHED
    assert FailedJobRegistry(queue=queue).get_job_ids(cleanup=False) == []
    assert StartedJobRegistry(queue=queue).get_job_ids(cleanup=False) == []
    assert _jobs_counted() == counted


def test_a_job_run_again_after_its_start_failed_names_the_execution_running_it(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis error takes the dequeued job out of RQ's intermediate list (`DynfaceWorker._take`), after
    RQ registered its execution: the job does not run, and its execution expires for the reaper, which
    puts the job back in the queue. When the same worker runs it again, its record names the execution
    now running it; it used to name the dead one, so that a second entry of its id in the queue had the
    reaper put the running job back to `queued`."""
    settings = make_settings(heartbeat_ttl_seconds=1)
    with TestClient(create_app(settings)) as c:
        job_id = submit(c, aligned_png(), aligned="true")
    store, queue, worker = in_process_worker(settings)
    started: list[Execution] = []
    real_prepare = worker.prepare_execution

    def prepare_and_keep(job: Job) -> Execution:
        started.append(real_prepare(job))
        return started[-1]

    seen: dict[str, Any] = {}

    class SecondEntryWhileRunning(RestoresEveryPhoto):
        def restore_photos(self, requests: list[Any]) -> list[Any]:
            seen["named"] = store.get(job_id)["execution"]
            store.redis.rpush(queue.key, job_id)
            lost.reap(store, queue, settings, TALLY)
            seen["status"] = store.get(job_id)["status"]
            return super().restore_photos(requests)

    bind_runtime(monkeypatch, worker, SecondEntryWhileRunning())
    real_lrem = worker.connection.lrem
    calls = 0

    def lrem_failing_once(*args: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise redis.exceptions.ConnectionError("connection reset")
        return real_lrem(*args)

    monkeypatch.setattr(worker, "prepare_execution", prepare_and_keep)
    monkeypatch.setattr(worker.connection, "lrem", lrem_failing_once)
    with pytest.raises(redis.exceptions.ConnectionError):
        run_next_job(worker, queue)
    assert store.get(job_id)["status"] == "queued"
    time.sleep(settings.heartbeat_ttl_seconds + 0.2)
    lost.reap(store, queue, settings, TALLY)  # the expired execution goes
    lost.return_stranded(store, settings, queue, after=0)  # the job back in the queue without waiting
    assert queue.job_ids == [job_id]

    # The run under test must not expire as the first was made to: its 1 s ran out before the reap in
    # restore_photos on a loaded machine (the suite's two processes on two cores).
    monkeypatch.setattr(worker, "get_heartbeat_ttl", lambda job, working_time=0.0: 60)
    assert run_next_job(worker, queue) == job_id
    assert seen == {"named": started[-1].composite_key, "status": "processing"}
    record = store.get(job_id)
    assert record["status"] == "succeeded" and record["attempts"] == 1, record
