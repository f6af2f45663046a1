"""The Redis job store shared by the API and the worker: key names, record JSON, TTLs, queue.

Our own job record (a hash) is the source of truth for what clients see; the RQ job is only the
transport that hands a job id to one worker. That keeps RQ's pickles and internals out of the
public contract and lets the API answer status, progress and cancellation from one key.

Layout (``P`` = settings.key_prefix)::

    P:job:{id}            hash, every field JSON-encoded; TTL record_ttl, renewed at start and completion
    P:input:{id}          upload bytes; deleted when the job ends (TTL record_ttl as a safety net)
    P:result:{id}:{name}  result bytes (image | comparison | face:{k}); TTL result_ttl
    P:idem:{sha256(key)}  {"job_id", "body_sha256"}; TTL record_ttl (the idempotency window)
    P:rate:{key_id}:{min} request counter of one API key in one minute; TTL 60 s
    P:worker:{name}       hash describing a live worker; TTL heartbeat_ttl, refreshed by its heartbeat
    P:workers             set of worker names (entries whose hash expired are pruned on read)
    P:done:{id}           pub/sub channel (no key): published once when the job ends
    P:reaper-lock         lock so only one worker at a time re-queues abandoned jobs

This module must stay torch-free: the API imports it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from typing import Any

from redis import Redis
from redis.sentinel import Sentinel
from rq import Queue, Retry
from rq.serializers import JSONSerializer

from app.settings import Settings

TERMINAL = frozenset({"succeeded", "failed", "canceled"})
ACTIVE = frozenset({"queued", "processing"})
#: The RQ job function (referenced by name so the API never imports the worker or torch).
TASK = "worker.tasks.restore"

# Atomically update a record only if its status is one of the allowed ones (ARGV[1] = how many
# allowed statuses follow, then field/value pairs). Returns 1 when applied, 0 otherwise.
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return 0 end
local n = tonumber(ARGV[1])
local ok = false
for i = 2, n + 1 do if ARGV[i] == cur then ok = true end end
if not ok then return 0 end
for i = n + 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


def sentinel_options(settings: Settings) -> tuple[list[tuple[str, int]], dict[str, Any], str | None]:
    """For ``redis_sentinels``: the sentinels' addresses, their own client options and the primary's
    password — shared by this module's client and the API's asyncio one (app/completions.py)."""
    hosts = [(h, int(p)) for h, _, p in (s.rpartition(":") for s in settings.redis_sentinels)]
    sentinel_password = settings.redis_sentinel_password
    sentinel_kwargs = {
        "socket_timeout": settings.redis_timeout_seconds,
        "socket_connect_timeout": settings.redis_timeout_seconds,
        "password": sentinel_password.get_secret_value() if sentinel_password else None,
    }
    password = settings.redis_password
    return hosts, sentinel_kwargs, password.get_secret_value() if password else None


def connect(settings: Settings) -> Redis:
    """A Redis client with short timeouts, so a dead Redis fails requests fast, not after minutes.

    With ``redis_sentinels`` the client is redis-py's Sentinel-managed one: it asks the sentinels
    for the current primary of ``redis_sentinel_master`` and finds the new one after a failover.
    """
    timeouts = {
        "socket_timeout": settings.redis_timeout_seconds,
        "socket_connect_timeout": settings.redis_timeout_seconds,
        "health_check_interval": 30,
    }
    if settings.redis_sentinels:
        hosts, sentinel_kwargs, password = sentinel_options(settings)
        sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs)
        return sentinel.master_for(settings.redis_sentinel_master, password=password, **timeouts)
    if not settings.redis_url:
        raise RuntimeError(
            "No Redis configured: set REDIS_URL or DYNFACE_REDIS_SENTINELS "
            "(or run `dynface serve` for an embedded one)."
        )
    return Redis.from_url(settings.redis_url, **timeouts)


def make_queue(connection: Redis, settings: Settings) -> Queue:
    """The RQ queue; JSON-serialised so nothing pickled is ever written to Redis by the API."""
    return Queue(settings.queue_name, connection=connection, serializer=JSONSerializer)


def _dump(record: dict[str, Any]) -> dict[str, str]:
    return {k: json.dumps(v) for k, v in record.items()}


class JobStore:
    """Typed access to the keys above. One instance per process; the Redis client is thread-safe."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.prefix = settings.key_prefix
        self._transition = redis.register_script(_TRANSITION)

    # --- key names
    def key(self, *parts: str) -> str:
        """A namespaced key: every key this service writes goes through here."""
        return ":".join((self.prefix, *parts))

    # --- records
    def create(self, job_id: str, data: bytes, record: dict[str, Any]) -> None:
        """Store the input and a new ``queued`` record (before enqueueing, so a worker always finds both)."""
        ttl = self.settings.record_ttl_seconds
        with self.redis.pipeline() as pipe:
            pipe.set(self.key("input", job_id), data, ex=ttl)
            pipe.hset(self.key("job", job_id), mapping=_dump(record))
            pipe.expire(self.key("job", job_id), ttl)
            pipe.execute()

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The record, or None when unknown or expired."""
        raw = self.redis.hgetall(self.key("job", job_id))
        if not raw:
            return None
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def update(self, job_id: str, fields: dict[str, Any], *, allowed: Iterable[str] = ACTIVE) -> bool:
        """Set fields only while the status is one of ``allowed``; False when the job moved on."""
        allowed = list(allowed)
        args: list[str] = [str(len(allowed)), *(json.dumps(s) for s in allowed)]
        for k, v in _dump(fields).items():
            args += [k, v]
        return bool(self._transition(keys=[self.key("job", job_id)], args=args))

    def finish(
        self,
        job_id: str,
        fields: dict[str, Any],
        results: dict[str, bytes] | None = None,
        result_ttl: int | None = None,
        allowed: Iterable[str] = ACTIVE,
    ) -> bool:
        """Move an active job to a terminal state: store results, drop the input, reset TTLs.

        Results are written before the status flips, so a client that sees ``succeeded`` can
        always fetch them (until ``result_ttl``: the record's, fixed by the API at submission).
        """
        s = self.settings
        if results:
            with self.redis.pipeline() as pipe:
                for name, blob in results.items():
                    pipe.set(self.key("result", job_id, name), blob, ex=result_ttl or s.result_ttl_seconds)
                pipe.execute()
        done = self.update(job_id, {**fields, "completed_at": time.time()}, allowed=allowed)
        if done:
            with self.redis.pipeline() as pipe:
                pipe.delete(self.key("input", job_id))
                pipe.expire(self.key("job", job_id), s.record_ttl_seconds)
                # Wakes the API's `Prefer: wait` requests for this job (app/completions.py).
                pipe.publish(self.key("done", job_id), fields.get("status", ""))
                pipe.execute()
        return done

    def renew(self, job_id: str) -> None:
        """Restart the record's and input's TTL (when a worker starts the job): a job that waited
        long in the queue must not expire while it runs."""
        ttl = self.settings.record_ttl_seconds
        with self.redis.pipeline() as pipe:
            pipe.expire(self.key("job", job_id), ttl)
            pipe.expire(self.key("input", job_id), ttl)
            pipe.execute()

    def input(self, job_id: str) -> bytes | None:
        return self.redis.get(self.key("input", job_id))

    def result(self, job_id: str, name: str) -> bytes | None:
        return self.redis.get(self.key("result", job_id, name))

    def cancel_requested(self, job_id: str) -> bool:
        """Read by the worker between diffusion steps (one HGET, well under a millisecond)."""
        return self.redis.hget(self.key("job", job_id), "cancel_requested") == b"true"

    # --- idempotency
    def claim_idempotency(self, key: str, job_id: str, body_sha256: str) -> dict[str, str] | None:
        """Bind an Idempotency-Key to a job (SET NX); returns the earlier binding if there is one."""
        k = self._idem_key(key)
        value = json.dumps({"job_id": job_id, "body_sha256": body_sha256})
        if self.redis.set(k, value, nx=True, ex=self.settings.record_ttl_seconds):
            return None
        raw = self.redis.get(k)
        return json.loads(raw) if raw else None

    def release_idempotency(self, key: str) -> None:
        """Undo a claim when the submission failed before a job existed (so a retry can succeed)."""
        self.redis.delete(self._idem_key(key))

    def _idem_key(self, key: str) -> str:
        """Keys are hashed: clients may send anything, and it must not become a Redis key verbatim."""
        return self.key("idem", hashlib.sha256(key.encode()).hexdigest())

    # --- workers
    def register_worker(self, name: str, fields: dict[str, Any]) -> None:
        """Create/refresh a worker's entry; it disappears heartbeat_ttl after the last refresh."""
        k = self.key("worker", name)
        with self.redis.pipeline() as pipe:
            pipe.sadd(self.key("workers"), name)
            pipe.hset(k, mapping=_dump(fields))
            pipe.expire(k, self.settings.heartbeat_ttl_seconds)
            pipe.execute()

    def unregister_worker(self, name: str) -> None:
        with self.redis.pipeline() as pipe:
            pipe.srem(self.key("workers"), name)
            pipe.delete(self.key("worker", name))
            pipe.execute()

    def workers(self) -> list[dict[str, Any]]:
        """Live workers; names whose entry expired (worker died) are pruned from the set."""
        names = sorted(n.decode() for n in self.redis.smembers(self.key("workers")))
        if not names:
            return []
        with self.redis.pipeline() as pipe:
            for n in names:
                pipe.hgetall(self.key("worker", n))
            rows = pipe.execute()
        live = []
        for name, raw in zip(names, rows, strict=True):
            if raw:
                live.append({k.decode(): json.loads(v) for k, v in raw.items()})
            else:
                self.redis.srem(self.key("workers"), name)
        return live


def enqueue(queue: Queue, settings: Settings, job_id: str) -> None:
    """Hand a stored job to the workers. Arguments are just the id (JSON); limits are explicit."""
    s = settings
    queue.enqueue(
        TASK,
        job_id,
        job_id=job_id,
        job_timeout=s.job_timeout_seconds,
        result_ttl=s.result_ttl_seconds,
        failure_ttl=s.record_ttl_seconds,
        ttl=s.record_ttl_seconds,
        retry=Retry(max=s.max_retries) if s.max_retries else None,
    )
