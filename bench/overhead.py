"""Service overhead: a job through API → Redis → worker → result vs the same pipeline called directly.

Real processes on loopback: uvicorn (`app.main:app_from_env`, one process) and one worker
(`worker.main.run_worker`, an RQ SimpleWorker) on the Redis at $REDIS_URL (default
redis://127.0.0.1:6379/0), in a key prefix and queue of their own that are purged afterwards.

Pipeline, on both sides: the tiny profile at minimal cost — restorer replaced by the identity, mode
`difface` (no blur-level estimation) with its start set to 1 step, i.e. one UNet call at 64 px — so a
job's time is mostly the service's and the image codecs', not the model's. Both
the worker and the direct call build it with `bench_pipeline` below (the worker process is launched
as `python -m bench.overhead --worker`, which patches `RestorationPipeline.from_pretrained` to it and
then runs the ordinary `run_worker`).

One job = POST /v1/restorations (multipart, aligned 512 face, `Prefer: wait=60`) until the 200 with
the finished job, then GET of the result image: what a client needs to hold the result. Direct =
`pipe.restore_photo(same bytes, same options)` in this process, returning the same encoded image.

Reported per concurrency level (clients each running jobs back to back):
- e2e: client-observed latency of one job;
- overhead = e2e − direct p50 (the service's total cost per job, including waiting behind other
  clients' jobs, since there is one worker);
- queue wait: created → picked up by the worker (the record's `timings.queue_wait_seconds`);
- service overhead = e2e − queue wait − worker inference time (the record's `inference_seconds`,
  which also counts the per-step progress writes): API, Redis and result-transfer cost of one job,
  which does not grow with the queue.

Usage: OMP_NUM_THREADS=1 .venv/bin/python -m bench.overhead [--levels 1,10,50] [--jobs 20,40,100]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import redis
import torch

from bench._report import ALIGNED, ROOT, SHARED, header, percentile, purge_namespace, write_section

TARGET_MS = 20.0
WEIGHTS = SHARED / "weights"
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
OPTIONS = {"aligned": "true", "seed": "0", "mode": "difface"}


def bench_pipeline(**kwargs: Any) -> Any:
    """Tiny profile, identity restorer, baseline start 1 step (see the module docstring)."""
    from models.pipeline import RestorationPipeline, _tiny_networks
    from models.profiles import PROFILES

    tiny = PROFILES["tiny"]
    profile = dataclasses.replace(tiny, method=dataclasses.replace(tiny.method, baseline_start_index=1))
    unet, _ = _tiny_networks(tiny)
    kwargs.pop("download", None)
    kwargs["weights_dir"] = kwargs.get("weights_dir") or WEIGHTS
    return RestorationPipeline(profile, unet, torch.nn.Identity(), **kwargs)


def worker_main() -> None:
    """The worker process: the ordinary run_worker with the bench pipeline."""
    from app.settings import Settings
    from models.pipeline import RestorationPipeline
    from worker.main import run_worker

    RestorationPipeline.from_pretrained = classmethod(lambda cls, *a, **kw: bench_pipeline(**kw))  # type: ignore[method-assign]
    run_worker(Settings(), "cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class Job:
    e2e: float
    queue_wait: float
    inference: float


async def run_level(base: str, data: bytes, clients: int, jobs: int) -> list[Job]:
    counter = iter(range(jobs))
    done: list[Job] = []
    limits = httpx.Limits(max_connections=clients + 5, max_keepalive_connections=clients + 5)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:

        async def client() -> None:
            for _ in counter:
                t0 = time.perf_counter()
                r = await http.post(
                    f"{base}/v1/restorations",
                    files={"image": ("face.png", data, "image/png")},
                    data=OPTIONS,
                    headers={"Prefer": "wait=60"},
                )
                body = r.json()
                if r.status_code != 200 or body["status"] != "succeeded":
                    raise RuntimeError(f"job did not succeed: {r.status_code} {r.text[:500]}")
                img = await http.get(body["outputs"]["image"])
                img.raise_for_status()
                e2e = time.perf_counter() - t0
                timings = body["timings"]
                done.append(
                    Job(e2e, float(timings["queue_wait_seconds"]), float(timings["inference_seconds"]))
                )

        await asyncio.gather(*(client() for _ in range(clients)))
    return done


def wait_ready(base: str, procs: list[subprocess.Popen], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"a service process exited early (rc {p.returncode}); see its log")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("service not ready in time")


def ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--levels", default="1,10,50", help="concurrent clients per level")
    parser.add_argument("--jobs", default="20,40,100", help="jobs per level (bounded run time)")
    parser.add_argument("--direct", type=int, default=20, help="direct pipeline calls")
    parser.add_argument("--no-write", action="store_true", help="print, do not write docs/benchmarks.md")
    args = parser.parse_args()
    if args.worker:
        worker_main()
        return
    levels = [int(v) for v in args.levels.split(",")]
    counts = [int(v) for v in args.jobs.split(",")]
    if len(levels) != len(counts):
        raise SystemExit("--levels and --jobs need the same number of entries")
    head = header("Service overhead: API → Redis → worker vs the pipeline called directly")
    started = time.perf_counter()

    face = sorted(ALIGNED.glob("*.png"))[0]
    data = face.read_bytes()
    prefix = f"bench-overhead-{uuid.uuid4().hex[:8]}"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNFACE_") and k != "REDIS_URL"}
    env.update(
        {
            "DYNFACE_REDIS_URL": REDIS_URL,
            "DYNFACE_KEY_PREFIX": prefix,
            "DYNFACE_QUEUE_NAME": prefix,
            "DYNFACE_PROFILE": "tiny",
            "DYNFACE_WEIGHTS_DIR": str(WEIGHTS),
            "DYNFACE_OFFLINE": "true",
            "DYNFACE_RATE_LIMIT_PER_MINUTE": "0",
            "DYNFACE_WORKER_METRICS_PORT": "0",
            "DYNFACE_MAX_QUEUE_DEPTH": str(max(levels) * 2 + 10),
            "PYTHONPATH": str(ROOT),
        }
    )
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / prefix
    logs.mkdir(parents=True, exist_ok=True)
    api_cmd = [sys.executable, "-m", "uvicorn", "--factory", "app.main:app_from_env"]
    api_cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"]
    worker_cmd = [sys.executable, "-m", "bench.overhead", "--worker"]
    procs: list[subprocess.Popen] = []
    r = redis.Redis.from_url(REDIS_URL)
    try:
        for name, cmd in (("api", api_cmd), ("worker", worker_cmd)):
            out = open(logs / f"{name}.log", "wb")  # noqa: SIM115 (child owns it until exit)
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
        wait_ready(base, procs)

        # Direct calls first, with the service idle (same construction, same bytes and options).
        from models.pipeline import RestoreOptions

        pipe = bench_pipeline(device="cpu")
        options = RestoreOptions(aligned=True, seed=0, mode="difface")
        pipe.restore_photo(data, options)  # warm-up
        direct: list[float] = []
        for _ in range(args.direct):
            t0 = time.perf_counter()
            pipe.restore_photo(data, options)
            direct.append(time.perf_counter() - t0)
        direct_p50 = percentile(direct, 50)
        print(f"direct: p50 {direct_p50 * 1000:.1f} ms p95 {ms(direct, 95)} ms")

        asyncio.run(run_level(base, data, 1, 3))  # warm-up: worker's first job, connections
        rows = []
        for clients, jobs in zip(levels, counts, strict=True):
            t0 = time.perf_counter()
            done = asyncio.run(run_level(base, data, clients, jobs))
            wall = time.perf_counter() - t0
            e2e = [j.e2e for j in done]
            over = [j.e2e - direct_p50 for j in done]
            wait = [j.queue_wait for j in done]
            service = [j.e2e - j.queue_wait - j.inference for j in done]
            rows.append((clients, jobs, wall, e2e, over, wait, service))
            print(
                f"c={clients}: e2e p50 {ms(e2e, 50)} ms, overhead p50 {ms(over, 50)} p95 {ms(over, 95)} ms, "
                f"queue wait p50 {ms(wait, 50)} ms, service overhead p50 {ms(service, 50)} "
                f"p95 {ms(service, 95)} ms ({jobs} jobs in {wall:.1f} s)"
            )
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        purge_namespace(r, prefix)

    one = rows[0]
    met_total = percentile(one[4], 50) * 1000 <= TARGET_MS
    met_service = all(percentile(row[6], 50) * 1000 <= TARGET_MS for row in rows)
    table = [
        "| clients | jobs | e2e p50 / p95 (ms) | overhead p50 / p95 (ms) | queue wait p50 (ms) "
        "| service overhead p50 / p95 (ms) | jobs/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for clients, jobs, wall, e2e, over, wait, service in rows:
        table.append(
            f"| {clients} | {jobs} | {ms(e2e, 50)} / {ms(e2e, 95)} | {ms(over, 50)} / {ms(over, 95)} "
            f"| {ms(wait, 50)} | {ms(service, 50)} / {ms(service, 95)} | {jobs / wall:.1f} |"
        )
    body = f"""{head}
- pipeline (both sides): tiny profile, identity restorer, mode `difface` with start 1 (1 UNet call at
  64 px), one aligned 512×512 PNG face (`{face.relative_to(SHARED.parent)}`, {len(data)} bytes), PNG out.
  Direct `restore_photo` on it: p50 {direct_p50 * 1000:.1f} ms, p95 {ms(direct, 95)} ms ({args.direct} calls).
- service: 1 uvicorn process, 1 RQ worker process (CPU), Redis `{REDIS_URL}`, all on loopback; clients are
  asyncio httpx in the bench process, each running its jobs back to back (POST with `Prefer: wait=60`,
  then GET of the result image). Run took {time.perf_counter() - started:.0f} s. API, worker, clients
  and the other users of this machine share its CPUs, so contention is part of these numbers.
- overhead = e2e − direct p50 (includes waiting behind other clients' jobs: there is one worker);
  service overhead = e2e − queue wait − worker inference (does not grow with the queue). Definitions:
  `bench/overhead.py` docstring.

{chr(10).join(table)}

Target (issue 8): p50 overhead ≤ {TARGET_MS:.0f} ms on loopback. At 1 client (no queueing): p50
overhead {ms(one[4], 50)} ms — **{"met" if met_total else "not met"}**. Service overhead p50 at every
level ≤ {TARGET_MS:.0f} ms: **{"met" if met_service else "not met"}**. With more than one client the
one worker serialises the jobs, so the overhead column there is mostly queueing behind other jobs
(capacity, not per-job cost).
"""
    print(body)
    if not args.no_write:
        write_section("overhead", body)


if __name__ == "__main__":
    main()
