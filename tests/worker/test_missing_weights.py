"""A worker whose weight files are missing stays up, says which files and how to fetch them, and
becomes ready by itself once they appear (real `python -m worker` processes, offline)."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from app.jobs import JobStore, connect
from app.main import create_app
from app.settings import Settings
from models import weights
from models.dsst import default_table
from tests.conftest import WEIGHTS, WorkerProcess, base_settings, purge, wait_for
from worker.main import _profile_and_dir, pipeline_from_settings

MOBILENET = "detection_mobilenet0.25_Final.pth"


@pytest.fixture(scope="module")
def waiting_workers(
    redis_conn: redis.Redis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[Settings, WorkerProcess, dict]]]:
    """A `real` worker with an empty weights dir and a `tiny` one lacking its detector, both offline,
    each in its own namespace, started together (process start-up dominates these tests); both
    are waiting in `missing_weights` when the tests start."""
    started: dict[str, tuple[Settings, WorkerProcess]] = {}
    for profile in ("real", "tiny"):
        tmp = tmp_path_factory.mktemp(profile)
        (tmp / "weights").mkdir()
        s = base_settings(
            uuid.uuid4().hex[:10],
            profile=profile,
            weights_dir=str(tmp / "weights"),
            offline=True,
            weights_retry_seconds=0.5,
        )
        started[profile] = (s, WorkerProcess(s, tmp / "worker.log", f"mw-{profile}-{uuid.uuid4().hex[:6]}"))

    def waiting(s: Settings, worker: WorkerProcess) -> dict | None:
        assert worker.proc.poll() is None, worker.log()[-3000:]
        entries = [e for e in JobStore(connect(s), s).workers() if e.get("state") == "missing_weights"]
        return entries[0] if entries else None

    try:
        entries = {
            p: wait_for(lambda s=s, w=w: waiting(s, w), 90, interval=0.2, what=f"{p} missing_weights")
            for p, (s, w) in started.items()
        }
        yield {p: (s, w, entries[p]) for p, (s, w) in started.items()}
    finally:
        for s, w in started.values():
            w.stop(signal.SIGKILL)
            purge(redis_conn, s)


def test_real_profile_without_weights_names_files_and_command(waiting_workers) -> None:
    s, worker, entry = waiting_workers["real"]
    empty = Path(s.weights_dir)
    names = [m["name"] for m in entry["missing_weights"]]
    assert names == ["difface_prior", "difface_swinir", "retinaface_resnet50"], entry
    prior = entry["missing_weights"][0]
    assert prior["path"] == str(empty / "iddpm_ffhq512_ema500000.pth")
    assert prior["command"] == f"DYNFACE_WEIGHTS_DIR={empty} dynface weights pull --only difface_prior"
    with TestClient(create_app(s)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["workers"][0]["state"] == "missing_weights"
        assert body["workers"][0]["missing_weights"] == entry["missing_weights"]
        (reason,) = [x for x in body["reasons"] if "missing weight files" in x]
        assert all(name in reason for name in names)
        assert str(empty / "swinir_restoration512_L1.pth") in reason
        assert (
            f"DYNFACE_WEIGHTS_DIR={empty} dynface weights pull --only difface_prior "
            "--only difface_swinir --only retinaface_resnet50" in reason
        )
        assert c.get("/v1/models").json()["models"][0]["missing_weights"] == entry["missing_weights"]
    assert not list(empty.iterdir())  # offline: nothing was downloaded, not even partially
    # it keeps waiting rather than exiting, and a stop signal ends the wait cleanly
    assert worker.proc.poll() is None
    assert worker.stop(timeout=10) == 0, worker.log()[-3000:]
    assert JobStore(connect(s), s).workers() == []


def test_tiny_profile_without_detector_becomes_ready_once_it_appears(waiting_workers) -> None:
    s, worker, entry = waiting_workers["tiny"]
    wdir = Path(s.weights_dir)
    assert [m["name"] for m in entry["missing_weights"]] == ["retinaface_mobile0.25"], entry
    with TestClient(create_app(s)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503
        assert any(
            "retinaface_mobile0.25" in x and "dynface weights pull --only retinaface_mobile0.25" in x
            for x in r.json()["reasons"]
        ), r.json()
        # what `dynface weights pull` would leave there; the worker picks it up without a restart
        os.symlink(WEIGHTS / MOBILENET, wdir / MOBILENET)
        try:
            # It builds the tiny pipeline now: as long as a worker's start (start_workers allows 120 s).
            wait_for(lambda: c.get("/readyz").status_code == 200, 120, interval=0.2, what="ready after pull")
        except AssertionError as e:
            raise AssertionError(f"{e}; worker log:\n{worker.log()[-3000:]}") from None
        w = c.get("/readyz").json()["workers"][0]
        assert w["state"] == "ready" and w["missing_weights"] == [] and w["weights_command"] is None
        assert w["info"]["profile"] == "tiny"


def test_a_setting_it_cannot_use_leaves_the_worker_misconfigured_until_fixed(
    redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """A DSST table that does not parse (as any setting whose file is missing, damaged or mismatched)
    made the worker crash at start with a traceback, restarted into the same crash: /readyz said
    only that no worker was ready. It stays up in state `misconfigured` with the error, which
    /readyz names (only the count to a caller without a key), and once the file is fixed it
    becomes ready without a restart."""
    table = tmp_path / "dsst.json"
    table.write_text("{not json", encoding="utf-8")
    s = base_settings(
        uuid.uuid4().hex[:10],
        profile="tiny",
        weights_dir=str(WEIGHTS),
        offline=True,
        dsst_table=str(table),
        weights_retry_seconds=0.5,
        api_keys=["k"],
    )
    worker = WorkerProcess(s, tmp_path / "worker.log", f"mc-{uuid.uuid4().hex[:6]}")
    try:

        def misconfigured() -> dict | None:
            assert worker.proc.poll() is None, worker.log()[-3000:]
            entries = [e for e in JobStore(connect(s), s).workers() if e.get("state") == "misconfigured"]
            return entries[0] if entries else None

        entry = wait_for(misconfigured, 90, interval=0.2, what="misconfigured")
        assert str(table) in entry["config_error"], entry
        with TestClient(create_app(s)) as c:
            body = c.get("/readyz", headers={"X-API-Key": "k"}).json()
            (reason,) = [x for x in body["reasons"] if "cannot load its model" in x]
            assert str(table) in reason and entry["name"] in reason, body
            assert body["workers"][0]["config_error"] == entry["config_error"]
            anonymous = c.get("/readyz").json()["reasons"]
            assert "1 worker(s) are misconfigured (details with an API key)" in anonymous
            assert not any(str(table) in x for x in anonymous), anonymous
            assert 'dynface_workers{state="misconfigured"} 1.0' in c.get("/metrics").text
            table.write_text(default_table().to_json(), encoding="utf-8")
            try:
                wait_for(
                    lambda: c.get("/readyz").status_code == 200, 120, interval=0.2, what="ready when fixed"
                )
            except AssertionError as e:
                raise AssertionError(f"{e}; worker log:\n{worker.log()[-3000:]}") from None
            w = c.get("/readyz", headers={"X-API-Key": "k"}).json()["workers"][0]
            assert w["state"] == "ready" and w["config_error"] is None, w
        assert "Traceback" not in worker.log() and str(table) in worker.log()  # a message, not a crash
    finally:
        worker.stop(signal.SIGKILL)
        purge(redis_conn, s)


@pytest.mark.parametrize(
    ("profile", "weights_dir", "expected"),
    [
        ("tiny", "~/w", "w"),
        ("tiny", "", ".cache/dynface/weights"),
        ("real", "~/w", "w"),
        ("~/p", "~/w", "p"),  # a profile that is a path is the weights dir
    ],
)
def test_the_worker_loads_from_the_dir_it_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, profile: str, weights_dir: str, expected: str
) -> None:
    """One rule (`weights.profile_and_dir`): the pipeline took `~/w` for a dir named `~` and an empty
    DYNFACE_WEIGHTS_DIR for the current dir, where the worker's /readyz report (and `dynface weights`)
    expanded `~` and took empty as unset: it named one dir and loaded from another."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("DYNFACE_WEIGHTS_DIR", raising=False)
    s = base_settings("unused", profile=profile, weights_dir=weights_dir, offline=True)
    reported = _profile_and_dir(s)[1]
    try:
        loaded = pipeline_from_settings(s, "cpu").weights_dir
    except weights.MissingWeightsError as e:  # a real profile: nothing there
        loaded = e.directory
    assert loaded == reported == tmp_path / expected


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_weight_file_leaves_the_worker_misconfigured_until_fixed(
    redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """A weight file the worker may not read (copied in as root with mode 0600) crashed it with a
    traceback, restarted into the same crash. It waits in `misconfigured`, the error saying how to make
    the file readable (no pull would fix it), and becomes ready once it is, without a restart."""
    wdir = tmp_path / "weights"
    wdir.mkdir()
    detector = wdir / MOBILENET
    detector.write_bytes((WEIGHTS / MOBILENET).read_bytes())
    detector.chmod(0)
    s = base_settings(
        uuid.uuid4().hex[:10], profile="tiny", weights_dir=str(wdir), offline=True, weights_retry_seconds=0.5
    )
    worker = WorkerProcess(s, tmp_path / "worker.log", f"ur-{uuid.uuid4().hex[:6]}")
    try:

        def in_state(state: str) -> dict | None:
            assert worker.proc.poll() is None, worker.log()[-3000:]
            entries = [e for e in JobStore(connect(s), s).workers() if e.get("state") == state]
            return entries[0] if entries else None

        entry = wait_for(lambda: in_state("misconfigured"), 90, interval=0.2, what="misconfigured")
        assert f"chmod a+r {detector}" in entry["config_error"], entry
        assert entry["missing_weights"] == [] and entry["weights_command"] is None
        detector.chmod(0o644)
        try:
            wait_for(lambda: in_state("ready"), 120, interval=0.2, what="ready once readable")
        except AssertionError as e:
            raise AssertionError(f"{e}; worker log:\n{worker.log()[-3000:]}") from None
        assert "Traceback" not in worker.log() and f"chmod a+r {detector}" in worker.log()
    finally:
        worker.stop(signal.SIGKILL)
        purge(redis_conn, s)
