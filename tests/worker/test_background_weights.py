"""A configured background model whose file is absent is reported by the worker like any missing
weight: state `missing_weights`, the file, and `dynface weights pull --only realesrgan_x2plus`.

The profile's own files are placeholders here (one byte where the manifest pins no size: an empty file
counts as corrupt; a sparse file of the pinned size otherwise), so the background file is the only one
missing.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from app.jobs import JobStore, connect
from app.main import create_app
from models import weights
from models.errors import PipelineError
from models.profiles import PROFILES
from tests.conftest import WorkerProcess, base_settings, http_server, purge, wait_for
from worker.main import _missing_weights

BACKGROUND = "realesrgan_x2plus"


def _placeholders(root: Path) -> None:
    """What a size-only probe takes for the real profile's files (never loaded in these tests)."""
    for entry in weights.select(PROFILES["real"].required_weights):
        with (root / entry.path).open("wb") as f:
            f.truncate(entry.size or 1)


def _expected(root: Path) -> list[dict[str, str]]:
    return [
        {
            "name": BACKGROUND,
            "path": str(root / "RealESRGAN_x2plus.pth"),
            "command": f"DYNFACE_WEIGHTS_DIR={root} dynface weights pull --only {BACKGROUND}",
        }
    ]


class _NotFound(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_error(404)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def not_found_url() -> Iterator[str]:
    with http_server(_NotFound) as base:
        yield f"{base}/RealESRGAN_x2plus.pth"


def test_a_failed_background_download_is_reported_by_name(tmp_path: Path, not_found_url: str) -> None:
    """The profile alone does not list the background file, so the download error must name it."""
    _placeholders(tmp_path)
    (entry,) = weights.select([BACKGROUND])
    manifest = [weights.WeightFile(BACKGROUND, entry.path, not_found_url, None, None, "test")]
    with pytest.raises(weights.DownloadError) as err:
        weights.pull([BACKGROUND], tmp_path, progress=False, manifest=manifest)
    assert err.value.names == [BACKGROUND]
    settings = base_settings("unused", profile="real", weights_dir=str(tmp_path), background_model=BACKGROUND)
    assert _missing_weights(settings, err.value) == _expected(tmp_path)


@pytest.fixture
def waiting_worker(redis_conn: redis.Redis, tmp_path: Path) -> Iterator[tuple]:
    wdir = tmp_path / "weights"
    wdir.mkdir()
    _placeholders(wdir)
    s = base_settings(
        uuid.uuid4().hex[:10],
        profile="real",
        weights_dir=str(wdir),
        offline=True,
        weights_retry_seconds=0.5,
        background_model=BACKGROUND,
    )
    worker = WorkerProcess(s, tmp_path / "worker.log", f"bg-{uuid.uuid4().hex[:6]}")

    def waiting() -> dict | None:
        assert worker.proc.poll() is None, worker.log()[-3000:]
        entries = [e for e in JobStore(connect(s), s).workers() if e.get("state") == "missing_weights"]
        return entries[0] if entries else None

    try:
        yield s, worker, wait_for(waiting, 90, interval=0.2, what="missing_weights")
    finally:
        worker.stop(signal.SIGKILL)
        purge(redis_conn, s)


def test_worker_waits_in_missing_weights_naming_the_background_file(waiting_worker: tuple) -> None:
    s, worker, entry = waiting_worker
    wdir = Path(s.weights_dir)
    assert entry["missing_weights"] == _expected(wdir), entry
    with TestClient(create_app(s)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503, r.text
        (reason,) = [x for x in r.json()["reasons"] if "missing weight files" in x]
        assert f"dynface weights pull --only {BACKGROUND}" in reason
    assert worker.proc.poll() is None  # it waits for the file, it does not exit
    assert sorted(os.listdir(wdir)) == sorted(
        e.path for e in weights.select(PROFILES["real"].required_weights)
    )


def test_a_file_that_does_not_load_is_fetched_again_with_force(tmp_path: Path) -> None:
    """A file that is there but does not load (no pinned checksum: a plain pull would keep it) is
    named with a `--force` pull, directly or wrapped as `load_detector` wraps it; a missing one keeps
    the plain command."""
    _placeholders(tmp_path)
    detector = tmp_path / weights.select([PROFILES["real"].detector])[0].path
    detector.unlink()
    settings = base_settings("unused", profile="real", weights_dir=str(tmp_path))
    prior = tmp_path / weights.select(["difface_prior"])[0].path
    unloadable = weights.UnloadableWeightsError(["difface_prior"], tmp_path, prior, "not a checkpoint")
    wrapped = PipelineError("the model does not load")
    wrapped.__cause__ = unloadable
    for error in (unloadable, wrapped):
        commands = {m["name"]: m["command"] for m in _missing_weights(settings, error)}
        assert commands["difface_prior"].endswith("dynface weights pull --force --only difface_prior")
        assert commands[PROFILES["real"].detector].endswith(f"pull --only {PROFILES['real'].detector}")
    assert [m["name"] for m in _missing_weights(settings)] == [PROFILES["real"].detector]
