"""Cross-job batching with real worker processes, real Redis and the real `tiny` pipeline.

Jobs are submitted before the worker starts, so the queue holds them all when the worker takes its
first job: which jobs ride along is then decided by their options, not by timing. A DSST table with
starts of 2–4 steps keeps the jobs short where the batch need not outlast a kill.
"""

from __future__ import annotations

import dataclasses
import io
import json
import signal
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import REGISTRY
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from app import lost
from app.jobs import JobStore, connect, make_queue
from app.main import create_app
from app.schemas import RestorationOptions
from app.settings import Settings
from models.dsst import default_table
from models.pipeline import FaceFacts, FaceReport, PhotoResult, RestorationPipeline, RestoreOptions
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


def restore_alone(table: Path, photos: dict[str, tuple[bytes, RestoreOptions]]) -> dict[str, PhotoResult]:
    """Each photo restored by itself, with the options of its job, by a pipeline of this process."""
    pipe = RestorationPipeline.from_pretrained("tiny", weights_dir=WEIGHTS, dsst_table=table)
    return {job_id: pipe.restore_photo(data, options) for job_id, (data, options) in photos.items()}


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
    with TestClient(create_app(batching)) as c, ThreadPoolExecutor(1) as background:
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
        # What A and F give alone (same seed, same options), computed here while the worker runs:
        # this process would otherwise sit idle, then compute them after.
        inputs = {a: aligned_png("0143.png"), f: photo}
        alone = background.submit(
            restore_alone, fast_table, {j: (inputs[j], pipeline_options(store, j)) for j in inputs}
        )

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
        for job_id, result in alone.result().items():
            job = jobs["a" if job_id == a else "f"]
            assert [(x["start_step"], x["eta"]) for x in job["faces"]] == [
                (r.facts.start_step, r.facts.eta) for r in result.face_reports
            ]
            got = [c.get(u).content for u in (job["outputs"]["image"], *job["outputs"].get("faces", []))]
            for batched, single in zip(got, [result.image, *result.faces], strict=True):
                assert_same_up_to_rounding(pixels(batched), pixels(single))
        assert len(jobs["f"]["faces"]) == 4

        # RQ's view: every job ended (E too: its worker call returned), none is left started.
        wait_for(lambda: queue.count == 0, 30, what="queue drained")
        assert StartedJobRegistry(queue=queue).get_job_ids(cleanup=False) == []
        for job_id in (a, b, cc, e, f):
            assert Job.fetch(job_id, svc.redis, serializer=JSONSerializer).get_status() == JobStatus.FINISHED


def _kill_the_worker_mid_batch(
    settings: Settings,
    store: JobStore,
    ids: list[str],
    workers: list[WorkerProcess],
    tmp_path: Path,
    fast_table: Path,
) -> None:
    """One worker takes all of `ids` into one batch and is SIGKILLed while they run (nothing of the
    batch is cleaned up by it); then a fresh worker starts, whose reaper notices the loss. That one
    samples from `fast_table`: what it reruns is the recovery, not the sampling, under test."""
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
    workers += start_workers(settings.model_copy(update={"dsst_table": str(fast_table)}), tmp_path)


def test_worker_killed_mid_batch_has_every_job_recovered(
    make_settings: Callable[..., Settings], workers: list[WorkerProcess], tmp_path: Path, fast_table: Path
) -> None:
    """kill -9 while three jobs run as one batch: the reaper (in a worker started afterwards)
    re-queues each of them, the rider ones exactly like the job the dead worker dequeued. The
    shipped DSST table (starts of 24–100 steps) keeps the batch running long enough to be killed."""
    batching = make_settings(worker_batch_max_jobs=4, worker_batch_wait_seconds=0.3)
    with TestClient(create_app(batching)) as c:
        store: JobStore = c.app.state.services.store
        faces = ("0143.png", "0240.png", "0342.png")
        ids = [submit(c, aligned_png(n), aligned="true", seed=k) for k, n in enumerate(faces)]
        _kill_the_worker_mid_batch(batching, store, ids, workers, tmp_path, fast_table)
        for job_id in ids:
            job = wait_terminal(c, job_id)
            assert job["status"] == "succeeded" and job["attempts"] == 2, job
            assert any("lost" in w for w in job["warnings"]), job["warnings"]


def test_worker_killed_mid_batch_without_retries_fails_every_job_with_a_reason(
    make_settings: Callable[..., Settings], workers: list[WorkerProcess], tmp_path: Path, fast_table: Path
) -> None:
    settings = make_settings(worker_batch_max_jobs=3, worker_batch_wait_seconds=0.3, max_retries=0)
    with TestClient(create_app(settings)) as c:
        store: JobStore = c.app.state.services.store
        ids = [submit(c, aligned_png(n), aligned="true") for n in ("0143.png", "0240.png", "0342.png")]
        _kill_the_worker_mid_batch(settings, store, ids, workers, tmp_path, fast_table)
        for job_id in ids:
            job = wait_terminal(c, job_id)
            assert job["status"] == "failed" and job["error"]["code"] == "worker_lost", job


def in_process_worker(settings: Settings, name: str = "w") -> tuple[JobStore, Queue, DynfaceWorker]:
    """Real RQ worker code in this process, on the test's queue (the pipeline is whatever the test
    binds as `tasks._runtime`)."""
    rq_redis = connect(settings)
    store = JobStore(connect(settings), settings)
    queue = make_queue(rq_redis, settings)
    worker = DynfaceWorker(
        [queue],
        name=f"{settings.queue_name}-{name}",  # inside the test's namespace, so it is purged with it
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
        execution_of=worker.execution_of,
    )
    monkeypatch.setattr(tasks, "_runtime", runtime)


def rq_status(queue: Queue, job_id: str) -> JobStatus:
    """The job's status in RQ's eyes."""
    return Job.fetch(job_id, queue.connection, serializer=JSONSerializer).get_status()


def run_next_job(worker: DynfaceWorker, queue: Queue) -> str:
    """Dequeue the next job as RQ's loop does and run it; its id."""
    dequeued = Queue.dequeue_any([queue], None, connection=queue.connection, serializer=JSONSerializer)
    assert dequeued is not None
    worker.execute_job(*dequeued)
    return dequeued[0].id


def test_riders_the_batch_never_started_go_back_to_the_front_in_their_order(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch ends between claiming its riders and starting them (here an error right after the
    claim, as a Redis failure or the time limit could cause): the dequeued job fails with a reason,
    and the riders are neither lost nor started but back at the head of the queue, in their order,
    before the job that waited behind them. Real RQ worker code, in this process (the pipeline is
    never reached)."""
    settings = make_settings(worker_batch_max_jobs=3, worker_batch_wait_seconds=0)
    with TestClient(create_app(settings)) as c:
        first, r1, r2, behind = (submit(c, aligned_png(), aligned="true") for _ in range(4))
    store, queue, worker = in_process_worker(settings)

    def claim_then_fail(key: tuple[Any, ...]) -> list[Job]:
        assert [j.id for j in worker.claim_riders(key)] == [r1, r2]
        raise RuntimeError("connection lost")

    bind_runtime(monkeypatch, worker, None, claim_then_fail)  # the pipeline is never reached
    assert run_next_job(worker, queue) == first

    assert store.get(first)["status"] == "failed" and store.get(first)["error"]["code"] == "internal"
    for rider in (r1, r2):
        assert store.get(rider)["status"] == "queued" and store.get(rider)["attempts"] == 0
        assert rq_status(queue, rider) == JobStatus.QUEUED
    assert queue.job_ids == [r1, r2, behind]
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

    monkeypatch.setattr(lost, "fail_lost", broken)
    assert run_next_job(worker, queue) == job_id
    assert queue.job_ids == [job_id]
    assert StartedJobRegistry(queue=queue).get_job_ids(cleanup=False) == []


def restored_photo(sharing: int = 1) -> PhotoResult:
    """What the pipeline returns for a photo with one face, with stage times as it reports them: its
    faces sampled with those of ``sharing`` photos."""
    facts = FaceFacts(blur_sigma=0.0, start_step=40, eta=0.5, nfe=40, dblm="none", dgsa="none")
    return PhotoResult(
        image=b"restored",
        media_type="image/png",
        faces=[],
        comparison=None,
        face_reports=[FaceReport((0.0, 0.0, 512.0, 512.0), 0.99, facts)],
        timings={"decode": 0.01, "sample": 0.6},
        stage_shares={"decode": 0.01, "sample": 0.6 / sharing},
    )


class RestoresEveryPhoto:
    """A pipeline standing in for the real one: every photo restored (the results are not checked)."""

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}

    def restore_photos(self, requests: list[Any]) -> list[PhotoResult]:
        return [restored_photo(sharing=len(requests)) for _ in requests]


def batch_of_three(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> tuple[JobStore, Queue, DynfaceWorker, list[str]]:
    """Three compatible jobs queued for an in-process worker that batches them (restoring with
    `RestoresEveryPhoto`); their ids in queue order."""
    settings = make_settings(worker_batch_max_jobs=3, worker_batch_wait_seconds=0)
    with TestClient(create_app(settings)) as c:
        ids = [submit(c, aligned_png(), aligned="true") for _ in range(3)]
    store, queue, worker = in_process_worker(settings)
    bind_runtime(monkeypatch, worker, RestoresEveryPhoto())
    return store, queue, worker, ids


def test_an_error_ending_one_job_of_a_batch_fails_that_job_alone(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Storing the second job's results hits a Redis error: that job fails (`internal`), and the
    jobs before and after it keep the results the batch computed for them."""
    store, queue, worker, (first, r1, r2) = batch_of_three(make_settings, monkeypatch)
    real_finish = store.finish

    def blip_on_r1_results(job_id: str, fields: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if job_id == r1 and fields.get("status") == "succeeded":
            raise redis.exceptions.ConnectionError("connection reset while storing the results")
        return real_finish(job_id, fields, *args, **kwargs)

    monkeypatch.setattr(store, "finish", blip_on_r1_results)
    assert run_next_job(worker, queue) == first

    assert store.get(r1)["status"] == "failed" and store.get(r1)["error"]["code"] == "internal"
    for job_id in (first, r2):
        assert store.get(job_id)["status"] == "succeeded", store.get(job_id)
        assert store.result(job_id, "image") == b"restored"


def test_a_redis_error_while_claiming_riders_runs_the_job_alone(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claiming riders is an optimisation: a Redis error while looking for them (here on the first
    look) leaves the waiting jobs queued and runs the dequeued job alone, instead of failing it."""
    store, queue, worker, (first, r1, r2) = batch_of_three(make_settings, monkeypatch)

    def blip(*args: Any) -> list[Job]:
        raise redis.exceptions.ConnectionError("connection reset while claiming")

    monkeypatch.setattr(worker, "_claim", blip)
    assert run_next_job(worker, queue) == first

    assert store.get(first)["status"] == "succeeded", store.get(first)
    assert store.get(first)["timings"]["batch_jobs"] == 1
    for rider in (r1, r2):
        assert store.get(rider)["status"] == "queued" and rq_status(queue, rider) == JobStatus.QUEUED
    assert queue.job_ids == [r1, r2]


def _sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_a_batchs_metrics_count_each_job_once_its_share_of_the_batch(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/scaling.md reads sum/count of dynface_inference_seconds as GPU seconds per job: a batch
    of 3 that took T counts T in all (T / 3 per job), not 3 T. The shared `sample` stage likewise
    counts 0.6 s once: each photo's part as the pipeline reports it (`stage_shares`, a third), not the
    whole 0.6 s of its timings; `decode` is per photo and counts in full for each. Each job's record
    still has the whole time it waited."""
    store, queue, worker, ids = batch_of_three(make_settings, monkeypatch)
    stage = "dynface_stage_seconds_sum"
    before = {
        "inference": _sample("dynface_inference_seconds_sum"),
        "jobs": _sample("dynface_inference_seconds_count"),
        "sample": _sample(stage, {"stage": "sample"}),
        "decode": _sample(stage, {"stage": "decode"}),
    }
    run_next_job(worker, queue)

    records = [store.get(i) for i in ids]
    assert [r["status"] for r in records] == ["succeeded"] * 3, records
    batch_seconds = records[0]["timings"]["inference_seconds"]
    assert [r["timings"]["inference_seconds"] for r in records] == [batch_seconds] * 3
    assert all(r["timings"]["stages"]["sample"] == 0.6 for r in records)
    assert _sample("dynface_inference_seconds_count") - before["jobs"] == 3
    assert _sample("dynface_inference_seconds_sum") - before["inference"] == pytest.approx(
        batch_seconds, abs=1e-9
    )
    assert _sample(stage, {"stage": "sample"}) - before["sample"] == pytest.approx(0.6)
    assert _sample(stage, {"stage": "decode"}) - before["decode"] == pytest.approx(3 * 0.01)


def test_riders_end_in_rq_as_their_records_ended_when_the_batch_fails_after_them(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold shutdown (SystemExit, as in `_ForcedStop`) lands once every job of the batch has
    succeeded, while the last one's webhook is being queued: RQ fails the job it dequeued, but the
    riders succeeded and end as RQ's finished jobs, never re-queued to run again."""
    store, queue, worker, (first, r1, r2) = batch_of_three(make_settings, monkeypatch)
    real_notify = tasks.notify

    def stop_at_the_last_webhook(record: dict[str, Any], settings: Settings) -> Any:
        if record["id"] == r2:
            raise SystemExit
        return real_notify(record, settings)

    monkeypatch.setattr(tasks, "notify", stop_at_the_last_webhook)
    assert run_next_job(worker, queue) == first

    for rider in (r1, r2):
        assert store.get(rider)["status"] == "succeeded"
        assert rq_status(queue, rider) == JobStatus.FINISHED
        assert rider not in queue.job_ids
    assert StartedJobRegistry(queue=queue).get_job_ids(cleanup=False) == []


def test_a_rider_started_but_never_ended_is_not_finished_in_rq(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rider's start reached Redis but its reply was lost: the batch runs without it, while the
    rider's record says `processing`. RQ must not call the rider finished (its record would stay
    `processing` until it expired): it ends as a lost worker's job does, re-queued with a warning
    (retries left)."""
    settings = make_settings(worker_batch_max_jobs=2, worker_batch_wait_seconds=0)
    with TestClient(create_app(settings)) as c:
        first, rider = (submit(c, aligned_png(), aligned="true") for _ in range(2))
    store, queue, worker = in_process_worker(settings)
    bind_runtime(monkeypatch, worker, RestoresEveryPhoto())
    real_start = store.start

    def start_then_lose_the_reply(job_id: str, fields: dict[str, Any]) -> bool:
        started = real_start(job_id, fields)
        if job_id == rider:
            raise redis.exceptions.TimeoutError("Timeout reading from socket")
        return started

    monkeypatch.setattr(store, "start", start_then_lose_the_reply)
    assert run_next_job(worker, queue) == first

    assert store.get(first)["status"] == "succeeded" and store.get(first)["timings"]["batch_jobs"] == 1
    record = store.get(rider)
    assert record["status"] == "queued" and any("lost" in w for w in record["warnings"]), record
    assert rq_status(queue, rider) == JobStatus.QUEUED
    assert queue.job_ids == [rider]
    assert StartedJobRegistry(queue=queue).get_job_ids(cleanup=False) == []


def test_a_rider_whose_start_redis_fails_waits_for_a_later_batch(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis fails the start of the second rider (no write landed): the batch runs without it, and
    the two jobs started before it succeed (all three used to fail `internal`). It goes back to the
    queue, retries untouched, and runs to success next."""
    store, queue, worker, (first, r1, r2) = batch_of_three(make_settings, monkeypatch)
    real_start = store.start

    def time_out_for_r2(job_id: str, fields: dict[str, Any]) -> bool:
        if job_id == r2:
            raise redis.exceptions.TimeoutError("Timeout reading from socket")
        return real_start(job_id, fields)

    monkeypatch.setattr(store, "start", time_out_for_r2)
    assert run_next_job(worker, queue) == first

    for job_id in (first, r1):
        record = store.get(job_id)
        assert record["status"] == "succeeded" and record["timings"]["batch_jobs"] == 2, record
    assert store.get(r2)["status"] == "queued" and store.get(r2)["attempts"] == 0
    assert queue.job_ids == [r2] and rq_status(queue, r2) == JobStatus.QUEUED

    monkeypatch.setattr(store, "start", real_start)
    assert run_next_job(worker, queue) == r2
    record = store.get(r2)
    assert record["status"] == "succeeded" and record["attempts"] == 1, record
    assert not any("lost" in w for w in record["warnings"]), record


def test_a_job_whose_input_redis_fails_to_read_fails_alone(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis fails the read of the second job's photo: that job fails with a reason (`internal`),
    and the jobs before and after it run and succeed (all three used to fail `internal`). Failed
    rather than left for a retry: `restore` returns, so RQ would end the dequeued job, were it the
    one, as finished, its record left `processing`."""
    store, queue, worker, (first, r1, r2) = batch_of_three(make_settings, monkeypatch)
    real_input = store.input

    def time_out_for_r1(job_id: str) -> bytes | None:
        if job_id == r1:
            raise redis.exceptions.TimeoutError("Timeout reading from socket")
        return real_input(job_id)

    monkeypatch.setattr(store, "input", time_out_for_r1)
    assert run_next_job(worker, queue) == first

    assert store.get(r1)["status"] == "failed" and store.get(r1)["error"]["code"] == "internal"
    for job_id in (first, r2):
        record = store.get(job_id)
        assert record["status"] == "succeeded" and record["timings"]["batch_jobs"] == 2, record
    assert StartedJobRegistry(queue=queue).get_job_ids(cleanup=False) == []


def test_a_rider_that_cannot_be_ended_in_rq_does_not_stop_the_others(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """RQ's end of the first rider fails (a Redis error): the second is still ended, the worker
    goes back to `ready`, and the first's execution is left to expire for the reaper, forgotten by the
    worker (a later run of the job by it names its own execution, `test_duplicates.py`)."""
    store, queue, worker, (first, r1, r2) = batch_of_three(make_settings, monkeypatch)
    real_finalize = worker._finalize_success

    def fail_for_r1(job: Job, *args: Any) -> None:
        if job.id == r1:
            raise redis.exceptions.ConnectionError("connection reset")
        real_finalize(job, *args)

    monkeypatch.setattr(worker, "_finalize_success", fail_for_r1)
    worker.registry_fields = {"name": worker.name}
    assert run_next_job(worker, queue) == first

    assert rq_status(queue, r2) == JobStatus.FINISHED
    assert StartedJobRegistry(queue=queue).get_job_ids(cleanup=False) == [r1]
    assert worker.execution_of(r1) is None
    assert {w["name"]: w["state"] for w in store.workers()}[worker.name] == "ready"


def test_a_waiting_job_whose_record_does_not_read_is_left_out_of_the_batch(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """During a rolling upgrade a newer API may store an option this worker does not know: claiming
    riders must not fail the job that claims. The odd job is not batched (the job behind it is), stays
    queued in its place, and fails on its own once a worker takes it."""
    store, queue, worker, (first, odd, third) = batch_of_three(make_settings, monkeypatch)
    options = {**store.get(odd)["options"], "an_option_from_a_newer_api": True}
    store.redis.hset(store.key("job", odd), "options", json.dumps(options))

    assert run_next_job(worker, queue) == first
    for job_id in (first, third):
        record = store.get(job_id)
        assert record["status"] == "succeeded" and record["timings"]["batch_jobs"] == 2, record
    assert store.get(odd)["status"] == "queued" and queue.job_ids == [odd]

    assert run_next_job(worker, queue) == odd
    assert store.get(odd)["status"] == "failed" and store.get(odd)["error"]["code"] == "internal"


def test_a_job_whose_end_cannot_be_written_at_all_leaves_the_others_theirs(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis refuses every end of the second job of a batch, its failure too: the jobs before and after
    it keep the results the batch computed for them, and it is re-queued as a lost worker's job
    (never left `processing`)."""
    store, queue, worker, (first, r1, r2) = batch_of_three(make_settings, monkeypatch)
    real_finish = store.finish

    def refuse_r1(job_id: str, *args: Any, **kwargs: Any) -> Any:
        if job_id == r1:
            raise redis.exceptions.ConnectionError("connection reset while ending the job")
        return real_finish(job_id, *args, **kwargs)

    monkeypatch.setattr(store, "finish", refuse_r1)
    assert run_next_job(worker, queue) == first

    for job_id in (first, r2):
        assert store.get(job_id)["status"] == "succeeded", store.get(job_id)
        assert store.result(job_id, "image") == b"restored"
    record = store.get(r1)
    assert record["status"] == "queued" and any("lost" in w for w in record["warnings"]), record
    assert r1 in queue.job_ids and rq_status(queue, r1) == JobStatus.QUEUED
