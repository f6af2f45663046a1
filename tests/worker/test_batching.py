"""Cross-job batching with real worker processes, real Redis and the real `tiny` pipeline.

Jobs are submitted before the worker starts, so the queue holds them all when the worker takes its
first job: which jobs ride along is then decided by their options, not by timing. A DSST table with
starts of 2–4 steps keeps the jobs short where the batch need not outlast a kill.
"""

from __future__ import annotations

import dataclasses
import io
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from app.jobs import JobStore, connect, make_queue
from app.main import create_app
from app.schemas import RestorationOptions
from app.settings import Settings
from models.dsst import default_table
from models.pipeline import RestorationPipeline, RestoreOptions
from tests.conftest import (
    TESTDATA,
    WEIGHTS,
    WorkerProcess,
    aligned_png,
    assert_same_up_to_rounding,
    start_workers,
    wait_for,
    wait_terminal,
)
from worker import tasks
from worker.main import DynfaceWorker


@pytest.fixture(scope="module")
def fast_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dsst") / "fast.json"
    path.write_text(dataclasses.replace(default_table(), start_indices=(2, 3, 4)).to_json())
    return path


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    """Worker processes a test starts (appended to this list) are stopped at its end."""
    started: list[WorkerProcess] = []
    yield started
    for w in started:
        w.stop(signal.SIGKILL)


def submit(c: TestClient, data: bytes, **fields: Any) -> str:
    r = c.post(
        "/v1/restorations",
        files={"image": ("in.png", data, "image/png")},
        data={k: str(v) for k, v in fields.items()},
    )
    assert r.status_code == 202, r.text
    return r.json()["id"]


def flat_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (160, 120), (200, 200, 200)).save(buf, "PNG")
    return buf.getvalue()


def pipeline_options(store: JobStore, job_id: str) -> RestoreOptions:
    """The options the worker gives the pipeline for this job (as the API stored them)."""
    opts = RestorationOptions.model_validate(store.get(job_id)["options"]).pipeline_options()
    return RestoreOptions(**{**opts, "outputs": tuple(opts["outputs"])})


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data))).astype(int)


def test_riders_run_in_one_batch_and_each_ends_on_its_own(
    make_settings: Callable[..., Settings], workers: list[WorkerProcess], tmp_path: Path, fast_table: Path
) -> None:
    """Queue: A (1 face, seed 3) · B (difface: incompatible) · C (no face: fails) · D (canceled) ·
    E (record expired) · F (photo with 4 faces, seed 11). The worker takes A and claims C and F
    (B, D, E stay behind); C's failure does not touch A and F, which are what they are alone; B then
    runs by itself, and E is dropped as an expired job is."""
    batching = make_settings(
        dsst_table=str(fast_table), worker_batch_max_jobs=4, worker_batch_wait_seconds=0.3
    )
    photo = (TESTDATA / "photos" / "00.jpg").read_bytes()
    with TestClient(create_app(batching)) as c:
        svc = c.app.state.services
        store: JobStore = svc.store
        a = submit(c, aligned_png("0143.png"), aligned="true", seed=3)
        b = submit(c, aligned_png("0240.png"), aligned="true", seed=3, mode="difface")
        cc = submit(c, flat_png(), seed=1)
        d = submit(c, aligned_png("0342.png"), aligned="true")
        e = submit(c, aligned_png("0345.png"), aligned="true")
        f = submit(c, photo, seed=11, outputs="image,faces", format="png")
        assert c.delete(f"/v1/restorations/{d}").json()["status"] == "canceled"
        svc.redis.delete(store.key("job", e))
        queue = make_queue(svc.redis, batching)
        assert queue.job_ids == [a, b, cc, e, f]

        # Not start_workers: it waits for the worker to be idle, i.e. for the batch to be over.
        workers.append(WorkerProcess(batching, tmp_path / "worker.log", f"w-{uuid.uuid4().hex[:6]}"))
        # While the batch runs, its riders are started RQ jobs (recoverable like A) and out of the
        # queue; the jobs it skipped wait in it in their order.
        wait_for(lambda: store.get(f)["status"] == "processing", 120, interval=0.02, what="F running")
        assert set(StartedJobRegistry(queue=queue).get_job_ids(cleanup=False)) == {a, cc, f}
        assert queue.job_ids == [b, e]

        jobs = {k: wait_terminal(c, v) for k, v in {"a": a, "b": b, "c": cc, "f": f}.items()}
        assert jobs["c"]["status"] == "failed" and jobs["c"]["error"]["code"] == "no_face", jobs["c"]
        for k in ("a", "b", "f"):
            assert jobs[k]["status"] == "succeeded" and jobs[k]["attempts"] == 1, jobs[k]
        assert [jobs[k]["timings"]["batch_jobs"] for k in ("a", "f")] == [3, 3]  # A, C and F
        assert jobs["b"]["timings"]["batch_jobs"] == 1
        assert jobs["b"]["started_at"] >= max(jobs[k]["completed_at"] for k in ("a", "f"))
        assert c.get(f"/v1/restorations/{d}").json()["attempts"] == 0  # canceled jobs never run
        assert store.get(e) is None

        # Each batched job got what it gets alone (same seed, same options), up to the rounding
        # of batched kernels (tests/models/test_photo_batch.py).
        pipe = RestorationPipeline.from_pretrained("tiny", weights_dir=WEIGHTS, dsst_table=fast_table)
        for job_id, data in ((a, aligned_png("0143.png")), (f, photo)):
            alone = pipe.restore_photo(data, pipeline_options(store, job_id))
            job = jobs["a" if job_id == a else "f"]
            assert [(x["start_step"], x["eta"]) for x in job["faces"]] == [
                (r.facts.start_step, r.facts.eta) for r in alone.face_reports
            ]
            got = [c.get(u).content for u in (job["outputs"]["image"], *job["outputs"].get("faces", []))]
            for batched, single in zip(got, [alone.image, *alone.faces], strict=True):
                assert_same_up_to_rounding(pixels(batched), pixels(single))
        assert len(jobs["f"]["faces"]) == 4

        # RQ's view: every job ended (E too: its worker call returned), none is left started.
        wait_for(lambda: queue.count == 0, 30, what="queue drained")
        assert StartedJobRegistry(queue=queue).get_job_ids(cleanup=False) == []
        for job_id in (a, b, cc, e, f):
            assert Job.fetch(job_id, svc.redis, serializer=JSONSerializer).get_status() == JobStatus.FINISHED


def _kill_the_worker_mid_batch(
    settings: Settings, store: JobStore, ids: list[str], workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """One worker takes all of `ids` into one batch and is SIGKILLed while they run (nothing of the
    batch is cleaned up by it); then a fresh worker starts, whose reaper notices the loss."""
    # Not start_workers: it waits for the worker to be idle, i.e. for the batch to be over.
    victim = WorkerProcess(settings, tmp_path / "victim.log", f"victim-{uuid.uuid4().hex[:6]}")
    workers.append(victim)
    wait_for(
        lambda: all(store.get(i)["status"] == "processing" for i in ids),
        120,
        interval=0.02,
        what="the jobs running",
    )
    assert {store.get(i)["worker"] for i in ids} == {victim.name}
    victim.proc.kill()
    victim.proc.wait(10)
    workers += start_workers(settings, tmp_path)


def test_worker_killed_mid_batch_has_every_job_recovered(
    make_settings: Callable[..., Settings], workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """kill -9 while three jobs run as one batch: the reaper (in a worker started afterwards)
    re-queues each of them, the rider ones exactly like the job the dead worker dequeued. The
    shipped DSST table (starts of 24–100 steps) keeps the batch running long enough to be killed."""
    batching = make_settings(worker_batch_max_jobs=4, worker_batch_wait_seconds=0.3)
    with TestClient(create_app(batching)) as c:
        store: JobStore = c.app.state.services.store
        faces = ("0143.png", "0240.png", "0342.png")
        ids = [submit(c, aligned_png(n), aligned="true", seed=k) for k, n in enumerate(faces)]
        _kill_the_worker_mid_batch(batching, store, ids, workers, tmp_path)
        for job_id in ids:
            job = wait_terminal(c, job_id)
            assert job["status"] == "succeeded" and job["attempts"] == 2, job
            assert any("lost" in w for w in job["warnings"]), job["warnings"]


def test_worker_killed_mid_batch_without_retries_fails_every_job_with_a_reason(
    make_settings: Callable[..., Settings], workers: list[WorkerProcess], tmp_path: Path
) -> None:
    settings = make_settings(worker_batch_max_jobs=3, worker_batch_wait_seconds=0.3, max_retries=0)
    with TestClient(create_app(settings)) as c:
        store: JobStore = c.app.state.services.store
        ids = [submit(c, aligned_png(n), aligned="true") for n in ("0143.png", "0240.png", "0342.png")]
        _kill_the_worker_mid_batch(settings, store, ids, workers, tmp_path)
        for job_id in ids:
            job = wait_terminal(c, job_id)
            assert job["status"] == "failed" and job["error"]["code"] == "worker_lost", job


def in_process_worker(settings: Settings) -> tuple[JobStore, Queue, DynfaceWorker]:
    """Real RQ worker code in this process, on the test's queue (the pipeline is whatever the test
    binds as `tasks._runtime`)."""
    rq_redis = connect(settings)
    store = JobStore(connect(settings), settings)
    queue = make_queue(rq_redis, settings)
    worker = DynfaceWorker(
        [queue],
        name=f"{settings.queue_name}-w",  # inside the test's namespace, so it is purged with it
        connection=rq_redis,
        serializer=JSONSerializer,
        settings=settings,
        store=store,
    )
    return store, queue, worker


def bind_runtime(
    monkeypatch: pytest.MonkeyPatch,
    worker: DynfaceWorker,
    pipe: Any,
    claim_riders: Callable[[tuple[Any, ...]], list[Job]] | None = None,
) -> None:
    """What worker.main binds at start-up, for `worker`, with `pipe` standing in for the pipeline
    and the worker's own rider claims unless `claim_riders` replaces them."""
    runtime = tasks.Runtime(
        pipe=pipe,
        store=worker.store,
        settings=worker.settings,
        worker_name=worker.name,
        device="cpu",
        claim_riders=claim_riders or worker.claim_riders,
    )
    monkeypatch.setattr(tasks, "_runtime", runtime)


def run_next_job(worker: DynfaceWorker, queue: Queue) -> str:
    """Dequeue the next job as RQ's loop does and run it; its id."""
    dequeued = Queue.dequeue_any([queue], None, connection=queue.connection, serializer=JSONSerializer)
    assert dequeued is not None
    worker.execute_job(*dequeued)
    return dequeued[0].id


def test_a_rider_the_batch_never_started_goes_back_to_the_queue(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch ends between claiming a rider and starting it (here an error right after the
    claim, as a Redis failure or the time limit could cause): the dequeued job fails with a reason,
    and the rider is neither lost nor started but back at the head of the queue. Real RQ worker code,
    in this process (the pipeline is never reached)."""
    settings = make_settings(worker_batch_max_jobs=2, worker_batch_wait_seconds=0)
    with TestClient(create_app(settings)) as c:
        first, rider = (submit(c, aligned_png(), aligned="true") for _ in range(2))
    store, queue, worker = in_process_worker(settings)

    def claim_then_fail(key: tuple[Any, ...]) -> list[Job]:
        assert [j.id for j in worker.claim_riders(key)] == [rider]
        raise RuntimeError("connection lost")

    bind_runtime(monkeypatch, worker, None, claim_then_fail)  # the pipeline is never reached
    assert run_next_job(worker, queue) == first

    assert store.get(first)["status"] == "failed" and store.get(first)["error"]["code"] == "internal"
    assert store.get(rider)["status"] == "queued" and store.get(rider)["attempts"] == 0
    assert queue.job_ids == [rider]
    assert Job.fetch(rider, queue.connection, serializer=JSONSerializer).get_status() == JobStatus.QUEUED
    assert StartedJobRegistry(queue=queue).get_job_ids(cleanup=False) == []


class _ForcedStop:
    """A pipeline interrupted as RQ's cold shutdown (a second stop signal) interrupts a job: by
    raising SystemExit where the job is, which `tasks.restore` does not catch."""

    def restore_photos(self, requests: list[Any]) -> list[Any]:
        raise SystemExit


@pytest.mark.parametrize("max_retries", [2, 0])
def test_a_batch_interrupted_past_restore_leaves_no_job_processing(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, max_retries: int
) -> None:
    """What escapes `restore` ends in RQ (retried, or failed once retries are spent) and our records
    follow it, the rider's included: queued again, or failed with `worker_lost` — never left
    `processing` until they expire. Real RQ worker code, in this process."""
    settings = make_settings(worker_batch_max_jobs=2, worker_batch_wait_seconds=0, max_retries=max_retries)
    with TestClient(create_app(settings)) as c:
        first, rider = (submit(c, aligned_png(), aligned="true") for _ in range(2))
    store, queue, worker = in_process_worker(settings)
    bind_runtime(monkeypatch, worker, _ForcedStop())
    assert run_next_job(worker, queue) == first

    for job_id in (first, rider):
        record = store.get(job_id)
        assert record["attempts"] == 1, record  # the rider did run in the batch
        if max_retries:
            assert record["status"] == "queued" and any("lost" in w for w in record["warnings"]), record
        else:
            assert record["status"] == "failed" and record["error"]["code"] == "worker_lost", record
    assert sorted(queue.job_ids) == (sorted([first, rider]) if max_retries else [])
    assert StartedJobRegistry(queue=queue).get_job_ids(cleanup=False) == []


def test_rq_ends_the_job_even_when_recording_its_failure_fails(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mirroring the failure into our record must never stop RQ's own failure handling: with
    `fail_lost` raising, RQ still re-queues the job (here: retries left) and frees its execution."""
    settings = make_settings()
    with TestClient(create_app(settings)) as c:
        job_id = submit(c, aligned_png(), aligned="true")
    _, queue, worker = in_process_worker(settings)
    bind_runtime(monkeypatch, worker, _ForcedStop())

    def broken(*args: Any) -> None:
        raise ValueError("an odd record")

    monkeypatch.setattr(tasks, "fail_lost", broken)
    assert run_next_job(worker, queue) == job_id
    assert queue.job_ids == [job_id]
    assert StartedJobRegistry(queue=queue).get_job_ids(cleanup=False) == []
