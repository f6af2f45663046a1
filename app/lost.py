"""Jobs whose worker was lost: found, re-queued or failed, and mirrored into their records — one
implementation, run by every worker's reaper (worker/main.py) and by the API's sweep (app/queued.py),
one process a round (`take_round`). In the API too, because the workers may be the missing part: a
lost worker's `processing` job must not wait for a worker that never comes back (`dynface serve`
stopped with nothing restarted, a pool scaled to zero by KEDA, which counts only the queue list).

RQ detects a lost worker only when its job's execution entry in the StartedJobRegistry expires (the
worker's heartbeat renews it every heartbeat_interval). `reap` runs RQ's own cleanup of expired
executions, which re-queues the job while it has retries (`Retry`) and fails it otherwise;
`abandoned_handler` mirrors each decision into our record (`fail_lost`). Anyone else may run that
cleanup first (RQ's `count` and `get_job_ids` do, without our handler: `rq info`, dashboards), so each
round also reconciles records with what RQ did (`reconcile`). Every move of a `processing` record here
applies only to the attempt that was lost: its RQ execution expired or is gone (`attempt_over` in
app/jobs.py), so a second queue entry of a running job's id never disturbs it. A lost worker's job
whose client asked it to stop (DELETE of a running job, 202) ends `canceled`, as its worker would
have ended it, and leaves the queue (`fail_lost`, `reconcile`).

Expired by Redis' clock (`TIME`), not the reaping host's: an API pod whose clock ran ahead of the
workers' by more than heartbeat_ttl − heartbeat_interval took live jobs for lost ones. The expiries
themselves are still written by RQ with each worker's clock (`StartedJobRegistry.add_execution`), so
the workers' clocks must keep within that margin of Redis' (NTP), as must those of RQ's own cleanups
that run without us (a worker's maintenance, `rq info`).

Torch-free: the API imports it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter
from redis import Redis
from rq.exceptions import AbandonedJobError, NoSuchJobError
from rq.job import Job
from rq.queue import Queue
from rq.registry import CanceledJobRegistry
from rq.utils import as_text

from app.jobs import ACTIVE, JobStore, merge_warnings
from app.settings import Settings
from app.webhooks import notify

log = logging.getLogger(__name__)

# Job ARGV[1], moved by RQ's dequeue from the queue (KEYS[2]) to its intermediate list (KEYS[1]), with
# no execution in the StartedJobRegistry (KEYS[3]) and `queued` in its RQ job hash (KEYS[5]), is
# stranded there. Hash KEYS[4] notes when it was first seen so (job id → Redis' clock; TTL ARGV[3]),
# and a job no longer stranded loses its note. Stranded for ARGV[2] seconds (0: at once), it goes
# back to the front of the queue, and RQ's own first-seen key for it (KEYS[6]) goes too: left behind,
# it would make RQ's maintenance take the job's next dequeue for one stranded long ago. Returns 1
# when it put the job back.
_RETURN_STRANDED = """
local id = ARGV[1]
local stranded = redis.call('LPOS', KEYS[1], id) and redis.call('HGET', KEYS[5], 'status') == 'queued'
if stranded then
  for _, entry in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
    if string.sub(entry, 1, #id + 1) == id .. ':' then stranded = false break end
  end
end
if not stranded then
  redis.call('HDEL', KEYS[4], id)
  return 0
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
local seen = tonumber(redis.call('HGET', KEYS[4], id))
if not seen then
  seen = now
  redis.call('HSET', KEYS[4], id, tostring(now))
  redis.call('EXPIRE', KEYS[4], ARGV[3])
end
if now - seen < tonumber(ARGV[2]) then return 0 end
redis.call('HDEL', KEYS[4], id)
redis.call('DEL', KEYS[6])
redis.call('LREM', KEYS[1], 1, id)
-- Already waiting in the queue (RQ re-queued it, its worker lost after starting it): only this entry goes.
if redis.call('LPOS', KEYS[2], id) then return 0 end
redis.call('LPUSH', KEYS[2], id)
return 1
"""


@dataclass(frozen=True)
class Tally:
    """How the process that ends a lost worker's job counts it: in its own `dynface_jobs_total`, while
    holding the lock its /metrics waits on (a worker's `metrics.ENDING`), so that a scrape woken by
    the end sees the count."""

    jobs: Counter
    ending: AbstractContextManager[Any] = field(default_factory=nullcontext)


def lost_warning(attempt: int) -> str:
    return f"The worker running attempt {attempt} was lost; the job was re-queued."


def requeue_lost(
    store: JobStore, settings: Settings, tally: Tally, job_id: str, waiting_in: str | None = None
) -> None:
    """A `processing` job whose worker was lost, and which RQ re-queues: back to ``queued``, waiting
    afresh from now (`JobStore.requeue`), with a warning; or, once its cancel was requested, ended
    ``canceled`` (`cancel_lost`), also when the DELETE lands between the record's read and the
    re-queue (which refuses it then). Nothing when it was no longer processing, or processing for an
    attempt that was not lost."""
    record = store.get(job_id)
    if record is None or cancel_lost(store, settings, tally, job_id, record):
        return
    fields = {
        "stage": None,
        "step": None,
        "total": None,
        "warnings": merge_warnings(record.get("warnings") or [], [lost_warning(record.get("attempts", 0))]),
    }
    if not store.requeue(job_id, fields, waiting_in):
        cancel_lost(store, settings, tally, job_id, store.get(job_id) or {})


def fail_lost(store: JobStore, settings: Settings, tally: Tally, job_id: str, retries_left: int) -> None:
    """A worker died holding this job (RQ found its execution expired): say so in our record.

    A job whose cancel was requested ends ``canceled`` (`cancel_lost`). Otherwise, with retries
    left RQ re-queues the job and it goes back to ``queued`` (`requeue_lost`); without, it fails with
    ``worker_lost``. An end is counted in ``tally`` and its webhook sent. Runs in whichever process's
    reaper noticed, or in the worker whose job RQ failed.
    """
    if retries_left > 0:
        requeue_lost(store, settings, tally, job_id)
        return
    record = store.get(job_id)
    if record is None or cancel_lost(store, settings, tally, job_id, record):
        return
    attempt = record.get("attempts", 0)
    message = f"The worker running this job was lost {attempt} time(s); giving up."
    error = {"code": "worker_lost", "message": message}
    fields = {"status": "failed", "stage": None, "error": error}
    if end_job(store, settings, tally, job_id, fields, lost=True, unless_canceled=True) is None:
        cancel_lost(store, settings, tally, job_id, store.get(job_id) or {})  # a DELETE landed meanwhile


def cancel_lost(
    store: JobStore, settings: Settings, tally: Tally, job_id: str, record: dict[str, Any]
) -> bool:
    """A lost worker's job whose client asked it to stop (`cancel_requested`: the DELETE of a running
    job) ends ``canceled``, as its worker would have ended it: re-queued, it waited for a worker that
    would only cancel it, and with none left failed ``queue_timeout`` an hour later. Returns whether
    it was asked to stop (then nothing else is done with it, whether this end landed or another
    did). Its RQ job, which RQ may re-queue after this, leaves the queue in `reconcile`."""
    if not record.get("cancel_requested"):
        return False
    end_job(store, settings, tally, job_id, {"status": "canceled", "stage": None, "error": None}, lost=True)
    return True


def end_job(
    store: JobStore, settings: Settings, tally: Tally, job_id: str, fields: dict[str, Any], **finish: Any
) -> dict[str, Any] | None:
    """End a job the process found without a live worker (`JobStore.finish` with ``finish``: a lost
    worker's job, or one still queued), counted in ``tally`` by the process whose end landed, then
    told (webhook). Returns the final record, or None when the job had moved on (nothing is done)."""
    with tally.ending:  # counted before a scrape can see it ended
        final = store.finish(job_id, fields, **finish)
        if final is not None:
            error = final.get("error")
            tally.jobs.labels(final["status"], error["code"] if error else final["status"]).inc()
    if final is not None:
        notify(final, settings)
    return final


def abandoned_handler(
    store: JobStore, settings: Settings, tally: Tally
) -> Callable[[Job, type, BaseException, Any], bool]:
    """RQ exception handler: mirrors RQ's decision for each abandoned job (its execution expired) into
    its record, before RQ re-queues or fails it. Passed by `reap` and by RQ's own maintenance in a
    worker (`push_exc_handler`)."""

    def handler(job: Job, exc_type: type, exc_value: BaseException, tb: Any) -> bool:
        if exc_type is AbandonedJobError:
            fail_lost(store, settings, tally, job.id, job.retries_left or 0)
        return True

    return handler


def take_round(store: JobStore, queue: Queue, settings: Settings, holder: str) -> bool:
    """Whether this process reaps this round: one process a round, workers and APIs alike (a Redis
    lock that lapses after reaper_interval_seconds, named for ``holder``)."""
    lock_ms = max(1, int(settings.reaper_interval_seconds * 1000))
    return bool(store.redis.set(store.key("reaper-lock", queue.name), holder, nx=True, px=lock_ms))


def reap(store: JobStore, queue: Queue, settings: Settings, tally: Tally) -> None:
    """One reaper round: RQ's cleanup of the executions that expired (our handler mirrors each into
    its record), `return_stranded` for jobs taken but never started, then `reconcile` for what a
    cleanup run by someone else did. The caller holds the round (`take_round`). Expired by Redis'
    clock (`redis_time`), as the record transitions judge it."""
    handlers = [abandoned_handler(store, settings, tally)]
    queue.started_job_registry.cleanup(timestamp=redis_time(store.redis), exception_handlers=handlers)
    return_stranded(store, settings, queue, after=settings.heartbeat_ttl_seconds)
    reconcile(store, settings, tally, queue)


def redis_time(redis: Redis) -> float:
    """Redis' clock (`TIME`) as a Unix time: the one clock every reaper shares."""
    seconds, micros = redis.time()
    return seconds + micros / 1e6


def return_stranded(store: JobStore, settings: Settings, queue: Queue, after: float) -> None:
    """Put back at the front of the queue, in their order, the jobs stranded between RQ's dequeue and
    their start for `after` seconds (`_RETURN_STRANDED`).

    RQ's dequeue moves a job from the queue to an intermediate list, and its worker starts it a few
    round trips later. A worker stopped (SIGTERM while idle) or lost in between leaves the job there,
    `queued` and out of the queue, until RQ's own maintenance (10 minutes apart or more, after a
    minute there, and only in a live worker) fails it as lost: a retry spent on a job that never ran,
    or `worker_lost`. It never ran, so it just waits again where it was, retries and record
    untouched. Safe at any age: a worker that then starts it finds it gone and leaves it
    (`DynfaceWorker._take`); the reaper waits heartbeat_ttl_seconds, as for a silent worker's
    running job, so as not to bounce dequeues in progress."""
    notes = store.key("stranded", queue.name)
    stranded = [as_text(i) for i in store.redis.lrange(queue.intermediate_queue_key, 0, -1)]
    noted = [i for i in (as_text(k) for k in store.redis.hkeys(notes)) if i not in stranded]
    put_back = store.redis.register_script(_RETURN_STRANDED)
    args = [after, settings.record_ttl_seconds]
    for job_id in [*reversed(stranded), *noted]:  # each goes to the front: the oldest last
        keys = [queue.intermediate_queue_key, queue.key, queue.started_job_registry.key, notes]
        keys += [Job.key_for(job_id), queue.intermediate_queue.get_first_seen_key(job_id)]
        if put_back(keys=keys, args=[job_id, *args]):
            log.warning("job %s: its worker stopped or was lost before starting it; queued again", job_id)


def reconcile(store: JobStore, settings: Settings, tally: Tally, queue: Queue) -> None:
    """Mirror into our records what RQ did to lost workers' jobs without our exception handler.

    RQ's `StartedJobRegistry.count` and `get_job_ids` run its cleanup with no handler, so whoever
    lists running jobs (`rq info`, a dashboard) may fail or re-queue a lost worker's job first, and
    its record would stay `processing` until it expired (a 404). So: an active record whose RQ job
    is in the FailedJobRegistry fails with `worker_lost`, and a `processing` record whose RQ job is
    still in the queue goes back to `queued` (a worker that takes it first says so itself:
    `worker.tasks._start`), or ends `canceled` if its cancel was requested (`cancel_lost`). Both only
    for an attempt RQ no longer runs: an id in the queue may be a second entry of a running job's.
    A `canceled` job's id leaves the queue (`drop_from_queue`): RQ re-queues a lost worker's job
    after our handler has ended it. The lists are short here: the queue is capped by
    max_queue_depth, and RQ fails a job only when its worker was lost (`worker.tasks.restore`
    records every other failure itself)."""
    failed = queue.failed_job_registry.get_job_ids(cleanup=False)
    waiting = queue.get_job_ids()
    status = store.statuses(failed + waiting)
    for job_id in failed:
        if status[job_id] in ACTIVE:
            fail_lost(store, settings, tally, job_id, retries_left=0)
    for job_id in waiting:
        if status[job_id] == "processing":
            # Only while it is still in the queue, checked with the change: a worker may have taken
            # it since the list was read, and its running job's record must stay `processing`.
            requeue_lost(store, settings, tally, job_id, waiting_in=queue.key)
            status.update(store.statuses([job_id]))
        if status[job_id] == "canceled":
            drop_from_queue(store.redis, queue, job_id)


def drop_from_queue(redis: Redis, queue: Queue, job_id: str) -> None:
    """Best-effort removal of an ended job's RQ job from the queue. Failure is harmless: a worker
    that dequeues it finds the record no longer queued and skips it (worker.tasks._start).

    RQ's cancel also files the job in its canceled-job registry (`rq:canceled:<queue>`), a sorted set
    that nothing of RQ's ever trims and that dynface never reads: each cancel or queue timeout would
    leave an entry there for good. The entry is taken out again in the cancel's own transaction, so
    it never exists; the RQ job keeps its `canceled` status until its TTL (the record's) ends it.
    Every entry of its id goes (RQ's cancel takes one), and an RQ job already canceled only loses
    those (RQ refuses to cancel it again): `reconcile` drops each canceled job's id it finds queued."""
    try:
        job = Job.fetch(job_id, connection=redis, serializer=queue.serializer)
        canceled = job.is_canceled
        with redis.pipeline() as pipe:  # MULTI/EXEC: cancel's writes, then the registry entry's removal
            if not canceled:
                job.cancel(pipeline=pipe)
                pipe.zrem(CanceledJobRegistry(job.origin, connection=redis).key, job.id)
            pipe.lrem(queue.key, 0, job.id)
            pipe.execute()
    except NoSuchJobError:
        pass  # already gone: nothing to remove
    except Exception as e:  # RQ's own errors, Redis down: the job has ended anyway
        log.warning("job %s: ended, but its RQ job was not removed from the queue: %s", job_id, e)
