"""The API's job-completion listener (app/completions.py) starts, wakes waiters and always stops.

Stopping matters as much as waking: the listener runs inside the app's lifespan, so a listener that
ignores its cancellation hangs every API shutdown (seen once in CI before the stop flag existed).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

import pytest

from app.completions import Completions
from app.settings import Settings


def _closed_port() -> int:
    """A loopback port nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stop_ends_a_live_subscription(settings: Settings) -> None:
    async def scenario() -> tuple[bool, bool]:
        completions = Completions(settings)
        completions.start()
        await asyncio.wait_for(completions.subscribed.wait(), 10)
        await completions.stop()
        task = completions._task
        assert task is not None
        return task.done(), completions.subscribed.is_set()

    done, subscribed = asyncio.run(scenario())
    assert done
    assert not subscribed


def test_stop_ends_the_reconnect_loop_when_redis_is_unreachable(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """With Redis gone the listener sits in its retry loop (connect error, sleep, reconnect);
    stopping it there must end the task, not leave it retrying."""
    settings = make_settings(redis_url=f"redis://127.0.0.1:{_closed_port()}/0")
    caplog.set_level(logging.WARNING, logger="app.completions")

    def retrying() -> bool:
        return any("retrying" in r.getMessage() for r in caplog.records if r.name == "app.completions")

    async def scenario() -> tuple[bool, bool]:
        completions = Completions(settings)
        completions.start()
        # The first connect has failed and the listener said it retries: it is in its retry sleep.
        deadline = asyncio.get_running_loop().time() + 10
        while not retrying():
            assert asyncio.get_running_loop().time() < deadline, "the listener never reported a retry"
            await asyncio.sleep(0.01)
        task = completions._task
        assert task is not None
        was_running = not task.done()
        await completions.stop()
        return was_running, task.done()

    was_running, done = asyncio.run(scenario())
    assert was_running
    assert done


def test_the_stop_flag_alone_ends_a_live_subscription(settings: Settings) -> None:
    """redis-py can swallow a cancellation that lands while the subscription reads (seen: a cancel
    just after subscribing left the listener reading on), so `stop` also sets a flag that the
    listener checks between its bounded reads. Here the flag is set without any cancel at all."""

    async def scenario() -> tuple[bool, bool]:
        completions = Completions(settings)
        completions.start()
        await asyncio.wait_for(completions.subscribed.wait(), 10)
        task = completions._task
        assert task is not None
        completions._stopping = True
        done, _ = await asyncio.wait({task}, timeout=10)
        return bool(done), completions.subscribed.is_set()

    done, subscribed = asyncio.run(scenario())
    assert done
    assert not subscribed
