"""Reliability at scale with real processes: repeated kill -9 mid-sampling, then a bounded load test.

Both scenarios run against a private redis-server, a real uvicorn API and two CPU workers on the
`tiny` profile (real pipeline code, small random weights), exactly as tests/reliability/test_rel_slow.py
does, but at a scale chosen on the command line; the figures go to docs/reliability.md (section
between the `bench:reliability` markers) straight from this run's own counters.

1. kill loop: `--kills` rounds; in each, two jobs are submitted and the worker sampling the first one
   is SIGKILLed (a replacement starts, as a supervisor would). Counts jobs lost, duplicate webhooks,
   missing results.
2. load: `--jobs` jobs from `--clients` concurrent HTTP clients (closed loop: submit, poll, fetch the
   image). Counts 5xx and lost jobs; records API/worker RSS (start/peak/end) and Redis used_memory
   (baseline/peak/after every per-job key expired, with short TTLs so that happens within the run).

3. bad inputs (`--inputs`, or alone with `--inputs-only`): every generated malformed request of
   tests/reliability/test_rel_inputs.py against an in-process API on the local Redis; counts the
   inputs tried, the answers by status and code, 5xx and answers with the wrong code (own section).

Usage: OMP_NUM_THREADS=1 .venv/bin/python -m bench.reliability [--kills 20] [--jobs 2000] [--clients 50]
       [--no-write]
       OMP_NUM_THREADS=1 .venv/bin/python -m bench.reliability --inputs-only [--no-write]
The issue's target scale is the default (2000 jobs, 50 clients); docs/reliability.md says what was run.
`--no-write` prints the sections instead of writing them into docs/reliability.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench._report import ROOT, header, percentile, write_section
from tests.reliability.rel_support import Fleet, KillLoopResult, LoadResult, MiB, kill_loop, load_run

DOC = ROOT / "docs" / "reliability.md"
TARGET_JOBS, TARGET_CLIENTS = 2000, 50


def log(msg: str) -> None:
    print(msg, flush=True)


def mib(v: int) -> str:
    return f"{v / MiB:.1f}"


def kill_section(res: KillLoopResult) -> str:
    statuses = sorted({str(res.final.get(j, {}).get("status", "not terminal")) for j in res.jobs})
    attempts_killed = sorted({res.final[j]["attempts"] for j in res.killed if j in res.final})
    attempts_others = sorted({res.final[j]["attempts"] for j in res.others if j in res.final})
    dup = sum(1 for j in res.jobs if res.webhooks[j] > 1)
    missing_hook = sum(1 for j in res.jobs if res.webhooks[j] == 0)
    no_image = sum(1 for j in res.jobs if res.images.get(j) != 200)
    return f"""### 1. kill -9 mid-sampling

| figure | value |
|---|---|
| kills survived (SIGKILL of the worker sampling a job, 2 workers) | {res.kills} |
| jobs submitted | {len(res.jobs)} ({len(res.killed)} killed once mid-sampling, {len(res.others)} beside) |
| jobs lost (not `succeeded` at the end) | {len(res.lost)} |
| final statuses seen | {", ".join(statuses)} |
| attempts of killed jobs / of the others | {attempts_killed} / {attempts_others} |
| jobs with 0 webhooks / with more than 1 | {missing_hook} / {dup} |
| jobs whose result image was not 200 | {no_image} |
| worker processes started (2 + replacements) | {res.workers_started} |
| duration | {res.seconds:.0f} s |
"""


def load_section(res: LoadResult, settings: dict[str, int]) -> str:
    statuses = {s: list(res.final.values()).count(s) for s in sorted(set(res.final.values()))}
    http = ", ".join(f"{code}: {n}" for code, n in sorted(res.http.items()))
    dup = sum(1 for j in res.final if res.webhooks[j] > 1)
    missing_hook = sum(1 for j in res.final if res.webhooks[j] == 0)
    lat = res.latencies
    lost_why = "".join(f"<br>`{j}`: {why}" for j, why in list(res.lost_why.items())[:5])
    # No job reached a terminal state: no latency to give, not a latency of 0.
    latency = (
        f"{percentile(lat, 50):.1f} / {percentile(lat, 95):.1f} / {max(lat):.1f} s"
        if lat
        else "— (no job finished)"
    )
    rate = len(res.final) / max(res.seconds, 1e-9)
    ttl = f"record_ttl {settings['record_ttl_seconds']} s, result_ttl {settings['result_ttl_seconds']} s"
    rss_rows = "\n".join(
        f"| {'API (uvicorn)' if name == 'api' else f'worker {name}'} | {mib(res.rss_cold.get(name, 0))} | "
        f"{mib(res.rss_start.get(name, 0))} | {mib(res.rss_peak.get(name, 0))} | "
        f"{mib(res.rss_end.get(name, 0))} |"
        for name in res.rss_start
    )
    return f"""### 2. Bounded load

| figure | value |
|---|---|
| jobs submitted / clients | {res.jobs} / {res.clients} |
| jobs accepted (202) / rejected | {len(res.final) + len(res.lost)} / {len(res.rejected)} |
| jobs lost (accepted, never terminal) | {len(res.lost)}{lost_why} |
| final statuses | {statuses} |
| HTTP responses by status (submit, polls, image) | {http} |
| 5xx responses / transport errors | {res.five_xx} / {len(res.transport_errors)} |
| succeeded w/o image / webhooks missing / duplicated | {len(res.missing_images)} / {missing_hook} / {dup} |
| submit → terminal, p50 / p95 / max | {latency} |
| duration of the load (after warm-up) / throughput | {res.seconds:.0f} s / {rate:.2f} jobs/s |
| TTLs used | {ttl} |

RSS in MiB (cold = right after start-up; start = after one warm-up job per worker; peak sampled every
0.5 s during the load):

| process | cold | start | peak | end |
|---|---|---|---|---|
{rss_rows}

Redis (private redis-server, INFO `used_memory`):

| figure | value |
|---|---|
| baseline (service up, before any job) | {mib(res.redis_baseline)} MiB, {res.keys_baseline} keys |
| peak during the load | {mib(res.redis_peak)} MiB |
| after every per-job key expired | {mib(res.redis_after_ttl)} MiB, {res.keys_after_ttl} keys |
| per-job keys left | {len(res.job_keys_after_ttl)} |
| wait for the TTLs after the last job | {res.ttl_wait_seconds:.0f} s |
"""


def inputs_section() -> tuple[str, bool]:
    """Run every generated bad input of test_rel_inputs against in-process apps; (section, failed)."""
    import redis
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.conftest import REDIS_URL, base_settings, purge

    sys.path.insert(0, str(ROOT / "tests" / "reliability"))  # test_rel_inputs imports rel_support so
    from test_rel_inputs import bad_cases, error_code

    head = header("Reliability: generated bad inputs")
    t0 = time.monotonic()
    cases = bad_cases()
    ns = uuid.uuid4().hex[:10]
    apps = {"default": base_settings(ns), "tiny_pixels": base_settings(ns + "p", max_pixels=64 * 64)}
    answers: Counter[str] = Counter()
    wrong: list[str] = []
    five_xx = 0
    with TestClient(create_app(apps["default"])) as a, TestClient(create_app(apps["tiny_pixels"])) as b:
        clients = {"default": a, "tiny_pixels": b}
        for case in cases:
            r = clients[case.app].post("/v1/restorations", **case.request)
            code = error_code(r) if r.headers.get("content-type") == "application/json" else "?"
            answers[f"{r.status_code} {code}"] += 1
            five_xx += r.status_code >= 500
            if (r.status_code, code) != (case.status, case.code):
                wrong.append(case.name)
    r = redis.Redis.from_url(REDIS_URL)
    for settings in apps.values():
        purge(r, settings)
    shown = ": " + ", ".join(wrong[:10]) if wrong else ""
    rows = "\n".join(f"| {answer} | {n} |" for answer, n in sorted(answers.items()))
    body = f"""{head}
- inputs: the {len(cases)} malformed requests generated (fixed seed) by `bad_cases()` in
  tests/reliability/test_rel_inputs.py, posted to an in-process API (local Redis, no worker).
- inputs tried: **{len(cases)}**; 5xx seen: **{five_xx}**; answered with another status/code than
  expected: **{len(wrong)}**{shown}; took {time.monotonic() - t0:.1f} s.

| answer (status code) | requests |
|---|---|
{rows}
"""
    return body, bool(five_xx or wrong)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20, help="kill -9 rounds (0 skips the kill loop)")
    p.add_argument("--jobs", type=int, default=TARGET_JOBS, help="jobs in the load test (0 skips it)")
    p.add_argument("--clients", type=int, default=TARGET_CLIENTS, help="concurrent HTTP clients")
    p.add_argument(
        "--record-ttl",
        type=int,
        default=None,
        help="record/input TTL in the load test; renewed when a worker starts a job, it must outlast the "
        "queue wait. Default max(60 + 6 s per client, 150): a closed loop keeps ≤ clients jobs in the "
        "system and 2 tiny CPU workers on a busy 2-core machine finish ~0.2 jobs/s",
    )
    p.add_argument("--result-ttl", type=int, default=30, help="result TTL in the load test (s)")
    p.add_argument("--inputs", action="store_true", help="also run the generated bad inputs")
    p.add_argument("--inputs-only", action="store_true", help="run only the generated bad inputs")
    p.add_argument("--no-write", action="store_true", help="print, do not write docs/reliability.md")
    args = p.parse_args(argv)
    inputs_failed = False
    if args.inputs or args.inputs_only:
        body, inputs_failed = inputs_section()
        log(body)
        if not args.no_write:
            write_section("reliability_inputs", body, DOC)
        if args.inputs_only:
            return 1 if inputs_failed else 0
    record_ttl = args.record_ttl or max(60 + 6 * args.clients, 150)
    # Tiny CPU jobs take seconds: a short job timeout lets a short record TTL pass the settings check
    # (record TTL > (max_retries + 1) x job timeout).
    ttls = {
        "record_ttl_seconds": record_ttl,
        "result_ttl_seconds": args.result_ttl,
        "job_timeout_seconds": 40,
    }
    head = header("Reliability: kill -9 loop and bounded load")  # machine and CPU busy before the run
    t0 = time.monotonic()
    sections: list[str] = []
    failed = inputs_failed
    with tempfile.TemporaryDirectory(prefix="bench-rel-") as tmp:
        if args.kills:
            log(f"kill loop: {args.kills} kills")
            (Path(tmp) / "kill").mkdir()
            fleet = Fleet(Path(tmp) / "kill", workers=2)
            try:
                kres = kill_loop(fleet, args.kills, log=log)
            finally:
                fleet.close()
            failed |= bool(kres.lost) or any(kres.webhooks[j] != 1 for j in kres.jobs)
            sections.append(kill_section(kres))
            log(sections[-1])
        if args.jobs:
            log(f"load: {args.jobs} jobs from {args.clients} clients, {ttls}")
            (Path(tmp) / "load").mkdir()
            fleet = Fleet(Path(tmp) / "load", workers=2, **ttls)
            try:
                lres = load_run(fleet, args.jobs, args.clients, log=log, ttl_timeout=record_ttl + 300)
            finally:
                fleet.close()
            failed |= bool(lres.lost or lres.rejected or lres.five_xx or lres.job_keys_after_ttl)
            sections.append(load_section(lres, ttls))
            log(sections[-1])
    at_target = args.jobs >= TARGET_JOBS and args.clients >= TARGET_CLIENTS
    scale = (
        f"- scale: {args.kills} kills; {args.jobs} jobs from {args.clients} clients — "
        + (
            "the issue's target scale."
            if at_target
            else f"**below the issue's target of {TARGET_JOBS} jobs / {TARGET_CLIENTS} clients, which was "
            "not run here**."
        )
        + "\n- services: private redis-server (no persistence), uvicorn API, 2 × `python -m worker --device "
        "cpu` on the tiny profile, webhook receiver on loopback; everything on this one machine.\n"
        f"- total wall time: {time.monotonic() - t0:.0f} s.\n"
    )
    body = head + scale + "\n" + "\n".join(sections)
    if args.no_write:
        log(body)
    else:
        write_section("reliability", body, doc=DOC)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
