"""A lost worker's job, heartbeats and the worker's registry entry, with real RQ worker code in this
process on real Redis: whoever cleans up RQ's registries, the job's record follows what RQ did; a
stalled RQ connection stops neither heartbeats nor the reaper; the background refresh never
publishes a state older than the worker's.

A worker that "dies" here is one that took a job (RQ's execution started, our record `processing`)
and never beats again; heartbeat_ttl 1 s lets its execution expire at once."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from redis.client import PubSubWorkerThread
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.worker.base import WorkerStatus

from app import lost
from app.jobs import JobStore
from app.main import create_app
from app.settings import Settings
from tests.conftest import aligned_png, wait_for
from tests.worker.test_batching import (
    RestoresEveryPhoto,
    bind_runtime,
    in_process_worker,
    rq_status,
    run_next_job,
    submit,
)
from worker import main as worker_main
from worker.main import TALLY, DynfaceWorker, _background


@contextmanager
def unanswering_redis(timeout: float = 5) -> Iterator[redis.Redis]:
    """A client of a server that accepts connections and never answers: a stalled socket. Its
    timeout (5 s by default) stands in for RQ's (minutes)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        client = redis.Redis(host="127.0.0.1", port=server.getsockname()[1], socket_timeout=timeout)
        try:
            yield client
        finally:
            client.close()


def queued_jobs(settings: Settings, n: int = 1) -> list[str]:
    with TestClient(create_app(settings)) as c:
        return [submit(c, aligned_png(), aligned="true") for _ in range(n)]


def _reap(worker: DynfaceWorker, queue: Queue) -> None:
    """One reaper round, as a worker's background thread runs it (without its lock)."""
    lost.reap(worker.store, queue, worker.settings, TALLY)


def take_and_lose(worker: DynfaceWorker, queue: Queue, store: JobStore) -> str:
    """The next job, taken by a worker that then dies with it; its id once RQ sees its execution
    expired."""
    dequeued = Queue.dequeue_any([queue], None, connection=queue.connection, serializer=JSONSerializer)
    assert dequeued is not None
    job = dequeued[0]
    worker.prepare_execution(job)
    worker.prepare_job_execution(job, remove_from_intermediate_queue=True)
    assert store.start(job.id, {"status": "processing", "attempts": 1, "worker": worker.name})
    wait_for(lambda: queue.started_job_registry.get_expired_job_ids(), 10, what="its execution expired")
    return job.id


def list_running_jobs_as_rq_info_does(queue: Queue) -> int:
    """`rq info` and dashboards count running jobs with `StartedJobRegistry.count`, which first
    runs RQ's cleanup of expired executions, without our exception handler."""
    return queue.started_job_registry.count


def test_a_lost_job_rq_failed_without_us_fails_with_worker_lost(
    make_settings: Callable[..., Settings],
) -> None:
    """No retries left: RQ's cleanup run by `rq info` moves the job to its FailedJobRegistry. The
    next reaper round, with nothing left to clean up itself, still ends the record: failed with
    `worker_lost`, not `processing` until it expires (a 404)."""
    settings = make_settings(max_retries=0, heartbeat_ttl_seconds=1)
    queued_jobs(settings)
    store, queue, worker = in_process_worker(settings)
    job_id = take_and_lose(worker, queue, store)
    assert list_running_jobs_as_rq_info_does(queue) == 0
    assert rq_status(queue, job_id) == JobStatus.FAILED and store.get(job_id)["status"] == "processing"

    _reap(worker, queue)
    record = store.get(job_id)
    assert record["status"] == "failed" and record["error"]["code"] == "worker_lost", record


def test_a_lost_job_rq_requeued_without_us_waits_as_queued(make_settings: Callable[..., Settings]) -> None:
    """Retries left: RQ's cleanup run by `rq info` puts the job back in the queue. The next reaper
    round puts its record back to `queued` with a warning, waiting from now: the queue timeout
    applies to it again."""
    settings = make_settings(max_retries=1, heartbeat_ttl_seconds=1)
    queued_jobs(settings)
    store, queue, worker = in_process_worker(settings)
    job_id = take_and_lose(worker, queue, store)
    list_running_jobs_as_rq_info_does(queue)
    assert queue.job_ids == [job_id] and store.get(job_id)["status"] == "processing"

    before = time.time()
    _reap(worker, queue)
    record = store.get(job_id)
    assert record["status"] == "queued" and any("lost" in w for w in record["warnings"]), record
    assert store.waiting_since([job_id])[job_id] >= before  # what the queue-timeout sweep reads
    assert queue.job_ids == [job_id]


def test_a_lost_job_rq_requeued_without_us_says_so_when_it_runs_again(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker takes the job RQ re-queued before any reaper round noticed: the attempt it starts
    is the second, and the job's record says the first one's worker was lost."""
    settings = make_settings(max_retries=1, heartbeat_ttl_seconds=1)
    queued_jobs(settings)
    store, queue, worker = in_process_worker(settings)
    job_id = take_and_lose(worker, queue, store)
    list_running_jobs_as_rq_info_does(queue)

    bind_runtime(monkeypatch, worker, RestoresEveryPhoto())
    assert run_next_job(worker, queue) == job_id
    record = store.get(job_id)
    assert record["status"] == "succeeded" and record["attempts"] == 2, record
    assert any("attempt 1 was lost" in w for w in record["warnings"]), record["warnings"]


def test_a_requeued_job_a_worker_takes_meanwhile_stays_processing(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reaper reads the record (`processing`, RQ job in the queue), and another worker takes
    and starts the job before the reaper puts the record back to `queued`: the record of the
    attempt now running is left alone — `processing`, its progress kept, no "lost" warning for it,
    never `queued` even for a moment (a DELETE then would cancel a running job)."""
    settings = make_settings(max_retries=1, heartbeat_ttl_seconds=1)
    queued_jobs(settings)
    store, queue, worker = in_process_worker(settings)
    job_id = take_and_lose(worker, queue, store)
    list_running_jobs_as_rq_info_does(queue)
    real_requeue = lost.requeue_lost

    def another_worker_takes_it_first(*args: Any, waiting_in: str | None = None) -> None:
        assert Queue.dequeue_any([queue], None, connection=queue.connection, serializer=JSONSerializer)
        assert store.start(
            job_id, {"status": "processing", "attempts": 2, "worker": "other", "stage": "sample"}
        )
        real_requeue(*args, waiting_in=waiting_in)

    monkeypatch.setattr(lost, "requeue_lost", another_worker_takes_it_first)
    _reap(worker, queue)
    record = store.get(job_id)
    assert record["status"] == "processing" and record["worker"] == "other", record
    assert record["stage"] == "sample" and "queued_at" not in record, record
    assert not any("lost" in w for w in record.get("warnings") or []), record


def test_execution_heartbeats_do_not_wait_on_a_stalled_rq_connection(
    make_settings: Callable[..., Settings],
) -> None:
    """RQ's client waits minutes for a reply (its socket timeout covers its blocking dequeue): a
    beat sent through it on a stalled socket would outlast heartbeat_ttl, and the reaper would
    re-queue a job still running. The beat goes through the job store's client instead."""
    settings = make_settings()
    queued_jobs(settings)
    store, queue, worker = in_process_worker(settings)
    dequeued = Queue.dequeue_any([queue], None, connection=queue.connection, serializer=JSONSerializer)
    assert dequeued is not None
    job = dequeued[0]
    execution = worker.prepare_execution(job)
    worker.prepare_job_execution(job, remove_from_intermediate_queue=True)
    registry_key = queue.started_job_registry.key
    expires = store.redis.zscore(registry_key, execution.composite_key)
    time.sleep(1.1)

    # A beat through the stalled client would take its whole 30 s timeout; one through the store's
    # takes a round trip to the real Redis. 10 s tells the two apart with room for a loaded machine.
    with unanswering_redis(timeout=30) as stalled:
        worker.connection = stalled
        t0 = time.monotonic()
        worker.maintain_heartbeats(job, execution)
        assert time.monotonic() - t0 < 10
    assert store.redis.zscore(registry_key, execution.composite_key) >= expires + 1


def test_a_stalled_rq_connection_stops_neither_the_registry_refresh_nor_the_reaper(
    make_settings: Callable[..., Settings],
) -> None:
    """The background thread keeps the worker's registry entry fresh (/readyz) and reaps a lost
    worker's job while every call on RQ's client would hang."""
    settings = make_settings(
        max_retries=0, heartbeat_ttl_seconds=1, heartbeat_interval_seconds=0.2, reaper_interval_seconds=0.2
    )
    queued_jobs(settings)
    store, queue, worker = in_process_worker(settings)
    job_id = take_and_lose(worker, queue, store)
    worker.registry_fields = {"name": worker.name}
    worker.announce("ready")

    def heartbeat_at() -> float:
        return {w["name"]: w["heartbeat_at"] for w in store.workers()}[worker.name]

    announced = heartbeat_at()
    stop = threading.Event()
    with unanswering_redis() as stalled:
        worker.connection = stalled
        thread = threading.Thread(target=_background, args=(worker, stop), daemon=True)
        thread.start()
        try:
            # Rounds run every 0.2 s; the generous deadline is for a loaded machine, not the design.
            wait_for(lambda: store.get(job_id)["status"] == "failed", 30, what="the lost job reaped")
            wait_for(lambda: heartbeat_at() > announced, 30, what="the registry entry refreshed")
        finally:
            stop.set()
            thread.join(10)
    assert store.get(job_id)["error"]["code"] == "worker_lost"


class _Interleaved(dict[str, Any]):
    """A worker's registry fields that run `meanwhile` right after a field is read: the main
    thread acting at that moment."""

    def __init__(self, fields: dict[str, Any], meanwhile: Callable[[], None]) -> None:
        super().__init__(fields)
        self.meanwhile = meanwhile

    def get(self, key: str, default: Any = None) -> Any:
        value = super().get(key, default)
        self.meanwhile()
        return value


def test_the_background_refresh_never_publishes_an_older_state(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The main thread announces `busy` (it took a job) while the background thread refreshes the
    `ready` entry, whether as it reads the fields or while its write is on its way to Redis: Redis
    and the worker end with `busy`."""
    settings = make_settings()
    store, _, worker = in_process_worker(settings)
    takes_a_job = threading.Thread(target=worker.announce, args=("busy",))

    def meanwhile() -> None:
        if threading.current_thread() is not takes_a_job and takes_a_job.ident is None:
            takes_a_job.start()
            takes_a_job.join(0.5)  # done at once, or waiting for the refresh to finish

    worker.registry_fields = _Interleaved({"name": worker.name, "state": "ready"}, meanwhile)
    real_register = store.register_worker

    def register_meanwhile(name: str, fields: dict[str, Any]) -> None:
        meanwhile()
        real_register(name, fields)

    monkeypatch.setattr(store, "register_worker", register_meanwhile)
    worker.republish()
    takes_a_job.join(10)
    assert {w["name"]: w["state"] for w in store.workers()}[worker.name] == "busy"
    assert worker.registry_fields["state"] == "busy"


def test_a_worker_whose_rq_state_write_fails_after_a_job_is_ready_again(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis goes down as the job ends, failing RQ's `idle` state write: the worker still announces
    `ready`, kept for the background refresh, which publishes it once Redis answers (the worker's entry
    used to stay `busy` for good, republished by that refresh)."""
    settings = make_settings()
    with TestClient(create_app(settings)) as c:
        job_id = submit(c, aligned_png(), aligned="true")
    store, queue, worker = in_process_worker(settings)
    bind_runtime(monkeypatch, worker, RestoresEveryPhoto())
    worker.registry_fields = {"name": worker.name}
    real_set_state = worker.set_state

    def fail_idle(state: WorkerStatus, pipeline: Any = None) -> None:
        if state == WorkerStatus.IDLE and pipeline is None:
            raise redis.exceptions.ConnectionError("Redis went down")
        real_set_state(state, pipeline)

    monkeypatch.setattr(worker, "set_state", fail_idle)
    with pytest.raises(redis.exceptions.ConnectionError):
        run_next_job(worker, queue)

    assert store.get(job_id)["status"] == "succeeded"
    worker.republish()  # the background thread's next beat
    assert {w["name"]: w["state"] for w in store.workers()}[worker.name] == "ready"


def dequeue(queue: Queue) -> Job:
    """A job taken as RQ's loop takes it: moved from the queue to RQ's intermediate list."""
    dequeued = Queue.dequeue_any([queue], None, connection=queue.connection, serializer=JSONSerializer)
    assert dequeued is not None
    return dequeued[0]


def reap_until(worker: DynfaceWorker, queue: Queue, done: Callable[[], bool], what: str) -> None:
    """Reaper rounds, as the background thread runs them, until `done()`."""
    wait_for(lambda: _reap(worker, queue) or done(), 10, interval=0.2, what=what)


def test_jobs_taken_but_never_started_go_back_to_the_front_of_the_queue(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker stopped (SIGTERM while idle) between RQ's dequeue and the job's start leaves the job
    in RQ's intermediate list. After heartbeat_ttl the reaper puts it back at the front of the queue,
    in order, with its record and RQ's retries untouched (it never ran): it runs once, as a first
    attempt."""
    settings = make_settings(heartbeat_ttl_seconds=1)
    a, b, c = queued_jobs(settings, 3)
    store, queue, worker = in_process_worker(settings)
    records = {job_id: store.get(job_id) for job_id in (a, b)}
    assert [dequeue(queue).id for _ in range(2)] == [a, b]  # and the worker stops there
    assert queue.job_ids == [c]
    assert queue.intermediate_queue.set_first_seen(a)  # RQ's maintenance noticed it too

    _reap(worker, queue)
    assert queue.job_ids == [c]  # not before heartbeat_ttl: its worker may be about to start it
    reap_until(worker, queue, lambda: len(queue.job_ids) == 3, "the stranded jobs put back")
    assert queue.job_ids == [a, b, c]
    assert queue.intermediate_queue.get_job_ids() == []
    assert not store.redis.exists(store.key("stranded", queue.name))
    assert queue.intermediate_queue.get_first_seen(a) is None  # RQ's would take a's next dequeue for stranded
    for job_id in (a, b):
        assert store.get(job_id) == records[job_id]
        job = Job.fetch(job_id, queue.connection, serializer=JSONSerializer)
        assert job.get_status() == JobStatus.QUEUED and job.retries_left == settings.max_retries

    bind_runtime(monkeypatch, worker, RestoresEveryPhoto())
    for job_id in (a, b, c):
        assert run_next_job(worker, queue) == job_id
        assert store.get(job_id)["status"] == "succeeded" and store.get(job_id)["attempts"] == 1


def test_a_worker_slower_than_the_reaper_does_not_run_the_job_it_put_back(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that stalled between dequeuing a job and starting it for longer than heartbeat_ttl
    finds it put back in the queue: it leaves it to whichever worker takes it, instead of running it
    while another one does."""
    settings = make_settings(heartbeat_ttl_seconds=1)
    (job_id,) = queued_jobs(settings)
    store, queue, worker = in_process_worker(settings)
    bind_runtime(monkeypatch, worker, RestoresEveryPhoto())
    job = dequeue(queue)
    reap_until(worker, queue, lambda: queue.job_ids == [job_id], "the stranded job put back")

    worker.execute_job(job, queue)  # the stalled worker resumes
    assert store.get(job_id)["status"] == "queued" and store.get(job_id)["attempts"] == 0
    assert queue.job_ids == [job_id]
    assert queue.started_job_registry.get_job_ids(cleanup=False) == []
    assert run_next_job(worker, queue) == job_id
    assert store.get(job_id)["status"] == "succeeded" and store.get(job_id)["attempts"] == 1


def test_a_job_its_worker_is_starting_is_never_put_back(make_settings: Callable[..., Settings]) -> None:
    """Once its worker has registered the job's execution, however long it then takes to move it out
    of the intermediate list, the job is not put back; and it is forgotten once started."""
    settings = make_settings(heartbeat_ttl_seconds=1)
    (job_id,) = queued_jobs(settings)
    store, queue, worker = in_process_worker(settings)
    job = dequeue(queue)
    _reap(worker, queue)  # noted as stranded: no execution yet
    execution = worker.prepare_execution(job)
    for _ in range(3):  # past heartbeat_ttl, the execution kept alive as its heartbeat thread does
        time.sleep(0.4)
        with store.redis.pipeline() as pipe:
            execution.heartbeat(queue.started_job_registry, settings.heartbeat_ttl_seconds, pipe)
            pipe.execute()
    _reap(worker, queue)
    assert queue.job_ids == [] and queue.intermediate_queue.get_job_ids() == [job_id]
    assert not store.redis.exists(store.key("stranded", queue.name))
    worker.prepare_job_execution(job, remove_from_intermediate_queue=True)
    _reap(worker, queue)
    assert queue.job_ids == [] and queue.intermediate_queue.get_job_ids() == []


def test_a_lost_job_rq_requeued_is_not_queued_twice(make_settings: Callable[..., Settings]) -> None:
    """A worker lost after registering the job's execution but before moving it out of the
    intermediate list: RQ re-queues it (its execution expired), and the entry left behind goes
    without queueing the job a second time."""
    settings = make_settings(heartbeat_ttl_seconds=1, max_retries=1)
    (job_id,) = queued_jobs(settings)
    _, queue, worker = in_process_worker(settings)
    worker.prepare_execution(dequeue(queue))  # and the worker is lost
    reap_until(
        worker, queue, lambda: not queue.intermediate_queue.get_job_ids(), "the entry left behind gone"
    )
    assert queue.job_ids == [job_id]


def test_resuming_after_an_outage_leaves_the_pubsub_to_its_own_thread(
    make_settings: Callable[..., Settings],
) -> None:
    """After a Redis outage ended RQ's loop, the worker closed RQ's pubsub from its own thread while
    the pubsub thread still read it: the connection went back to the pool under that thread, and the
    resumed loop's commands could share it (the worker hung before its next job). It only stops the
    thread now, which closes the pubsub as its loop ends (redis-py's contract)."""
    settings = make_settings()
    _, _, worker = in_process_worker(settings)
    worker.register_birth()
    pubsub = worker.connection.pubsub()
    pubsub.subscribe(**{f"{settings.key_prefix}:commands": lambda message: None})
    # RQ's thread waits 60 s per read; 5 s lets this one outlive the reset's 1 s join and end here.
    thread = pubsub.run_in_thread(sleep_time=5.0, daemon=True)
    worker.pubsub, worker.pubsub_thread = pubsub, thread
    wait_for(lambda: pubsub.connection is not None and pubsub.subscribed, 5, what="subscribed")
    worker_main._reset_after_outage(worker)
    assert worker.pubsub_thread is None
    assert thread.is_alive() and pubsub.connection is not None  # not closed under its reader
    thread.join(8)
    assert not thread.is_alive() and pubsub.connection is None  # closed by its own loop
    assert worker.connection.ping()
    # A thread that has already ended (RQ's handler re-raises what is no ConnectionError) closes
    # nothing any more: the reset does.
    pubsub = worker.connection.pubsub()
    pubsub.subscribe(**{f"{settings.key_prefix}:commands": lambda message: None})
    ended = PubSubWorkerThread(pubsub, sleep_time=2.0)
    ended._running.set()  # its run() then returns at once: a thread that ended and closed nothing
    ended.start()
    ended.join()
    worker.pubsub, worker.pubsub_thread = pubsub, ended
    worker_main._reset_after_outage(worker)
    assert pubsub.connection is None
