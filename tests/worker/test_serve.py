"""`dynface serve`: real uvicorn + one real worker, driven over real HTTP. With no REDIS_URL it
brings its own embedded Redis (here with 2 API processes and multiprocess metrics); with REDIS_URL it
uses that Redis instead, still with a worker."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

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
from worker.cli import _WorkerPool
from worker.main import run_worker


def _stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM `serve` and wait for it (killed, and the wait's timeout raised, after 60 s)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def _start_serving(
    log_path: Path, env: dict[str, str], args: tuple[str, ...]
) -> tuple[subprocess.Popen[bytes], str]:
    """Start `dynface serve` on freshly picked ports and wait until it is ready; raises PortTaken
    when the API or the worker found its port taken (the worker's restarts would never get it)."""
    port, metrics_port = free_ports(2)  # distinct: picked together
    command = [sys.executable, "-m", "worker.cli", "serve", "--port", str(port), "--profile", "tiny"]
    command += ["--device", "cpu", "--worker-metrics-port", str(metrics_port), *args]
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
        wait_for(ready, 120, interval=0.5, what="serve ready")
    except BaseException:
        with contextlib.suppress(subprocess.TimeoutExpired):
            _stop(proc)
        raise
    return proc, base


@contextmanager
def serving(tmp_path: Path, env: dict[str, str], *args: str) -> Iterator[str]:
    """Run `dynface serve` until it is ready; yield its base URL; stop it with SIGTERM (must exit 0)."""
    log_path = tmp_path / "serve.log"
    proc, base = retry_on_port_taken(lambda: _start_serving(log_path, env, args))
    try:
        yield base
    finally:
        rc = _stop(proc)
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


def test_embedded_serve_round_trip(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNFACE_") and k != "REDIS_URL"}
    env.update(
        {
            "DYNFACE_WEIGHTS_DIR": str(WEIGHTS),
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
        wait_for(lambda: ready_workers(base) - {first}, 120, interval=0.5, what="restarted worker ready")
        round_trip(base)
    log = (tmp_path / "serve.log").read_text()
    assert "embedded Redis" in log
    assert f"worker 0 exited with code {-signal.SIGKILL}; restarting" in log


def test_serve_with_redis_url_uses_that_redis(tmp_path, redis_conn) -> None:
    settings = base_settings(os.urandom(5).hex())
    env = settings_env(settings)
    env["REDIS_URL"] = env.pop("DYNFACE_REDIS_URL")  # the un-prefixed spelling ops use
    try:
        with serving(tmp_path, env) as base:
            job = round_trip(base)
            # the job, its worker and its results are in the given Redis, under the configured prefix
            assert redis_conn.exists(f"{settings.key_prefix}:job:{job['id']}")
            assert redis_conn.exists(f"{settings.key_prefix}:result:{job['id']}:image")
            assert redis_conn.scard(f"{settings.key_prefix}:workers") == 1
        # SIGTERM to a single-process `serve` (uvicorn re-raises it) still stops its worker cleanly
        assert redis_conn.scard(f"{settings.key_prefix}:workers") == 0
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
