"""Worker liveness with real processes: kill -9 mid-job (re-queued, or failed once retries are
spent) and SIGTERM (the current job finishes first). Timings are short via settings
(heartbeat_ttl 3 s, reaper every 1 s), never by slowing the pipeline."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.conftest import (
    WorkerProcess,
    aligned_png,
    base_settings,
    purge,
    start_workers,
    wait_for,
    wait_terminal,
)


@pytest.fixture(scope="module")
def pool(redis_conn, tmp_path_factory) -> Iterator[tuple[Settings, list[WorkerProcess], object]]:
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
    """Wait until the job is sampling, then return the worker process running it."""
    store = c.app.state.services.store
    rec = wait_for(
        lambda: (r := store.get(job_id)) and r.get("stage") == "sample" and r,
        60,
        interval=0.02,
        what="stage=sample",
    )
    return next(w for w in workers if w.name == rec["worker"])


def test_kill9_mid_job_is_requeued_to_another_worker(pool) -> None:
    settings, workers, _ = pool
    with TestClient(create_app(settings)) as c:
        job_id = submit(c)
        victim = running_on(c, job_id, workers)
        victim.proc.kill()  # SIGKILL: no cleanup runs in the victim
        victim.proc.wait(10)
        job = wait_terminal(c, job_id, timeout=90)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2
        assert any("lost" in w for w in job["warnings"]), job["warnings"]
        survivor = next(w for w in workers if w is not victim)
        assert c.app.state.services.store.get(job_id)["worker"] == survivor.name  # attempt 2 ran there
        assert survivor.proc.poll() is None
        # the dead worker disappears from readiness once its entry expires
        wait_for(
            lambda: len(c.get("/readyz").json()["workers"]) == 1, 10, interval=0.2, what="dead worker gone"
        )
    workers.remove(victim)


def test_kill9_without_retries_left_fails_with_reason(pool) -> None:
    settings, workers, tmp = pool
    workers.extend(start_workers(settings, tmp, n=1))  # a second live worker to notice the loss
    no_retry = settings.model_copy(update={"max_retries": 0})
    with TestClient(create_app(no_retry)) as c:
        job_id = submit(c)
        victim = running_on(c, job_id, workers)
        victim.proc.kill()
        victim.proc.wait(10)
        job = wait_terminal(c, job_id, timeout=90)
        assert job["status"] == "failed" and job["error"]["code"] == "worker_lost", job
    workers.remove(victim)


def test_sigterm_finishes_current_job(pool) -> None:
    settings, workers, _ = pool
    with TestClient(create_app(settings)) as c:
        job_id = submit(c)
        worker = running_on(c, job_id, workers)
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(60) == 0
        job = c.get(f"/v1/restorations/{job_id}").json()
        assert job["status"] == "succeeded" and job["attempts"] == 1, job
        assert worker.name not in {w["worker"] for w in c.get("/readyz").json()["workers"]}
    workers.remove(worker)
