"""A Redis that answers but refuses writes (out of memory, a read-only replica, a failed snapshot, too
few replicas for `min-replicas-to-write`) is the job store being unavailable, as when it cannot be
reached: 503 `redis_unavailable`, not a bug. Each case runs against its own private `redis-server`,
put into that state for real."""

from __future__ import annotations

import logging
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app import metrics
from app.errors import redis_unavailable
from app.main import create_app
from app.settings import Settings
from tests.app.test_api import error_code, metric, noise_png, requests_counted, submit
from tests.conftest import base_settings, free_ports, retry_on_port_taken, wait_for
from tests.reliability.rel_support import start_redis_server

#: The private server's memory limit: about 2 MiB above an empty server's own use (about 1 MiB).
MAXMEMORY = "3mb"


#: An upload that does not fit under MAXMEMORY beside the server's own use: storing it is refused,
#: though the small writes before (the Idempotency-Key's claim) are not.
BIG_UPLOAD = noise_png(1000)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[redis.Redis, Path]]:
    """A redis-server of its own (port, data folder) with noeviction (as docker-compose.yml runs it),
    a snapshot rule (so a failed snapshot stops writes, as with any `save` rule) and no AOF."""
    data = tmp_path / "data"
    data.mkdir()

    def start() -> tuple[subprocess.Popen[bytes], int]:
        (port,) = free_ports(1)
        args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--appendonly", "no"]
        args += ["--save", "3600", "1", "--maxmemory-policy", "noeviction"]
        return start_redis_server(args, port, tmp_path / "redis-server.log"), port

    proc, port = retry_on_port_taken(start)
    client = redis.Redis(port=port, socket_timeout=5)
    try:
        yield client, data
    finally:
        client.close()
        proc.kill()  # not SIGTERM: its shutdown snapshot may fail (MISCONF case), and it would not exit
        proc.wait(10)


def _out_of_memory(r: redis.Redis, data: Path) -> Callable[[], None]:
    # The big upload itself is what does not fit under the limit.
    r.config_set("maxmemory", MAXMEMORY)
    return lambda: r.config_set("maxmemory", "0")


def _read_only(r: redis.Redis, data: Path) -> Callable[[], None]:
    # A replica of a primary that never answers, as a demoted primary is after a failover.
    (nowhere,) = free_ports(1)
    r.execute_command("REPLICAOF", "127.0.0.1", str(nowhere))
    return lambda: r.execute_command("REPLICAOF", "NO", "ONE")


def _snapshot_failed(r: redis.Redis, data: Path) -> Callable[[], None]:
    # Its data folder is gone: the snapshot fails and Redis refuses writes (MISCONF) from then on.
    data.rmdir()
    r.bgsave()
    wait_for(lambda: r.info("persistence")["rdb_last_bgsave_status"] == "err", 10, what="snapshot failed")
    return lambda: r.config_set("stop-writes-on-bgsave-error", "no")


def _no_replicas(r: redis.Redis, data: Path) -> Callable[[], None]:
    # A primary told to write only with a replica connected (docs/scaling.md), which has none.
    r.config_set("min-replicas-to-write", 1)
    return lambda: r.config_set("min-replicas-to-write", 0)


@pytest.mark.parametrize("keyed", [False, True], ids=["open", "keyed"])
@pytest.mark.parametrize("refuse", [_out_of_memory, _read_only, _snapshot_failed, _no_replicas])
def test_a_redis_refusing_writes_is_503_redis_unavailable_and_frees_the_idempotency_key(
    private_redis: tuple[redis.Redis, Path],
    refuse: Callable[[redis.Redis, Path], Callable[[], None]],
    keyed: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It was a 500 `internal` logged with a traceback, not counted as a refused submission, and an
    Idempotency-Key claimed before the refusal stayed bound: the client's retry got 409
    `idempotency_in_progress` for a minute, though no job had been stored."""
    r, data = private_redis
    port = r.connection_pool.connection_kwargs["port"]
    # Keyed: one active job per API key, so a refused submission must give back its place, or the
    # retry is a 429.
    limit = {"api_keys": "k", "max_active_jobs_per_key": 1} if keyed else {}
    s = base_settings(uuid.uuid4().hex[:10], redis_url=f"redis://127.0.0.1:{port}/0", **limit)
    rejected = 'dynface_jobs_rejected_total{reason="redis_unavailable"}'
    api_key = {"X-API-Key": "k"} if keyed else {}
    key = {"Idempotency-Key": "refused-once", **api_key}
    with TestClient(create_app(s), raise_server_exceptions=False) as c:
        heal = refuse(r, data)
        before = (
            metric(c, rejected),
            requests_counted(c, "/v1/restorations", "POST", 503, "redis_unavailable"),
            requests_counted(c, "/v1/restorations", "POST", 500, "internal"),
        )
        with caplog.at_level(logging.WARNING, logger="app.errors"):
            # Without an Idempotency-Key the first writes are the job's admission and its own
            # transaction; with one, the key's claim comes first (the small writes fit under the
            # memory limit: the job's transaction is refused after them).
            for headers in (api_key, key):
                answer = submit(c, data=BIG_UPLOAD, headers=headers)
                assert answer.status_code == 503 and error_code(answer) == "redis_unavailable", answer.text
                assert answer.headers["retry-after"].isdigit()
        assert [rec.levelno for rec in caplog.records if rec.name == "app.errors"] == [logging.WARNING] * 2
        assert all(rec.exc_info is None for rec in caplog.records)  # no traceback: not a bug
        # redis-py quotes a failed transaction step with its arguments: none of the upload is logged.
        assert all(
            BIG_UPLOAD[8:40] not in rec.getMessage().encode("latin-1", "replace") for rec in caplog.records
        )
        assert all(len(rec.getMessage()) < 400 for rec in caplog.records)
        after = (
            metric(c, rejected),
            requests_counted(c, "/v1/restorations", "POST", 503, "redis_unavailable"),
            requests_counted(c, "/v1/restorations", "POST", 500, "internal"),
        )
        assert after == (before[0] + 2, before[1] + 2, before[2])
        heal()
        # The refused submission stored nothing, so its key is free: the retry makes the job at once.
        retry = submit(c, data=BIG_UPLOAD, headers=key)
        assert retry.status_code == 202 and "idempotent-replayed" not in retry.headers, retry.text
        replay = submit(c, data=BIG_UPLOAD, headers=key)
        assert replay.json()["id"] == retry.json()["id"] and replay.headers["idempotent-replayed"] == "true"
        assert c.app.state.services.queue.count == 1


def test_a_redis_error_that_is_no_refusal_is_still_a_bug(make_settings: Callable[..., Settings]) -> None:
    """Only refusals are `redis_unavailable`: a command Redis rejects for what it is (here a wrong
    type, which only a bug of ours sends) stays a 500 `internal`."""
    s = make_settings()
    app = create_app(s)
    store = app.state.services.store
    key = store.key("not-a-hash")

    def read_a_string_as_a_hash() -> None:
        store.redis.set(key, "x", ex=60)
        store.redis.hget(key, "field")

    app.add_api_route("/wrong-type", read_a_string_as_a_hash)
    with TestClient(app, raise_server_exceptions=False) as c:
        before = requests_counted(c, "/wrong-type", "GET", 500, "internal")
        r = c.get("/wrong-type")
        assert r.status_code == 500 and error_code(r) == "internal", r.text
        assert requests_counted(c, "/wrong-type", "GET", 500, "internal") == before + 1
    with pytest.raises(redis.ResponseError) as wrong_type:
        read_a_string_as_a_hash()
    assert not redis_unavailable(wrong_type.value)


def _samples(client: TestClient, family: str) -> list[float]:
    """The values of one gauge family in the API's /metrics, parsed as Prometheus would."""
    text = client.get("/metrics").text
    return [s.value for f in text_string_to_metric_families(text) if f.name == family for s in f.samples]


def _info_calls(r: redis.Redis) -> int:
    return int(r.info("commandstats").get("cmdstat_info", {}).get("calls", 0))


def test_the_api_exports_redis_memory_and_its_limit_also_once_redis_is_full(
    private_redis: tuple[redis.Redis, Path],
) -> None:
    """Redis runs with maxmemory and noeviction: once full, every submission fails 503
    redis_unavailable. dynface_redis_memory_used_bytes / _max_bytes (INFO memory's used_memory and
    maxmemory, 0 = no limit) let DynfaceRedisMemoryHigh warn before, and still answer once it is full
    (the scrape only reads). One INFO call per scrape."""
    r, _ = private_redis
    port = r.connection_pool.connection_kwargs["port"]
    s = base_settings(uuid.uuid4().hex[:10], redis_url=f"redis://127.0.0.1:{port}/0")
    with TestClient(create_app(s), raise_server_exceptions=False) as c:
        # No limit set: exported as 0, and the use is Redis' own figure.
        (used,) = _samples(c, "dynface_redis_memory_used_bytes")
        assert _samples(c, "dynface_redis_memory_max_bytes") == [0.0]
        assert 0 < used < 64 * 2**20 and abs(used - r.info("memory")["used_memory"]) < 2**20
        before = _info_calls(r)
        c.get("/metrics")
        assert _info_calls(r) - before == 2  # the scrape's INFO, and `before`'s own
        # Filled up to its limit: writes are refused, submissions fail, and the scrape still reports,
        # with the ratio DynfaceRedisMemoryHigh fires on (above 0.9).
        r.config_set("maxmemory", MAXMEMORY)
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            for i in range(100):
                r.set(f"filler:{i}", b"x" * 100_000)
        answer = submit(c)
        assert answer.status_code == 503 and error_code(answer) == "redis_unavailable", answer.text
        assert _samples(c, "dynface_redis_up") == [1.0]
        assert _samples(c, "dynface_redis_memory_max_bytes") == [float(3 * 2**20)]
        (used,) = _samples(c, "dynface_redis_memory_used_bytes")
        assert 0.9 < used / (3 * 2**20) < 1.2, used


def test_a_redis_that_refuses_info_loses_only_the_memory_gauges(
    private_redis: tuple[redis.Redis, Path], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """INFO refused (an ACL without it; managed Redis services that rename it) is no outage: the
    scrape answers with Redis up and its other gauges, only the memory ones have no sample, and the
    refusal is logged once, not on every scrape."""
    monkeypatch.setattr(metrics, "_info_refusal_logged", False)  # another test's refusal was logged
    r, _ = private_redis
    port = r.connection_pool.connection_kwargs["port"]
    r.acl_setuser("no-info", enabled=True, nopass=True, keys=["*"], categories=["+@all"], commands=["-info"])
    s = base_settings(uuid.uuid4().hex[:10], redis_url=f"redis://no-info:x@127.0.0.1:{port}/0")
    with TestClient(create_app(s), raise_server_exceptions=False) as c:
        assert submit(c).status_code == 202
        with caplog.at_level(logging.WARNING, logger="app.metrics"):
            for _ in range(2):
                assert _samples(c, "dynface_redis_up") == [1.0]
                assert _samples(c, "dynface_queue_depth") == [1.0]
                assert _samples(c, "dynface_redis_memory_used_bytes") == []
                assert _samples(c, "dynface_redis_memory_max_bytes") == []
    refusals = [rec.getMessage() for rec in caplog.records if rec.name == "app.metrics"]
    assert len(refusals) == 1 and "INFO memory refused" in refusals[0], refusals
