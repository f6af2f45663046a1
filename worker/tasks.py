"""The RQ job function: read the input from Redis, run the pipeline, store results, map failures.

RQ imports the function by name and passes only the job id (JSON), so everything the job needs
lives in our Redis record and in the `Runtime` that worker.main binds once at start-up (the
pipeline is loaded before the first job and reused: CUDA state cannot be rebuilt per job).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from app.jobs import JobStore
from app.schemas import RestorationOptions, profile_notice
from app.settings import Settings
from app.webhooks import notify
from models.errors import Cancelled, PipelineError
from models.pipeline import RestorationPipeline, RestoreOptions
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


_runtime: Runtime | None = None


def bind(runtime: Runtime) -> None:
    """Called once by worker.main after the model has loaded, before the first job."""
    global _runtime
    _runtime = runtime


def restore(job_id: str) -> None:
    """Run one job. Never raises for job-level failures: they are recorded in our job record so
    RQ's Retry is spent only on lost workers (a no_face photo would fail the same way again)."""
    rt = _runtime
    if rt is None:
        raise RuntimeError("worker.tasks.restore called outside a dynface worker (no pipeline bound)")
    store = rt.store
    record = store.get(job_id)
    if record is None:
        log.warning("job %s: record expired before it ran", job_id)
        return
    now = time.time()
    started = store.update(
        job_id,
        {
            "status": "processing",
            "stage": None,
            "step": None,
            "total": None,
            "started_at": now,
            "attempts": record.get("attempts", 0) + 1,
            "worker": rt.worker_name,
        },
    )
    if not started:  # canceled (or otherwise finished) while it waited in the queue
        return
    store.renew(job_id)
    metrics.QUEUE_WAIT.observe(max(0.0, now - record["created_at"]))
    if rt.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(rt.device)
    # The mapping covers the whole job, not only the pipeline call: RQ's timeout (SIGALRM) can
    # strike while results are stored, and an exception escaping to RQ would leave our record
    # `processing` forever (RQ would retry it as if the worker had been lost).
    try:
        _run(rt, job_id, record, now)
    except Cancelled:
        _finish(rt, job_id, "canceled", None)
    except PipelineError as e:
        _finish(rt, job_id, "failed", (e.code, e.message))
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        _finish(
            rt,
            job_id,
            "failed",
            ("cuda_oom", "The GPU ran out of memory on this photo; try a smaller image or upscale."),
        )
    except JobTimeoutException:
        job = get_current_job()
        limit = job.timeout if job is not None and job.timeout else rt.settings.job_timeout_seconds
        _finish(rt, job_id, "failed", ("timeout", f"The job exceeded its time limit of {limit} s."))
    except Exception:
        log.exception("job %s: unexpected failure", job_id)
        _finish(rt, job_id, "failed", ("internal", "Internal error while restoring the photo."))
    finally:
        if rt.device.startswith("cuda"):
            metrics.GPU_PEAK.labels(rt.device).set(torch.cuda.max_memory_allocated(rt.device))


def _run(rt: Runtime, job_id: str, record: dict[str, Any], started_at: float) -> None:
    """The pipeline on the stored input, then results into Redis. Failures raise (see `restore`)."""
    store = rt.store
    if record.get("cancel_requested"):
        raise Cancelled("Canceled before it started.")
    data = store.input(job_id)
    if data is None:
        raise PipelineError("The uploaded image expired before the job ran.")  # code: internal
    opts = RestorationOptions.model_validate(record["options"]).pipeline_options()
    options = RestoreOptions(**{**opts, "outputs": tuple(opts["outputs"])})
    rq_job = get_current_job()

    def progress(stage: str, step: int, total: int) -> None:
        # `progress` counts diffusion steps only; the other stages report (0, 0) or a face count,
        # which would make the public step/total jump between units.
        fields: dict[str, Any] = {"stage": stage}
        if stage == "sample":
            fields.update(step=step, total=total)
        store.update(job_id, fields, allowed=["processing"])
        if rq_job is not None:  # mirrored into RQ's job meta for RQ's own tools (rq info, dashboards)
            rq_job.meta.update(fields)
            rq_job.save_meta()

    t0 = time.perf_counter()
    result = rt.pipe.restore_photo(
        data, options, progress=progress, should_cancel=lambda: store.cancel_requested(job_id)
    )
    inference = time.perf_counter() - t0
    # A DELETE that arrived after the last diffusion step (paste/encode) still wins: the client was
    # told "poll until canceled".
    if store.cancel_requested(job_id):
        raise Cancelled("Canceled after sampling.")

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
    for stage, seconds in result.timings.items():
        metrics.STAGE.labels(stage).observe(seconds)
    metrics.FACES.observe(len(result.face_reports))
    for f in result.face_reports:
        metrics.NFE.observe(f.facts.nfe)
    metrics.INFERENCE.observe(inference)
    fields = {
        "faces": faces,
        "faces_dropped": result.faces_dropped,
        "outputs": produced,
        # The pipeline's own profile warning supersedes the provisional one the API added.
        "warnings": _merge(
            [
                w
                for w in (store.get(job_id) or record).get("warnings") or []
                if w != profile_notice(rt.pipe.info)
            ],
            list(result.warnings),
        ),
        "timings": {
            "queue_wait_seconds": started_at - record["created_at"],
            "inference_seconds": inference,
            "stages": dict(result.timings),
        },
    }
    _finish(rt, job_id, "succeeded", None, fields, results)


def _merge(warnings: list[str], extra: list[str]) -> list[str]:
    """Warnings + new ones, without duplicates, in order."""
    return list(dict.fromkeys([*warnings, *extra]))


def _finish(
    rt: Runtime,
    job_id: str,
    status: str,
    error: tuple[str, str] | None,
    fields: dict[str, Any] | None = None,
    results: dict[str, bytes] | None = None,
) -> None:
    """Terminal transition + metrics + webhook. A job finished elsewhere meanwhile is left alone."""
    body = {
        **(fields or {}),
        "status": status,
        "stage": None,
        "error": {"code": error[0], "message": error[1]} if error else None,
    }
    record = rt.store.get(job_id) or {}
    if not rt.store.finish(job_id, body, results, result_ttl=record.get("result_ttl")):
        return
    record = rt.store.get(job_id)
    reason = error[0] if error else ("ok" if status == "succeeded" else status)
    metrics.JOBS.labels(status, reason).inc()
    if record is not None:
        metrics.END_TO_END.observe(max(0.0, record["completed_at"] - record["created_at"]))
        notify(record, rt.settings)


def fail_lost(store: JobStore, settings: Settings, job_id: str, retries_left: int) -> None:
    """A worker died holding this job (RQ found its execution expired): say so in our record.

    With retries left RQ re-queues the job and it goes back to ``queued``; otherwise it fails
    with ``worker_lost``. Runs in whichever worker's reaper noticed.
    """
    record = store.get(job_id)
    if record is None:
        return
    attempt = record.get("attempts", 0)
    if retries_left > 0:
        store.update(
            job_id,
            {
                "status": "queued",
                "stage": None,
                "step": None,
                "total": None,
                "warnings": _merge(
                    record.get("warnings") or [],
                    [f"The worker running attempt {attempt} was lost; the job was re-queued."],
                ),
            },
            allowed=["processing"],
        )
        return
    if store.finish(
        job_id,
        {
            "status": "failed",
            "stage": None,
            "error": {
                "code": "worker_lost",
                "message": f"The worker running this job was lost {attempt} time(s); giving up.",
            },
        },
    ):
        metrics.JOBS.labels("failed", "worker_lost").inc()
        final = store.get(job_id)
        if final is not None:
            notify(final, settings)
