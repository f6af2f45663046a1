"""The Redis job store shared by the API and the worker: key names, record JSON, TTLs, queue.

Our own job record (a hash) is the source of truth for what clients see; the RQ job is only the
transport that hands a job id to one worker. That keeps RQ's pickles and internals out of the
public contract and lets the API answer status, progress and cancellation from one key.

Layout (``P`` = settings.key_prefix)::

    P:job:{id}            hash, every field JSON-encoded; TTL record_ttl, renewed at start, re-queue, end
    P:input:{id}          upload bytes; deleted when the job ends (TTL record_ttl as a safety net)
    P:result:{id}:{name}  result bytes (image | comparison | face:{k}); TTL result_ttl
    P:idem:{sha256(key)}  {"job_id", "body_sha256", "claimed_at"}; TTL record_ttl (the idempotency window)
    P:rate:{key_id}:{min} request counter of one API key in one minute; TTL 60 s
    P:active:{key_id}     sorted set: job ids of one API key's active jobs, scored by admission time
                          (Redis' clock); members of ended jobs are pruned at its next admission
                          (`JobStore.admit`); TTL 2 x record_ttl, renewed at each admission
    P:stored:{key_id}     sorted set: `{id}:{bytes}` of one API key's stored results, scored by when
                          they expire (Redis' clock), added as they are stored (`JobStore.finish`),
                          pruned of expired ones then and at each admission; TTL its latest results'
    P:stored-bytes:{key_id} the bytes of P:stored:{key_id}'s members: a running total kept with it
    P:worker:{name}       hash describing a live worker; TTL heartbeat_ttl, refreshed by its heartbeat
    P:workers             set of worker names (entries whose hash expired are pruned on read)
    P:done:{id}           pub/sub channel (no key): published once when the job ends
    P:reaper-lock:{q}     lock so one process a round, a worker or an API, reaps lost workers' jobs of
                          queue q (app/lost.py)
    P:stranded:{q}        hash: job id → when first seen between RQ's dequeue and its start (app/lost.py)
    P:queue-sweep-lock:{q} lock so one API process a round fails jobs queued too long (app/queued.py)

This module must stay torch-free: the API imports it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

from redis import Redis
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.retry import Retry as RedisRetry
from redis.sentinel import Sentinel, SentinelManagedConnection
from rq import Queue, Retry
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from app.settings import Settings

TERMINAL = frozenset({"succeeded", "failed", "canceled"})
ACTIVE = frozenset({"queued", "processing"})
#: The RQ job function (referenced by name so the API never imports the worker or torch).
TASK = "worker.tasks.restore"

log = logging.getLogger(__name__)

# Every change to a stored record goes through one of these scripts, each one round trip and atomic. They
# share `transition`: set fields of record KEYS[1] only if its status is one of the allowed ones.
# Its arguments come first: ARGV[1] = how many allowed statuses follow, then how many field/value
# pairs follow, then the pairs (`_transition_args`); `after_transition` is the index of the next
# argument. `transition` returns that index, or nil when the record is gone or its status is not
# allowed (then nothing is written).
#
# `attempt_over(cutoff)`: whether RQ no longer runs the attempt the record names: its field
# `execution` (the entry `job_id:execution_id` in RQ's StartedJobRegistry KEYS[3] of the execution
# that runs it, `_start` in worker/tasks.py) is unset or null, that entry is gone, or it expired by
# `cutoff` (a Unix time, or `now`: Redis' own clock, as a lost worker's job is judged, never the
# clock of the host that asks: an API pod's running ahead would take live jobs for lost ones). RQ
# drops an execution only when it ends, re-queues or fails the job, and a live worker's heartbeat
# keeps its entry's expiry ahead: so a second queue entry of a job's id never moves a running
# attempt's record.
_PRELUDE = """
local function after_transition()
  local n = tonumber(ARGV[1])
  return n + 3 + 2 * tonumber(ARGV[n + 2])
end
local function transition()
  local cur = redis.call('HGET', KEYS[1], 'status')
  if not cur then return nil end
  local n = tonumber(ARGV[1])
  local ok = false
  for i = 2, n + 1 do if ARGV[i] == cur then ok = true end end
  if not ok then return nil end
  local at = after_transition()
  for i = n + 3, at - 1, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
  return at
end
local function attempt_over(cutoff)
  local raw = redis.call('HGET', KEYS[1], 'execution')
  local execution = raw and cjson.decode(raw)
  if not execution or execution == cjson.null then return true end
  local expires = redis.call('ZSCORE', KEYS[3], execution)
  if not expires then return true end
  if cutoff == 'now' then
    local clock = redis.call('TIME')
    cutoff = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
  end
  return tonumber(expires) <= tonumber(cutoff)
end
local function processing() return redis.call('HGET', KEYS[1], 'status') == '"processing"' end
"""

# The transition alone. Returns 1 when applied, 0 otherwise.
_UPDATE = _PRELUDE + "return transition() and 1 or 0"

# A worker takes the job, or a lost worker's job goes back to the queue: the transition, then (if
# applied) record KEYS[1] and input KEYS[2] get the TTL in the next argument ARGV[at] again. A
# `processing` record moves only when `attempt_over(ARGV[at + 1])` (KEYS[3]: RQ's StartedJobRegistry),
# and, with ARGV[at + 2] = '1', not once its cancel was requested (a lost job's DELETE that landed
# after the caller read the record: that job ends canceled instead). With KEYS[4] (an RQ queue list)
# only while the job is waiting in it. Returns 1 when applied, 0 otherwise.
_RENEW = (
    _PRELUDE
    + """
local at = after_transition()
if KEYS[4] then
  local id = redis.call('HGET', KEYS[1], 'id')
  if not id or not redis.call('LPOS', KEYS[4], cjson.decode(id)) then return 0 end
end
if processing() and not attempt_over(ARGV[at + 1]) then return 0 end
if ARGV[at + 2] == '1' and redis.call('HGET', KEYS[1], 'cancel_requested') == 'true' then return 0 end
if not transition() then return 0 end
redis.call('EXPIRE', KEYS[1], ARGV[at])
redis.call('EXPIRE', KEYS[2], ARGV[at])
return 1
"""
)

# Progress: the transition, then (if applied, and KEYS[2] is given) the next argument written as
# field `meta` of hash KEYS[2] (RQ's job: its meta mirrors our progress).
_PROGRESS = (
    _PRELUDE
    + """
local at = transition()
if at and KEYS[2] then redis.call('HSET', KEYS[2], 'meta', ARGV[at]) end
return 0
"""
)

# Idempotency keys, each change one atomic step. A binding's `claimed_at` is Redis' clock, and a
# binding that stands is returned with its `age` by that clock: API hosts' clocks may disagree, and a
# host ahead would take over a key whose first request is still storing its job. Claim — KEYS: idem
# key; ARGV: binding, ttl; binds the key unless it is bound already, and returns the binding that
# stands then, or nil once bound (one step: a release between a SET NX and a GET made a claim that
# held nothing). Rebind — KEYS: idem key; ARGV: job id it must still be bound to, new binding, ttl;
# returns the binding that stands instead, or nil once rebound (also when the key had gone). Release
# — KEYS: idem key, the job's record; ARGV: job id; deletes the key only while it is bound to that job
# (a retry may have taken it over meanwhile) and that job does not exist (a transaction whose reply
# was lost may have stored it).
_IDEMPOTENCY_BINDING = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
local function standing(raw)
  local binding = cjson.decode(raw)
  binding['age'] = now - (tonumber(binding['claimed_at']) or 0)
  return cjson.encode(binding)
end
local function bind(binding, ttl)
  local claimed = cjson.decode(binding)
  claimed['claimed_at'] = now
  redis.call('SET', KEYS[1], cjson.encode(claimed), 'EX', tonumber(ttl))
end
"""
_CLAIM_IDEMPOTENCY = (
    _IDEMPOTENCY_BINDING
    + """
local raw = redis.call('GET', KEYS[1])
if raw then
  return standing(raw)
end
bind(ARGV[1], ARGV[2])
return false
"""
)
_REBIND_IDEMPOTENCY = (
    _IDEMPOTENCY_BINDING
    + """
local raw = redis.call('GET', KEYS[1])
if raw and cjson.decode(raw)['job_id'] ~= ARGV[1] then
  return standing(raw)
end
bind(ARGV[2], ARGV[3])
return false
"""
)
_RELEASE_IDEMPOTENCY = """
local raw = redis.call('GET', KEYS[1])
if raw and cjson.decode(raw)['job_id'] == ARGV[1] and redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# A key's stored results: sorted set ZSET (`P:stored:{key_id}`, member `{id}:{bytes}`, scored by when
# they expire by Redis' clock) and their bytes' running total TOTAL (`P:stored-bytes:{key_id}`), so an
# admission costs what has expired, not the whole set. `stored_bytes(zset, total, now)` drops what has
# expired by `now` from both and returns the total (recounted from the set when the total is missing).
_STORED = """
local function member_bytes(member) return tonumber(string.match(member, ':(%d+)$')) end
local function set_total(zset, total, held)  -- expires with the set (in ms: TTL rounds under 1 s to 0)
  local ttl = redis.call('PTTL', zset)
  if ttl > 0 then redis.call('SET', total, held, 'PX', ttl) else redis.call('SET', total, held) end
end
local function recount(zset)
  local held = 0
  for _, member in ipairs(redis.call('ZRANGE', zset, 0, -1)) do held = held + member_bytes(member) end
  return held
end
local function stored_bytes(zset, total, now)
  local held = tonumber(redis.call('GET', total))
  local expired = redis.call('ZRANGEBYSCORE', zset, '-inf', now)
  if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', zset, '-inf', now)
    if held then
      for _, member in ipairs(expired) do held = held - member_bytes(member) end
    end
  end
  if redis.call('ZCARD', zset) == 0 then
    redis.call('DEL', total)
    return 0
  end
  -- Missing, or below zero (a member some other writer added without its bytes): counted again.
  if not held or held < 0 then held = recount(zset) elseif #expired == 0 then return held end
  set_total(zset, total, held)
  return held
end
"""

# A job's end: the transition (a `processing` record only when `attempt_over(ARGV[at])`, KEYS[3] being
# RQ's StartedJobRegistry), then (if applied) the results KEYS[6..] written with the status flip (a
# client that sees `succeeded` can always fetch them; TTL = the record's result_ttl, else ARGV[at + 4])
# and counted in their owner's stored results (`_STORED`: set KEYS[4], total KEYS[5]; both kept as long
# as their latest results; read by `_ADMIT`), the input KEYS[2] dropped, the record's TTL restarted
# (ARGV[at + 3]) and message ARGV[at + 2] published on channel ARGV[at + 1] (wakes the API's `Prefer:
# wait` requests, app/completions.py). With ARGV[at + 5] = '1', not once its cancel was requested (a
# lost job's DELETE that landed after the caller read the record: that job ends canceled instead).
# One blob per result key follows. Without results, KEYS end at KEYS[3]. Returns the final record
# (flat HGETALL), or false when the job had already moved on (then nothing is written, results
# included).
_FINISH = (
    _PRELUDE
    + _STORED
    + """
local at = after_transition()
if processing() and not attempt_over(ARGV[at]) then return false end
if ARGV[at + 5] == '1' and redis.call('HGET', KEYS[1], 'cancel_requested') == 'true' then return false end
if not transition() then return false end
local ttl = tonumber(redis.call('HGET', KEYS[1], 'result_ttl')) or tonumber(ARGV[at + 4])
local bytes = 0
for k = 6, #KEYS do
  redis.call('SET', KEYS[k], ARGV[at + k], 'EX', ttl)
  bytes = bytes + string.len(ARGV[at + k])
end
if #KEYS >= 6 then
  local now = tonumber(redis.call('TIME')[1])
  local id = cjson.decode(redis.call('HGET', KEYS[1], 'id'))
  local held = stored_bytes(KEYS[4], KEYS[5], now)
  redis.call('ZADD', KEYS[4], now + ttl, id .. ':' .. bytes)
  if redis.call('TTL', KEYS[4]) < ttl then redis.call('EXPIRE', KEYS[4], ttl) end
  set_total(KEYS[4], KEYS[5], held + bytes)
end
redis.call('DEL', KEYS[2])
redis.call('EXPIRE', KEYS[1], ARGV[at + 3])
redis.call('PUBLISH', ARGV[at + 1], ARGV[at + 2])
return redis.call('HGETALL', KEYS[1])
"""
)

# A submission's admission under its API key's limits: of active jobs, and of bytes its jobs hold in
# Redis. KEYS: the key's set of active jobs (`P:active:{key_id}`), its stored results (`_STORED`: set,
# total), then for each member of the active set the caller read just before (ARGV[7..], in order)
# its record and its input. ARGV: the limit of active jobs (0 = none), the new job id ('' = only
# check), seconds a member may lack its record (it is being stored: `IDEMPOTENCY_TAKEOVER_SECONDS`,
# the longest a submission takes), the active set's TTL, the limit of bytes (0 = none), the upload's
# bytes, then the members' ids. Each listed member whose record is gone (past that grace) or not
# active is removed, the others' inputs counted; stored results past their expiry stop counting.
# Then, with fewer active jobs than the limit (members added since the caller's read count, being
# new) and the bytes (inputs, results, this upload) within theirs, the job is added. Returns {0} when
# admitted (or, only checking, when it would be); {1, active jobs}; or {2, bytes held, seconds until
# the first stored result expires (0: none stored)}.
_ADMIT = (
    _STORED
    + """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
local held = stored_bytes(KEYS[2], KEYS[3], now)
for i = 1, (#KEYS - 3) / 2 do
  local member, record, input = ARGV[6 + i], KEYS[2 + 2 * i], KEYS[3 + 2 * i]
  local status = redis.call('HGET', record, 'status')
  local admitted = tonumber(redis.call('ZSCORE', KEYS[1], member))
  local storing = not status and admitted and admitted > now - tonumber(ARGV[3])
  if status == '"queued"' or status == '"processing"' or storing then
    held = held + redis.call('STRLEN', input)
  else
    redis.call('ZREM', KEYS[1], member)
  end
end
local active = redis.call('ZCARD', KEYS[1])
if tonumber(ARGV[1]) > 0 and active >= tonumber(ARGV[1]) then return {1, active} end
local budget = tonumber(ARGV[5])
if budget > 0 and held + tonumber(ARGV[6]) > budget then
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  return {2, held, first[2] and math.ceil(tonumber(first[2]) - now) or 0}
end
if ARGV[2] ~= '' then
  redis.call('ZADD', KEYS[1], now, ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
return {0}
"""
)
# Give an admission back — KEYS: the key's set of active jobs, the job's record; ARGV: job id — unless
# the job was stored after all (a transaction that failed after Redis had applied it).
_UNADMIT = """
if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('ZREM', KEYS[1], ARGV[1]) end
return 0
"""


class Refusal(NamedTuple):
    """Why `JobStore.admit` refused a job: ``limit`` "active_jobs" (``amount`` = its key's active
    jobs) or "stored_bytes" (``amount`` = the bytes its jobs hold; ``expires_in`` = seconds until its
    first stored result expires, 0 when none is stored)."""

    limit: str
    amount: int
    expires_in: int


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


class _SentinelConnection(SentinelManagedConnection):
    """redis-py's Sentinel-managed connection, but dropped when a read fails, as a plain one is.

    redis-py 8.1's ``SentinelManagedConnection.read_response`` defaults ``disconnect_on_error`` to
    False (the base ``Connection`` defaults True). An exception raised mid-read — RQ's StopRequested
    from SIGTERM during an idle worker's blocking dequeue — then returns the connection to the pool
    with the reply still pending, and the next command on it reads that stale reply or blocks (the
    worker hung in its shutdown instead of exiting). Remove once redis-py ships the fix
    (https://github.com/redis/redis-py/pull/4292). Calls the parent, so its ReadOnlyError handling
    (a demoted primary → ConnectionError and a reconnect through the sentinels) stays.
    """

    def read_response(self, *args: Any, disconnect_on_error: bool = True, **kwargs: Any) -> Any:
        return super().read_response(*args, disconnect_on_error=disconnect_on_error, **kwargs)


def connect(settings: Settings) -> Redis:
    """A Redis client with short timeouts, so a dead Redis fails requests fast, not after minutes.

    With ``redis_sentinels`` the client is redis-py's Sentinel-managed one: it asks the sentinels
    for the current primary of ``redis_sentinel_master`` and finds the new one after a failover.

    It never sends a command again after a connection error: redis-py's Retry re-sends a whole
    MULTI/EXEC whose reply was lost, which Redis may have applied (`create`'s would queue the job
    twice and put a started job's record back to `queued`). A lost reply is an unknown outcome,
    for the caller to handle (the API keeps the Idempotency-Key bound). redis-py's clients built on
    a pool (URL, Sentinel) default to no retry too; this keeps it so.
    """
    options = {
        "socket_timeout": settings.redis_timeout_seconds,
        "socket_connect_timeout": settings.redis_timeout_seconds,
        "health_check_interval": 30,
        "retry": RedisRetry(NoBackoff(), 0),
    }
    if settings.redis_sentinels:
        hosts, sentinel_kwargs, password = sentinel_options(settings)
        sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs)
        return sentinel.master_for(
            settings.redis_sentinel_master,
            password=password,
            connection_class=_SentinelConnection,
            **options,
        )
    if not settings.redis_url:
        raise RuntimeError(
            "No Redis configured: set REDIS_URL or DYNFACE_REDIS_SENTINELS "
            "(or run `dynface serve` for an embedded one)."
        )
    return Redis.from_url(settings.redis_url, **options)


def make_queue(connection: Redis, settings: Settings) -> Queue:
    """The RQ queue; JSON-serialised so nothing pickled is ever written to Redis by the API."""
    return Queue(settings.queue_name, connection=connection, serializer=JSONSerializer)


def _dump(record: dict[str, Any]) -> dict[str, str]:
    return {k: json.dumps(v) for k, v in record.items()}


def _load(raw: dict[bytes, bytes]) -> dict[str, Any]:
    return {k.decode(): json.loads(v) for k, v in raw.items()}


def _transition_args(allowed: Iterable[str], fields: dict[str, Any]) -> list[Any]:
    """The scripts' leading arguments (see `_PRELUDE`)."""
    allowed = list(allowed)
    pairs = [part for item in _dump(fields).items() for part in item]
    return [len(allowed), *(json.dumps(a) for a in allowed), len(pairs) // 2, *pairs]


def _timestamp(raw: bytes | None) -> float:
    """A stored timestamp (JSON number); ValueError for anything else, a missing field included."""
    value = json.loads(raw) if raw is not None else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"not a timestamp: {value!r}")
    return float(value)


def wait_began(created_at: float, queued_at: float | None) -> float:
    """When a job began to wait for its next start: its submission, or its last re-queue after its
    worker was lost (`JobStore.requeue` sets `queued_at`)."""
    return max(created_at, queued_at or 0.0)


def merge_warnings(warnings: list[str], extra: list[str]) -> list[str]:
    """A record's warnings + new ones, without duplicates, in order."""
    return list(dict.fromkeys([*warnings, *extra]))


def _binding(job_id: str, body_sha256: str) -> str:
    """An Idempotency-Key's value: its job and the request it was made for (the script binding it adds
    when, by Redis' clock)."""
    return json.dumps({"job_id": job_id, "body_sha256": body_sha256})


class JobStore:
    """Typed access to the keys above. One instance per process; the Redis client is thread-safe."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.prefix = settings.key_prefix
        #: Where RQ registers the execution running each attempt (`attempt_over` in the scripts).
        self.started_registry = StartedJobRegistry(settings.queue_name, connection=redis).key
        # Called on the client, never queued in a pipeline: redis-py precedes every pipeline that
        # holds a script with a SCRIPT EXISTS round trip.
        self._update = redis.register_script(_UPDATE)
        self._renew = redis.register_script(_RENEW)
        self._progress = redis.register_script(_PROGRESS)
        self._finish = redis.register_script(_FINISH)
        self._claim_idem = redis.register_script(_CLAIM_IDEMPOTENCY)
        self._rebind_idem = redis.register_script(_REBIND_IDEMPOTENCY)
        self._release_idem = redis.register_script(_RELEASE_IDEMPOTENCY)
        self._admit = redis.register_script(_ADMIT)
        self._unadmit = redis.register_script(_UNADMIT)

    # --- key names
    def key(self, *parts: str) -> str:
        """A namespaced key: every key this service writes goes through here."""
        return ":".join((self.prefix, *parts))

    # --- records
    def create(self, job_id: str, data: bytes, record: dict[str, Any], queue: Queue | None = None) -> None:
        """Store the input and a new ``queued`` record and, given the queue, enqueue the job: one
        transaction (one round trip), so a worker never finds the job without its record and input."""
        ttl = self.settings.record_ttl_seconds
        with self.redis.pipeline() as pipe:
            pipe.multi()  # before RQ's commands: RQ opens MULTI itself only on an empty pipeline
            pipe.set(self.key("input", job_id), data, ex=ttl)
            pipe.hset(self.key("job", job_id), mapping=_dump(record))
            pipe.expire(self.key("job", job_id), ttl)
            if queue is not None:
                enqueue(queue, self.settings, job_id, pipe)
            pipe.execute()

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The record, or None when unknown or expired."""
        return _load(self.redis.hgetall(self.key("job", job_id))) or None

    def get_with_result(self, job_id: str, name: str) -> tuple[dict[str, Any] | None, bytes | None]:
        """The record and one result's bytes, read in one round trip (a result download needs both)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.key("job", job_id))
            pipe.get(self.key("result", job_id, name))
            raw, blob = pipe.execute()
        return _load(raw) or None, blob

    def get_with_result_length(self, job_id: str, name: str) -> tuple[dict[str, Any] | None, int | None]:
        """The record and one result's length (None when it is gone), without its bytes (a HEAD)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.key("job", job_id))
            pipe.strlen(self.key("result", job_id, name))
            raw, length = pipe.execute()
        return _load(raw) or None, length or None  # results are never empty: 0 is a missing key

    def update(self, job_id: str, fields: dict[str, Any], *, allowed: Iterable[str] = ACTIVE) -> bool:
        """Set fields only while the status is one of ``allowed``; False when the job moved on."""
        return bool(self._update(keys=[self.key("job", job_id)], args=_transition_args(allowed, fields)))

    def start(self, job_id: str, fields: dict[str, Any]) -> bool:
        """A worker takes the job: set ``fields`` (its `execution` among them) and restart the record's
        and input's TTL, so a job that waited long in the queue does not expire while it runs. Only
        from `queued`, or from `processing` once RQ has dropped the execution the record names (RQ
        re-queued a lost worker's job without telling the record, `app.lost.reconcile`). False
        otherwise: canceled or ended while queued, or another attempt runs it (the job's id was in
        the queue twice). One round trip."""
        return self._renewing(job_id, ACTIVE, fields, cutoff=0)

    def requeue(self, job_id: str, fields: dict[str, Any], waiting_in: str | None = None) -> bool:
        """A job whose worker was lost goes back to ``queued`` with ``fields`` (False when it was no
        longer processing). Its wait starts again now (`queued_at`, read by `waiting_since`) and its
        record's and input's TTL restart as at start, so it may wait the whole queue timeout again
        before the sweep fails it, without expiring first. With ``waiting_in`` (an RQ queue's key)
        only while the job is in that queue, checked in the same step: a worker that has taken it
        meanwhile must not find its running job's record back at `queued`. Only while the execution
        the record names has expired or is gone by Redis' clock (`attempt_over`): a live one's job was
        not lost. Never once its cancel was requested (False: it is to end canceled). One round trip."""
        fields = {**fields, "status": "queued", "queued_at": time.time(), "execution": None}
        return self._renewing(
            job_id, ["processing"], fields, cutoff="now", waiting_in=waiting_in, unless_canceled=True
        )

    def _renewing(
        self,
        job_id: str,
        allowed: Iterable[str],
        fields: dict[str, Any],
        cutoff: float | str,
        waiting_in: str | None = None,
        unless_canceled: bool = False,
    ) -> bool:
        """The transition with the record's and input's TTL restarted (`_RENEW`)."""
        keys = [self.key("job", job_id), self.key("input", job_id), self.started_registry]
        if waiting_in is not None:
            keys.append(waiting_in)
        args = [*_transition_args(allowed, fields), self.settings.record_ttl_seconds, cutoff]
        args.append("1" if unless_canceled else "0")
        return bool(self._renew(keys=keys, args=args))

    def progress(self, job_id: str, fields: dict[str, Any], rq_job: Job | None) -> None:
        """Progress of a running job, mirrored into RQ's job meta for RQ's own tools (rq info,
        dashboards): one round trip for both, neither written once the job has ended."""
        keys, args = [self.key("job", job_id)], _transition_args(["processing"], fields)
        if rq_job is not None:
            rq_job.meta.update(fields)
            keys.append(rq_job.key)
            args.append(rq_job.serializer.dumps(rq_job.meta))
        self._progress(keys=keys, args=args)

    def finish(
        self,
        job_id: str,
        fields: dict[str, Any],
        results: dict[str, bytes] | None = None,
        allowed: Iterable[str] = ACTIVE,
        lost: bool = False,
        unless_canceled: bool = False,
        owner: str | None = None,
    ) -> dict[str, Any] | None:
        """Move an active job to a terminal state: store results (for the record's result_ttl, fixed
        by the API at submission; counted against ``owner``'s stored bytes, which results require),
        drop the input, reset TTLs, publish the end — atomically, in one round trip (`_FINISH`).
        ``lost``: the end of a lost worker's job, so a `processing` one only while the execution its
        record names has expired (by Redis' clock) or is gone (`attempt_over`). ``unless_canceled``:
        not once its cancel was requested. Returns the final record, or None when the job had already
        moved on or was not ended (then nothing is written)."""
        s = self.settings
        results = results or {}
        now = time.time()
        keys = [self.key("job", job_id), self.key("input", job_id), self.started_registry]
        if results:
            if owner is None:
                raise ValueError("results are counted against their owner's stored bytes: name it")
            keys += [self.key("stored", owner), self.key("stored-bytes", owner)]
            keys += [self.key("result", job_id, name) for name in results]
        channel, message = self.key("done", job_id), fields.get("status", "")
        args = _transition_args(allowed, {**fields, "completed_at": now})
        # inf: a job's own end may end whichever attempt runs it; now: Redis' clock (`attempt_over`).
        args += ["now" if lost else "inf", channel, message, s.record_ttl_seconds, s.result_ttl_seconds]
        args += ["1" if unless_canceled else "0", *results.values()]
        raw = self._finish(keys=keys, args=args)
        return _load(dict(zip(raw[::2], raw[1::2], strict=True))) if raw else None

    def statuses(self, job_ids: list[str]) -> dict[str, str | None]:
        """Each job's status (None without a record). One round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(self.key("job", job_id), "status")
            raw = pipe.execute()
        return {job_id: None if r is None else json.loads(r) for job_id, r in zip(job_ids, raw, strict=True)}

    def waiting_since(self, job_ids: list[str]) -> dict[str, float]:
        """When each of these jobs that is still queued began to wait: its submission, or its last
        re-queue after its worker was lost (`requeue`). Jobs that are gone or no longer queued are left
        out, and so are records whose fields do not parse (logged): one odd record must not stop the
        sweep for every other job. One round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(self.key("job", job_id), "status", "created_at", "queued_at")
            rows = pipe.execute()
        since = {}
        for job_id, (status, created, queued) in zip(job_ids, rows, strict=True):
            try:
                if status is not None and json.loads(status) == "queued":
                    requeued = _timestamp(queued) if queued is not None else None
                    since[job_id] = wait_began(_timestamp(created), requeued)
            except ValueError as e:
                log.warning("job %s: queued, but its record does not say since when: %s", job_id, e)
        return since

    def input(self, job_id: str) -> bytes | None:
        return self.redis.get(self.key("input", job_id))

    def result(self, job_id: str, name: str) -> bytes | None:
        return self.redis.get(self.key("result", job_id, name))

    def cancel_requested(self, job_id: str) -> bool:
        """Read by the worker at each cancel check of a running job: between its stages, diffusion
        steps and background tiles, and before its results are stored (one HGET, well under a
        millisecond)."""
        return self.redis.hget(self.key("job", job_id), "cancel_requested") == b"true"

    # --- idempotency
    def claim_idempotency(self, key: str, job_id: str, body_sha256: str) -> dict[str, Any] | None:
        """Bind an Idempotency-Key to a job unless it is bound already; returns the earlier binding if
        there is one (`job_id`, `body_sha256`, `claimed_at`, and its `age` in seconds, both by Redis'
        clock). One atomic step (`_CLAIM_IDEMPOTENCY`)."""
        args = [_binding(job_id, body_sha256), self.settings.record_ttl_seconds]
        raw = self._claim_idem(keys=[self._idem_key(key)], args=args)
        return json.loads(raw) if raw else None

    def idempotency_binding(self, key: str) -> dict[str, Any] | None:
        """An Idempotency-Key's binding (`job_id`, `body_sha256`, `claimed_at`; its job stored, or being
        stored), or None when the key is not bound."""
        raw = self.redis.get(self._idem_key(key))
        return json.loads(raw) if raw else None

    def rebind_idempotency(
        self, key: str, dead_job_id: str, job_id: str, body_sha256: str
    ) -> dict[str, Any] | None:
        """Take over a key still bound to ``dead_job_id``, a job that was never created (its submission
        failed after the claim), or no longer bound at all; returns the binding that stands instead
        (with its `age`, as `claim_idempotency`'s) when another request rebound it first."""
        args = [dead_job_id, _binding(job_id, body_sha256), self.settings.record_ttl_seconds]
        raw = self._rebind_idem(keys=[self._idem_key(key)], args=args)
        return json.loads(raw) if raw else None

    def release_idempotency(self, key: str, job_id: str) -> None:
        """Undo this submission's claim when it failed before its job existed (so a retry can succeed);
        a key another request has taken over meanwhile, or whose job exists after all, is left alone."""
        self._release_idem(keys=[self._idem_key(key), self.key("job", job_id)], args=[job_id])

    def _idem_key(self, key: str) -> str:
        """Keys are hashed: clients may send anything, and it must not become a Redis key verbatim."""
        return self.key("idem", hashlib.sha256(key.encode()).hexdigest())

    # --- per-key limits: active jobs, stored bytes
    def admit(
        self,
        owner: str,
        job_id: str | None,
        *,
        max_active: int,
        max_bytes: int,
        upload_bytes: int,
        storing_grace: float,
    ) -> Refusal | None:
        """Count a new job of ``owner`` among its active (queued or processing) jobs, unless it has
        ``max_active`` of them already, or its jobs' bytes in Redis (queued inputs, stored results)
        and this upload's would pass ``max_bytes`` (a limit of 0 is none): then returns why, and
        counts nothing. ``job_id`` None only checks. A job counts from its admission, before its
        record is stored, for up to ``storing_grace`` seconds without it; an ended job stops counting
        at the owner's next admission, and its results once they expire. Atomic (`_ADMIT`; bytes of
        jobs admitted since its first read are not seen); two round trips."""
        active = self.key("active", owner)
        members = [m.decode() for m in self.redis.zrange(active, 0, -1)]
        keys = [active, self.key("stored", owner), self.key("stored-bytes", owner)]
        for member in members:
            keys += [self.key("job", member), self.key("input", member)]
        # The set outlives its key's last admission by twice a record's TTL: its jobs' records are
        # renewed at start and re-queue, so an active job may outlive one TTL from its admission.
        ttl = 2 * self.settings.record_ttl_seconds
        args = [max_active, job_id or "", storing_grace, ttl, max_bytes, upload_bytes, *members]
        reply = [int(v) for v in self._admit(keys=keys, args=args)]
        if reply[0] == 1:
            return Refusal("active_jobs", reply[1], 0)
        if reply[0] == 2:
            return Refusal("stored_bytes", reply[1], reply[2])
        return None

    def unadmit(self, owner: str, job_id: str) -> None:
        """Undo `admit` for a job that was not stored (one that was, after all, keeps its place)."""
        self._unadmit(keys=[self.key("active", owner), self.key("job", job_id)], args=[job_id])

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
                live.append(_load(raw))
            else:
                self.redis.srem(self.key("workers"), name)
        return live


def enqueue(queue: Queue, settings: Settings, job_id: str, pipeline: Pipeline) -> None:
    """Hand a job to the workers when ``pipeline`` executes (`JobStore.create`). Arguments are just
    the id (JSON); limits are explicit."""
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
        pipeline=pipeline,
    )
