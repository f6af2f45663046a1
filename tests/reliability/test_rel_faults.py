"""Faults with real processes and a real Redis: nothing submitted is ever lost.

Every job must end `succeeded`, `failed` with a reason, or `canceled`, with exactly one terminal
record and exactly one webhook delivery, whatever happens to the workers (kill -9 mid-sampling,
SIGTERM), to Redis (killed and restarted) or to the job (job_timeout). Timings are shortened via
settings (heartbeat_ttl 3 s, reaper every 1 s), never by patching the code under test.

The long version (20+ kills, load) is `test_rel_slow.py` and `bench/reliability.py`.
"""

from __future__ import annotations

import contextlib
import io
import signal
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image
from rel_support import RedisServer, WebhookSink
from rq.registry import FinishedJobRegistry

from app.jobs import JobStore, connect
from app.main import create_app
from app.settings import Settings
from tests.conftest import (
    TESTDATA,
    WorkerProcess,
    aligned_png,
    base_settings,
    purge,
    start_workers,
    wait_for,
    wait_mid_sampling,
    wait_terminal,
)


class Pool:
    """Two live workers on one test namespace, replaced as tests kill or stop them. A test that needs
    both calls ``wait_ready`` first, so no test depends on what an earlier one left behind."""

    def __init__(self, settings: Settings, tmp: Path) -> None:
        self.settings = settings
        self.tmp = tmp
        self.store = JobStore(connect(settings), settings)
        self.workers: list[WorkerProcess] = start_workers(settings, tmp, n=2)
        self.sink = WebhookSink()

    def replace(self, gone: WorkerProcess) -> None:
        """Swap a dead worker for a fresh one, which loads its model in the background (the survivor
        keeps serving meanwhile); a test that needs it waits with ``wait_ready``."""
        gone.stop()
        self.workers.remove(gone)
        name = f"w-{uuid.uuid4().hex[:6]}"
        self.workers.append(WorkerProcess(self.settings, self.tmp / f"{name}.log", name))

    def alive(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.proc.poll() is None]

    def states(self) -> dict[str, str]:
        """Registry state of each live worker process of the pool."""
        registry = {e["name"]: e["state"] for e in self.store.workers()}
        return {w.name: registry.get(w.name, "?") for w in self.alive()}

    def wait_ready(self, n: int = 2, timeout: float = 180) -> None:
        """Until ``n`` workers are idle with their model loaded (dead ones are replaced first)."""
        for w in [w for w in self.workers if w.proc.poll() is not None]:
            self.replace(w)
        wait_for(
            lambda: list(self.states().values()).count("ready") >= n,
            timeout,
            interval=0.2,
            what=f"{n} pool workers ready",
        )


@pytest.fixture(scope="module")
def pool(redis_conn: redis.Redis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    settings = base_settings(uuid.uuid4().hex[:10])
    p = Pool(settings, tmp_path_factory.mktemp("rel-faults"))
    yield p
    for w in p.workers:
        w.stop(signal.SIGKILL)
    p.sink.close()
    purge(redis_conn, settings)


def submit(c: TestClient, data: bytes | None = None, headers: dict[str, str] | None = None, **fields: Any):
    r = c.post(
        "/v1/restorations",
        files={"image": ("f.png", data or aligned_png(), "image/png")},
        data={"aligned": "true", **fields},
        headers=headers or {},
    )
    return r


def submit_ok(c: TestClient, webhook: str | None = None, **fields: Any) -> str:
    if webhook:
        fields["webhook"] = webhook
    r = submit(c, **fields)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def running_on(c: TestClient, job_id: str, workers: list[WorkerProcess]) -> WorkerProcess:
    """Wait until the job is well inside the diffusion loop, then return the worker process running it."""
    rec = wait_mid_sampling(c.app.state.services.store, job_id)
    return next(w for w in workers if w.name == rec["worker"])


def assert_one_result(c: TestClient, pool: Pool, job_ids: list[str]) -> None:
    """Exactly one outcome per job: one webhook delivery each (the worker that finishes a job
    delivers it once; a killed attempt must not add a second), and a result image for successes.

    A delivery is sent on a job's terminal transition, which `JobStore.finish` makes at most once and
    only from a live worker running the job. So once every job has a delivery, no live pool worker is
    busy (none is still finishing one of them: a second transition's delivery would be on its way)
    and the receiver has answered every request it took (no delivery in flight, and each sender got
    its 2xx, so none retries), nothing more can arrive: the counts are final."""
    sink = pool.sink
    wait_for(lambda: all(sink.per_job()[j] >= 1 for j in job_ids), 20, what="webhooks delivered")
    wait_for(
        lambda: "busy" not in pool.states().values() and sink.idle(),
        30,
        interval=0.05,
        what="workers idle and no webhook in flight",
    )
    counts = sink.per_job()
    assert {j: counts[j] for j in job_ids} == dict.fromkeys(job_ids, 1)
    for j in job_ids:
        if c.get(f"/v1/restorations/{j}").json()["status"] == "succeeded":
            assert c.get(f"/v1/restorations/{j}/image").status_code == 200


def test_kill9_mid_sampling_loses_nothing(pool: Pool) -> None:
    """kill -9 the worker that is sampling (2 workers): the job is re-queued to the survivor and
    succeeds on its second attempt, exactly once, and the dead worker leaves /readyz once its entry
    expires. Repetition (20 kills in a row, a replacement after each) is test_rel_slow's."""
    pool.wait_ready(2)
    with TestClient(create_app(pool.settings)) as c:
        job_id = submit_ok(c, webhook=pool.sink.url)
        victim = running_on(c, job_id, pool.workers)
        victim.proc.kill()  # SIGKILL: nothing runs in the victim, as on a host loss
        victim.proc.wait(10)
        pool.replace(victim)
        job = wait_terminal(c, job_id)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2, job
        assert any("lost" in w for w in job["warnings"]), job["warnings"]
        survivor = c.app.state.services.store.get(job_id)["worker"]  # attempt 2 ran there
        assert survivor != victim.name and survivor in {w.name for w in pool.alive()}
        assert_one_result(c, pool, [job_id])
        wait_for(
            lambda: victim.name not in {w["worker"] for w in c.get("/readyz").json()["workers"]},
            10,
            interval=0.2,
            what="dead worker gone from /readyz",
        )


def test_kill9_with_no_worker_left_requeues_the_job_from_the_api(pool: Pool) -> None:
    """kill -9 the worker sampling a job while no other worker runs (the other was stopped): only
    workers used to reap, so the job stayed `processing` until its record expired (a 404, no webhook)
    and, with KEDA counting only the queue list, nothing brought a worker back. The API's sweep now
    re-queues it: `queued` with a "lost" warning and back in RQ's queue list. Workers started later
    finish it on attempt 2, with one webhook and one result."""
    pool.wait_ready(2)
    other = pool.workers[0]
    other.proc.send_signal(signal.SIGTERM)  # idle: it exits at once
    assert other.proc.wait(60) == 0, other.log()[-2000:]
    with TestClient(create_app(pool.settings)) as c:
        store = c.app.state.services.store
        queue = c.app.state.services.queue
        job_id = submit_ok(c, webhook=pool.sink.url)
        victim = running_on(c, job_id, pool.workers)
        victim.proc.kill()
        victim.proc.wait(10)
        record = wait_for(
            lambda: (r := store.get(job_id))["status"] != "processing" and r, 30, what="the job re-queued"
        )
        assert record["status"] == "queued" and record["attempts"] == 1, record
        assert any("attempt 1 was lost" in w for w in record["warnings"]), record["warnings"]
        assert queue.job_ids == [job_id]
        pool.wait_ready(2)  # replaces both
        job = wait_terminal(c, job_id)
        assert job["status"] == "succeeded" and job["attempts"] == 2, job
        assert_one_result(c, pool, [job_id])


def test_sigterm_finishes_current_job_and_leaves_the_queue_to_others(pool: Pool) -> None:
    pool.wait_ready(2)
    with TestClient(create_app(pool.settings)) as c:
        first = submit_ok(c, webhook=pool.sink.url)
        worker = running_on(c, first, pool.workers)
        second = submit_ok(c, webhook=pool.sink.url)  # queued while the worker drains
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(60) == 0, worker.log()[-2000:]
        job = c.get(f"/v1/restorations/{first}").json()
        assert job["status"] == "succeeded" and job["attempts"] == 1, job
        assert c.app.state.services.store.get(first)["worker"] == worker.name
        # a clean exit unregisters at once (no waiting for the entry to expire)
        assert worker.name not in {w["worker"] for w in c.get("/readyz").json()["workers"]}
        other = wait_terminal(c, second)
        assert other["status"] == "succeeded" and other["attempts"] == 1, other
        assert c.app.state.services.store.get(second)["worker"] != worker.name
        assert_one_result(c, pool, [first, second])
    pool.replace(worker)  # loads in the background; the next test that needs two waits for it


def test_job_timeout_fails_with_timeout_and_worker_stays_healthy(pool: Pool) -> None:
    """RQ's job_timeout interrupts a real job on a real worker: a job-level failure with a reason,
    no outputs, its input dropped, counted in the worker's metrics, never retried; the worker goes
    back to ready and runs the next job fine."""
    pool.wait_ready(2)
    # job_timeout is fixed per job by the API at submission (RQ job.timeout), so an API with a
    # 1 s limit times a job out without touching the workers. The job must outlast that second on
    # any machine: the Solvay photo's 29 faces each restored and sampled for DifFace's fixed 100
    # steps, then upscaled 4× with every output: 3 min on the shared test machine, where one aligned
    # face (the job this used to be) took 7 s and so could finish within a second on a fast one.
    strict = pool.settings.model_copy(update={"job_timeout_seconds": 1})
    crowd = (TESTDATA / "photos" / "Solvay_conference_1927.png").read_bytes()
    with TestClient(create_app(strict)) as c:
        job_id = submit_ok(
            c,
            webhook=pool.sink.url,
            data=crowd,
            aligned="false",
            mode="difface",
            upscale="4",
            outputs="image,faces,comparison",
            format="png",
        )
        job = wait_terminal(c, job_id, timeout=60)
        assert c.get(f"/v1/restorations/{job_id}/image").status_code == 409
    assert job["status"] == "failed" and job["error"]["code"] == "timeout", job
    assert "1 s" in job["error"]["message"] and job["outputs"] is None, job
    assert job["attempts"] == 1, job  # job-level failures are never retried
    assert pool.store.input(job_id) is None  # inputs live only until the job is done
    worker_name = pool.store.get(job_id)["worker"]
    worker = next(w for w in pool.workers if w.name == worker_name)
    assert worker.proc.poll() is None, worker.log()[-2000:]
    # The worker announces ready once RQ's bookkeeping after the job is done, a moment after the
    # job's end is recorded.
    wait_for(lambda: pool.states().get(worker_name) == "ready", 10, what="worker ready again")
    port = next(e["metrics_port"] for e in pool.store.workers() if e["name"] == worker_name)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert 'dynface_jobs_total{outcome="failed",reason="timeout"}' in text
    with TestClient(create_app(pool.settings)) as c:
        # Both workers take the next two jobs: the one that timed out must run one fine.
        after = [submit_ok(c, webhook=pool.sink.url) for _ in range(2)]
        done = [wait_terminal(c, j) for j in after]
        assert [j["status"] for j in done] == ["succeeded", "succeeded"], done
        assert_one_result(c, pool, [job_id, *after])
    assert worker.proc.poll() is None


def _namespace_ids(r: redis.Redis, settings: Settings) -> dict[str, set[str]]:
    """The job ids that have anything stored in the namespace: our records and results, RQ's job
    hashes of its queue, and RQ's finished registry of its queue."""
    prefix, queue = settings.key_prefix, settings.queue_name
    records = {k.decode().rsplit(":", 1)[1] for k in r.scan_iter(match=f"{prefix}:job:*", count=1000)}
    results = {
        k.decode().removeprefix(f"{prefix}:result:").split(":", 1)[0]
        for k in r.scan_iter(match=f"{prefix}:result:*", count=1000)
    }
    # rq:job:<id> (not rq:job:<id>:dependents and the like), kept when its origin is our queue.
    rq_ids = [
        parts[2]
        for k in r.scan_iter(match="rq:job:*", count=1000)
        if len(parts := k.decode().split(":")) == 3
    ]
    with r.pipeline(transaction=False) as pipe:
        for job_id in rq_ids:
            pipe.hget(f"rq:job:{job_id}", "origin")
        origins = pipe.execute()
    rq_jobs = {j for j, origin in zip(rq_ids, origins, strict=True) if origin == queue.encode()}
    finished_key = FinishedJobRegistry(queue, connection=r).key
    finished = {m.decode() for m in r.zrange(finished_key, 0, -1)}
    return {"records": records, "results": results, "rq_jobs": rq_jobs, "finished": finished}


def test_concurrent_duplicate_idempotency_key_runs_one_job(pool: Pool, redis_conn: redis.Redis) -> None:
    pool.wait_ready(1)
    h = {"Idempotency-Key": f"dup-{uuid.uuid4().hex}"}
    # The module's tests share one namespace: what earlier tests stored is set aside by id.
    before = _namespace_ids(redis_conn, pool.settings)
    with TestClient(create_app(pool.settings)) as c:
        barrier = threading.Barrier(8)

        def post(_: int):
            barrier.wait()  # all eight requests race for the key at once
            return submit(c, headers=h, webhook=pool.sink.url)

        with ThreadPoolExecutor(8) as ex:
            responses = list(ex.map(post, range(8)))
        assert [r.status_code for r in responses] == [202] * 8, [r.text for r in responses]
        ids = {r.json()["id"] for r in responses}
        assert len(ids) == 1
        (job_id,) = ids
        assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 7
        assert wait_terminal(c, job_id)["status"] == "succeeded"
        assert_one_result(c, pool, [job_id])
    # No second RQ job, record or result was ever written for this key: every kind of key gained
    # exactly this job's id (a job that ran gets a record, an RQ job hash, results and a finished
    # registry entry; a second one would add its own id to each).
    after = _namespace_ids(redis_conn, pool.settings)
    gained = {kind: after[kind] - before[kind] for kind in after}
    assert gained == {kind: {job_id} for kind in after}, gained
    assert len(after["finished"]) == len(before["finished"]) + 1
    idem = list(redis_conn.scan_iter(match=f"{pool.settings.key_prefix}:idem:*", count=1000))
    assert len(idem) == 1


def _exif_oriented(photo: Image.Image, orientation: int) -> bytes:
    """A JPEG whose pixels are stored so that applying EXIF ``orientation`` restores ``photo``."""
    inverse = {
        1: lambda im: im,
        2: lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        3: lambda im: im.transpose(Image.Transpose.ROTATE_180),
        4: lambda im: im.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
        5: lambda im: im.transpose(Image.Transpose.TRANSPOSE),
        6: lambda im: im.transpose(Image.Transpose.ROTATE_90),
        7: lambda im: im.transpose(Image.Transpose.TRANSVERSE),
        8: lambda im: im.transpose(Image.Transpose.ROTATE_270),
    }[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    inverse(photo).save(buf, "JPEG", quality=92, exif=exif)
    return buf.getvalue()


def _encoded(im: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_odd_valid_inputs_through_a_real_worker(pool: Pool) -> None:
    """A sample of the unusual-but-valid uploads, end to end: the worker never crashes, every job
    ends with a result or a reason, EXIF orientations 1–8 still find the face, alpha is kept and
    grayscale stays grayscale."""
    face = Image.open(io.BytesIO(aligned_png())).convert("RGB")
    small = face.resize((256, 256))
    frames = [small, small.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    cases: dict[str, tuple[bytes, dict[str, str]]] = {
        f"exif{o}": (_exif_oriented(face, o), {"aligned": "false"}) for o in range(1, 9)
    }
    la = small.convert("LA")
    cases |= {
        "LA": (_encoded(la, "PNG"), {}),
        "L": (_encoded(small.convert("L"), "PNG"), {}),
        "CMYK": (_encoded(small.convert("CMYK"), "JPEG"), {}),
        "I;16": (_encoded(small.convert("L").convert("I;16"), "PNG"), {}),
        "P": (_encoded(small.convert("P"), "PNG"), {}),
        "gif-anim": (_encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50), {}),
        "webp-anim": (_encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50), {}),
    }
    pool.wait_ready(1)
    with TestClient(create_app(pool.settings)) as c:
        ids: dict[str, str] = {}
        for name, (data, fields) in cases.items():
            r = submit(c, data=data, webhook=pool.sink.url, **{"aligned": "true", **fields})
            assert r.status_code == 202, (name, r.text)
            ids[name] = r.json()["id"]
        jobs = {name: wait_terminal(c, j, timeout=180) for name, j in ids.items()}
        for name, job in jobs.items():
            assert job["status"] == "succeeded", (name, job)
        for o in range(1, 9):
            assert len(jobs[f"exif{o}"]["faces"]) == 1, (o, jobs[f"exif{o}"]["faces"])
        for name in ("gif-anim", "webp-anim"):
            assert any("first one was used" in w for w in jobs[name]["warnings"]), jobs[name]["warnings"]
        la_out = Image.open(io.BytesIO(c.get(f"/v1/restorations/{ids['LA']}/image").content))
        assert la_out.mode == "LA"
        l_out = Image.open(io.BytesIO(c.get(f"/v1/restorations/{ids['L']}/image").content))
        assert l_out.mode == "L"
        assert_one_result(c, pool, list(ids.values()))
    assert all(w.proc.poll() is None for w in pool.workers), "a worker crashed"


@contextlib.contextmanager
def _service_on_own_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, WorkerProcess, TestClient]]:
    """A Redis server of the test's own (so it can be killed), one worker and the API on it."""
    server = RedisServer(tmp_path)
    server.start()
    settings = base_settings(uuid.uuid4().hex[:10], redis_url=server.url, redis_timeout_seconds=0.5)
    (worker,) = start_workers(settings, tmp_path, n=1)
    try:
        with TestClient(create_app(settings), raise_server_exceptions=False) as c:
            yield server, worker, c
    finally:
        worker.stop(signal.SIGKILL)
        server.stop()


def _assert_succeeds(c: TestClient, job_id: str, worker: WorkerProcess) -> None:
    """The job ends `succeeded`; on failure or timeout, the worker's log is in the message."""
    try:
        job = wait_terminal(c, job_id, timeout=120)
    except AssertionError as e:
        raise AssertionError(f"{e}; worker log:\n{worker.log()[-3000:]}") from e
    assert job["status"] == "succeeded", (job, worker.log()[-3000:])


def _assert_retry_after_seconds(r: httpx.Response) -> None:
    """Retry-After as RFC 9110 delta-seconds (digits only), at least 1: `redis_unavailable` has no
    setting for it, and 0 would invite a client to hammer the failing service at once."""
    value = r.headers.get("retry-after", "")
    assert value.isascii() and value.isdigit() and int(value) >= 1, (value, r.headers)


@pytest.mark.timeout(240)  # a request hanging on the dead Redis ends the test instead of the run
def test_redis_killed_and_restarted(tmp_path: Path) -> None:
    """Redis dies (kill -9) and comes back on the same port with its AOF: meanwhile the API answers
    503 redis_unavailable (with Retry-After) and without a stack trace; afterwards the API and the
    idle worker (whose blocking dequeue broke) recover by themselves and the next job completes."""
    with _service_on_own_redis(tmp_path) as (server, worker, c):
        server.stop()  # outage first, so the job queued below waits in Redis across the restart
        for path in ("/v1/restorations/x", "/v1/models"):
            r = c.get(path)
            assert r.status_code == 503 and r.json()["error"]["code"] == "redis_unavailable", r.text
            assert "Traceback" not in r.text, r.text
            _assert_retry_after_seconds(r)
        r = submit(c)
        assert r.status_code == 503 and r.json()["error"]["code"] == "redis_unavailable", r.text
        assert "Traceback" not in r.text
        _assert_retry_after_seconds(r)
        assert c.get("/healthz").status_code == 200  # liveness does not depend on Redis
        assert c.get("/readyz").status_code == 503
        # The outage must reach the idle worker before Redis returns: its blocking dequeue breaks.
        wait_for(
            lambda: "could not connect to Redis instance" in worker.log(),
            30,
            interval=0.1,
            what="the idle worker's dequeue to lose Redis",
        )
        server.start()
        # The API's client reconnects on its own (no restart of the app).
        job_id = wait_for(lambda: (r := submit(c)).status_code == 202 and r.json()["id"], 15, interval=0.2)
        _assert_succeeds(c, job_id, worker)
        assert worker.proc.poll() is None


def _lose_redis_mid_job(c: TestClient, server: RedisServer, worker: WorkerProcess) -> str:
    """Submit a job, kill Redis while it samples, and wait until the worker has left RQ's loop (the
    job runs on, its failed progress writes only logged, then neither its end nor RQ's bookkeeping
    after it can be written). Returns the job id."""
    job_id = submit(c).json()["id"]
    wait_for(
        lambda: (
            (j := c.get(f"/v1/restorations/{job_id}").json())["status"] == "processing"
            and j["stage"] == "sample"
        ),
        60,
        interval=0.02,
        what="job sampling",
    )
    server.stop()
    wait_for(
        lambda: "resuming once Redis answers" in worker.log() or worker.proc.poll() is not None,
        60,
        interval=0.1,
        what="the worker to lose Redis after the job",
    )
    return job_id


def test_redis_killed_while_a_job_runs(tmp_path: Path) -> None:
    """Redis dies mid-job: the job runs on (its failed progress writes are only logged), but its end
    cannot be written, nor RQ's bookkeeping after it, which ends RQ's own work loop. The worker stays
    up and resumes once Redis is back; the job, whose end could not be recorded, is re-run once its
    heartbeat lapses and succeeds, and the next job runs."""
    with _service_on_own_redis(tmp_path) as (server, worker, c):
        job_id = _lose_redis_mid_job(c, server, worker)
        server.start()
        for jid in (job_id, submit(c).json()["id"]):
            _assert_succeeds(c, jid, worker)
        assert worker.proc.poll() is None
        # The resumed loop still ends on a plain SIGTERM (RQ records an idle worker's stop
        # nowhere; the resume must not take it for a lost connection).
        assert worker.stop(signal.SIGTERM) == 0, worker.log()[-3000:]


def test_worker_stopped_while_waiting_for_redis(tmp_path: Path) -> None:
    """SIGTERM while the worker waits for Redis to come back: it exits cleanly (RQ's stop handler,
    still installed, asks the unreachable Redis for the worker's state), and the job it lost stays
    recorded for a later worker: once Redis is back, a fresh worker's reaper finds the lapsed
    execution, re-queues the job (a retry is left) and runs it to success on a second attempt."""
    with _service_on_own_redis(tmp_path) as (server, worker, c):
        job_id = _lose_redis_mid_job(c, server, worker)
        assert worker.stop(signal.SIGTERM) == 0, worker.log()[-3000:]
        server.start()
        assert c.get(f"/v1/restorations/{job_id}").json()["status"] == "processing"
        settings = c.app.state.services.settings
        later = WorkerProcess(settings, tmp_path / "later.log", f"later-{uuid.uuid4().hex[:6]}")
        try:
            try:
                job = wait_terminal(c, job_id, timeout=180)
            except AssertionError as e:
                raise AssertionError(f"{e}; later worker log:\n{later.log()[-3000:]}") from e
            assert job["status"] == "succeeded", (job, later.log()[-3000:])
            assert job["attempts"] == 2, job
            assert any("lost" in w for w in job["warnings"]), job["warnings"]
            assert c.app.state.services.store.get(job_id)["worker"] == later.name
            assert c.get(f"/v1/restorations/{job_id}/image").status_code == 200
        finally:
            later.stop(signal.SIGKILL)
