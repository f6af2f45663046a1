"""Jobs that end while still queued, in the API: a DELETE's cancel, and the sweep that fails jobs no
worker took within the queue timeout (`Settings.queue_timeout`) and trims RQ's canceled-job registry.
The sweep also reaps lost workers' jobs (app/lost.py), as every worker does.

A queued job's record, input and RQ job expire DYNFACE_RECORD_TTL_SECONDS after it began to wait (a
worker renews them when it starts the job), and a lost worker's `processing` job is re-queued or
failed only by a reaper. Without a live worker they would vanish unannounced: a 404, no webhook,
never `failed`. So the sweep runs in every API process, not in the workers that may be the missing
part; Redis locks let one process do each round (the reaper's lock is shared with the workers).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
from redis import Redis
from rq import Queue

from app import lost, metrics
from app.errors import brief_redis_error, redis_unavailable
from app.jobs import JobStore
from app.settings import Settings

log = logging.getLogger(__name__)

#: The jobs this API ends (queued ones, lost workers') are counted in its `dynface_jobs_total`.
_TALLY = lost.Tally(metrics.JOBS_ENDED)


def end_queued(
    store: JobStore, queue: Queue, settings: Settings, job_id: str, fields: dict[str, Any]
) -> dict[str, Any] | None:
    """End a job that is still queued as a worker ends one: terminal record, count, webhook; then take
    its RQ job off the queue. Returns the final record, or None when the job was no longer queued
    (then nothing is done: a worker took it, or it ended otherwise)."""
    # The record is the truth once it says the job ended: counted and told before anything can fail.
    record = lost.end_job(store, settings, _TALLY, job_id, fields, allowed=["queued"])
    if record is not None:
        lost.drop_from_queue(store.redis, queue, job_id)
    return record


def sweep(store: JobStore, queue: Queue, settings: Settings) -> list[str]:
    """One round: reap lost workers' jobs (`lost.reap`) unless another process, API or worker, holds
    this round of the reaper; then, unless another API process holds this round's lock, fail every
    queued job that has waited longer than the queue timeout with `queue_timeout`. Returns the ids of
    the jobs it failed so. A reap that fails (an odd record, Redis) is logged and the queue timeouts
    still run: else a failure that repeats would leave queued jobs waiting until their records expire."""
    try:
        if lost.take_round(store, queue, settings, holder="api"):
            lost.reap(store, queue, settings, _TALLY)
    except Exception as e:
        failed = "queue sweep: reaping lost workers' jobs failed (queue timeouts still run)"
        if redis_unavailable(e):  # an outage or a refusal (read-only, full), not a bug: no traceback
            log.warning("%s: %s", failed, brief_redis_error(e))
        else:
            log.exception(failed)
    lock_ms = max(1, int(settings.reaper_interval_seconds * 1000))
    if not store.redis.set(store.key("queue-sweep-lock", queue.name), "1", nx=True, px=lock_ms):
        return []
    timeout = settings.queue_timeout
    cutoff = time.time() - timeout
    failed = {
        "status": "failed",
        "stage": None,
        "error": {
            "code": "queue_timeout",
            "message": f"No worker started this job within {timeout:g} s of queueing; submit it again later.",
        },
    }
    ended = []
    for job_id, since in store.waiting_since(queue.get_job_ids()).items():
        if since < cutoff and end_queued(store, queue, settings, job_id, failed) is not None:
            ended.append(job_id)
    trim_canceled_registry(store.redis, queue, settings)
    return ended


def trim_canceled_registry(redis: Redis, queue: Queue, settings: Settings) -> int:
    """Drop the entries of RQ's canceled-job registry older than the record TTL; returns how many.
    Versions before `lost.drop_from_queue` took its entries out left one there per cancel and queue
    timeout, and RQ never removes them (its cleanup of that registry does nothing), so the set grew
    for good. dynface never reads it; entries that old name RQ jobs whose TTL (the record's) has
    ended, while younger ones (an `rq` command's cancel by hand) stay for RQ's own tools."""
    cutoff = time.time() - settings.record_ttl_seconds
    return redis.zremrangebyscore(queue.canceled_job_registry.key, "-inf", cutoff)


async def sweep_forever(store: JobStore, queue: Queue, settings: Settings) -> None:
    """`sweep` every reaper interval, off the event loop, until cancelled (by the app's lifespan)."""
    while True:
        await anyio.sleep(settings.reaper_interval_seconds)
        try:
            ended = await anyio.to_thread.run_sync(sweep, store, queue, settings)
        except Exception as e:  # Redis down or failing over: the next round tries again
            log.warning("queue sweep: %s: %s", type(e).__name__, e)
            continue
        for job_id in ended:
            log.warning("job %s: failed with queue_timeout (no worker took it)", job_id)
