"""The job store's batched Redis operations (app/jobs.py), on the real Redis: each is one round trip
now, and each must still do everything the separate calls did, atomically where it matters."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import pytest
import redis
from fastapi.testclient import TestClient
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import utcparse

from app.completions import Completions
from app.jobs import JobStore, Refusal, connect, make_queue
from app.main import create_app
from app.settings import Settings
from tests.conftest import aligned_png, wait_for
from worker.main import DynfaceWorker


def _record(job_id: str, **extra: object) -> dict[str, object]:
    return {"id": job_id, "status": "queued", "owner": "anonymous", "created_at": time.time(), **extra}


def test_create_with_queue_stores_and_enqueues_together(settings: Settings) -> None:
    store = JobStore(connect(settings), settings)
    queue = make_queue(store.redis, settings)
    store.create("j1", b"input bytes", _record("j1"), queue)
    assert store.get("j1")["status"] == "queued"
    assert store.redis.get(store.key("input", "j1")) == b"input bytes"
    assert queue.job_ids == ["j1"]
    job = Job.fetch("j1", connection=store.redis, serializer=JSONSerializer)
    assert job.get_status() == "queued" and job.args == ["j1"] and job.func_name == "worker.tasks.restore"
    assert job.timeout == settings.job_timeout_seconds


@contextlib.contextmanager
def reply_lost(upstream: str, command: bytes = b"EXEC", nth: int = 1) -> Iterator[str]:
    """A TCP proxy to the Redis at ``upstream`` (a URL) that passes everything, except that once a
    client sends the ``nth`` ``command`` (counted over all connections), that connection's replies
    are dropped and it is closed: Redis applies the command, and its client sees the connection lost
    before the reply. Yields the proxy's URL."""
    target = urlsplit(upstream)
    server = socket.create_server(("127.0.0.1", 0))
    seen = [0]  # the command's count over all connections
    lock = threading.Lock()

    def pump(src: socket.socket, dst: socket.socket, watch: bool, dropping: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if watch and command in data:
                    with lock:
                        before, seen[0] = seen[0], seen[0] + data.count(command)
                    if before < nth <= seen[0]:
                        dropping.set()
                if not watch and dropping.is_set():
                    break  # the command's replies: never delivered
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = server.accept()
                redis_side = socket.create_connection((target.hostname, target.port or 6379))
                dropping = threading.Event()
                for src, dst, watch in ((client, redis_side, True), (redis_side, client, False)):
                    threading.Thread(target=pump, args=(src, dst, watch, dropping), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"redis://127.0.0.1:{server.getsockname()[1]}{target.path}"
    finally:
        server.close()


def test_a_create_whose_reply_is_lost_is_never_sent_again(make_settings) -> None:
    """The job-creating transaction (record, input, RQ enqueue) is applied, and its reply lost. A client
    that re-sent it (redis-py's Retry, which the service's client does not use) would apply it twice:
    the job's id twice in the queue and its record rewritten to `queued`, even under a worker that
    had started it. The submission fails instead with the outcome unknown (the API then keeps its
    Idempotency-Key bound: a retry finds the job), and the job is in the queue once."""
    probe = make_settings()
    with reply_lost(probe.redis_url) as url:
        s = make_settings(redis_url=url, key_prefix=probe.key_prefix, queue_name=probe.queue_name)
        store = JobStore(connect(s), s)
        queue = make_queue(store.redis, s)
        with pytest.raises(redis.exceptions.ConnectionError):
            store.create("j1", b"input bytes", _record("j1"), queue)
    direct = JobStore(connect(probe), probe)
    assert direct.get("j1")["status"] == "queued"
    assert [i.decode() for i in direct.redis.lrange(queue.key, 0, -1)] == ["j1"]


def test_start_moves_a_queued_job_and_refuses_an_ended_one(settings: Settings) -> None:
    store = JobStore(connect(settings), settings)
    store.create("run", b"x", _record("run"))
    assert store.start("run", {"status": "processing", "attempts": 1})
    assert store.get("run")["status"] == "processing" and store.get("run")["attempts"] == 1
    store.create("gone", b"x", _record("gone"))
    assert store.finish("gone", {"status": "canceled"}, allowed=["queued"]) is not None
    assert not store.start("gone", {"status": "processing"})
    assert store.get("gone")["status"] == "canceled"


def test_progress_writes_the_record_and_rq_meta_while_processing(settings: Settings) -> None:
    store = JobStore(connect(settings), settings)
    store.create("p", b"x", _record("p"), make_queue(store.redis, settings))
    store.start("p", {"status": "processing"})
    rq_job = Job.fetch("p", connection=store.redis, serializer=JSONSerializer)
    store.progress("p", {"stage": "sample", "step": 2, "total": 5}, rq_job)
    record = store.get("p")
    assert (record["stage"], record["step"], record["total"]) == ("sample", 2, 5)
    meta = Job.fetch("p", connection=store.redis, serializer=JSONSerializer).meta
    assert meta == {"stage": "sample", "step": 2, "total": 5}
    store.finish("p", {"status": "succeeded", "stage": None})
    store.progress("p", {"stage": "encode"}, None)  # a late write never reopens an ended job
    assert store.get("p")["stage"] is None and store.get("p")["status"] == "succeeded"


def test_finish_writes_results_drops_input_and_returns_the_final_record(settings: Settings) -> None:
    store = JobStore(connect(settings), settings)
    store.create("f", b"x", _record("f", result_ttl=123))
    pubsub = store.redis.pubsub()
    pubsub.subscribe(store.key("done", "f"))
    pubsub.get_message(timeout=5)  # the subscribe confirmation
    final = store.finish(
        "f", {"status": "succeeded", "outputs": {"image": "image/png"}}, {"image": b"png"}, owner="anonymous"
    )
    assert (
        final is not None and final["status"] == "succeeded" and final["completed_at"] >= final["created_at"]
    )
    assert final == store.get("f")
    result_key = store.key("result", "f", "image")
    assert store.redis.get(result_key) == b"png"
    assert 100 < store.redis.ttl(result_key) <= 123  # the record's result_ttl, not the default
    assert store.redis.exists(store.key("input", "f")) == 0
    assert store.redis.ttl(store.key("job", "f")) > settings.record_ttl_seconds - 10
    # Counted against its owner's stored bytes until the results expire (by Redis' clock).
    stored = store.key("stored", "anonymous")
    ((member, expires),) = store.redis.zrange(stored, 0, -1, withscores=True)
    assert member == b"f:3" and abs(expires - (store.redis.time()[0] + 123)) <= 2
    assert 100 < store.redis.ttl(stored) <= 123
    total = store.key("stored-bytes", "anonymous")  # their running total, expiring with the set
    assert store.redis.get(total) == b"3" and abs(store.redis.ttl(total) - store.redis.ttl(stored)) <= 1
    message = pubsub.get_message(timeout=5)
    assert message is not None and message["data"] == b"succeeded"
    pubsub.close()
    # Already ended: nothing is written, not even results.
    assert store.finish("f", {"status": "failed"}, {"comparison": b"late"}, owner="anonymous") is None
    assert store.get("f")["status"] == "succeeded"
    assert store.redis.exists(store.key("result", "f", "comparison")) == 0
    assert store.redis.zcard(stored) == 1
    # An open API never admits, so the next end prunes what has expired: the set never only grows.
    store.redis.zadd(stored, {b"long-gone:7": store.redis.time()[0] - 1})
    store.redis.incrby(total, 7)
    store.create("f2", b"x", _record("f2"))
    store.finish("f2", {"status": "succeeded"}, {"image": b"png"}, owner="anonymous")
    assert {m for m, _ in store.redis.zrange(stored, 0, -1, withscores=True)} == {b"f:3", b"f2:3"}
    assert store.redis.get(total) == b"6"
    with pytest.raises(ValueError, match="owner"):  # results are always counted against someone
        store.finish("f", {"status": "failed"}, {"image": b"x"})


def test_get_with_result(settings: Settings) -> None:
    store = JobStore(connect(settings), settings)
    store.create("g", b"x", _record("g"))
    store.finish("g", {"status": "succeeded"}, {"image": b"bytes"}, owner="anonymous")
    record, blob = store.get_with_result("g", "image")
    assert record is not None and record["status"] == "succeeded" and blob == b"bytes"
    assert store.get_with_result("g", "face:0") == (record, None)
    assert store.get_with_result("unknown", "image") == (None, None)


def test_worker_heartbeat_writes_rq_worker_keys(settings: Settings) -> None:
    """DynfaceWorker sends RQ's heartbeat as one pipeline; the writes must be RQ's own."""
    redis = connect(settings)
    store = JobStore(redis, settings)
    worker = DynfaceWorker(
        [make_queue(redis, settings)],
        name=f"{settings.queue_name}-beat",
        connection=redis,
        serializer=JSONSerializer,
        settings=settings,
        store=store,
    )
    sent = datetime.now(UTC)
    worker.heartbeat(timeout=77)
    # RQ's own timestamp format, parsed as RQ reads it back, and written by this beat (now).
    beat = utcparse(redis.hget(worker.key, "last_heartbeat").decode())
    assert sent - timedelta(seconds=1) <= beat <= datetime.now(UTC) + timedelta(seconds=1), (sent, beat)
    assert 0 < redis.ttl(worker.key) <= 77


def test_prefer_wait_answers_without_the_completion_listener(settings: Settings) -> None:
    """With the listener down (Redis reconnecting: not subscribed, no message arrives), a waiting
    request still sees its job end by re-reading the record."""
    with TestClient(create_app(settings)) as client:
        svc = client.app.state.services
        svc.completions = Completions(settings)  # never started: what requests see while it reconnects
        submitted: list[str] = []

        def cancel_while_it_waits() -> None:
            job_id = wait_for(lambda: next(iter(svc.queue.job_ids), None), 20, what="job queued")
            submitted.append(job_id)
            # The request has registered its wake-up event: it is in its wait loop, not before it.
            wait_for(lambda: job_id in svc.completions._waiting, 20, what="request waiting")
            svc.store.finish(job_id, {"status": "canceled"}, allowed=["queued"])

        canceller = threading.Thread(target=cancel_while_it_waits)
        canceller.start()
        r = client.post(
            "/v1/restorations",
            files={"image": ("face.png", aligned_png(), "image/png")},
            data={"aligned": "true"},
            headers={"Prefer": "wait=20"},
        )
        canceller.join()
        assert r.status_code == 200, r.text
        assert r.json()["id"] == submitted[0] and r.json()["status"] == "canceled"


def test_idempotency_release_leaves_a_key_taken_over_by_another_request(settings: Settings) -> None:
    """A submission releases its claim only while the key is still bound to its own job: a retry that
    took the key over keeps it."""
    store = JobStore(connect(settings), settings)
    assert store.claim_idempotency("owner:k", "job-a", "hash") is None
    assert store.rebind_idempotency("owner:k", "job-a", "job-b", "hash") is None
    store.release_idempotency("owner:k", "job-a")  # A failed late: must not drop B's binding
    assert store.claim_idempotency("owner:k", "job-c", "hash")["job_id"] == "job-b"
    store.release_idempotency("owner:k", "job-b")
    assert store.claim_idempotency("owner:k", "job-c", "hash") is None


def test_idempotency_release_leaves_a_key_whose_job_exists(settings: Settings) -> None:
    """redis-py sends a transaction again after a lost reply: the first send may have stored the job
    though the second one is refused. The key then stays bound, and a retry replays that job."""
    store = JobStore(connect(settings), settings)
    assert store.claim_idempotency("owner:k", "job-a", "hash") is None
    store.create("job-a", b"x", _record("job-a"))
    store.release_idempotency("owner:k", "job-a")
    assert store.claim_idempotency("owner:k", "job-b", "hash")["job_id"] == "job-a"


def test_a_claim_is_one_step_so_a_release_cannot_come_between(settings: Settings, monkeypatch) -> None:
    """A claim was SET NX, then GET of the binding that stood: when its holder released the key in
    between (its submission failed), the claim returned "no earlier binding" though it had bound
    nothing, and its request went on to store a job while no key held it: a concurrent retry with
    the same key could make a second one. Here the holder's release lands after the claim's first
    command, where it did."""
    store = JobStore(connect(settings), settings)
    assert store.claim_idempotency("owner:k", "job-a", "hash") is None
    real_get = store.redis.get

    def get_after_the_holder_released(name: str) -> bytes | None:
        store.release_idempotency("owner:k", "job-a")
        return real_get(name)

    monkeypatch.setattr(store.redis, "get", get_after_the_holder_released)
    earlier = store.claim_idempotency("owner:k", "job-b", "hash")
    monkeypatch.undo()
    # Either the claim saw A's binding, or it holds the key itself: never neither.
    bound = store.claim_idempotency("owner:k", "job-c", "hash")
    assert earlier is not None or (bound is not None and bound["job_id"] == "job-b"), (earlier, bound)


def _admit(store: JobStore, owner: str, job_id: str, grace: float = 60.0) -> int | None:
    """`JobStore.admit` under a limit of 3 active jobs alone: None, or the active jobs it refused at."""
    refusal = store.admit(owner, job_id, max_active=3, max_bytes=0, upload_bytes=0, storing_grace=grace)
    return None if refusal is None else refusal.amount


def test_admissions_under_a_key_limit_are_exact_and_skip_ended_and_unstored_jobs(settings: Settings) -> None:
    """`admit` is one atomic step after its read: concurrent submissions of one key never pass its
    limit together. A member whose job ended, or whose record never came within the grace, stops
    counting; one admitted a moment ago without its record yet (being stored) still counts."""
    store = JobStore(connect(settings), settings)
    admitted: list[str] = []
    barrier = threading.Barrier(8)

    def submit(n: int) -> None:
        barrier.wait()
        if _admit(store, "owner", f"job-{n}", grace=60.0) is None:
            admitted.append(f"job-{n}")

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 3  # none has a record yet: each counts as being stored
    for job_id in admitted:
        store.create(job_id, b"x", _record(job_id))
    assert _admit(store, "owner", "late", grace=60.0) == 3
    assert _admit(store, "another-owner", "theirs", grace=60.0) is None
    assert store.update(admitted[0], {"status": "succeeded"})  # ended: its place is free
    assert _admit(store, "owner", "next", grace=60.0) is None
    # "next" was never stored: within the grace it counts, past it (grace 0 here) it does not.
    assert _admit(store, "owner", "again", grace=60.0) == 3
    assert _admit(store, "owner", "again", grace=0.0) is None
    assert store.redis.ttl(store.key("active", "owner")) > 0
    store.unadmit("owner", "again")
    members = {m.decode() for m in store.redis.zrange(store.key("active", "owner"), 0, -1)}
    assert members == set(admitted[1:])


def test_an_admission_whose_reply_is_lost_is_given_back(make_settings) -> None:
    """A submission's admission under its key's limit of active jobs applied, its reply lost: the
    place was kept (the submission only gave back admissions it knew of), and with a limit of 1 the
    client's retry got 429 too_many_active_jobs for a minute though no job existed."""
    probe = make_settings()
    # The submission's second EVALSHA is its admission (the first only checks, before the upload).
    with reply_lost(probe.redis_url, b"EVALSHA", nth=2) as url:
        s = make_settings(
            redis_url=url,
            key_prefix=probe.key_prefix,
            queue_name=probe.queue_name,
            api_keys="k",
            max_active_jobs_per_key=1,
        )
        with TestClient(create_app(s), raise_server_exceptions=False) as c:
            lost = c.post(
                "/v1/restorations",
                files={"image": ("x.png", aligned_png(), "image/png")},
                data={"aligned": "true"},
                headers={"X-API-Key": "k"},
            )
            assert lost.status_code == 503 and lost.json()["error"]["code"] == "redis_unavailable", lost.text
            retry = c.post(
                "/v1/restorations",
                files={"image": ("x.png", aligned_png(), "image/png")},
                data={"aligned": "true"},
                headers={"X-API-Key": "k"},
            )
            assert retry.status_code == 202, retry.text


def test_admissions_count_a_keys_queued_inputs_and_stored_results_against_its_bytes(
    settings: Settings,
) -> None:
    """A key's jobs hold bytes in Redis: inputs while they are active, results until they expire.
    An admission whose upload would take them past the limit is refused, saying how many they hold
    and when the first stored result expires; expired results and ended jobs' inputs stop counting."""
    store = JobStore(connect(settings), settings)

    def admit(job_id: str, upload: int) -> Refusal | None:
        return store.admit(
            "owner", job_id, max_active=0, max_bytes=1000, upload_bytes=upload, storing_grace=60.0
        )

    assert admit("a", 400) is None
    store.create("a", b"x" * 400, _record("a", owner="owner", result_ttl=50))
    assert admit("b", 601) == Refusal("stored_bytes", 400, 0)  # 400 + 601 > 1000; nothing stored yet
    assert admit("b", 600) is None
    store.create("b", b"x" * 600, _record("b", owner="owner"))
    # "a" ends: its input (400) is dropped, its result (300) kept for 50 s.
    store.finish("a", {"status": "succeeded"}, {"image": b"r" * 300}, owner="owner")
    refusal = admit("c", 101)  # 600 + 300 + 101
    assert refusal is not None and refusal[:2] == ("stored_bytes", 900) and 45 <= refusal.expires_in <= 50
    assert admit("c", 100) is None  # only checking would do the same: `None` admits
    assert (
        store.admit("other", "d", max_active=0, max_bytes=1000, upload_bytes=1000, storing_grace=60) is None
    )
    # A lost running total, or one below zero, is counted again from the set, and expires with it
    # (in ms: a set with under 1 s left has a TTL of 0).
    total = store.key("stored-bytes", "owner")
    assert store.redis.get(total) == b"300"
    stored = store.key("stored", "owner")
    for lose in (lambda: store.redis.delete(total), lambda: store.redis.set(total, -5)):
        lose()
        store.redis.pexpire(stored, 60_000)
        assert admit("c", 101)[:2] == ("stored_bytes", 900)
        assert store.redis.get(total) == b"300" and 0 < store.redis.pttl(total) <= 60_000
    # Expired by Redis' clock (its score moved into the past): no longer counted, and removed.
    store.redis.zadd(stored, {b"a:300": store.redis.time()[0] - 1})
    store.update("b", {"status": "canceled"})
    store.unadmit("owner", "c")  # admitted above, never stored
    assert admit("e", 1000) is None
    assert store.redis.zcard(stored) == 0 and store.redis.exists(total) == 0
