"""Intra-photo batching: B faces through one batched sampler loop vs B separate one-face calls.

Measured: for B in 1, 2, 4, 8 (`--sizes`), the first B real aligned faces of `--faces-dir`
(../shared/testdata/aligned, sorted) are restored
- batched: one `restore_faces(B faces, seed=0)` call on a pipeline with `max_batch=B`, so the restorer
  R runs once on the B faces and the DDIM sampler runs one loop over all B;
- one at a time: B calls `restore_faces(face k, seed=k)` on a pipeline with `max_batch=1` (the same
  per-face seeds, so both ways compute the same faces up to float rounding; the max abs difference of
  the uint8 outputs is reported as a check).

Pipeline: `RestorationPipeline` as the worker builds it (its default SpeedOptions, `--dtype`, auto =
fp16 on CUDA, fp32 on CPU, in both parts) on `--device`, with the `--profile`'s networks (default: the
real 512 px ones on CUDA, the tiny toy ones on CPU; the real profile's released weights where
`--weights-dir` holds them, else its architecture with random weights, which batch the same work), mode
`dynfacerestore` with the training-free DBLM/DGSA fallbacks, `fidelity` fixed (so eta does not depend on
the face) and a DSST table with the default's blur levels but every start set to `--steps` (default
10): whatever level a face gets, it makes the same number of UNet calls (NFE), so every configuration
does the same work per face. Every call's UNet evaluations are counted (`bench._pipeline.UNetCalls`)
and must be exactly that. Both pipelines share the same network objects (as
tests/models/test_pipeline.py `_fast_pipeline`).

Timed with `time.perf_counter` around each `restore_faces` call (whole call: restorer R at 512, blur
estimate, DGSA map, sampling, uint8 conversion), and the call's own `timings["sample"]` (the sampler
loop alone). After one untimed warm-up call per pipeline, each configuration is repeated `--repeats`
times (5 by default), batched and one-at-a-time one after the other within a repeat, in alternating
order (batched first in even repeats, one-at-a-time first in odd ones), so neither way always runs
on the machine the other left (caches, clocks, other users). Reported (p50 over repeats):
- faces/s = B / wall time of the B faces (one batched call, or the sum of the B one-face calls);
- sampler faces/s = B / sampling-stage time; guide-stage faces/s = B / the call's `timings["dblm"]`;
- per-face latency = time from when all B faces are ready until that face's result exists: the batched
  call's wall time for every face of the batch; one at a time, the walls of the one-face calls up to
  and including that face's (face k waits for the k − 1 before it); p50 over all faces;
- speed-up = batched faces/s ÷ one-at-a-time faces/s, per repeat (the two ways of one repeat ran
  back to back); reported as the median over repeats and its spread (min–max over repeats);
- noise: at B = 1 both ways do the same work (one face, one call), so the spread of B = 1's ratio is
  this run's timing noise; a B > 1 speed-up whose median falls inside it is marked "within noise".
  No B = 1 in `--sizes`, or one repeat: no noise reference, nothing is marked.

Across jobs (the worker's cross-job batching, DYNFACE_WORKER_BATCH_MAX_JOBS = B): `--jobs` one-face
jobs (the first real aligned faces, job k with seed k, the same fidelity, so all may share a batch)
are submitted through the API (in-process) while no worker runs, into a Redis namespace of their own
($REDIS_URL as for the other benches, default redis://127.0.0.1:6379/0; purged afterwards); then one real
worker process (`python -m worker --device DEVICE`, the same profile, dtype and DSST table,
max_face_batch = the largest B) starts and takes them all; the dtype reported is the one the worker
says it loaded (its registry entry). B = 1 is batching off. From the job records:
- faces/s = jobs / (last completion − first start), i.e. while all of them were waiting or running
  (the worker's start-up is not counted);
- sampler faces/s and guide-stage faces/s = jobs / the summed `sample` / `dblm` stage time of the
  batches (a job reports its batch's stage time, so Σ over jobs of stage time ÷ `batch_jobs`);
- per-face latency = a job's completion − the first start (how long a face waited for its result
  once the worker began), p50 over all jobs of all repeats;
- max abs diff = of each job's output image vs the same job's with batching off in the same repeat;
- speed-up = faces/s ÷ batching off's in the same repeat; median and min–max over the repeats.
`--worker-repeats` repeats (2 by default; a worker run is the slow part); in each, one worker process
per configuration, in the order of `--worker-sizes`, reversed in odd repeats.

Run time of the defaults (tiny profile, CPU): 371 s, about 6 min, on the 2-CPU AMD EPYC VM of the
section in docs/benchmarks.md (2026-12-06 22:39 UTC).

Figure (docs/benchmarks/batching_by_batch_size.png beside `--doc`, linked from the section): faces/s
and per-face latency p50 against B, in-process both ways and across jobs.

The worker part needs Redis, the API's dependencies and, for the real profile, its released weights
(the worker loads no random ones); `--skip-worker` runs the in-process part alone, which needs no Redis
or API packages, but still the pipeline's (torch, diffusers, spandrel, opencv, Pillow, ...) and, away
from ../shared, `--faces-dir` with aligned faces.

Usage: OMP_NUM_THREADS=1 .venv/bin/python -m bench.batching [--device cpu|cuda[:N]] [--profile tiny|real]
       [--dtype auto] [--sizes 1,2,4,8] [--steps 10] [--repeats 5] [--worker-repeats 2] [--jobs 8]
       [--worker-sizes 1,2,4,8]
       [--faces-dir DIR] [--skip-worker] [--doc PATH | --no-write]
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench._pipeline import Networks, UNetCalls, default_profile, networks, parse_device
from bench._report import (
    ALIGNED,
    DOC,
    REDIS_URL,
    SHARED,
    figure_link,
    figure_path,
    header,
    percentile,
    pyplot,
    save_figure,
    shown,
    write_section,
)
from models import weights
from models.dsst import DSSTable, default_table
from models.pipeline import RestorationPipeline, auto_dtype, profile_weights
from models.profiles import PROFILES

WEIGHTS = SHARED / "weights"
#: How long a worker may take to load its pipeline and start the first job.
LOAD_SECONDS = 300
FIGURE = "batching_by_batch_size.png"


@dataclasses.dataclass
class Runs:
    """Times of one configuration over the repeats (seconds)."""

    wall: list[float] = dataclasses.field(default_factory=list)  # the B faces, per repeat
    sample: list[float] = dataclasses.field(default_factory=list)  # sampler stage, per repeat
    guide: list[float] = dataclasses.field(default_factory=list)  # R, σ̂, DGSA map ("dblm" stage)
    latency: list[float] = dataclasses.field(default_factory=list)  # per face


def load_faces(folder: Path, n: int) -> np.ndarray:
    files = sorted(folder.glob("*.png"))[:n]
    if len(files) < n:
        raise SystemExit(f"need {n} aligned faces in {folder}, found {len(files)}")
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def steps_table(steps: int) -> DSSTable:
    """The default table's blur levels, every one starting at `steps` (so NFE = steps per face)."""
    return dataclasses.replace(default_table(), start_indices=(steps,) * len(default_table().sigmas))


@dataclasses.dataclass(frozen=True)
class Counted:
    """A pipeline and the count of the UNet evaluations it really makes."""

    pipe: RestorationPipeline
    unet: UNetCalls


def make_pipeline(nets: Networks, steps: int, max_batch: int, device: str, dtype: str) -> Counted:
    """A pipeline on the shared networks (the constructor moves them in place; every pipeline of a run
    has the same device and dtype, so they agree), with the worker's default SpeedOptions."""
    pipe = RestorationPipeline(
        nets.profile,
        nets.unet,
        nets.restorer,
        dsst=steps_table(steps),
        max_batch=max_batch,
        weights_dir=WEIGHTS,
        device=device,
        dtype=dtype,
    )
    return Counted(pipe, UNetCalls.count(pipe))


def timed(
    counted: Counted, faces: np.ndarray, seed: int, fidelity: float, steps: int
) -> tuple[float, float, float, np.ndarray]:
    """One `restore_faces` call: wall, sample-stage and guide-stage seconds, the faces. Raises unless
    the UNet ran exactly `steps` times over all the faces (every face's NFE is `steps`)."""
    before = counted.unet.calls, counted.unet.faces
    t0 = time.perf_counter()
    result = counted.pipe.restore_faces(faces, seed=seed, fidelity=fidelity)
    wall = time.perf_counter() - t0
    made = counted.unet.calls - before[0], counted.unet.faces - before[1]
    if made != (steps, steps * len(faces)):
        raise RuntimeError(
            f"expected {steps} UNet calls over all {len(faces)} face(s) (NFE {steps} each), counted "
            f"{made[0]} calls and {made[1]} face evaluations"
        )
    return wall, result.timings["sample"], result.timings["dblm"], result.faces


@dataclasses.dataclass(frozen=True)
class WorkerSetup:
    """What every worker run of the across-jobs part shares."""

    device: str
    profile: str
    dtype: str  # DYNFACE_DTYPE
    weights_dir: Path
    table: Path  # the steps table as a `dynface dsst build` JSON file
    fidelity: float
    steps: int
    face_batch: int  # max_face_batch
    wait: float  # worker_batch_wait_seconds


def worker_run(
    faces: list[Path], max_jobs: int, setup: WorkerSetup
) -> tuple[Runs, list[np.ndarray], float, str]:
    """One worker taking `len(faces)` waiting one-face jobs with up to `max_jobs` per batch: its
    times, the output images (job order), the mean jobs per batch and the dtype it says it loaded."""
    # The service's own dependencies and the test suite's helpers for a service in a namespace of its
    # own, imported here: the in-process part must run where they are not installed (a lent GPU).
    import redis
    from fastapi.testclient import TestClient

    from app.jobs import JobStore, connect
    from app.main import create_app
    from tests.conftest import WorkerProcess, base_settings, purge, wait_for

    settings = base_settings(
        f"bench-batching-{uuid.uuid4().hex[:8]}",
        redis_url=REDIS_URL,  # $REDIS_URL, as every other bench (not the tests' own variable)
        profile=setup.profile,
        dtype=setup.dtype,
        weights_dir=str(setup.weights_dir),
        offline=True,
        dsst_table=str(setup.table),
        max_face_batch=setup.face_batch,
        max_queue_depth=len(faces) + 1,
        worker_batch_max_jobs=max_jobs,
        worker_batch_wait_seconds=setup.wait,
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
                    data={
                        "aligned": "true",
                        "seed": str(k),
                        "fidelity": str(setup.fidelity),
                        "format": "png",
                    },
                )
                r.raise_for_status()
                ids.append(r.json()["id"])
        log = Path(tempfile.gettempdir()) / f"{settings.key_prefix}.log"
        worker = WorkerProcess(settings, log, settings.queue_name, device=setup.device)
        proc = worker.proc
        load_deadline = time.monotonic() + LOAD_SECONDS

        def ended() -> list[dict[str, Any]] | None:
            # A worker that cannot load its model retries forever: fail fast instead, with its log.
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited (rc {proc.returncode}); its log: {log}")
            records = [r for r in (store.get(i) for i in ids) if r is not None]
            if time.monotonic() > load_deadline and not any(r.get("started_at") for r in records):
                raise RuntimeError(f"the worker started no job in {LOAD_SECONDS} s; its log: {log}")
            done = [r for r in records if r.get("completed_at")]
            return done if len(done) == len(ids) else None

        records = wait_for(ended, 1800, interval=0.2, what=f"{len(ids)} jobs with max_jobs={max_jobs}")
        bad = [(r["id"], r["status"], r.get("error")) for r in records if r["status"] != "succeeded"]
        if bad:
            raise RuntimeError(f"jobs did not succeed: {bad}; worker log {log}")
        # Another process's UNet calls cannot be counted from here: this checks the start its records
        # report, which the in-process part's count shows is the number of UNet calls made.
        starts = {f["start_step"] for r in records for f in r["faces"]}
        if starts != {setup.steps}:
            raise RuntimeError(f"expected start step {setup.steps} for every face, got {starts}")
        images = [np.asarray(Image.open(io.BytesIO(store.result(i, "image") or b""))) for i in ids]
        # The pipeline's own report (/v1/models reads the same), while the worker is still registered.
        (dtype,) = {w["info"]["dtype"] for w in store.workers()}
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
    return runs, images, per_batch, dtype


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--profile", choices=sorted(PROFILES), help="default: real on CUDA, tiny on CPU")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="the pipeline's")
    p.add_argument(
        "--weights-dir", type=Path, default=WEIGHTS, help="the detector's weights, and real ones if there"
    )
    p.add_argument("--faces-dir", type=Path, default=ALIGNED, help="aligned 512 px faces (*.png)")
    p.add_argument("--sizes", default="1,2,4,8", help="batch sizes B")
    p.add_argument("--steps", type=int, default=10, help="DSST start for every level (= NFE per face)")
    p.add_argument("--repeats", type=int, default=5, help="in-process repeats (order alternating)")
    p.add_argument("--worker-repeats", type=int, default=2, help="repeats of the across-jobs part")
    p.add_argument("--fidelity", type=float, default=0.5, help="fixed eta for every face")
    p.add_argument("--jobs", type=int, default=8, help="one-face jobs waiting for the worker")
    p.add_argument("--worker-sizes", default="1,2,4,8", help="DYNFACE_WORKER_BATCH_MAX_JOBS values (1 = off)")
    p.add_argument("--wait", type=float, default=0.05, help="DYNFACE_WORKER_BATCH_WAIT_SECONDS")
    p.add_argument(
        "--skip-worker", action="store_true", help="in-process part only (no Redis, API or worker)"
    )
    p.add_argument("--doc", type=Path, default=DOC, help="file whose batching section is (re)written")
    p.add_argument("--no-write", action="store_true", help="print only, write no file")
    args = p.parse_args(argv)
    device = parse_device(p, args.device)
    profile = PROFILES[args.profile or default_profile(device)]
    dtype = auto_dtype(device) if args.dtype == "auto" else args.dtype
    sizes = [int(v) for v in args.sizes.split(",")]
    worker_sizes = [int(v) for v in args.worker_sizes.split(",")]
    if worker_sizes[0] != 1:
        p.error("--worker-sizes must start with 1 (batching off, the reference)")
    if args.repeats < 1 or args.worker_repeats < 1:
        p.error("--repeats and --worker-repeats must be at least 1")
    wdir = args.weights_dir
    if not args.skip_worker and profile.real and weights.missing_for(profile_weights(profile, wdir), wdir):
        p.error(
            f"the worker loads the real profile's released weights, which are not in {wdir}: pass "
            "--weights-dir, or --skip-worker for the in-process part alone (random weights)"
        )
    if not args.no_write:
        pyplot()
    head = header("Batching: B faces in one sampler loop vs one at a time (issue 8, item 3)", device)
    started = time.perf_counter()

    faces = load_faces(args.faces_dir, max(sizes))
    nets = networks(profile, wdir)
    single = make_pipeline(nets, args.steps, 1, str(device), dtype)
    timed(single, faces[:1], 0, args.fidelity, args.steps)  # warm-up
    results: dict[int, tuple[Runs, Runs, int]] = {}
    for b in sizes:
        batched_pipe = make_pipeline(nets, args.steps, b, str(device), dtype)
        timed(batched_pipe, faces[:b], 0, args.fidelity, args.steps)  # warm-up at this batch shape
        batched, separate, max_diff = Runs(), Runs(), 0
        for repeat in range(args.repeats):
            out_b, outs = None, []
            # Alternating order: batched first in even repeats, one at a time first in odd ones.
            for way in ("batched", "separate") if repeat % 2 == 0 else ("separate", "batched"):
                if way == "batched":
                    wall, sample, guide, out_b = timed(batched_pipe, faces[:b], 0, args.fidelity, args.steps)
                    batched.wall.append(wall)
                    batched.sample.append(sample)
                    batched.guide.append(guide)
                    batched.latency += [wall] * b
                    continue
                walls, samples, guides = [], [], []
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
            assert out_b is not None
            diff = np.abs(out_b.astype(int) - np.concatenate(outs).astype(int)).max()
            max_diff = max(max_diff, int(diff))
        results[b] = (batched, separate, max_diff)
        ups = ratios(separate.wall, batched.wall)
        print(
            f"B={b}: batched {b / percentile(batched.wall, 50):.3f} faces/s, one at a time "
            f"{b / percentile(separate.wall, 50):.3f} faces/s, speed-up {speed_up(ups, None, False)}, "
            f"max |diff| {max_diff}",
            flush=True,
        )

    # Across jobs: real worker processes; configurations alternate within a repeat.
    across: dict[int, tuple[Runs, int, list[float]]] = {b: (Runs(), 0, []) for b in worker_sizes}
    worker_dtypes: set[str] = set()
    table_dir = tempfile.TemporaryDirectory()
    if not args.skip_worker:
        job_faces = sorted(args.faces_dir.glob("*.png"))[: args.jobs]
        if len(job_faces) < args.jobs:
            raise SystemExit(f"need {args.jobs} aligned faces in {args.faces_dir}, found {len(job_faces)}")
        table_file = Path(table_dir.name) / "dsst.json"
        table_file.write_text(steps_table(args.steps).to_json())
        setup = WorkerSetup(
            str(device),
            profile.name,
            dtype,
            wdir,
            table_file,
            args.fidelity,
            args.steps,
            max(worker_sizes),
            args.wait,
        )
    for repeat in range(0 if args.skip_worker else args.worker_repeats):
        images_of: dict[int, list[np.ndarray]] = {}
        # The configurations' order reversed in odd repeats, as the in-process ways alternate.
        for b in worker_sizes if repeat % 2 == 0 else worker_sizes[::-1]:
            run, images_of[b], per_batch, worker_dtype = worker_run(job_faces, b, setup)
            worker_dtypes.add(worker_dtype)
            runs, max_diff, batch_sizes = across[b]
            for name in ("wall", "sample", "guide", "latency"):
                getattr(runs, name).extend(getattr(run, name))
            across[b] = (runs, max_diff, [*batch_sizes, per_batch])
            print(
                f"worker max_jobs={b}: {args.jobs / run.wall[0]:.3f} faces/s, {per_batch:.1f} jobs per batch",
                flush=True,
            )
        for b in worker_sizes:  # every output vs the same job's with batching off, in this repeat
            runs, max_diff, batch_sizes = across[b]
            diff = max(
                int(np.abs(a.astype(int) - r.astype(int)).max())
                for a, r in zip(images_of[b], images_of[1], strict=True)
            )
            across[b] = (runs, max(max_diff, diff), batch_sizes)
    table_dir.cleanup()
    seconds = time.perf_counter() - started
    load_end = ", ".join(f"{v:.2f}" for v in os.getloadavg())

    table = [
        "| B | way | faces/s | sampler faces/s | guide-stage faces/s | per-face latency p50 (s) "
        "| speed-up (whole call) | speed-up (sampler) | max abs diff (uint8) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    # The noise reference: B = 1's ratios, where both ways do the same work.
    noise: dict[str, list[float]] = {}
    if 1 in results and args.repeats > 1:
        one_b, one_s, _ = results[1]
        noise = {"wall": ratios(one_s.wall, one_b.wall), "sample": ratios(one_s.sample, one_b.sample)}
    for b, (batched, separate, max_diff) in results.items():
        fps = {k: b / percentile(r.wall, 50) for k, r in (("b", batched), ("s", separate))}
        sfps = {k: b / percentile(r.sample, 50) for k, r in (("b", batched), ("s", separate))}
        gfps = {k: b / percentile(r.guide, 50) for k, r in (("b", batched), ("s", separate))}
        ups = {
            stage: speed_up(
                ratios(getattr(separate, stage), getattr(batched, stage)), noise.get(stage), b == 1
            )
            for stage in ("wall", "sample")
        }
        table.append(
            f"| {b} | one call, max_batch={b} | {fps['b']:.3f} | {sfps['b']:.3f} | {gfps['b']:.3f} "
            f"| {percentile(batched.latency, 50):.2f} | {ups['wall']} | {ups['sample']} | {max_diff} |"
        )
        table.append(
            f"| {b} | {b} one-face call(s) | {fps['s']:.3f} | {sfps['s']:.3f} | {gfps['s']:.3f} "
            f"| {percentile(separate.latency, 50):.2f} | 1× | 1× | — |"
        )
    across_table = table[:2]
    if not args.skip_worker:
        off = across[1][0]
        for b, (runs, max_diff, batch_sizes) in across.items():
            fps, sfps = args.jobs / percentile(runs.wall, 50), args.jobs / percentile(runs.sample, 50)
            way = (
                "worker, batching off"
                if b == 1
                else f"worker, ≤ {b} jobs per batch ({np.mean(batch_sizes):.1f} on average)"
            )
            if b == 1:
                ups = {"wall": "1×", "sample": "1×"}
            else:
                ups = {
                    stage: speed_up(ratios(getattr(off, stage), getattr(runs, stage)), None, False)
                    for stage in ("wall", "sample")
                }
            across_table.append(
                f"| {b} | {way} | {fps:.3f} | {sfps:.3f} "
                f"| {args.jobs / percentile(runs.guide, 50):.3f} | {percentile(runs.latency, 50):.2f} "
                f"| {ups['wall']} | {ups['sample']} | {max_diff if b > 1 else '—'} |"
            )
    on_cpu = device.type == "cpu"
    what = (
        f"**{'CPU' if on_cpu else 'GPU'} numbers**, device `{device}`, profile `{profile.name}` (UNet at "
        f"{profile.image_size} px, restorer at 512 px), {nets.weights}; pipeline dtype {dtype}, the worker's "
        f"default SpeedOptions (channels_last on, compile off); {torch.get_num_threads()} intra-op thread(s)."
    )
    if on_cpu:
        what += " GPU batching gains differ and are **not measured by a CPU run**."
    across_text = (
        "Not run (`--skip-worker`)."
        if args.skip_worker
        else f"""- {args.jobs} one-face jobs (the first {args.jobs} aligned faces, job k seeded k, fidelity
  {args.fidelity}, the same DSST table) submitted while no worker ran; then one real worker process
  (`python -m worker --device {device}`, profile `{profile.name}`, dtype {", ".join(sorted(worker_dtypes))}
  (as the worker reported it), `max_face_batch` =
  {max(worker_sizes)}, batch wait {args.wait} s) took them all. B = 1 is batching off. One worker
  process per configuration and repeat ({args.worker_repeats} repeat(s), the configurations' order
  reversed in odd repeats); its start-up is not counted. faces/s = jobs / (last completion − first
  start); sampler and guide-stage faces/s = jobs / the batches' summed `sample` / `dblm` stage times;
  per-face latency = a job's completion − the first start (p50 over all jobs); speed-up = faces/s ÷
  batching off's in the same repeat, median over repeats (min–max); max abs diff = each output image
  vs the same job's with batching off in the same repeat (float rounding of batched kernels). The
  worker is another process, so its UNet calls are not counted: its job records' start step
  ({args.steps} for every face, checked) is, which the count above shows to be the number of UNet
  calls a face gets.

{chr(10).join(across_table)}"""
    )
    body = f"""{head}
- {what}
- set: the first {max(sizes)} aligned faces of `{shown(args.faces_dir)}` (sorted); batch B uses the
  first B. Mode `dynfacerestore` (training-free DBLM/DGSA fallbacks), fidelity fixed at {args.fidelity},
  DSST table with every start = {args.steps}, so every face makes {args.steps} UNet calls whichever blur
  level it gets: counted on every call by wrapping the pipeline's UNet (`RestorationPipeline._unet_call`),
  which must have run {args.steps} times over all the call's faces, else the run stops.
- batched = one `restore_faces` call of B faces with `max_batch=B` (one restorer forward, one sampler
  loop); one at a time = B calls of one face (`max_batch=1`, seed k for face k, the seed the batched call
  gives face k). {args.repeats} repeats after a warm-up, the two ways back to back in each, batched first
  in even repeats and one at a time first in odd ones; p50 over repeats. faces/s = B / wall time of the
  whole call(s) (restorer, blur estimate, DGSA map, sampling); sampler faces/s = B / the `sample` stage
  only; guide-stage faces/s = B / the `dblm` stage (restorer R at 512, blur estimate, DGSA map).
  Per-face latency = from when all B faces are ready until that face's result exists (p50 over
  faces): batched, every face waits for the whole call; one at a time, face k waits for its own call
  and the k − 1 before it. Run took {seconds:.0f} s on a {os.cpu_count()}-CPU machine; load average at
  the end {load_end} (a load above the CPU count means other jobs competed during the run, and later
  rows (larger B) may then see more contention than earlier ones).
- speed-up = the batched way's faces/s ÷ one at a time's, per repeat (the two ran back to back): the
  median over repeats (min–max). At B = 1 both rows run the same work (one face, one call), so the
  spread of its ratio is this run's timing noise ("noise reference"); a larger B's median inside
  that spread is marked "within noise".

{chr(10).join(table)}

### Across jobs: the worker batching waiting jobs (`DYNFACE_WORKER_BATCH_MAX_JOBS` = B)

{across_text}

{figure_link("Faces/s and per-face latency by faces per forward", FIGURE)}
"""
    print(body)
    if not args.no_write:
        plot(results, None if args.skip_worker else across, args.jobs, figure_path(FIGURE, args.doc))
        write_section("batching", body, args.doc)


def ratios(before: list[float], after: list[float]) -> list[float]:
    """Per repeat, one way's time ÷ the other's in the same repeat: the second way's speed-up."""
    return [x / y for x, y in zip(before, after, strict=True)]


def speed_up(values: list[float], noise: list[float] | None, reference: bool) -> str:
    """A speed-up cell: the median over repeats and, with several, its min–max; "within noise" when
    the median lies inside the spread of `noise` (B = 1's ratios), "noise reference" for B = 1 itself."""
    median = percentile(values, 50)
    if len(values) < 2:
        return f"{median:.2f}×"
    cell = f"{median:.2f}× ({min(values):.2f}–{max(values):.2f})"
    if reference:
        return cell + ", noise reference"
    if noise and min(noise) <= median <= max(noise):
        return cell + ", within noise"
    return cell


def plot(
    results: dict[int, tuple[Runs, Runs, int]],
    across: dict[int, tuple[Runs, int, list[float]]] | None,
    jobs: int,
    out: Path,
) -> None:
    """faces/s and per-face latency p50 against B: in-process batched and one at a time (`results`),
    and across jobs (`across`, None when the worker part did not run; `jobs` jobs per worker run)."""
    plt = pyplot()
    fig, (rate, latency) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
    sizes = sorted(results)
    series = [
        ("in-process, one batched call", sizes, [(b, results[b][0]) for b in sizes], "-"),
        ("in-process, one face at a time", sizes, [(b, results[b][1]) for b in sizes], "--"),
    ]
    if across is not None:
        worker_sizes = sorted(across)
        runs = [(jobs, across[b][0]) for b in worker_sizes]
        series.append(("across jobs: worker, ≤ B jobs per batch", worker_sizes, runs, "-."))
    for label, xs, faces_runs, style in series:
        rate.plot(xs, [n / percentile(r.wall, 50) for n, r in faces_runs], style, marker="o", label=label)
        latency.plot(xs, [percentile(r.latency, 50) for _, r in faces_runs], style, marker="o", label=label)
    ticks = sorted(set(sizes) | set(across or ()))
    for ax, ylabel in ((rate, "faces/s (whole call)"), (latency, "per-face latency p50 (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(b) for b in ticks])
        ax.minorticks_off()
        ax.set_xlabel("B: faces per forward (in-process) / jobs per batch (worker)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    rate.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out)


if __name__ == "__main__":
    main()
