"""Intra-photo batching: B faces through one batched sampler loop vs B separate one-face calls.

Measured: for B in 1, 2, 4, 8 (`--sizes`), the first B real aligned faces of
../shared/testdata/aligned (sorted) are restored
- batched: one `restore_faces(B faces, seed=0)` call on a pipeline with `max_batch=B`, so the restorer
  R runs once on the B faces and the DDIM sampler runs one loop over all B;
- one at a time: B calls `restore_faces(face k, seed=k)` on a pipeline with `max_batch=1` (the same
  per-face seeds, so both ways compute the same faces up to float rounding; the max abs difference of
  the uint8 outputs is reported as a check).

Pipeline: the tiny profile (toy networks, random weights, CPU), mode `dynfacerestore` with the
training-free DBLM/DGSA fallbacks, `fidelity` fixed (so eta does not depend on the face) and a DSST
table with the default's blur levels but every start set to `--steps` (default 10): whatever level a
face gets, it makes the same number of UNet calls (NFE), so every configuration does the same work per
face. Both pipelines share the same network objects (as tests/models/test_pipeline.py `_fast_pipeline`).

Timed with `time.perf_counter` around each `restore_faces` call (whole call: restorer R at 512, blur
estimate, DGSA map, sampling, uint8 conversion), and the call's own `timings["sample"]` (the sampler
loop alone). After one untimed warm-up call per pipeline, each configuration is repeated `--repeats`
times, batched and one-at-a-time alternating within a repeat. Reported (p50 over repeats):
- faces/s = B / wall time of the B faces (one batched call, or the sum of the B one-face calls);
- sampler faces/s = B / sampling-stage time; guide-stage faces/s = B / the call's `timings["dblm"]`;
- per-face latency = time from when all B faces are ready until that face's result exists: the batched
  call's wall time for every face of the batch; one at a time, the walls of the one-face calls up to
  and including that face's (face k waits for the k − 1 before it); p50 over all faces;
- speed-up = batched faces/s ÷ one-at-a-time faces/s.

Across jobs (the worker's cross-job batching, DYNFACE_WORKER_BATCH_MAX_JOBS = B): `--jobs` one-face
jobs (the first real aligned faces, job k with seed k, the same fidelity, so all may share a batch)
are submitted through the API (in-process) while no worker runs, into a Redis namespace of their own
($DYNFACE_TEST_REDIS_URL, default redis://127.0.0.1:6379/0; purged afterwards); then one real worker
process (`python -m worker`, the same tiny pipeline and DSST table, max_face_batch = the largest B)
starts and takes them all. B = 1 is batching off. From the job records:
- faces/s = jobs / (last completion − first start), i.e. while all of them were waiting or running
  (the worker's start-up is not counted);
- sampler faces/s and guide-stage faces/s = jobs / the summed `sample` / `dblm` stage time of the
  batches (a job reports its batch's stage time, so Σ over jobs of stage time ÷ `batch_jobs`);
- per-face latency = a job's completion − the first start (how long a face waited for its result
  once the worker began), p50 over all jobs of all repeats;
- max abs diff = of each job's output image vs the same job's with batching off in the same repeat.
Configurations alternate within a repeat (one worker process per configuration and repeat).

The real profile (DifFace's 512 px UNet) is not measured: its weights are not on this machine.

Usage: OMP_NUM_THREADS=1 .venv/bin/python -m bench.batching [--sizes 1,2,4,8] [--steps 10] [--repeats 3]
       [--jobs 8] [--worker-sizes 1,2,4,8]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import signal
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import redis
from fastapi.testclient import TestClient
from PIL import Image

from app.jobs import JobStore, connect
from app.main import create_app
from bench._report import ALIGNED, SHARED, header, percentile, write_section
from models.dsst import DSSTable, default_table
from models.pipeline import RestorationPipeline
from models.profiles import PROFILES
from tests.conftest import REDIS_URL, WorkerProcess, base_settings, purge, wait_for

WEIGHTS = SHARED / "weights"


@dataclasses.dataclass
class Runs:
    """Times of one configuration over the repeats (seconds)."""

    wall: list[float] = dataclasses.field(default_factory=list)  # the B faces, per repeat
    sample: list[float] = dataclasses.field(default_factory=list)  # sampler stage, per repeat
    guide: list[float] = dataclasses.field(default_factory=list)  # R, σ̂, DGSA map ("dblm" stage)
    latency: list[float] = dataclasses.field(default_factory=list)  # per face


def load_faces(n: int) -> np.ndarray:
    files = sorted(ALIGNED.glob("*.png"))[:n]
    if len(files) < n:
        raise SystemExit(f"need {n} aligned faces in {ALIGNED}, found {len(files)}")
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def steps_table(steps: int) -> DSSTable:
    """The default table's blur levels, every one starting at `steps` (so NFE = steps per face)."""
    return dataclasses.replace(default_table(), start_indices=(steps,) * len(default_table().sigmas))


def make_pipeline(base: RestorationPipeline, steps: int, max_batch: int) -> RestorationPipeline:
    table = steps_table(steps)
    return RestorationPipeline(
        PROFILES["tiny"], base.unet, base.restorer, dsst=table, max_batch=max_batch, weights_dir=WEIGHTS
    )


def timed(
    pipe: RestorationPipeline, faces: np.ndarray, seed: int, fidelity: float, steps: int
) -> tuple[float, float, float, np.ndarray]:
    t0 = time.perf_counter()
    result = pipe.restore_faces(faces, seed=seed, fidelity=fidelity)
    wall = time.perf_counter() - t0
    nfe = [f.nfe for f in result.facts]
    if nfe != [steps] * len(faces):
        raise RuntimeError(f"expected NFE {steps} for every face, got {nfe}")
    return wall, result.timings["sample"], result.timings["dblm"], result.faces


def worker_run(
    faces: list[Path], max_jobs: int, table: Path, fidelity: float, steps: int, face_batch: int, wait: float
) -> tuple[Runs, list[np.ndarray], float]:
    """One worker taking `len(faces)` waiting one-face jobs with up to `max_jobs` per batch: its
    times, the output images (job order) and the mean jobs per batch."""
    settings = base_settings(
        f"bench-batching-{uuid.uuid4().hex[:8]}",
        dsst_table=str(table),
        max_face_batch=face_batch,
        max_queue_depth=len(faces) + 1,
        worker_batch_max_jobs=max_jobs,
        worker_batch_wait_seconds=wait,
        job_timeout_seconds=600,
    )
    store = JobStore(connect(settings), settings)
    worker = None
    try:
        with TestClient(create_app(settings)) as client:
            ids = []
            for k, face in enumerate(faces):
                r = client.post(
                    "/v1/restorations",
                    files={"image": (face.name, face.read_bytes(), "image/png")},
                    data={"aligned": "true", "seed": str(k), "fidelity": str(fidelity), "format": "png"},
                )
                r.raise_for_status()
                ids.append(r.json()["id"])
        log = Path(tempfile.gettempdir()) / f"{settings.key_prefix}.log"
        worker = WorkerProcess(settings, log, settings.key_prefix)

        def ended() -> list[dict[str, Any]] | None:
            done = [r for r in (store.get(i) for i in ids) if r is not None and r.get("completed_at")]
            return done if len(done) == len(ids) else None

        records = wait_for(ended, 1800, interval=0.2, what=f"{len(ids)} jobs with max_jobs={max_jobs}")
        bad = [(r["id"], r["status"], r.get("error")) for r in records if r["status"] != "succeeded"]
        if bad:
            raise RuntimeError(f"jobs did not succeed: {bad}; worker log {log}")
        nfe = {f["start_step"] for r in records for f in r["faces"]}
        if nfe != {steps}:
            raise RuntimeError(f"expected NFE {steps} for every face, got {nfe}")
        images = [np.asarray(Image.open(io.BytesIO(store.result(i, "image") or b""))) for i in ids]
    finally:
        if worker is not None:
            worker.stop(signal.SIGTERM)
        purge(redis.Redis.from_url(REDIS_URL), settings)
    first = min(r["started_at"] for r in records)
    runs = Runs(
        wall=[max(r["completed_at"] for r in records) - first],
        sample=[sum(r["timings"]["stages"]["sample"] / r["timings"]["batch_jobs"] for r in records)],
        guide=[sum(r["timings"]["stages"]["dblm"] / r["timings"]["batch_jobs"] for r in records)],
        latency=[r["completed_at"] - first for r in records],
    )
    per_batch = len(records) / sum(1 / r["timings"]["batch_jobs"] for r in records)
    return runs, images, per_batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1,2,4,8", help="batch sizes B")
    p.add_argument("--steps", type=int, default=10, help="DSST start for every level (= NFE per face)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fidelity", type=float, default=0.5, help="fixed eta for every face")
    p.add_argument("--jobs", type=int, default=8, help="one-face jobs waiting for the worker")
    p.add_argument("--worker-sizes", default="1,2,4,8", help="DYNFACE_WORKER_BATCH_MAX_JOBS values (1 = off)")
    p.add_argument("--wait", type=float, default=0.05, help="DYNFACE_WORKER_BATCH_WAIT_SECONDS")
    p.add_argument("--no-write", action="store_true", help="print, do not write docs/benchmarks.md")
    args = p.parse_args()
    sizes = [int(v) for v in args.sizes.split(",")]
    worker_sizes = [int(v) for v in args.worker_sizes.split(",")]
    if worker_sizes[0] != 1:
        raise SystemExit("--worker-sizes must start with 1 (batching off, the reference)")
    head = header("Batching: B faces in one sampler loop vs one at a time (issue 8, item 3)")
    started = time.perf_counter()

    faces = load_faces(max(sizes))
    base = RestorationPipeline.from_pretrained("tiny", weights_dir=WEIGHTS, max_batch=1)
    single = make_pipeline(base, args.steps, 1)
    timed(single, faces[:1], 0, args.fidelity, args.steps)  # warm-up
    results: dict[int, tuple[Runs, Runs, int]] = {}
    for b in sizes:
        batched_pipe = make_pipeline(base, args.steps, b)
        timed(batched_pipe, faces[:b], 0, args.fidelity, args.steps)  # warm-up at this batch shape
        batched, separate, max_diff = Runs(), Runs(), 0
        for _ in range(args.repeats):
            wall, sample, guide, out_b = timed(batched_pipe, faces[:b], 0, args.fidelity, args.steps)
            batched.wall.append(wall)
            batched.sample.append(sample)
            batched.guide.append(guide)
            batched.latency += [wall] * b
            walls, samples, guides, outs = [], [], [], []
            for k in range(b):
                wall, sample, guide, out = timed(single, faces[k : k + 1], k, args.fidelity, args.steps)
                walls.append(wall)
                samples.append(sample)
                guides.append(guide)
                outs.append(out)
            separate.wall.append(sum(walls))
            separate.sample.append(sum(samples))
            separate.guide.append(sum(guides))
            # One at a time, face k's result exists only after the k − 1 calls before its own.
            separate.latency += np.cumsum(walls).tolist()
            diff = np.abs(out_b.astype(int) - np.concatenate(outs).astype(int)).max()
            max_diff = max(max_diff, int(diff))
        results[b] = (batched, separate, max_diff)
        print(
            f"B={b}: batched {b / percentile(batched.wall, 50):.3f} faces/s, one at a time "
            f"{b / percentile(separate.wall, 50):.3f} faces/s, max |diff| {max_diff}",
            flush=True,
        )

    # Across jobs: real worker processes; configurations alternate within a repeat.
    job_faces = sorted(ALIGNED.glob("*.png"))[: args.jobs]
    if len(job_faces) < args.jobs:
        raise SystemExit(f"need {args.jobs} aligned faces in {ALIGNED}, found {len(job_faces)}")
    table_dir = tempfile.TemporaryDirectory()
    table_file = Path(table_dir.name) / "dsst.json"
    table_file.write_text(steps_table(args.steps).to_json())
    across: dict[int, tuple[Runs, int, list[float]]] = {b: (Runs(), 0, []) for b in worker_sizes}
    for _ in range(args.repeats):
        reference: list[np.ndarray] = []
        for b in worker_sizes:
            run, images, per_batch = worker_run(
                job_faces, b, table_file, args.fidelity, args.steps, max(worker_sizes), args.wait
            )
            reference = reference or images
            runs, max_diff, batch_sizes = across[b]
            for name in ("wall", "sample", "guide", "latency"):
                getattr(runs, name).extend(getattr(run, name))
            diff = max(
                int(np.abs(a.astype(int) - r.astype(int)).max())
                for a, r in zip(images, reference, strict=True)
            )
            across[b] = (runs, max(max_diff, diff), [*batch_sizes, per_batch])
            print(
                f"worker max_jobs={b}: {args.jobs / run.wall[0]:.3f} faces/s, "
                f"{per_batch:.1f} jobs per batch, max |diff| vs off {diff}",
                flush=True,
            )
    table_dir.cleanup()
    seconds = time.perf_counter() - started
    load_end = ", ".join(f"{v:.2f}" for v in os.getloadavg())

    table = [
        "| B | way | faces/s | sampler faces/s | guide-stage faces/s | per-face latency p50 (s) "
        "| speed-up (whole call) | speed-up (sampler) | max abs diff (uint8) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for b, (batched, separate, max_diff) in results.items():
        fps = {k: b / percentile(r.wall, 50) for k, r in (("b", batched), ("s", separate))}
        sfps = {k: b / percentile(r.sample, 50) for k, r in (("b", batched), ("s", separate))}
        gfps = {k: b / percentile(r.guide, 50) for k, r in (("b", batched), ("s", separate))}
        table.append(
            f"| {b} | one call, max_batch={b} | {fps['b']:.3f} | {sfps['b']:.3f} | {gfps['b']:.3f} "
            f"| {percentile(batched.latency, 50):.2f} | {fps['b'] / fps['s']:.2f}× "
            f"| {sfps['b'] / sfps['s']:.2f}× | {max_diff} |"
        )
        table.append(
            f"| {b} | {b} one-face call(s) | {fps['s']:.3f} | {sfps['s']:.3f} | {gfps['s']:.3f} "
            f"| {percentile(separate.latency, 50):.2f} | 1× | 1× | — |"
        )
    across_table = table[:2]
    off = across[1][0]
    off_fps, off_sfps = args.jobs / percentile(off.wall, 50), args.jobs / percentile(off.sample, 50)
    for b, (runs, max_diff, batch_sizes) in across.items():
        fps, sfps = args.jobs / percentile(runs.wall, 50), args.jobs / percentile(runs.sample, 50)
        way = (
            "worker, batching off"
            if b == 1
            else f"worker, ≤ {b} jobs per batch ({np.mean(batch_sizes):.1f} on average)"
        )
        across_table.append(
            f"| {b} | {way} | {fps:.3f} | {sfps:.3f} "
            f"| {args.jobs / percentile(runs.guide, 50):.3f} | {percentile(runs.latency, 50):.2f} "
            f"| {fps / off_fps:.2f}× | {sfps / off_sfps:.2f}× | {max_diff if b > 1 else '—'} |"
        )
    body = f"""{head}
- **CPU numbers on the tiny profile** (toy networks with random weights; UNet at
  {PROFILES["tiny"].image_size} px, restorer at 512 px), one intra-op thread. GPU batching gains differ
  and are **not measured here** (no GPU on this machine); neither is the real profile (DifFace's 512 px
  UNet): its weights are not on this machine, so there is no real-profile row.
- set: the first {max(sizes)} real aligned faces (`../shared/testdata/aligned`, sorted); batch B uses the
  first B. Mode `dynfacerestore` (training-free DBLM/DGSA fallbacks), fidelity fixed at {args.fidelity},
  DSST table with every start = {args.steps}, so every face makes {args.steps} UNet calls (NFE, checked on
  every call) whichever blur level it gets.
- batched = one `restore_faces` call of B faces with `max_batch=B` (one restorer forward, one sampler
  loop); one at a time = B calls of one face (`max_batch=1`, seed k for face k, the seed the batched call
  gives face k). {args.repeats} repeats after a warm-up; p50 over repeats. faces/s = B / wall time of the
  whole call(s) (restorer, blur estimate, DGSA map, sampling); sampler faces/s = B / the `sample` stage
  only; guide-stage faces/s = B / the `dblm` stage (restorer R at 512, blur estimate, DGSA map).
  Per-face latency = from when all B faces are ready until that face's result exists (p50 over
  faces): batched, every face waits for the whole call; one at a time, face k waits for its own call
  and the k − 1 before it. Run took {seconds:.0f} s on a {os.cpu_count()}-CPU machine; load average at
  the end {load_end} (a load above the CPU count means other jobs competed during the run, and later
  rows (larger B) may then see more contention than earlier ones). At B = 1 both rows run the same
  work (one face, one call), so their gap shows this run's timing noise.

{chr(10).join(table)}

### Across jobs: the worker batching waiting jobs (`DYNFACE_WORKER_BATCH_MAX_JOBS` = B)

- {args.jobs} one-face jobs (the first {args.jobs} aligned faces, job k seeded k, fidelity {args.fidelity},
  the same DSST table) submitted while no worker ran; then one real worker process (`python -m
  worker`, tiny profile, CPU, `max_face_batch` = {max(worker_sizes)}, batch wait {args.wait} s) took them
  all. B = 1 is batching off. One worker process per configuration and repeat ({args.repeats} repeats,
  configurations alternating); its start-up is not counted. faces/s = jobs / (last completion − first
  start); sampler and guide-stage faces/s = jobs / the batches' summed `sample` / `dblm` stage times;
  per-face latency = a job's completion − the first start (p50 over all jobs); max abs diff = each
  output image vs the same job's with batching off in the same repeat (float rounding of batched
  kernels).

{chr(10).join(across_table)}
"""
    print(body)
    if not args.no_write:
        write_section("batching", body)


if __name__ == "__main__":
    main()
