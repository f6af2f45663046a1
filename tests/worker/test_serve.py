"""`dynface serve` with no REDIS_URL: embedded real Redis + real uvicorn (2 processes, multiprocess
metrics) + one real worker, driven over real HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import httpx

from tests.conftest import ROOT, WEIGHTS, aligned_png, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_embedded_serve_round_trip(tmp_path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNFACE_") and k != "REDIS_URL"}
    env.update(
        {
            "DYNFACE_WEIGHTS_DIR": str(WEIGHTS),
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        }
    )
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker.cli",
            "serve",
            "--port",
            str(port),
            "--profile",
            "tiny",
            "--device",
            "cpu",
            "--api-workers",
            "2",
            "--worker-metrics-port",
            str(free_port()),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 120, interval=0.5, what="serve ready")
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
        models = httpx.get(f"{base}/v1/models", timeout=5).json()
        assert models["models"][0]["profile"] == "tiny" and models["warnings"]
        metrics = httpx.get(f"{base}/metrics", timeout=5).text
        assert 'dynface_http_requests_total{method="POST",route="/v1/restorations",status="200"}' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        log.close()
    assert rc == 0, (tmp_path / "serve.log").read_text()[-3000:]
