"""Worker liveness with real processes: kill -9 mid-job once retries are spent fails the job with a
reason, and a job whose id is in the queue twice runs once. Timings are short via settings
(heartbeat_ttl 3 s, reaper every 1 s), never by slowing the pipeline.

kill -9 with retries left (re-queued to another worker) and SIGTERM (the current job finishes
first) are tests/reliability/test_rel_faults.py's, which also check the webhook of each job."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from rq.job import JobStatus

from app.main import create_app
from app.settings import Settings
from tests.conftest import (
    WorkerProcess,
    aligned_png,
    base_settings,
    purge,
    start_workers,
    wait_for,
    wait_mid_sampling,
    wait_terminal,
)


@pytest.fixture(scope="module")
def pool(redis_conn, tmp_path_factory) -> Iterator[tuple[Settings, list[WorkerProcess], Path]]:
    settings = base_settings(uuid.uuid4().hex[:10])
    tmp = tmp_path_factory.mktemp("recovery")
    workers = start_workers(settings, tmp, n=2)
    yield settings, workers, tmp
    for w in workers:
        w.stop(signal.SIGKILL)
    purge(redis_conn, settings)


def submit(c: TestClient) -> str:
    r = c.post(
        "/v1/restorations", files={"image": ("f.png", aligned_png(), "image/png")}, data={"aligned": "true"}
    )
    assert r.status_code == 202, r.text
    return r.json()["id"]


def running_on(c: TestClient, job_id: str, workers: list[WorkerProcess]) -> WorkerProcess:
    """Wait until the job is well inside the diffusion loop, then return the worker process running it."""
    rec = wait_mid_sampling(c.app.state.services.store, job_id, timeout=60)
    return next(w for w in workers if w.name == rec["worker"])


def two_live(settings: Settings, workers: list[WorkerProcess], tmp: Path) -> None:
    """Dead pool workers replaced, until two are ready."""
    for dead in [w for w in workers if w.proc.poll() is not None]:
        dead.stop()
        workers.remove(dead)
    if len(workers) < 2:
        workers.extend(start_workers(settings, tmp, n=2 - len(workers)))


def test_a_job_queued_twice_runs_once_though_both_workers_take_it(pool) -> None:
    """The job's id goes into the queue a second time while one worker samples it (as a second
    re-queue of a lost job would put it): the idle worker takes that entry at once and skips it (it
    used to run the job too, as "attempt 2"). The job succeeds once, as attempt 1, and RQ ends it
    once, failing nothing."""
    settings, workers, tmp = pool
    two_live(settings, workers, tmp)
    with TestClient(create_app(settings)) as c:
        store = c.app.state.services.store
        queue = c.app.state.services.queue
        job_id = submit(c)
        running = running_on(c, job_id, workers)
        store.redis.rpush(queue.key, job_id)
        job = wait_terminal(c, job_id, timeout=90)
        assert job["status"] == "succeeded" and job["attempts"] == 1, job
        assert not any("lost" in w for w in job["warnings"]), job["warnings"]
        wait_for(
            lambda: {e["state"] for e in store.workers()} == {"ready"}, 20, what="both workers idle again"
        )
        assert queue.job_ids == [] and queue.started_job_registry.get_job_ids(cleanup=False) == []
        assert queue.failed_job_registry.get_job_ids(cleanup=False) == []
        assert queue.fetch_job(job_id).get_status() == JobStatus.FINISHED
        assert store.get(job_id)["worker"] == running.name
        assert [w.name for w in workers if f"job {job_id}: not started" in w.log()] == [
            w.name for w in workers if w is not running
        ]


def test_kill9_without_retries_left_fails_with_reason(pool) -> None:
    settings, workers, tmp = pool
    # Two live workers: one to kill, one whose reaper notices the loss.
    two_live(settings, workers, tmp)
    no_retry = settings.model_copy(update={"max_retries": 0})
    with TestClient(create_app(no_retry)) as c:
        job_id = submit(c)
        victim = running_on(c, job_id, workers)
        victim.proc.kill()
        victim.proc.wait(10)
        job = wait_terminal(c, job_id, timeout=90)
        assert job["status"] == "failed" and job["error"]["code"] == "worker_lost", job
    victim.stop()
    workers.remove(victim)
