"""Worker metrics, served by the worker process itself (`start_http_server` on `SCRAPED`).

A SimpleWorker runs jobs in its own process, so the default registry is complete: no multiprocess
mode is needed here. Buckets reach 10 minutes because one real face on a slow GPU, or a queue
backlog, can take that long. No job ids in labels.

A job's end is written to Redis and counted here under `ENDING`, and /metrics reads the registry
under the same lock: a client woken by the end (`Prefer: wait`, a webhook) that scrapes at once
waits for the count instead of missing it, and a job is still counted only once its end has landed
(an end that another process wrote first, or that never reached Redis, is not this worker's to count).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

log = logging.getLogger(__name__)

# `_created` series double the series count and no dashboard of ours uses them.
disable_created_metrics()

_SECONDS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 180, 300, 600)

QUEUE_WAIT = Histogram(
    "dynface_queue_wait_seconds",
    "Time from submission, or from its last re-queue after a lost worker, to a worker starting the job.",
    buckets=_SECONDS,
)
INFERENCE = Histogram(
    "dynface_inference_seconds",
    "A succeeded job's share of the pipeline time of the batch it ran in (the batch's time divided by "
    "its jobs; all of it for a job run alone).",
    buckets=_SECONDS,
)
END_TO_END = Histogram(
    "dynface_job_duration_seconds",
    "Submission to completion (queue wait + inference) of the jobs a worker ended; jobs ended without "
    "one (worker_lost, queue_timeout, canceled while queued) count only in dynface_jobs_total.",
    buckets=_SECONDS,
)
STAGE = Histogram(
    "dynface_stage_seconds",
    "Pipeline stage time per photo; a stage the photos of a batch share (dblm, sample) counts each "
    "photo's share of it.",
    ["stage"],
    buckets=_SECONDS,
)
JOBS = Counter(
    "dynface_jobs_total", "Finished jobs by outcome and reason (error code, or 'ok').", ["outcome", "reason"]
)
BATCH_JOBS = Histogram(
    "dynface_jobs_per_batch",
    "Jobs whose faces one pipeline batch restored together (1 = alone; DYNFACE_WORKER_BATCH_MAX_JOBS).",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
)
FACES = Histogram("dynface_faces_per_image", "Faces restored per photo.", buckets=(0, 1, 2, 4, 8, 16, 32, 64))
NFE = Histogram(
    "dynface_diffusion_steps_per_face",
    "Diffusion steps (UNet evaluations) per face.",
    buckets=(5, 10, 25, 50, 75, 100, 150, 250),
)
GPU_PEAK = Gauge(
    "dynface_gpu_peak_memory_bytes", "Peak accelerator memory allocated during the last job.", ["device"]
)
MODEL_LOAD = Gauge("dynface_model_load_seconds", "Time taken to load the pipeline at start-up.")
READY = Gauge("dynface_worker_ready", "1 once the model is loaded and the worker takes jobs.")


#: Held while a job's end is written and counted: scrapes wait meanwhile (module docstring). A plain
#: lock taken with `with`: an exception raised from a signal handler (RQ's job timeout) cannot leave
#: it held, as it could inside a generator's `__enter__`.
ENDING = threading.Lock()

#: How long a scrape waits for `ENDING`. A hung Redis can hold it for several redis timeouts (the end's
#: write, reconnects, Sentinel discovery), and Prometheus gives up on a scrape after 10 s by default:
#: past this a scrape answers without waiting for the end being counted.
SCRAPE_WAIT_SECONDS = 5.0


class _Scraped:
    """A registry as /metrics reads it: whole, or by name (`?name[]=`), between job ends."""

    def __init__(self, registry: CollectorRegistry, names: Iterable[str] | None = None) -> None:
        self._registry = registry
        self._source: Collector = registry if names is None else registry.restricted_registry(names)

    def collect(self) -> Iterable[Metric]:
        lock = ENDING
        locked = lock.acquire(timeout=SCRAPE_WAIT_SECONDS)
        if not locked:
            log.warning("a job's end held /metrics for %s s (Redis slow?): serving it", SCRAPE_WAIT_SECONDS)
        try:
            return list(self._source.collect())
        finally:
            if locked:
                lock.release()

    def restricted_registry(self, names: Iterable[str]) -> _Scraped:
        return _Scraped(self._registry, names)


#: What the worker's /metrics serves.
SCRAPED = _Scraped(REGISTRY)


def serve(port: int, host: str | None = None) -> int:
    """Serve `SCRAPED` on `port` (0: any free one) of `host` (None: every interface) from a background
    thread; the port it listens on. Raises OSError when the port cannot be bound."""
    # prometheus_client reads a registry duck-typed: `collect` and `restricted_registry` are all it uses.
    server, _ = start_http_server(port, addr=host or "0.0.0.0", registry=SCRAPED)  # type: ignore[arg-type]
    return server.server_port
