"""The GPU worker process: load the pipeline once, then run an RQ SimpleWorker.

Why these choices:
- SimpleWorker (no fork per job): CUDA cannot be used in a forked child, and reloading weights
  per job would cost more than the job.
- RQ detects a dead worker only when its job's execution entry in the StartedJobRegistry expires.
  By default that entry lives job_timeout + 60 s and SimpleWorker never refreshes it during a
  job, so a kill -9 would strand the job for the whole timeout. We give executions a short TTL
  (heartbeat_ttl) and refresh it from a heartbeat thread while a job runs; a background reaper
  (`app.lost.reap`, which the API's sweep runs too) runs RQ's own `StartedJobRegistry.cleanup`
  every few seconds (RQ's maintenance runs only every 10 min and only between dequeue timeouts),
  which re-queues the job via `Retry` or fails it, and mirrors that decision into our job record.
- Heartbeats and the reaper use the job store's client (socket timeout redis_timeout_seconds), not
  RQ's: RQ raises its client's socket timeout above its blocking dequeue (job timeout + ~1 min), so
  one stalled reply would outlast heartbeat_ttl and a running job would be re-queued.
- RQ's worker key (what `rq info` lists) is not what detects a lost worker; it lives
  worker_ttl + 60 s between jobs and, during one, as long as the heartbeat renews it (RQ's
  job_monitoring_interval + 60 s a beat).
- SIGTERM: RQ's warm shutdown finishes the current job; we then wait briefly for webhooks. Before
  RQ's loop has its handlers (loading the model), ours remembers the stop. A job dequeued but not yet
  started when its worker stopped goes back to the queue as the worker exits, and one whose worker
  was lost then by the reaper (`app.lost.return_stranded`), not left to RQ's maintenance, which
  would fail it as lost.
- A job's id may be in the queue twice (e.g. two cleanups of one expired execution, each re-queueing
  it). The record names the execution running its attempt, and a start only takes a `queued` job
  (or one whose named execution RQ has dropped), so the second dequeue never runs it again; RQ ends
  the job only for the execution its record names (`_finalize_success`).
- Batching (DYNFACE_WORKER_BATCH_MAX_JOBS > 1): the job RQ dequeued claims compatible waiting jobs
  ("riders", `claim_riders`) and runs their faces in its sampler batch. A claim is one Redis
  transaction (WATCH on the queue, then LREM + RQ's own execution bookkeeping in MULTI/EXEC), so a
  job is either still queued or started by exactly one worker, with an execution in the
  StartedJobRegistry that the heartbeat keeps alive: a worker lost mid-batch has every rider
  re-queued or failed by the reaper exactly like the job it dequeued.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from redis.client import Pipeline
from redis.exceptions import RedisError, WatchError
from rq import SimpleWorker
from rq.exceptions import StopRequested
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import as_text, get_version, now
from rq.worker.base import WorkerStatus

from app import lost, webhooks
from app.jobs import JobStore, connect, make_queue
from app.settings import Settings
from models import weights
from models.errors import ConfigurationError, PipelineError
from models.profiles import PROFILES, Profile
from worker import metrics, tasks

if TYPE_CHECKING:
    from types import FrameType

    from models.background import BackgroundConfig
    from models.pipeline import RestorationPipeline
    from models.speed import SpeedOptions

log = logging.getLogger(__name__)


#: Queue entries looked at per free batch slot when claiming riders: bounds the Redis work of a
#: claim; compatible jobs further back wait for a later batch.
_SCAN_PER_SLOT = 4
#: How often a batch that is not full looks at the queue again while it waits for riders.
_CLAIM_POLL_SECONDS = 0.01
#: Claim transactions retried when the queue changed under them (another worker or a submission).
_CLAIM_ATTEMPTS = 3
#: Lost workers' jobs a worker fails are counted in its own `dynface_jobs_total`, under `ENDING`.
TALLY = lost.Tally(metrics.JOBS, metrics.ENDING)


@dataclass
class _Batch:
    """The jobs one `execute_job` runs: the one RQ dequeued first, then the riders claimed for it."""

    queue: Queue
    members: list[tuple[Job, Execution]]


class DynfaceWorker(SimpleWorker):
    """SimpleWorker with a short execution TTL refreshed by a heartbeat thread during each job, and
    cross-job batching (`claim_riders`)."""

    def __init__(self, *args: Any, settings: Settings, store: JobStore, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = settings
        self.store = store
        self.registry_fields: dict[str, Any] = {}
        # The main thread announces states while the background thread republishes: one at a time,
        # so an older snapshot never lands after a newer one.
        self._publish_lock = threading.Lock()
        self._batch: _Batch | None = None
        self._stop = threading.Event()  # set by a stop signal, whenever it came

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def wait_for_stop(self, timeout: float) -> bool:
        """Whether a stop was requested, waiting up to `timeout` seconds for one."""
        return self._stop.wait(timeout)

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        """RQ's warm shutdown (SIGTERM/SIGINT), remembered: RQ records it only when a job is running
        (an idle worker just leaves its loop), and the loop that resumes RQ after a Redis outage
        must tell a requested stop from a lost connection."""
        self._stop.set()
        super().request_stop(signum, frame)

    def request_stop_before_work(self, signum: int, frame: FrameType | None) -> None:
        """The stop handler until RQ's loop installs its own (`run_worker`): while the model loads and
        RQ's loop starts, a stop signal must not kill the process, which would leave its registry
        entry `ready` until it expires. Remembered: it ends the wait for weight files, and RQ's loop
        at its first look (RQ checks its own flag before each dequeue)."""
        self._stop.set()
        self._stop_requested = True

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.settings.heartbeat_ttl_seconds

    def heartbeat(self, timeout: int | None = None, pipeline: Pipeline | None = None) -> None:
        """RQ's worker heartbeat in one round trip: RQ sends its three writes one by one when given
        no pipeline, and beats three times per job (once between dequeuing and starting it)."""
        if pipeline is not None:
            super().heartbeat(timeout, pipeline)
            return
        with self.connection.pipeline() as pipe:
            super().heartbeat(timeout, pipe)
            pipe.execute()

    def maintain_heartbeats(self, job: Job, execution: Execution) -> None:
        """RQ's `maintain_heartbeats` (this worker's key, the execution, the job) sent through the job
        store's client: RQ's own waits up to its blocking dequeue's socket timeout (minutes) for a
        reply, so one stalled socket would hold the beat past heartbeat_ttl and the reaper would
        re-queue a job that is still running. The store's gives up after redis_timeout_seconds; the
        next beat tries again."""
        worker_ttl = self.job_monitoring_interval + 60  # as RQ's
        ttl = self.get_heartbeat_ttl(job)
        with self.store.redis.pipeline() as pipe:
            self.heartbeat(worker_ttl, pipeline=pipe)
            execution.heartbeat(job.started_job_registry, ttl, pipeline=pipe)
            job.heartbeat(now(), ttl, pipeline=pipe)
            results = pipe.execute()
            # An HSET recreates a key that expired or was deleted meanwhile: as RQ does, the job's is
            # deleted again (rq#1450) and this worker's gets its whole entry back.
            if results[-1] == 1:
                pipe.delete(job.key)
            if results[0] == 1:
                pipe.hset(self.key, mapping=self.serialize())
                pipe.expire(self.key, worker_ttl)
            pipe.execute()

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self._take(job, queue)
        if execution is None:
            return
        self.announce("busy")
        batch = self._batch = _Batch(queue, [(job, execution)])
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.settings.heartbeat_interval_seconds):
                for member, member_execution in list(batch.members):  # riders join while it runs
                    try:
                        self.maintain_heartbeats(member, member_execution)
                    except Exception as e:  # a missed beat is retried; only a long outage loses the job
                        log.warning("heartbeat failed: %s", e)

        thread = threading.Thread(target=beat, name="job-heartbeat", daemon=True)
        thread.start()
        try:
            try:
                self.perform_job(job, queue, execution)
                self._finalize_riders(queue, batch.members[1:])
            finally:
                self._batch = None
                done.set()
                thread.join()
            self.set_state(WorkerStatus.IDLE)
        finally:
            # However the job ended, RQ's state write included (it raises while Redis is down): else
            # the background thread would keep publishing `busy` once the worker resumes.
            self.announce("stopping" if self.stop_requested else "ready")

    def _take(self, job: Job, queue: Queue) -> Execution | None:
        """RQ's start of the job it dequeued (`prepare_execution`), then the job out of the intermediate
        list RQ's dequeue moved it to. None, nothing started, when it is no longer there: it was put
        back in the queue meanwhile (`app.lost.return_stranded`: this worker took longer than
        heartbeat_ttl_seconds, or another one stopped just then), where another worker may take it.
        The execution is registered first, so no job this worker is about to run is put back.

        A Redis error on the way raises (RQ's loop then ends, and `_work` resumes it) with the
        execution forgotten here but left in Redis: whether the job left that list is unknown, so
        the reaper decides once the execution expires. Remembered, it would be named by the record
        of this worker's next run of the job (`execution_of`)."""
        try:
            execution = self.prepare_execution(job)
            # RQ moves a job to that list when it watches one queue on Redis 6.2+ (`Queue.dequeue_any`).
            moved = get_version(self.connection) >= (6, 2, 0)
            if not moved or self.connection.lrem(queue.intermediate_queue_key, 1, job.id):
                return execution
        except Exception:
            self._forget_executions_of(job.id)
            raise
        log.warning("job %s: put back in the queue before this worker started it; not running it", job.id)
        with self.connection.pipeline() as pipe:
            self.cleanup_execution(job, pipe, execution)
            self.set_state(WorkerStatus.IDLE, pipeline=pipe)
            pipe.execute()
        return None

    def _forget_executions_of(self, job_id: str) -> None:
        """Drop this worker's executions of the job from `executions` (RQ's `prepare_execution` adds
        one before its write, so a failed write leaves it there too); Redis is not touched."""
        for key in [key for key, e in self.executions.items() if e.job_id == job_id]:
            del self.executions[key]

    def execution_of(self, job_id: str) -> str | None:
        """The StartedJobRegistry entry of this worker's execution of the job, which `tasks._start`
        writes into its record as the attempt running it: the newest, should an older one have
        been left behind."""
        return next((e.composite_key for e in reversed(self.executions.values()) if e.job_id == job_id), None)

    def _finalize_success(self, job: Job, queue: Queue, execution: Execution, return_value: Any) -> None:
        """RQ's end of a job that returned, unless its record names another execution still running
        it: this one's start was refused (the job's id was in the queue twice). Then only this
        execution goes, and RQ's job stays as the running attempt has it (started, no TTL), so that
        RQ still finds that attempt lost if its worker dies."""
        record = self.store.get(job.id)
        if record and record["status"] == "processing" and record.get("execution") != execution.composite_key:
            log.warning("job %s: another attempt runs it (its id was queued twice); left to that one", job.id)
            with self.connection.pipeline() as pipe:
                self.cleanup_execution(job, pipe, execution)
                pipe.execute()
            return
        super()._finalize_success(job, queue, execution, return_value)

    def handle_job_failure(
        self,
        job: Job,
        queue: Queue,
        started_job_registry: StartedJobRegistry | None = None,
        exc_string: str = "",
        execution: Execution | None = None,
    ) -> None:
        """RQ ends a job that failed in its eyes, then our record follows (back to `queued` while RQ
        retries it, else failed with `worker_lost`): after, since RQ's end drops this execution, and a
        record moves for a lost attempt only once its execution is gone (`app.lost`). `tasks.restore`
        records job-level failures itself and returns, so this runs only for what escaped it: a
        forced stop, a Redis error around the job, a rider its batch did not end, a job stuck in
        RQ's intermediate queue. Without it the record would stay `processing` until it expired."""
        retries_left = job.retries_left or 0  # before RQ's retry spends one
        try:
            super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)
        finally:
            try:
                lost.fail_lost(self.store, self.settings, TALLY, job.id, retries_left)
            except Exception as e:
                log.warning("job %s: could not record its failure: %s", job.id, e)

    def claim_riders(self, key: tuple[Any, ...]) -> list[Job]:
        """Up to worker_batch_max_jobs − 1 waiting jobs whose `tasks.batch_key` is `key`, taken from
        the queue for the running job's batch; waits up to worker_batch_wait_seconds for them.
        Incompatible, canceled and expired jobs are left where they are, in order. A Redis error
        ends the claiming, not the job: riders are an optimisation, it runs with those it has."""
        s = self.settings
        batch = self._batch
        wanted = s.worker_batch_max_jobs - 1
        if batch is None or wanted <= 0:
            return []
        deadline = time.monotonic() + s.worker_batch_wait_seconds
        claimed: list[Job] = []
        keys: dict[str, tuple[Any, ...] | None] = {}  # batch keys read so far (options never change)
        while True:
            try:
                claimed += self._claim(batch, key, wanted - len(claimed), keys)
            except RedisError as e:
                log.warning("worker %s: claiming jobs to batch with stopped: %s", self.name, e)
                return claimed
            left = deadline - time.monotonic()
            if len(claimed) >= wanted or left <= 0 or self.stop_requested:
                return claimed
            time.sleep(min(left, _CLAIM_POLL_SECONDS))

    def _claim(
        self, batch: _Batch, key: tuple[Any, ...], n: int, keys: dict[str, tuple[Any, ...] | None]
    ) -> list[Job]:
        """One look at the front of the queue: claim up to `n` compatible jobs, all or none."""
        queue = batch.queue
        for _ in range(_CLAIM_ATTEMPTS):
            with self.connection.pipeline() as pipe:
                try:
                    pipe.watch(queue.key)
                    waiting = [as_text(i) for i in pipe.lrange(queue.key, 0, n * _SCAN_PER_SLOT - 1)]
                    for i in waiting:
                        if i not in keys:
                            keys[i] = self._batch_key(i)
                    chosen = [i for i in dict.fromkeys(waiting) if keys[i] == key][:n]
                    jobs = Job.fetch_many(chosen, connection=self.connection, serializer=self.serializer)
                    jobs = [j for j in jobs if j is not None]
                    if not jobs:
                        return []
                    pipe.multi()
                    executions = [self._start_rider(pipe, queue, job) for job in jobs]
                    pipe.execute()
                except WatchError:  # the queue changed meanwhile (a job added or taken): look again
                    continue
            for job, execution in zip(jobs, executions, strict=True):
                self.executions[execution.id] = execution
                batch.members.append((job, execution))
            return jobs
        return []

    def _batch_key(self, job_id: str) -> tuple[Any, ...] | None:
        """A waiting job's `tasks.batch_key`; None (never claimed) for a record this worker cannot read,
        e.g. options from a newer API during a rolling upgrade: it stays queued and, taken on its own,
        fails alone. Claiming must not fail the job that claims."""
        try:
            return tasks.batch_key(self.store.get(job_id))
        except (KeyError, TypeError, ValueError) as e:  # ValueError: pydantic's and JSON's errors too
            log.warning("worker %s: not batching job %s, its record does not read: %s", self.name, job_id, e)
            return None

    def _start_rider(self, pipe: Pipeline, queue: Queue, job: Job) -> Execution:
        """Queued → started, as RQ does for the job it dequeues (prepare_execution and
        prepare_job_execution), inside the claim's transaction."""
        ttl = self.get_heartbeat_ttl(job)
        pipe.lrem(queue.key, 0, job.id)  # every entry of its id: a second one would only be skipped
        execution = Execution.create(job, ttl, pipeline=pipe, worker_name=self.name)
        job.heartbeat(now(), ttl, pipeline=pipe)
        job.prepare_for_execution(self.name, pipeline=pipe)
        pipe.persist(job.key)
        return execution

    def _finalize_riders(self, queue: Queue, riders: list[tuple[Job, Execution]]) -> None:
        """End each rider in RQ as its record says it ended, whatever became of the job RQ dequeued:

        - ended (or its record expired): RQ's own path for a job that returned;
        - still `processing` (its batch stopped before ending it): RQ's failure path, as for a lost
          worker (`handle_job_failure`: re-queued while it has retries, else `worker_lost`);
        - `processing` by another execution (its start was refused): left to that one
          (`_finalize_success`);
        - still `queued` (the batch ended before starting it: time limit, Redis error): back to the
          front of the queue, in its order, with its retries untouched.

        A rider that cannot be ended is logged and left to the reaper (its execution expires without
        heartbeats); the others are still ended."""
        never_started: list[tuple[Job, Execution]] = []
        for job, execution in riders:
            try:
                record = self.store.get(job.id)
                status = record.get("status") if record is not None else None
                if status == "queued":
                    never_started.append((job, execution))
                elif status == "processing" and record.get("execution") == execution.composite_key:
                    self.handle_execution_ended(job, queue, job.failure_callback_timeout)
                    self.handle_job_failure(
                        job, queue, exc_string="Its batch ended before it did.", execution=execution
                    )
                else:
                    self._finalize_success(job, queue, execution, None)
            except Exception as e:
                log.warning("job %s: could not end it in RQ after its batch: %s", job.id, e)
                # Its execution is left to expire; this worker must not name it in a later run's record.
                self._forget_executions_of(job.id)
        if not never_started:
            return
        try:
            with self.connection.pipeline() as pipe:  # one transaction: never out of both places
                pipe.multi()  # before any command: enqueue_job opens MULTI itself only on an empty one
                for job, execution in never_started:
                    self.cleanup_execution(job, pipeline=pipe, execution=execution)
                # Each goes to the front of the queue: the last one first keeps their order.
                for job, _ in reversed(never_started):
                    queue.enqueue_job(job, pipeline=pipe, at_front=True)
                pipe.execute()
        except Exception as e:
            ids = [job.id for job, _ in never_started]
            log.warning("jobs %s: could not put them back in the queue after their batch: %s", ids, e)

    def announce(self, state: str) -> None:
        """Publish this worker's state and model info for /readyz, /v1/models and metrics. Without
        Redis the state is kept for the background thread's next beat, which publishes it: a blip
        must not end a worker that has just loaded its model."""
        with self._publish_lock:
            self.registry_fields["state"] = state
            try:
                self._publish()
            except RedisError as e:
                log.warning("worker %s could not publish state %s: %s", self.name, state, e)

    def republish(self) -> None:
        """The background thread's refresh of this worker's entry, with whatever state the worker
        last announced (it never sets one: that is the main thread's)."""
        with self._publish_lock:
            self._publish()

    def _publish(self) -> None:
        self.registry_fields["heartbeat_at"] = time.time()
        # A copy: the main thread adds fields (model info, missing weights) while this one writes.
        self.store.register_worker(self.name, dict(self.registry_fields))


def _background(worker: DynfaceWorker, stop: threading.Event) -> None:
    """Keep our registry entry alive and reap lost workers' jobs (one process a round, `lost.take_round`),
    through the job store's short-timeout client: with RQ's (socket timeout: minutes) one stalled
    reply would stop both, and a live worker would drop out of /readyz."""
    s = worker.settings
    store = worker.store
    queue = make_queue(store.redis, s)
    next_reap = 0.0
    while not stop.wait(min(s.heartbeat_interval_seconds, s.reaper_interval_seconds)):
        try:
            worker.republish()
            if time.monotonic() >= next_reap:
                next_reap = time.monotonic() + s.reaper_interval_seconds
                if lost.take_round(store, queue, s, holder=worker.name):
                    lost.reap(store, queue, s, TALLY)
        except Exception as e:  # Redis blips must not kill the thread; the next round retries
            log.warning("worker background task failed: %s", e)


def run_worker(settings: Settings, device: str, name: str | None = None, burst: bool = False) -> None:
    """Load the pipeline on ``device``, then take jobs until SIGTERM (or the queue empties if burst)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Two clients: RQ raises its connection's socket timeout above its blocking dequeue (minutes);
    # the job store's keeps short timeouts so that progress writes, heartbeats (RQ's execution
    # heartbeat included: `maintain_heartbeats`) and the reaper fail fast.
    rq_redis = connect(settings)
    store = JobStore(connect(settings), settings)
    queue = make_queue(rq_redis, settings)
    name = name or f"{socket.gethostname()}.{os.getpid()}.{device.replace(':', '')}.{uuid.uuid4().hex[:6]}"
    worker = DynfaceWorker(
        [queue],
        name=name,
        connection=rq_redis,
        serializer=JSONSerializer,
        settings=settings,
        store=store,
        worker_ttl=settings.job_timeout_seconds + 60,
        default_result_ttl=settings.result_ttl_seconds,
    )
    worker.push_exc_handler(lost.abandoned_handler(store, settings, TALLY))
    try:
        port = metrics.serve(settings.worker_metrics_port, settings.worker_metrics_host)
    except OSError as e:
        raise SystemExit(
            f"dynface worker: cannot serve metrics on port {settings.worker_metrics_port} "
            f"({e.strerror}); set DYNFACE_WORKER_METRICS_PORT (dynface serve: --worker-metrics-port) "
            "to a free port, or 0 for any free port"
        ) from e
    worker.registry_fields = {
        "name": name,
        "device": device,
        "profile": settings.profile,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "metrics_port": port,
    }
    # RQ installs its stop handlers only once its loop runs; until then, ours (restored at the end).
    stop_signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, worker.request_stop_before_work) for sig in stop_signals}
    worker.announce("loading")
    stop = threading.Event()
    background = threading.Thread(target=_background, args=(worker, stop), name="worker-bg", daemon=True)
    background.start()
    try:
        pipe = _load_pipeline(worker, settings, device)
        if pipe is None:  # stopped while loading or waiting for weight files
            return
        info = dict(pipe.info)
        # Cleared by value: announce() writes fields into the Redis hash, it never deletes any.
        worker.registry_fields.update(
            {
                "info": info,
                "real": bool(info.get("real")),
                "missing_weights": [],
                "weights_command": None,
                "config_error": None,
            }
        )
        tasks.bind(
            tasks.Runtime(
                pipe=pipe,
                store=store,
                settings=settings,
                worker_name=name,
                device=device,
                claim_riders=worker.claim_riders,
                execution_of=worker.execution_of,
            )
        )
        metrics.READY.set(1)
        worker.announce("ready")
        log.info("worker %s ready on %s (profile %s)", name, device, settings.profile)
        _work(worker, burst)
        try:
            # A stop while idle may have landed between RQ's dequeue and the job's start: back now,
            # not after heartbeat_ttl, nor never when no other worker is left to reap.
            lost.return_stranded(store, settings, queue, after=0)
        except RedisError as e:
            log.warning("worker %s could not put back the jobs left between dequeue and start: %s", name, e)
    finally:
        metrics.READY.set(0)
        stop.set()
        background.join(timeout=5)
        try:
            store.unregister_worker(name)
        except RedisError as e:  # its registry entry expires by itself
            log.warning("worker %s could not unregister: %s", name, e)
        webhooks.drain()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


#: Pause between pings while the worker waits for Redis to come back before resuming RQ's loop.
_REDIS_RETRY_SECONDS = 1.0


def _work(worker: DynfaceWorker, burst: bool) -> None:
    """RQ's work loop until a stop is requested (or, with ``burst``, the queue is empty), resumed
    after it ends on a Redis outage.

    RQ rides out an outage during its blocking dequeue, but a connection error anywhere else (its
    registration as it starts, the suspension check, the bookkeeping around a job) ends `work()`:
    raised while starting, logged as "unhandled exception, quitting" otherwise. A worker holding a
    loaded model must not be lost to a Redis restart, so it waits for Redis, marks its old
    registration dead (RQ refuses a new one under a live name), drops the old pub/sub thread and
    starts the loop again.

    RQ's stop handler stays installed between loops and raises wherever the signal lands:
    StopRequested, or the Redis error of its own state query while Redis is down. After a stop
    request either one just ends the worker.
    """
    while not worker.stop_requested:  # one may have come before RQ's loop started
        try:
            worker.work(burst=burst, logging_level="INFO")
        except (RedisError, StopRequested) as e:
            log.warning("worker %s left RQ's loop on %s: %s", worker.name, type(e).__name__, e)
        if burst or worker.stop_requested:
            return
        log.warning(
            "worker %s: RQ's loop ended without a stop request; resuming once Redis answers", worker.name
        )
        try:
            _reset_after_outage(worker)
        except (RedisError, StopRequested):
            if not worker.stop_requested:
                raise


def _reset_after_outage(worker: DynfaceWorker) -> None:
    """Wait for Redis (or a stop request), then clear what the ended loop left behind."""
    while not worker.stop_requested:
        try:
            worker.connection.ping()
            worker.register_death()
            break
        except RedisError:
            time.sleep(_REDIS_RETRY_SECONDS)
    if worker.pubsub_thread is not None:  # RQ's teardown may have failed before stopping it
        # Stopped only: its loop closes the pubsub as it ends (redis-py's contract). Closed from here,
        # its connection went back to the pool while the thread still read it, and a command of this
        # thread could then share it (the worker hung before its next job).
        thread = worker.pubsub_thread
        thread.stop()
        thread.join(timeout=1)  # as RQ's own unsubscribe waits
        if not thread.is_alive():  # ended (on an error of its own, it closed nothing): closing is safe
            thread.pubsub.close()
        worker.pubsub_thread = None


def _load_pipeline(worker: DynfaceWorker, settings: Settings, device: str) -> RestorationPipeline | None:
    """The pipeline with its default detector loaded, or None if stopped (SIGTERM/SIGINT) first.

    Missing weight files do not end the process: the worker stays registered in state
    ``missing_weights`` with the files and the command that fetches them (what /readyz reports),
    and tries again every ``weights_retry_seconds``, so a later `dynface weights pull` makes it
    ready without a restart. Nor does a method file its settings name that it cannot use (a DSST
    table or trained DBLM/DGSA file missing, damaged or mismatched: `ConfigurationError`), or a weight
    file it may not read (`weights.UnreadableWeightsError`: no pull fixes that, its message says how):
    state ``misconfigured`` with the error (`config_error`), retried as often, so /readyz says what to fix,
    where a crash at start put only a traceback in the worker's log and a restart loop in its place.
    Other errors are bugs or the device's and end the worker. A stop signal ends the wait
    (`DynfaceWorker.request_stop_before_work`).
    """
    pipe: RestorationPipeline | None = None
    build_seconds = 0.0
    reported: list[dict[str, str]] | str | None = None
    while not worker.stop_requested:
        try:
            t0 = time.perf_counter()
            if pipe is None:  # kept across retries when only the detector was missing
                pipe = pipeline_from_settings(settings, device)
                build_seconds = time.perf_counter() - t0
                t0 = time.perf_counter()
            # fail at start-up, not on the first photo, when detector weights are missing
            pipe.load_detector()
            metrics.MODEL_LOAD.set(build_seconds + time.perf_counter() - t0)
            return None if worker.stop_requested else pipe
        except (weights.MissingWeightsError, weights.DownloadError, PipelineError) as e:
            # load_detector wraps the detector's MissingWeightsError in a PipelineError.
            if isinstance(e, PipelineError) and not isinstance(e.__cause__, weights.MissingWeightsError):
                raise
            missing = _missing_weights(settings, e)
            if missing != reported:  # log changes, not every retry
                log.error("cannot load the model, retrying every %s s: %s", settings.weights_retry_seconds, e)
                reported = missing
            worker.registry_fields["missing_weights"] = missing
            worker.registry_fields["weights_command"] = _pull_command(
                [m["name"] for m in missing], _profile_and_dir(settings)[1], force=bool(_unloadable(e))
            )
            worker.registry_fields["config_error"] = None
            worker.announce("missing_weights")
        except (ConfigurationError, weights.UnreadableWeightsError) as e:
            if str(e) != reported:
                log.error(
                    "cannot load the model (a setting or a file it names), retrying every %s s: %s",
                    settings.weights_retry_seconds,
                    e,
                )
                reported = str(e)
            worker.registry_fields.update(
                {"config_error": str(e), "missing_weights": [], "weights_command": None}
            )
            worker.announce("misconfigured")
        worker.wait_for_stop(settings.weights_retry_seconds)
    return None


def pipeline_from_settings(settings: Settings, device: str) -> RestorationPipeline:
    """The worker's pipeline, built from its model settings (docs/configuration.md): from_pretrained
    takes the method files and the background model only from these arguments; an unset weights_dir
    is the weights store's default. The first start fetches the real weights (sha256-checked) unless
    offline."""
    from models.pipeline import RestorationPipeline

    return RestorationPipeline.from_pretrained(
        settings.profile,
        device=device,
        dtype=settings.dtype,
        weights_dir=settings.weights_dir,
        max_batch=settings.max_face_batch,
        max_pixels=settings.max_pixels,
        max_faces=settings.max_faces,
        speed=_speed_options(settings),
        png_compress_level=settings.png_compress_level,
        dsst_table=settings.dsst_table,
        dblm_weights=settings.dblm_weights,
        dgsa_weights=settings.dgsa_weights,
        background_config=_background_config(settings),
        download=not settings.offline,
    )


def _speed_options(settings: Settings) -> SpeedOptions:
    """The fast-path switches of docs/configuration.md (pinning is used on CUDA devices only)."""
    from models.speed import SpeedOptions

    return SpeedOptions(
        channels_last=settings.channels_last,
        compile=settings.compile,
        compile_mode=settings.compile_mode,  # type: ignore[arg-type]  # pattern-checked by Settings
        pin_memory=settings.pin_memory,
    )


def _background_config(settings: Settings) -> BackgroundConfig:
    """The background super-resolution model and its tiling (docs/configuration.md)."""
    from models.background import BackgroundConfig

    return BackgroundConfig(
        model=settings.background_model,
        tile=settings.background_tile,
        overlap=settings.background_tile_overlap,
    )


def _profile_and_dir(settings: Settings) -> tuple[Profile, Path]:
    """The profile and weights dir the worker loads from: `weights.profile_and_dir`, the rule
    RestorationPipeline.from_pretrained and `dynface weights` follow (a path profile is a `real`
    weights dir; `~` expanded; empty is unset)."""
    name, root = weights.profile_and_dir(settings.profile, settings.weights_dir)
    return PROFILES[name], root


def _pull_command(names: list[str], root: Path, *, force: bool = False) -> str:
    """The fetch command with the worker's weights dir spelled out: the operator's shell may not
    have the worker's DYNFACE_WEIGHTS_DIR."""
    return f"DYNFACE_WEIGHTS_DIR={shlex.quote(str(root))} {weights.pull_command(names, force=force)}"


def _unloadable(error: BaseException | None) -> set[str]:
    """The files `error` (or the error it wraps: `load_detector`'s PipelineError) found there but not
    loadable: a plain pull keeps such a file when no checksum is pinned, so their command forces."""
    cause = error if isinstance(error, weights.UnloadableWeightsError) else getattr(error, "__cause__", None)
    return set(cause.names) if isinstance(cause, weights.UnloadableWeightsError) else set()


def _missing_weights(settings: Settings, error: BaseException | None = None) -> list[dict[str, str]]:
    """The weight files the worker's profile needs (its default detector included) and lacks:
    ``[{name, path, command}]``, as /readyz reports them."""
    from models.pipeline import profile_weights

    profile, root = _profile_and_dir(settings)
    needed = list(dict.fromkeys([*profile_weights(profile, root), profile.detector]))
    found = {m.name: m.path for m in weights.missing_for(needed, root)}
    # `pull` also rejects files of the right size whose sha256 is wrong, which the size-only probe
    # above cannot see; the error names them.
    named = getattr(error, "names", None) or getattr(getattr(error, "__cause__", None), "names", None) or []
    for entry in weights.select(named):
        found.setdefault(entry.name, root / entry.path)
    force = _unloadable(error)
    return [
        {"name": n, "path": str(path), "command": _pull_command([n], root, force=n in force)}
        for n, path in found.items()
    ]
