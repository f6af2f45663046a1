"""API metrics (Prometheus). No job ids in labels: label values must stay a small, fixed set.

Request counters/histograms are ordinary metrics, so several uvicorn workers need prometheus
multiprocess mode (PROMETHEUS_MULTIPROC_DIR; `dynface serve` wipes it at start). Queue depth,
oldest-queued age, workers by state and Redis' memory use and limit are read from Redis at scrape
time by a custom collector, so every API process reports the same truth and no process has to keep
gauges in sync.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.jobs import JobStore

log = logging.getLogger(__name__)

# `_created` series double the series count and no dashboard of ours uses them.
disable_created_metrics()

#: `error_code` is the code of an error answer's body (app/errors.py: only codes of our own, framework
#: 404/405/422 included), "" for any other answer: Prometheus stores an empty label as no label, so
#: successes keep their plain series and `error_code!=""` selects the errors. Not `code`, which
#: exporters commonly use for the HTTP status.
REQUESTS = Counter(
    "dynface_http_requests_total",
    "HTTP requests by route, method, status and error code.",
    ["route", "method", "status", "error_code"],
)
REQUEST_SECONDS = Histogram(
    "dynface_http_request_duration_seconds",
    "HTTP request duration.",
    ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
UPLOAD_BYTES = Histogram(
    "dynface_upload_bytes",
    "Size of accepted uploads (decoded image bytes).",
    buckets=(16e3, 64e3, 256e3, 1e6, 4e6, 16e6, 64e6),
)
JOBS_SUBMITTED = Counter("dynface_jobs_submitted_total", "Jobs accepted into the queue.")
JOBS_REJECTED = Counter("dynface_jobs_rejected_total", "Submissions refused, by error code.", ["reason"])
#: The workers' `dynface_jobs_total` (worker.metrics.JOBS), for the jobs that end in the API: those
#: canceled or timed out while queued (app/queued.py) never reach a worker, and a lost worker's job
#: the API's sweep fails (`worker_lost`, app/lost.py). Summed over targets, it counts every ended
#: job. Kept out of the default registry, where the worker's metric of the same name lives when one
#: process imports both (`render` registers it).
JOBS_ENDED = Counter(
    "dynface_jobs_total",
    "Finished jobs by outcome and reason (error code, or 'ok').",
    ["outcome", "reason"],
    registry=None,
)

#: Every state a worker announces (worker/main.py): each is a series, 0 when no worker is in it.
WORKER_STATES = ("loading", "missing_weights", "misconfigured", "ready", "busy", "stopping")


class RedisStateCollector(Collector):
    """Queue depth, oldest queued job age, workers by state and Redis' memory (used and `maxmemory`,
    one INFO call), read from Redis on each scrape. No command here needs memory (reads, and the
    SREM that prunes dead workers), so a full Redis refusing writes (noeviction) still answers: the
    moment the memory gauges are for."""

    def __init__(self, store: JobStore, queue_name: str) -> None:
        self.store = store
        self.queue_name = queue_name

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("dynface_queue_depth", "Jobs waiting in the queue.", labels=["queue"])
        oldest = GaugeMetricFamily(
            "dynface_queue_oldest_age_seconds",
            "Age of the oldest queued job (0 when empty).",
            labels=["queue"],
        )
        workers = GaugeMetricFamily("dynface_workers", "Live workers by state.", labels=["state"])
        used_memory = GaugeMetricFamily(
            "dynface_redis_memory_used_bytes", "Memory Redis has allocated (INFO memory used_memory)."
        )
        max_memory = GaugeMetricFamily(
            "dynface_redis_memory_max_bytes",
            "Redis' memory limit (INFO memory maxmemory); 0 = no limit.",
        )
        up = GaugeMetricFamily("dynface_redis_up", "Whether Redis answered this scrape.")
        try:
            r = self.store.redis
            qkey = f"rq:queue:{self.queue_name}"
            n = r.llen(qkey)
            age = 0.0
            head = r.lindex(qkey, 0)
            if head is not None:
                rec = self.store.get(head.decode())
                if rec is not None:
                    age = max(0.0, time.time() - rec["created_at"])
            counts = dict.fromkeys(WORKER_STATES, 0)
            for w in self.store.workers():
                counts[w.get("state", "ready")] = counts.get(w.get("state", "ready"), 0) + 1
            memory = _memory_info(r)
        except Exception as e:  # a scrape must still answer (with redis_up 0) when Redis is down
            log.warning("metrics: redis unavailable: %s", e)
            up.add_metric([], 0)
            yield up
            return
        depth.add_metric([self.queue_name], n)
        oldest.add_metric([self.queue_name], age)
        for state, c in counts.items():
            workers.add_metric([state], c)
        # A Redis that refuses INFO or hides a field leaves out that gauge, not the scrape.
        if "used_memory" in memory:
            used_memory.add_metric([], memory["used_memory"])
        if "maxmemory" in memory:
            max_memory.add_metric([], memory["maxmemory"])
        up.add_metric([], 1)
        yield from (depth, oldest, workers, used_memory, max_memory, up)


_info_refusal_logged = False


def _memory_info(r: redis.Redis) -> dict[str, Any]:
    """INFO memory; empty when Redis refuses the command (an ACL without it, a managed Redis that
    renames it): that is no outage, so only the memory gauges are left out, and it is logged once per
    process, being a setting of that Redis rather than an event. Other errors propagate."""
    global _info_refusal_logged
    try:
        return r.info("memory")
    except redis.exceptions.ResponseError as e:
        if not _info_refusal_logged:
            log.warning("metrics: no Redis memory gauges, INFO memory refused: %s", e)
            _info_refusal_logged = True
        return {}


def render(store: JobStore, queue_name: str) -> bytes:
    """The /metrics body: this process's metrics (or all processes' in multiprocess mode) + Redis state."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:
        for collector in (REQUESTS, REQUEST_SECONDS, UPLOAD_BYTES, JOBS_SUBMITTED, JOBS_REJECTED, JOBS_ENDED):
            registry.register(collector)
    registry.register(RedisStateCollector(store, queue_name))
    return generate_latest(registry)
