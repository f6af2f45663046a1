"""The RQ job function: read the input from Redis, run the pipeline, store results, map failures.

RQ imports the function by name and passes only the job id (JSON), so everything the job needs
lives in our Redis record and in the `Runtime` that worker.main binds once at start-up (the
pipeline is loaded before the first job and reused: CUDA state cannot be rebuilt per job).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from redis.exceptions import RedisError
from rq import get_current_job
from rq.job import Job
from rq.timeouts import JobTimeoutException

from app.jobs import JobStore, merge_warnings, wait_began
from app.lost import lost_warning
from app.schemas import RestorationOptions, profile_notice
from app.settings import Settings
from app.webhooks import notify
from models.errors import Cancelled, PipelineError
from models.pipeline import PhotoRequest, PhotoResult, RestorationPipeline, RestoreOptions, sampler_key
from worker import metrics

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What a worker process holds for its whole life."""

    pipe: RestorationPipeline
    store: JobStore
    settings: Settings
    worker_name: str
    device: str
    #: Takes waiting jobs with this batch key from the queue to run in the starting job's batch
    #: (worker.main `DynfaceWorker.claim_riders`); none without a worker (tests call `restore`).
    claim_riders: Callable[[tuple[Any, ...]], list[Job]] = lambda key: []
    #: The entry of RQ's StartedJobRegistry for this worker's execution of a job (worker.main
    #: `DynfaceWorker.execution_of`): its record names it as the attempt running it; none without a worker.
    execution_of: Callable[[str], str | None] = lambda job_id: None


_runtime: Runtime | None = None


def bind(runtime: Runtime) -> None:
    """Called once by worker.main after the model has loaded, before the first job."""
    global _runtime
    _runtime = runtime


def restore(job_id: str) -> None:
    """Run one job, together with the jobs the worker claimed to batch with it (`Runtime.claim_riders`):
    their faces share the sampler, and each job still ends on its own (one's bad photo does not fail
    the others). Never raises for job-level failures: they are recorded in our job record so RQ's
    Retry is spent only on lost workers (a no_face photo would fail the same way again)."""
    rt = _runtime
    if rt is None:
        raise RuntimeError("worker.tasks.restore called outside a dynface worker (no pipeline bound)")
    first = _start(rt, job_id, get_current_job())
    if first is None:
        return
    jobs = [first]
    if rt.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(rt.device)
    # The mapping covers the whole batch, not only the pipeline call: RQ's timeout (SIGALRM) can
    # strike while results are stored, and an exception escaping to RQ would leave our records
    # `processing` forever (RQ would retry the job as if the worker had been lost). Jobs that
    # already ended are left alone by `_finish`.
    try:
        for rider in rt.claim_riders(sampler_key(_options(first.record))):
            if (job := _start_rider(rt, rider)) is not None:
                jobs.append(job)  # one at a time: a started job is always in `jobs` for the mapping
        _run(rt, jobs)
    except Exception as e:
        for job in jobs:
            _fail(rt, job.id, e)


@dataclass(frozen=True)
class _End:
    """A terminal state `_finish` writes, and what the metrics count once it has landed."""

    status: str
    error: tuple[str, str] | None = None  # (code, message)
    observe: Callable[[], None] = lambda: None  # a success's own metrics (`_observe_success`)

    @property
    def code(self) -> str | None:
        return self.error[0] if self.error else None

    def landed_in(self, record: dict[str, Any]) -> bool:
        """Whether `record` ended as this end says."""
        error = record.get("error")
        return record.get("status") == self.status and (error or {}).get("code") == self.code

    def count(self, record: dict[str, Any]) -> None:
        self.observe()
        reason = self.code or ("ok" if self.status == "succeeded" else self.status)
        metrics.JOBS.labels(self.status, reason).inc()
        metrics.END_TO_END.observe(max(0.0, record["completed_at"] - record["created_at"]))


@dataclass
class _Job:
    """A job of the running batch, moved to `processing`."""

    id: str
    record: dict[str, Any]  # as it was when the job was taken
    started_at: float
    rq_job: Job | None  # for mirroring progress into RQ's job meta


def _start(rt: Runtime, job_id: str, rq_job: Job | None) -> _Job | None:
    """Move a taken job to `processing`; None when it will not run: record expired, canceled or
    otherwise finished while it waited in the queue, or another attempt runs it (its id was in the
    queue twice: `JobStore.start`)."""
    store = rt.store
    record = store.get(job_id)
    if record is None:
        log.warning("job %s: record expired before it ran", job_id)
        return None
    now = time.time()
    attempts = record.get("attempts", 0)
    fields: dict[str, Any] = {
        "status": "processing",
        "stage": None,
        "step": None,
        "total": None,
        "started_at": now,
        "attempts": attempts + 1,
        "worker": rt.worker_name,
        "execution": rt.execution_of(job_id),
    }
    if record.get("status") == "processing":
        # RQ re-queued it after its worker was lost, and no one told its record (app.lost.reconcile);
        # unless another attempt still runs it, which the start refuses.
        fields["warnings"] = merge_warnings(record.get("warnings") or [], [lost_warning(attempts)])
    started = store.start(job_id, fields)
    if not started:
        log.info("job %s: not started: it ended, or another attempt runs it", job_id)
        return None
    if record.get("status") == "processing":
        log.warning("job %s: attempt %s was lost; running it again", job_id, attempts)
    metrics.QUEUE_WAIT.observe(max(0.0, now - wait_began(record["created_at"], record.get("queued_at"))))
    return _Job(job_id, record, now, rq_job)


def _start_rider(rt: Runtime, rider: Job) -> _Job | None:
    """`_start` for a claimed rider; None, the batch running without it, when Redis fails the start.
    The worker then ends it in RQ as its record says (`DynfaceWorker._finalize_riders`): still `queued`,
    it goes back to the queue; `processing` (the start landed, its reply was lost), RQ's retry path."""
    try:
        return _start(rt, rider.id, rider)
    except RedisError as e:
        log.warning("job %s: not run in this batch, Redis failed its start: %s", rider.id, e)
        return None


def _run(rt: Runtime, jobs: list[_Job]) -> None:
    """The pipeline on the jobs' stored inputs, then each job's results into Redis. Job-level
    failures end that job, and so does an error ending it; anything else raises (see `restore`), as
    does a job whose end cannot be written at all, once every other job has ended."""
    requests: list[PhotoRequest] = []
    running: list[_Job] = []
    for job in jobs:
        try:
            requests.append(_request(rt, job))
            running.append(job)
        except (PipelineError, RedisError) as e:  # this job's alone: canceled, input expired or unread
            _fail(rt, job.id, e)
    if not running:
        return
    metrics.BATCH_JOBS.observe(len(running))
    t0 = time.perf_counter()
    try:
        outcomes = rt.pipe.restore_photos(requests)
    finally:
        # Before any job of the batch ends, as every job metric (`_finish`).
        if rt.device.startswith("cuda"):
            metrics.GPU_PEAK.labels(rt.device).set(torch.cuda.max_memory_allocated(rt.device))
    seconds = time.perf_counter() - t0
    batch = _BatchRun(seconds=seconds, jobs=len(running))
    unended: Exception | None = None
    for job, outcome in zip(running, outcomes, strict=True):
        try:
            _end(rt, job, outcome, batch)
        except Exception as e:  # not even its failure could be written: the other jobs still end
            log.error("job %s: could not end it: %s", job.id, e)
            unended = unended or e
    if unended is not None:
        raise unended  # `restore` tries once more; else RQ ends it as a lost worker's job


def _end(rt: Runtime, job: _Job, outcome: PhotoResult | Exception, batch: _BatchRun) -> None:
    """A job's end as the pipeline left it; an error writing it fails the job alone (e.g. a Redis
    error storing its results: the other jobs keep theirs)."""
    try:
        if isinstance(outcome, PhotoResult):
            _succeed(rt, job, outcome, batch)
        else:
            _fail(rt, job.id, outcome)
    except Exception as e:
        _fail(rt, job.id, e)


def _request(rt: Runtime, job: _Job) -> PhotoRequest:
    """The job's photo, options and callbacks for the pipeline."""
    store = rt.store
    job_id = job.id
    if job.record.get("cancel_requested"):
        raise Cancelled("Canceled before it started.")
    data = store.input(job_id)
    if data is None:
        raise PipelineError("The uploaded image expired before the job ran.")  # code: internal
    rq_job = job.rq_job

    def progress(stage: str, step: int, total: int) -> None:
        # `progress` counts diffusion steps only; the other stages report (0, 0) or a face count,
        # which would make the public step/total jump between units.
        fields: dict[str, Any] = {"stage": stage}
        if stage == "sample":
            fields.update(step=step, total=total)
        try:
            store.progress(job_id, fields, rq_job)
        except RedisError as e:
            # Progress is for the client's eyes: a write Redis fails (a blip, a Sentinel failover)
            # must not end every job of the batch `internal`; the end is written, or fails, on its own.
            log.warning("job %s: progress not stored, Redis failed: %s", job_id, e)

    return PhotoRequest(data, _options(job.record), progress, partial(_cancel_requested, store, job_id))


def _cancel_requested(store: JobStore, job_id: str) -> bool:
    """Whether the job's client asked it to stop; a read that Redis fails is "not yet". The pipeline
    asks at every stage and background tile, and an error there would end every job of the batch,
    companions with their results already encoded included. A DELETE is only a request (the client
    polls for the end), and a job that stores its results anyway ends `succeeded` as documented."""
    try:
        return store.cancel_requested(job_id)
    except RedisError as e:
        log.warning("job %s: cancel not checked, Redis failed: %s", job_id, e)
        return False


def _options(record: dict[str, Any]) -> RestoreOptions:
    """The pipeline options of a job record (validated as the API validated them)."""
    opts = RestorationOptions.model_validate(record["options"]).pipeline_options()
    return RestoreOptions(**{**opts, "outputs": tuple(opts["outputs"])})


def batch_key(record: dict[str, Any] | None) -> tuple[Any, ...] | None:
    """What a waiting job must share with another to run in its batch (`sampler_key` of its
    options); None for a job that will not run (record expired, canceled, no longer queued)."""
    if record is None or record.get("status") != "queued" or record.get("cancel_requested"):
        return None
    return sampler_key(_options(record))


@dataclass(frozen=True)
class _BatchRun:
    """The pipeline call a batch's jobs shared."""

    seconds: float  # `restore_photos` wall time
    jobs: int


def _succeed(rt: Runtime, job: _Job, result: PhotoResult, batch: _BatchRun) -> None:
    """Store a finished photo's results and metrics, unless its job was canceled meanwhile."""
    store = rt.store
    job_id, record, started_at = job.id, job.record, job.started_at
    options = _options(record)
    # A DELETE that arrived after the pipeline's last look (before encoding) still wins while nothing
    # is stored.
    if _cancel_requested(store, job_id):
        _fail(rt, job_id, Cancelled("Canceled before its results were stored."))
        return

    results: dict[str, bytes] = {}
    produced: dict[str, Any] = {}
    if "image" in options.outputs:
        results["image"] = result.image
        produced["image"] = result.media_type
    for kind, key, blobs in (("faces", "face", result.faces), ("crops", "crop", result.crops)):
        if kind in options.outputs:
            results.update({f"{key}:{k}": blob for k, blob in enumerate(blobs)})
            produced[kind] = [result.media_type] * len(blobs)
    if "comparison" in options.outputs and result.comparison is not None:
        results["comparison"] = result.comparison
        produced["comparison"] = result.media_type
    faces = [
        {
            "box": [float(v) for v in f.box],
            "score": float(f.score),
            "start_step": f.facts.start_step,
            "eta": f.facts.eta,
        }
        for f in result.face_reports
    ]
    fields = {
        "faces": faces,
        "faces_dropped": result.faces_dropped,
        "outputs": produced,
        # The pipeline's own profile warning supersedes the provisional one the API added.
        "warnings": merge_warnings(
            [
                w
                for w in (store.get(job_id) or record).get("warnings") or []
                if w != profile_notice(rt.pipe.info)
            ],
            list(result.warnings),
        ),
        "timings": {
            "queue_wait_seconds": started_at - wait_began(record["created_at"], record.get("queued_at")),
            "inference_seconds": batch.seconds,
            "stages": dict(result.timings),
            "batch_jobs": batch.jobs,
        },
    }
    ended = _End("succeeded", observe=partial(_observe_success, result, batch))
    _finish(rt, job_id, ended, fields, results, owner=record["owner"])


def _observe_success(result: PhotoResult, batch: _BatchRun) -> None:
    """A succeeded photo's metrics. Its record has the times the job saw (its whole batch's); the
    metrics its share of them, so their sums add up to the worker's time (docs/scaling.md)."""
    for stage, seconds in result.stage_shares.items():
        metrics.STAGE.labels(stage).observe(seconds)
    metrics.FACES.observe(len(result.face_reports))
    for f in result.face_reports:
        metrics.NFE.observe(f.facts.nfe)
    metrics.INFERENCE.observe(batch.seconds / batch.jobs)


def _fail(rt: Runtime, job_id: str, error: Exception) -> None:
    """End a job that did not succeed, with the outcome its error maps to."""
    if isinstance(error, Cancelled):
        _finish(rt, job_id, _End("canceled"))
    elif isinstance(error, PipelineError):
        _finish(rt, job_id, _End("failed", (error.code, error.message)))
    elif isinstance(error, JobTimeoutException):
        job = get_current_job()
        limit = job.timeout if job is not None and job.timeout else rt.settings.job_timeout_seconds
        _finish(rt, job_id, _End("failed", ("timeout", f"The job exceeded its time limit of {limit} s.")))
    else:
        log.error("job %s: unexpected failure", job_id, exc_info=error)
        _finish(rt, job_id, _End("failed", ("internal", "Internal error while restoring the photo.")))


def _finish(
    rt: Runtime,
    job_id: str,
    end: _End,
    fields: dict[str, Any] | None = None,
    results: dict[str, bytes] | None = None,
    owner: str | None = None,
) -> None:
    """Terminal transition, counted in the metrics, then the webhook. A job finished elsewhere
    meanwhile is left alone (and counted there). ``results`` are stored counted against ``owner``'s
    stored bytes (`JobStore.finish`).

    The end is counted once it has landed, under `metrics.ENDING`: /metrics waits for the count, so
    whoever the end wakes and scrapes at once sees it."""
    body = {
        **(fields or {}),
        "status": end.status,
        "stage": None,
        "error": {"code": end.error[0], "message": end.error[1]} if end.error else None,
    }
    with metrics.ENDING:
        try:
            record = rt.store.finish(job_id, body, results, owner=owner)
        except Exception:
            # Only the reply may have been lost (a Redis timeout): an end that landed is still this
            # worker's to count and tell. Otherwise the error stands (the job then ends `internal`).
            record = _read_back(rt, job_id)
            if record is None or not end.landed_in(record):
                raise
        if record is None:
            return
        end.count(record)
    notify(record, rt.settings)


def _read_back(rt: Runtime, job_id: str) -> dict[str, Any] | None:
    """The job's record after a failed end, or None when Redis fails this read too (redis-py raises
    its RedisErrors for socket failures as well). Anything else propagates: RQ's JobTimeoutException
    above all, so that the job ends `timeout` rather than with the failed write's error."""
    try:
        return rt.store.get(job_id)
    except RedisError as e:
        log.warning("job %s: could not read back its end: %s", job_id, e)
        return None
