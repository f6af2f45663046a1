"""`dynface serve`: real uvicorn + one real worker, driven over real HTTP. With no REDIS_URL it
brings its own embedded Redis (here with 2 API processes and multiprocess metrics); with REDIS_URL it
uses that Redis instead, still with a worker. Also what `serve` gives each of its workers (metrics
port, device), and worker processes stopped before they start a job."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.jobs import JobStore, connect, make_queue
from app.main import create_app
from app.settings import Settings
from models.dsst import default_table
from tests.conftest import (
    ROOT,
    WEIGHTS,
    PortTaken,
    aligned_png,
    base_settings,
    free_ports,
    port_taken,
    purge,
    retry_on_port_taken,
    settings_env,
    wait_for,
)
from worker import metrics
from worker.cli import _device_for_worker, _worker_commands, _WorkerPool, build_parser
from worker.main import run_worker


def _stop(proc: subprocess.Popen[bytes], stop_signal: int = signal.SIGTERM) -> int:
    """Signal `serve` to stop and wait for it (killed, and the wait's timeout raised, after 60 s)."""
    proc.send_signal(stop_signal)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def _start_serving(
    log_path: Path, env: dict[str, str], args: tuple[str, ...], device: str | None
) -> tuple[subprocess.Popen[bytes], str]:
    """Start `dynface serve` on freshly picked ports and wait until it is ready; raises PortTaken
    when the API or the worker found its port taken (the worker's restarts would never get it)."""
    port, metrics_port = free_ports(2)  # distinct: picked together
    command = [sys.executable, "-m", "worker.cli", "serve", "--port", str(port), "--profile", "tiny"]
    command += ["--device", device] if device else []
    command += ["--worker-metrics-port", str(metrics_port), *args]  # a later flag in `args` wins
    with open(log_path, "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        exited = proc.poll() is not None
        text = log_path.read_text(errors="replace")
        if port_taken(text):
            raise PortTaken(text[-3000:])
        assert not exited, text
        try:
            return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, 120, interval=0.2, what="serve ready")
    except BaseException:
        with contextlib.suppress(subprocess.TimeoutExpired):
            _stop(proc)
        raise
    return proc, base


@contextmanager
def serving(
    tmp_path: Path,
    env: dict[str, str],
    *args: str,
    device: str | None = "cpu",
    stop_signal: int = signal.SIGTERM,
) -> Iterator[str]:
    """Run `dynface serve` until it is ready; yield its base URL; stop it with ``stop_signal`` (must
    exit 0)."""
    log_path = tmp_path / "serve.log"
    proc, base = retry_on_port_taken(lambda: _start_serving(log_path, env, args, device))
    try:
        yield base
    finally:
        rc = _stop(proc, stop_signal)
    assert rc == 0, log_path.read_text()[-3000:]


def round_trip(base: str) -> dict:
    r = httpx.post(
        f"{base}/v1/restorations",
        files={"image": ("f.png", aligned_png(), "image/png")},
        data={"aligned": "true"},
        headers={"Prefer": "wait=60"},
        timeout=70,
    )
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
    assert r.json()["urls"]["self"].startswith(base)
    img = httpx.get(r.json()["outputs"]["image"], timeout=5)
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    return r.json()


def ready_workers(base: str) -> set[str]:
    workers = httpx.get(f"{base}/readyz", timeout=5).json()["workers"]
    return {w["worker"] for w in workers if w["state"] == "ready"}


def worker_pid(name: str) -> int:
    """A worker's default name is host.pid.device.random (worker.main.run_worker)."""
    return int(name.split(".")[-3])


@pytest.fixture(scope="module")
def fast_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DSST table with starts of 2–4 steps: these jobs check the service around the pipeline, which
    the shipped table's 24+ sampling steps would only make longer."""
    path = tmp_path_factory.mktemp("dsst") / "fast.json"
    path.write_text(dataclasses.replace(default_table(), start_indices=(2, 3, 4)).to_json())
    return path


def test_embedded_serve_round_trip(tmp_path, fast_table: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNFACE_") and k != "REDIS_URL"}
    env.update(
        {
            "DYNFACE_WEIGHTS_DIR": str(WEIGHTS),
            "DYNFACE_DSST_TABLE": str(fast_table),
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        }
    )
    with serving(tmp_path, env, "--api-workers", "2") as base:
        round_trip(base)
        models = httpx.get(f"{base}/v1/models", timeout=5).json()
        assert models["models"][0]["profile"] == "tiny" and models["warnings"]
        metrics = httpx.get(f"{base}/metrics", timeout=5).text
        labels = 'error_code="",method="POST",route="/v1/restorations",status="200"'
        counted = "dynface_http_requests_total{" + labels + "}"
        assert counted in metrics

        # The worker has its own session (a terminal's Ctrl-C reaches only `serve`, which stops it
        # warmly), and one that dies is started again.
        (first,) = ready_workers(base)
        pid = worker_pid(first)
        assert os.getsid(pid) == pid != os.getsid(0)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: ready_workers(base) - {first}, 120, interval=0.2, what="restarted worker ready")
        round_trip(base)
    log = (tmp_path / "serve.log").read_text()
    assert "embedded Redis" in log
    assert f"worker 0 exited with code {-signal.SIGKILL}; restarting" in log


def test_an_empty_redis_url_is_unset_for_serve_its_api_and_its_workers(tmp_path, fast_table: Path) -> None:
    """`DYNFACE_REDIS_URL=` (an empty line of an env file) means no Redis configured, as unset does:
    `serve` embeds one, and its API and workers use it, though Settings read DYNFACE_REDIS_URL first,
    empty or not. Its two workers, given no device, each pick one (the CPU on this machine) and a
    metrics port of their own (0: any free port, for each)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNFACE_") and k != "REDIS_URL"}
    env.update(
        {
            "DYNFACE_REDIS_URL": "",
            "DYNFACE_WEIGHTS_DIR": str(WEIGHTS),
            "DYNFACE_DSST_TABLE": str(fast_table),
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
        }
    )
    with serving(tmp_path, env, "--workers", "2", "--worker-metrics-port", "0", device=None) as base:
        wait_for(lambda: len(ready_workers(base)) == 2, 120, interval=0.2, what="both workers ready")
        round_trip(base)
        log = (tmp_path / "serve.log").read_text()
        (url,) = re.findall(r"embedded Redis at (\S+)", log)
        embedded = Settings(redis_url=url)
        workers = JobStore(connect(embedded), embedded).workers()
        assert [w["device"] for w in workers] == ["cpu", "cpu"]
        ports = {w["metrics_port"] for w in workers}
        assert len(ports) == 2 and 0 not in ports, workers


def test_serve_gives_each_worker_its_own_metrics_port_and_device() -> None:
    """Worker i gets the first metrics port + i, which is DYNFACE_WORKER_METRICS_PORT unless
    --worker-metrics-port says otherwise; from 0 (any free port) each gets 0. Without --device each
    is numbered for its own GPU (`_device_for_worker`); with one, all run there."""

    def commands(*flags: str, setting: int = 9100) -> list[list[str]]:
        args = build_parser().parse_args(["serve", "--workers", "3", *flags])
        return _worker_commands(args, base_settings("ports", worker_metrics_port=setting))

    def ports(*flags: str, setting: int = 9100) -> list[str]:
        return [c[c.index("--metrics-port") + 1] for c in commands(*flags, setting=setting)]

    assert ports(setting=9300) == ["9300", "9301", "9302"]
    assert ports("--worker-metrics-port", "9200", setting=9300) == ["9200", "9201", "9202"]
    assert ports("--worker-metrics-port", "0") == ports(setting=0) == ["0", "0", "0"]
    assert [c[3:5] for c in commands()] == [["--worker-index", str(i)] for i in range(3)]
    assert [c[3:5] for c in commands("--device", "cuda:1")] == [["--device", "cuda:1"]] * 3


def test_serve_workers_serve_metrics_on_its_host() -> None:
    """The worker's metrics server listened on every interface: a `serve` on loopback (the default,
    `make serve`) exposed its workers' metrics to the network. They listen on serve's --host unless
    DYNFACE_WORKER_METRICS_HOST names another; a plain `dynface worker` keeps every interface (a
    Prometheus in another container scrapes it)."""

    def hosts(*flags: str, **setting: str) -> list[str]:
        args = build_parser().parse_args(["serve", "--workers", "2", *flags])
        found = _worker_commands(args, base_settings("hosts", **setting))
        return [c[c.index("--metrics-host") + 1] for c in found]

    assert hosts() == ["127.0.0.1"] * 2
    assert hosts("--host", "0.0.0.0") == ["0.0.0.0"] * 2
    assert hosts(worker_metrics_host="10.0.0.5") == ["10.0.0.5"] * 2
    port = metrics.serve(0, "127.0.0.1")
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    outward = socket.gethostbyname(socket.gethostname())
    if not outward.startswith("127."):
        with pytest.raises(OSError):
            socket.create_connection((outward, port), timeout=2)


def test_a_worker_without_a_device_takes_a_gpu_of_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    """`serve --workers N` on a machine with GPUs: one worker per GPU; on one without, all on the
    CPU. A worker beyond the GPUs refuses to start, with a reason and the status `serve` does not
    restart (`test_a_worker_that_cannot_run_here_is_not_restarted`)."""
    assert [_device_for_worker(i, 0) for i in range(3)] == ["cpu"] * 3
    assert [_device_for_worker(i, 2) for i in range(2)] == ["cuda:0", "cuda:1"]
    with pytest.raises(SystemExit) as exited:
        _device_for_worker(2, 2)
    assert exited.value.code == os.EX_CONFIG
    assert "worker 2 has no GPU of its own" in capsys.readouterr().err


def test_a_worker_that_cannot_run_here_is_not_restarted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that exits with EX_CONFIG (no GPU of its own) would exit so again: `serve` leaves it
    stopped instead of restarting it forever."""
    monkeypatch.setattr(_WorkerPool, "RESTART_DELAY", 0.05)
    pool = _WorkerPool([[sys.executable, "-c", f"raise SystemExit({os.EX_CONFIG})"]], dict(os.environ))
    real_spawn = pool._spawn
    starts: list[list[str]] = []

    def spawn(command: list[str]) -> subprocess.Popen[bytes]:
        starts.append(command)
        return real_spawn(command)

    monkeypatch.setattr(pool, "_spawn", spawn)
    pool.start()
    try:
        wait_for(lambda: pool._retired, 10, what="the worker given up")
        time.sleep(1.5)  # three rounds of the pool's watch
    finally:
        pool.stop(timeout=5)
    assert len(starts) == 1


#: The start of a worker process's script: its model is a stand-in that loads at once.
_STAND_IN_MODEL = """
from worker import main

class Loaded:
    info = {"profile": "stand-in", "real": False}
    def load_detector(self) -> None:
        pass

main.pipeline_from_settings = lambda settings, device: Loaded()
"""

#: A worker process (`_STAND_IN_MODEL`) which sends itself SIGTERM once the DynfaceWorker method
#: `sys.argv[2]` has run: `announce` of `ready` (model loaded, RQ's loop not started),
#: `register_birth` (RQ's loop starting, its stop handlers not installed yet) or
#: `dequeue_job_and_maintain_ttl` (RQ's loop idle, a job just dequeued and not started yet).
_STOPPED_AT = (
    _STAND_IN_MODEL
    + """
import os, signal, sys
from app.settings import Settings

where = sys.argv[2]
real = getattr(main.DynfaceWorker, where)

def then_stop(self, *args):
    result = real(self, *args)
    if where != "announce" or args == ("ready",):
        os.kill(os.getpid(), signal.SIGTERM)
    return result

setattr(main.DynfaceWorker, where, then_stop)
main.run_worker(Settings(), "cpu", name=sys.argv[1])
"""
)


@pytest.mark.parametrize("where", ["announce", "register_birth", "dequeue_job_and_maintain_ttl"])
def test_a_worker_stopped_before_it_starts_a_job_exits_cleanly_and_leaves_the_job_queued(
    make_settings: Callable[..., Settings], tmp_path: Path, where: str
) -> None:
    """SIGTERM before the worker starts a job: once its model loaded but before RQ's loop installs
    its stop handlers, or while idle just after RQ's dequeue took the job out of the queue. The
    worker exits 0 and leaves no live registry entry, ours (it would read `ready` until it expired)
    or RQ's; the job waits at the front of the queue as it was, for the next worker."""
    settings = make_settings()
    store = JobStore(connect(settings), settings)
    with TestClient(create_app(settings)) as c:
        r = c.post(
            "/v1/restorations",
            files={"image": ("f.png", aligned_png(), "image/png")},
            data={"aligned": "true"},
        )
    job_id = r.json()["id"]
    record = store.get(job_id)
    name = f"{settings.queue_name}-stopped"
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.run(
            [sys.executable, "-c", _STOPPED_AT, name, where],
            cwd=ROOT,
            env=settings_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=120,
        )
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    assert store.workers() == []
    rq_key = f"rq:worker:{name}"  # RQ's, if it registered: marked dead, out of RQ's set of workers
    assert not store.redis.sismember("rq:workers", rq_key)
    assert not store.redis.exists(rq_key) or store.redis.hexists(rq_key, "death")
    queue = make_queue(store.redis, settings)
    assert queue.job_ids == [job_id] and queue.intermediate_queue.get_job_ids() == []
    assert store.get(job_id) == record


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (one whose parent died is reparented to
    whichever process reaps orphans here, which may not reap it at once)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


#: A worker (`_STAND_IN_MODEL`) started through the `dynface worker` command line.
_WORKER = (
    _STAND_IN_MODEL
    + """
import sys
from worker import cli

raise SystemExit(cli.main(["worker", "--device", "cpu", *sys.argv[1:]]))
"""
)

#: A process standing in for `serve`: it starts `_WORKER` in a session of its own with --parent-pid,
#: as `serve` does, prints the worker's pid, and sleeps.
_PARENT = """
import os, subprocess, sys, time
command = [sys.executable, "-c", sys.argv[1], "--name", sys.argv[2], "--parent-pid", str(os.getpid())]
child = subprocess.Popen(command, start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""


def test_a_worker_whose_serve_was_killed_stops_itself(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """`serve` killed at once (SIGKILL, the OOM killer) cannot stop its workers, which run in sessions
    of their own: each notices that its parent is gone and stops warmly, unregistered, instead of
    holding its GPU memory and metrics port from the next `serve`'s worker."""
    settings = make_settings()
    store = JobStore(connect(settings), settings)
    name = f"{settings.queue_name}-orphan"
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        parent = subprocess.Popen(
            [sys.executable, "-c", _PARENT, _WORKER, name],
            cwd=ROOT,
            env=settings_env(settings),
            stdout=subprocess.PIPE,
            stderr=log,
        )
    pid = 0
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        wait_for(lambda: [w["state"] for w in store.workers()] == ["ready"], 60, what="worker ready")
        assert _running(pid)
        parent.kill()
        parent.wait()
        wait_for(lambda: not _running(pid), 30, interval=0.2, what="the orphaned worker's exit")
        assert store.workers() == []
        assert f"its serve process ({parent.pid}) is gone; stopping" in log_path.read_text()
    finally:
        parent.kill()
        parent.wait()
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_serve_with_redis_url_uses_that_redis(tmp_path, redis_conn) -> None:
    settings = base_settings(os.urandom(5).hex())
    env = settings_env(settings)
    env["REDIS_URL"] = env.pop("DYNFACE_REDIS_URL")  # the un-prefixed spelling ops use
    try:
        with serving(tmp_path, env, stop_signal=signal.SIGHUP) as base:
            job = round_trip(base)
            # the job, its worker and its results are in the given Redis, under the configured prefix
            assert redis_conn.exists(f"{settings.key_prefix}:job:{job['id']}")
            assert redis_conn.exists(f"{settings.key_prefix}:result:{job['id']}:image")
            assert redis_conn.scard(f"{settings.key_prefix}:workers") == 1
            (worker,) = ready_workers(base)
        # A closed terminal (SIGHUP) stops a single-process `serve` as SIGTERM does (uvicorn re-raises
        # it after its graceful shutdown): its worker is stopped cleanly, not left running.
        assert redis_conn.scard(f"{settings.key_prefix}:workers") == 0
        assert not _running(worker_pid(worker))
    finally:
        purge(redis_conn, settings)
    assert "embedded Redis" not in (tmp_path / "serve.log").read_text()


def test_a_worker_whose_metrics_port_is_taken_says_which_setting_to_change(make_settings) -> None:
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        settings = make_settings(worker_metrics_port=taken.getsockname()[1])
        with pytest.raises(SystemExit, match="DYNFACE_WORKER_METRICS_PORT"):
            run_worker(settings, "cpu", burst=True)


@pytest.mark.parametrize("value", ["", "70000", "-1"])
def test_a_worker_metrics_port_that_is_no_port_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """Every worker serves its metrics (probes and Prometheus read them): no value turns them off."""
    monkeypatch.setenv("DYNFACE_WORKER_METRICS_PORT", value)
    with pytest.raises(ValidationError, match="worker_metrics_port"):
        Settings()


def test_a_worker_serves_the_metrics_that_wait_for_job_ends(
    make_settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's /metrics is `metrics.SCRAPED` (read between job ends), not the default registry,
    which a client woken by a job's end could scrape before the job is counted."""
    served: list[object] = []
    real_start = metrics.start_http_server

    def spy(port: int, **kwargs: Any) -> Any:
        served.append(kwargs.get("registry"))
        return real_start(port, **kwargs)

    monkeypatch.setattr(metrics, "start_http_server", spy)
    with socket.socket() as taken:  # run_worker stops there, before loading the model
        taken.bind(("", 0))
        taken.listen()
        with pytest.raises(SystemExit):
            run_worker(make_settings(worker_metrics_port=taken.getsockname()[1]), "cpu", burst=True)
    assert served == [metrics.SCRAPED]


def test_a_worker_that_cannot_be_started_again_yet_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve` restarts a worker that exited. When starting its replacement fails (OSError: no
    memory or processes left for now), it tries again after the next delay instead of never
    restarting any worker again."""
    monkeypatch.setattr(_WorkerPool, "RESTART_DELAY", 0.05)
    pool = _WorkerPool([[sys.executable, "-c", "raise SystemExit(3)"]], dict(os.environ))
    real_spawn = pool._spawn
    starts: list[list[str]] = []

    def first_restart_fails(command: list[str]) -> subprocess.Popen[bytes]:
        starts.append(command)
        if len(starts) == 2:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        return real_spawn(command)

    monkeypatch.setattr(pool, "_spawn", first_restart_fails)
    pool.start()
    try:
        wait_for(lambda: len(starts) >= 3, 10, what="the worker started again after the failed start")
    finally:
        pool.stop(timeout=5)


def test_stopping_several_workers_waits_the_timeout_once_not_once_each(tmp_path: Path) -> None:
    """`serve`'s shutdown timeout bounds the whole stop: workers that do not finish in time are all
    killed at its end (N workers stuck in long jobs must not hold Ctrl-C for N × the timeout)."""
    commands = [
        [
            sys.executable,
            "-c",
            "import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "pathlib.Path(sys.argv[1]).touch(); time.sleep(60)",
            str(tmp_path / f"ignoring-{k}"),
        ]
        for k in range(3)
    ]
    pool = _WorkerPool(commands, dict(os.environ))
    pool.start()
    wait_for(lambda: len(list(tmp_path.glob("ignoring-*"))) == 3, 30, what="workers ignoring SIGTERM")
    # Waited once, the stop takes the timeout plus the kills; once per worker it would take 3× the
    # timeout. Under 2× proves "once" and leaves a whole timeout of room for a loaded machine.
    timeout = 4.0
    t0 = time.monotonic()
    pool.stop(timeout=timeout)
    elapsed = time.monotonic() - t0
    assert all(p.poll() is not None for p in pool._procs)
    assert elapsed < 2 * timeout, f"stopping 3 workers with a {timeout} s timeout took {elapsed:.1f} s"
