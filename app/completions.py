"""Wake `Prefer: wait` requests the moment their job ends.

`JobStore.finish` publishes on ``P:done:{id}``; each API process keeps one pattern subscription
(``P:done:*``) and sets the asyncio events of the requests waiting for that job. A waiting request
still re-reads its record on a growing interval, so a message lost while the listener reconnects
(Redis restart, failover) only costs latency, never an answer. One subscription per process, not one
per request: waiters cost no Redis connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel

from app.jobs import sentinel_options
from app.settings import Settings

log = logging.getLogger(__name__)

_CLOSE_TIMEOUT_SECONDS = 1.0
#: Longest blocking read of the subscription: how soon a stop request is noticed at the latest.
_READ_TIMEOUT_SECONDS = 1.0


def _connect(settings: Settings) -> AsyncRedis:
    """An asyncio client to the same Redis as `app.jobs.connect`, without a read timeout (a
    subscription waits for messages indefinitely; the health check notices a dead connection)."""
    options = {"socket_connect_timeout": settings.redis_timeout_seconds, "health_check_interval": 30}
    if settings.redis_sentinels:
        hosts, sentinel_kwargs, password = sentinel_options(settings)
        sentinel = AsyncSentinel(hosts, sentinel_kwargs=sentinel_kwargs)
        return sentinel.master_for(settings.redis_sentinel_master, password=password, **options)
    assert settings.redis_url is not None  # create_app's sync connect() has already refused None
    return AsyncRedis.from_url(settings.redis_url, **options)


class Completions:
    """Per-process registry of waiting requests, fed by one Redis pattern subscription."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._waiting: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.subscribed = asyncio.Event()  # set while the subscription is live (tests wait on it)

    @staticmethod
    def channel(prefix: str, job_id: str) -> str:
        return f"{prefix}:done:{job_id}"

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="dynface-completions")

    async def stop(self) -> None:
        if self._task is None:
            return
        # The flag, not only the cancel, ends the loop: redis-py can swallow a cancellation that lands
        # while it reads (seen: a cancel right after subscribing left the task reading on), so the
        # listener reads with a timeout and checks the flag between reads.
        self._stopping = True
        self._task.cancel()
        limit = _READ_TIMEOUT_SECONDS + _CLOSE_TIMEOUT_SECONDS + 1.0
        done, _ = await asyncio.wait({self._task}, timeout=limit)
        if not done:
            log.warning("job completion listener did not stop within %.0f s", limit)

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set when `job_id` ends; register before reading the record so no end is missed."""
        event = asyncio.Event()
        self._waiting.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiting.get(job_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiting[job_id]

    async def _listen(self) -> None:
        pattern = self.channel(self.settings.key_prefix, "*")
        while not self._stopping:
            client = _connect(self.settings)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.psubscribe(pattern)
                    self.subscribed.set()
                    while not self._stopping:
                        message = await pubsub.get_message(timeout=_READ_TIMEOUT_SECONDS)
                        if message is None or message["type"] != "pmessage":
                            continue
                        job_id = message["channel"].decode().rsplit(":", 1)[1]
                        for event in self._waiting.get(job_id, ()):
                            event.set()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis down or failing over: waiters fall back to polling
                if self._stopping:
                    return
                log.warning("job completion listener: %s: %s; retrying in 1 s", type(e).__name__, e)
            finally:
                self.subscribed.clear()
                # Bounded, and never cancelling the close (asyncio.wait, not wait_for): closing a
                # connection whose peer is gone must not hold up shutdown.
                closing = asyncio.ensure_future(client.aclose())
                await asyncio.wait({closing}, timeout=_CLOSE_TIMEOUT_SECONDS)
            if not self._stopping:
                await asyncio.sleep(1.0)
