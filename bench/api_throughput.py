"""API submission throughput and memory per in-flight upload (issue 8, item 5).

What is measured: how many `POST /v1/restorations` submissions per second the API accepts for a
~200 KB JPEG, and how much API process memory one upload costs while its body is still arriving
(before the API has it all, so before the decode check: not the upload's peak cost).

How: a real `uvicorn app.main:app_from_env --factory --workers N` subprocess (N = 1 and 2 by default)
on a free loopback port, with its own DYNFACE_KEY_PREFIX / DYNFACE_QUEUE_NAME namespace on the Redis at
$REDIS_URL (default redis://127.0.0.1:6379/0), DYNFACE_RATE_LIMIT_PER_MINUTE=0, a DYNFACE_MAX_QUEUE_DEPTH
above the number of submissions, and no worker running: every accepted job just waits in the queue, so
the figures are the API's own cost (multipart parsing, the header/size check and decode of the upload,
storing the input and record in Redis, the RQ enqueue). The namespace's keys (`PREFIX:*`, `rq:*PREFIX*`
and the `rq:job:ID` keys of its jobs) are deleted afterwards, also on failure.

The JPEG is made from the first test photo with Pillow: the JPEG quality (and, if needed, an upscale) is
searched for a file of about 200 KB; its exact size and dimensions are reported.

- throughput: asyncio httpx clients in this process (32 by default) post the same pre-built multipart
  body back to back until a fixed number of submissions is done (after an untimed warm-up). Reported:
  accepted submissions (202) per second over the timed phase (an answer other than 202, or a transport
  error, is not a submission the API took, so it is not in the rate), p50/p95 latency of one
  submission (request start to response read), the count of every status code (202 expected;
  anything else is listed, with transport errors, never dropped; the untimed warm-ups' are counted in
  the section's non-202 total too), and the peak API RSS during the timed phase (sampled every 0.1 s).
- memory: API RSS (psutil; summed over the uvicorn process and all its children, so the supervisor of
  `--workers 2` is in both readings) at idle vs while C uploads are in flight (C = 1, 16, 64 by
  default). Each level runs on a fresh server (same command, new namespace) after 8 sequential
  submissions, so memory freed by earlier load is not silently reused. Each slow client sends its body
  in 16 KiB chunks, 10 ms apart, up to the last 4 KiB, then holds until RSS has been sampled (1 s after
  the last client reached that point), then finishes. Reported: (RSS_loaded − RSS_idle) / C, each RSS the
  median of 7 samples 0.15 s apart.

Figure (docs/benchmarks/api_throughput_by_workers.png, linked from the section): accepted/s and memory
per in-flight upload against uvicorn workers.

Usage: OMP_NUM_THREADS=1 .venv/bin/python -m bench.api_throughput [--workers 1,2] [--submissions 2000]
       [--clients 32] [--inflight 1,16,64] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import redis
from PIL import Image

from app.settings import Settings
from bench._report import (
    REDIS_URL,
    ROOT,
    SHARED,
    Busy,
    cpu_busy,
    figure_link,
    figure_path,
    header,
    percentile,
    pyplot,
    save_figure,
    service_env,
    wait_until_ok,
    write_section,
)
from tests.conftest import purge

PHOTOS = SHARED / "testdata" / "photos"
TARGET_BYTES = 200_000
CHUNK = 16 * 1024
HOLD_TAIL = 4 * 1024
MEMORY_WARMUP = 8
LOGGED_FAILURES = 50  # non-202 answers and transport errors printed per phase; all are counted
PEAK_EVERY = 0.1  # seconds between RSS samples for the throughput phase's peak
FIGURE = "api_throughput_by_workers.png"


@dataclass
class Jpeg:
    data: bytes
    source: Path
    size: tuple[int, int]
    quality: int


def make_jpeg(target: int = TARGET_BYTES) -> Jpeg:
    """First test photo re-encoded at the JPEG quality (upscaled if needed) closest to target bytes."""
    source = sorted(PHOTOS.glob("*.jpg"))[0]
    image = Image.open(source).convert("RGB")

    def encode(img: Image.Image, quality: int) -> bytes:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        return buf.getvalue()

    for _ in range(4):
        if len(encode(image, 95)) >= target:
            break
        scale = (target / len(encode(image, 95))) ** 0.5 * 1.1
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    best = min(range(5, 96), key=lambda q: abs(len(encode(image, q)) - target))
    return Jpeg(encode(image, best), source, image.size, best)


def multipart(data: bytes) -> tuple[bytes, str]:
    """A multipart body with one `image` file field (default options); returns (body, content type)."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="photo.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children_proc(pid: int) -> list[int]:
    """Descendants of pid from /proc (used only when psutil is missing)."""
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parents[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found += kids
        frontier += kids
    return found


def tree_rss(pid: int) -> int:
    """RSS in bytes of pid plus all its descendants."""
    try:
        import psutil

        root = psutil.Process(pid)
        total = 0
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total
    except ImportError:
        total = 0
        for p in [pid, *_children_proc(pid)]:
            try:
                for line in Path(f"/proc/{p}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                pass
        return total


async def sample_rss(pid: int, n: int = 7, every: float = 0.15) -> int:
    values = []
    for _ in range(n):
        values.append(tree_rss(pid))
        await asyncio.sleep(every)
    return int(statistics.median(values))


T = TypeVar("T")


async def with_peak_rss(work: Awaitable[T], pid: int, every: float = PEAK_EVERY) -> tuple[T, int]:
    """`work`'s result and the largest RSS of pid's tree sampled while it ran."""
    peak = tree_rss(pid)

    async def sampler() -> None:
        nonlocal peak
        while True:
            await asyncio.sleep(every)
            peak = max(peak, tree_rss(pid))

    task = asyncio.create_task(sampler())
    try:
        result = await work
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return result, peak


@dataclass
class Throughput:
    submissions: int
    clients: int
    wall: float
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)

    @property
    def accepted_per_s(self) -> float:
        """Submissions the API took (202) per second of the phase: a refusal or error is no throughput."""
        return self.statuses["202"] / self.wall


async def throughput(base: str, body: bytes, ctype: str, clients: int, total: int) -> Throughput:
    counter = iter(range(total))
    result = Throughput(total, clients, 0.0)
    limits = httpx.Limits(max_connections=clients + 5, max_keepalive_connections=clients + 5)
    headers = {"Content-Type": ctype}
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:

        async def client() -> None:
            for _ in counter:
                t0 = time.perf_counter()
                logged = sum(v for k, v in result.statuses.items() if k != "202")
                try:
                    r = await http.post(f"{base}/v1/restorations", content=body, headers=headers)
                    status = str(r.status_code)
                    if r.status_code != 202 and logged < LOGGED_FAILURES:
                        print(f"  non-202: {r.status_code} {r.text[:300]}")
                except httpx.HTTPError as e:
                    status = f"error:{type(e).__name__}"
                    if logged < LOGGED_FAILURES:
                        print(f"  transport error: {e!r}")
                result.latencies.append(time.perf_counter() - t0)
                result.statuses[status] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        result.wall = time.perf_counter() - t0
    return result


@dataclass
class Memory:
    inflight: int
    idle: int
    loaded: int
    statuses: Counter[str]

    @property
    def per_upload(self) -> float:
        return (self.loaded - self.idle) / self.inflight


async def memory_level(base: str, pid: int, body: bytes, ctype: str, c: int) -> Memory:
    """RSS at idle, then with c uploads held just before their last HOLD_TAIL bytes."""
    idle = await sample_rss(pid)
    release = asyncio.Event()
    arrived = 0
    all_held = asyncio.Event()
    statuses: Counter[str] = Counter()
    cut = len(body) - HOLD_TAIL
    headers = {"Content-Type": ctype, "Content-Length": str(len(body))}

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal arrived
        for i in range(0, cut, CHUNK):
            yield body[i : min(i + CHUNK, cut)]
            await asyncio.sleep(0.01)
        arrived += 1
        if arrived == c:
            all_held.set()
        await release.wait()
        yield body[cut:]

    limits = httpx.Limits(max_connections=c + 5, max_keepalive_connections=c + 5)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:

        async def client() -> None:
            try:
                r = await http.post(f"{base}/v1/restorations", content=chunks(), headers=headers)
                statuses[str(r.status_code)] += 1
            except httpx.HTTPError as e:
                statuses[f"error:{type(e).__name__}"] += 1

        tasks = [asyncio.create_task(client()) for _ in range(c)]
        await asyncio.wait_for(all_held.wait(), 60)
        await asyncio.sleep(1.0)  # let the server consume what was sent
        loaded = await sample_rss(pid)
        release.set()
        await asyncio.gather(*tasks)
    await asyncio.sleep(0.5)
    return Memory(c, idle, loaded, statuses)


@dataclass
class Run:
    workers: int
    tp: Throughput
    memory: list[Memory]
    warmups: Counter[str] = field(default_factory=Counter)  # the untimed submissions' statuses
    purged: int = 0
    leftover: int = 0
    rss_before: int = 0
    rss_peak: int = 0  # during the timed throughput phase
    rss_after: int = 0


@contextlib.contextmanager
def serve(workers: int, queue_depth: int, r: redis.Redis, logs: Path, run: Run) -> Iterator[tuple[str, int]]:
    """A uvicorn subprocess in a fresh namespace; yields (base URL, pid); stops it and purges the keys."""
    prefix = f"bench-apitp-{uuid.uuid4().hex[:8]}"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = service_env(prefix, DYNFACE_MAX_QUEUE_DEPTH=str(queue_depth))
    cmd = [sys.executable, "-m", "uvicorn", "app.main:app_from_env", "--factory", "--workers", str(workers)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"]
    log = open(logs / f"{prefix}.log", "wb")  # noqa: SIM115 (child owns it until exit)
    # A session (process group) of its own: the last resort below kills the --workers children too.
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        # /healthz, not /readyz: with no worker running the API is deliberately 'not ready'.
        wait_until_ok(f"{base}/healthz", [proc], timeout=120)
        time.sleep(2.0 if workers > 1 else 0.5)  # every worker process up, not just the first
        yield base, proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        # model_construct: only the names are needed; validating would read this process's DYNFACE_*.
        purged = purge(r, Settings.model_construct(key_prefix=prefix, queue_name=prefix))
        leftover = sum(1 for _ in r.scan_iter(match=f"*{prefix}*", count=1000))
        run.purged += purged
        run.leftover += leftover
        print(f"  purged {purged} keys of {prefix}; {leftover} left")


def run_workers(
    workers: int, body: bytes, ctype: str, args: argparse.Namespace, r: redis.Redis, logs: Path
) -> Run:
    """Throughput on one server; then each memory level on a fresh server (no arenas from earlier load)."""
    run = Run(workers, Throughput(0, 0, 0.0), [])
    depth = args.submissions + args.warmup + 1000
    with serve(workers, depth, r, logs, run) as (base, pid):
        warmup = asyncio.run(throughput(base, body, ctype, min(args.clients, args.warmup), args.warmup))
        run.warmups.update(warmup.statuses)
        run.rss_before = asyncio.run(sample_rss(pid))
        tp, run.rss_peak = asyncio.run(
            with_peak_rss(throughput(base, body, ctype, args.clients, args.submissions), pid)
        )
        run.tp = tp
        time.sleep(1.0)
        run.rss_after = asyncio.run(sample_rss(pid))
        p50, p95 = (percentile(tp.latencies, q) * 1000 for q in (50, 95))
        print(
            f"workers={workers}: {tp.accepted_per_s:.1f} accepted (202) submissions/s, "
            f"p50 {p50:.1f} ms, p95 {p95:.1f} ms, statuses {dict(tp.statuses)}"
        )
    for c in args.inflight:
        with serve(workers, depth, r, logs, run) as (base, pid):
            # A few sequential submissions first: lazy imports and first-use caches are not per upload.
            run.warmups.update(asyncio.run(throughput(base, body, ctype, 1, MEMORY_WARMUP)).statuses)
            m = asyncio.run(memory_level(base, pid, body, ctype, c))
        run.memory.append(m)
        print(
            f"  in flight {c}: idle {m.idle / 2**20:.1f} MiB, loaded {m.loaded / 2**20:.1f} MiB, "
            f"{m.per_upload / 1024:.0f} KiB per upload, statuses {dict(m.statuses)}"
        )
    return run


def statuses(c: Counter[str]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(c.items()))


def report(
    head: str,
    args: argparse.Namespace,
    jpeg: Jpeg,
    body_bytes: int,
    runs: list[Run],
    duration: float,
    rev: str,
    busy: Busy,
) -> str:
    """The section, from the runs' figures (`body_bytes`: the multipart body's size)."""

    def ms(values: list[float], q: float) -> str:
        return f"{percentile(values, q) * 1000:.1f}"

    tp_table = [
        "| uvicorn workers | clients | submissions | accepted (202)/s | p50 / p95 latency (ms) | statuses "
        "| API RSS before / peak during / after (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    mem_table = [
        "| uvicorn workers | uploads in flight (C) | RSS idle (MiB) | RSS with C bodies arriving (MiB) "
        "| per upload while its body is arriving: (loaded − idle) / C (KiB) | statuses |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        tp = run.tp
        tp_table.append(
            f"| {run.workers} | {tp.clients} | {tp.submissions} | {tp.accepted_per_s:.1f} "
            f"| {ms(tp.latencies, 50)} / {ms(tp.latencies, 95)} | {statuses(tp.statuses)} "
            f"| {run.rss_before / 2**20:.1f} / {run.rss_peak / 2**20:.1f} / {run.rss_after / 2**20:.1f} |"
        )
        for m in run.memory:
            mem_table.append(
                f"| {run.workers} | {m.inflight} | {m.idle / 2**20:.1f} | {m.loaded / 2**20:.1f} "
                f"| {m.per_upload / 1024:.0f} | {statuses(m.statuses)} |"
            )
    warmup_non_202 = sum(v for run in runs for k, v in run.warmups.items() if k != "202")
    non_202 = warmup_non_202 + sum(v for run in runs for k, v in run.tp.statuses.items() if k != "202")
    non_202 += sum(v for run in runs for m in run.memory for k, v in m.statuses.items() if k != "202")
    cleanup = "; ".join(f"{run.workers} worker(s): {run.purged} deleted, {run.leftover} left" for run in runs)
    ncpu = os.cpu_count() or 1
    # Only the figure from before the run measures other work (the header's): during it, this
    # benchmark's own API, clients and Redis keep the CPUs busy by design.
    warning = (
        "\n\nWith the load warning above, the 1- vs 2-worker comparison especially is not reliable."
        if busy.high
        else ""
    )
    return f"""{head}
- upload: `{jpeg.source.relative_to(SHARED.parent)}` re-encoded by Pillow at quality {jpeg.quality},
  {jpeg.size[0]}×{jpeg.size[1]}: **{len(jpeg.data)} bytes** (multipart body {body_bytes} bytes,
  default options).
- service: `uvicorn app.main:app_from_env --factory --workers N` (uvicorn's auto choice: httptools
  parser and uvloop, both pinned in pyproject) on loopback,
  Redis `{REDIS_URL}`, own key prefix and queue, rate limit off, queue limit above the submission
  count, **no worker**: accepted jobs just queue, so this is the API's cost alone (multipart parse,
  image decode check, input + record to Redis, RQ enqueue). Keys purged afterwards
  ({cleanup}). Whole run took {duration:.0f} s. API code:
  `git describe --always --dirty` = `{rev}` (the working tree when the run started, before the first
  server).
- throughput: {args.clients} asyncio httpx clients in the bench process posting the same body back to
  back, {args.warmup} untimed warm-up submissions first; latency = one POST until its response is read
  (with {args.clients} clients it is mostly waiting behind the other clients' requests in the server).
  accepted (202)/s = the timed phase's 202 answers ÷ its wall time: any other answer or transport error
  is in the statuses column, not in the rate. Non-202 responses over the whole run (untimed warm-ups,
  throughput and memory phases): **{non_202}** ({warmup_non_202} of them in the warm-ups). API RSS
  (uvicorn process + children): median of 7 samples after the warm-up and 1 s after the timed phase;
  peak = the largest of the samples taken every {PEAK_EVERY} s during the timed phase.

{chr(10).join(tp_table)}

- memory per in-flight upload **while its body is arriving**: API RSS (uvicorn process + children,
  median of 7 samples) at idle vs while C uploads are held with all but their last {HOLD_TAIL // 1024}
  KiB sent (16 KiB chunks, 10 ms apart), i.e. before the API has the whole body and decodes it, so the
  decode check's memory is not in it (the throughput phase's peak RSS above includes it); each level on
  a fresh server after {MEMORY_WARMUP} sequential submissions, idle sampled right before the level.

{chr(10).join(mem_table)}

Notes: this machine has {ncpu} logical CPUs, shared by the API process(es), the clients (one Python
process on the same machine), Redis and any other users, so the accepted/s are lower bounds for the API
alone. With 2 uvicorn workers on {ncpu} cores, the second worker competes with the clients and Redis
for the same cores rather than getting one of its own. The RSS delta is a whole-process figure
(allocator reuse and arena growth included), so small deltas, especially at C = 1, are within noise.{warning}

{figure_link("Accepted submissions/s and memory per upload by uvicorn workers", FIGURE)}
"""


def plot(runs: list[Run], out: Path) -> None:
    """Accepted submissions/s and memory per in-flight upload (one line per C) against uvicorn workers."""
    plt = pyplot()
    fig, (rate, memory) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
    names = [str(run.workers) for run in runs]
    rate.bar(names, [run.tp.accepted_per_s for run in runs], color="#1f77b4")
    rate.set_xlabel("uvicorn workers")
    rate.set_ylabel("accepted (202) submissions/s")
    rate.set_title(f"throughput, ~{TARGET_BYTES // 1000} KB JPEG uploads, no worker", fontsize=9)
    for c in dict.fromkeys(m.inflight for run in runs for m in run.memory):
        per_upload = [
            next((m.per_upload / 1024 for m in run.memory if m.inflight == c), float("nan")) for run in runs
        ]
        memory.plot(names, per_upload, marker="o", label=f"C = {c} uploads in flight")
    memory.set_xlabel("uvicorn workers")
    memory.set_ylabel("KiB of API RSS per upload")
    memory.set_title("memory per upload while its body is arriving: (loaded − idle) / C", fontsize=9)
    memory.axhline(0, color="black", linewidth=0.5)
    memory.legend(fontsize=7)
    for ax in (rate, memory):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_figure(fig, out)


def ints(value: str) -> list[int]:
    return [int(v) for v in value.split(",")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=ints, default=[1, 2], help="uvicorn worker processes per run")
    parser.add_argument("--submissions", type=int, default=2000, help="timed submissions per run")
    parser.add_argument("--warmup", type=int, default=64, help="untimed submissions first")
    parser.add_argument("--clients", type=int, default=32, help="concurrent throughput clients")
    parser.add_argument("--inflight", type=ints, default=[1, 16, 64], help="uploads held in flight")
    parser.add_argument("--no-write", action="store_true", help="print, do not write docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.submissions > 5000:
        raise SystemExit("--submissions is bounded at 5000 (each stores ~200 KB in Redis)")
    if not args.no_write:
        pyplot()
    # The one load figure (header and warning): how busy the CPUs were just before this run.
    busy = cpu_busy()
    head = header("API submission throughput and memory per in-flight upload", busy=busy)
    # Before the first server starts: the code those servers run (the tree may change during the run).
    rev = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    started = time.perf_counter()
    jpeg = make_jpeg()
    body, ctype = multipart(jpeg.data)
    print(
        f"JPEG: {len(jpeg.data)} bytes, {jpeg.size[0]}×{jpeg.size[1]}, quality {jpeg.quality}, "
        f"from {jpeg.source.name}; multipart body {len(body)} bytes"
    )
    r = redis.Redis.from_url(REDIS_URL)
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-apitp-{uuid.uuid4().hex[:8]}"
    logs.mkdir(parents=True, exist_ok=True)
    runs = [run_workers(w, body, ctype, args, r, logs) for w in args.workers]
    duration = time.perf_counter() - started

    body_md = report(head, args, jpeg, len(body), runs, duration, rev, busy)
    print(body_md)
    if not args.no_write:
        plot(runs, figure_path(FIGURE))
        write_section("api_throughput", body_md)


if __name__ == "__main__":
    main()
