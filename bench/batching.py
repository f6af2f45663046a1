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
- per-face latency = time from the call until that face's result exists: the batched call's wall time
  for every face of the batch; the one-face call's own wall time one at a time (p50 over all calls);
- speed-up = batched faces/s ÷ one-at-a-time faces/s.

The real profile (DifFace's 512 px UNet) is not measured: its weights are not on this machine.

Usage: OMP_NUM_THREADS=1 .venv/bin/python -m bench.batching [--sizes 1,2,4,8] [--steps 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numpy as np
from PIL import Image

from bench._report import ALIGNED, SHARED, header, percentile, write_section
from models.dsst import default_table
from models.pipeline import RestorationPipeline
from models.profiles import PROFILES

WEIGHTS = SHARED / "weights"


@dataclasses.dataclass
class Runs:
    """Times of one configuration over the repeats (seconds)."""

    wall: list[float] = dataclasses.field(default_factory=list)  # the B faces, per repeat
    sample: list[float] = dataclasses.field(default_factory=list)  # sampler stage, per repeat
    guide: list[float] = dataclasses.field(default_factory=list)  # R, σ̂, DGSA map ("dblm" stage)
    latency: list[float] = dataclasses.field(default_factory=list)  # per face-call


def load_faces(n: int) -> np.ndarray:
    files = sorted(ALIGNED.glob("*.png"))[:n]
    if len(files) < n:
        raise SystemExit(f"need {n} aligned faces in {ALIGNED}, found {len(files)}")
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def make_pipeline(base: RestorationPipeline, steps: int, max_batch: int) -> RestorationPipeline:
    table = dataclasses.replace(default_table(), start_indices=(steps,) * len(default_table().sigmas))
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1,2,4,8", help="batch sizes B")
    p.add_argument("--steps", type=int, default=10, help="DSST start for every level (= NFE per face)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fidelity", type=float, default=0.5, help="fixed eta for every face")
    p.add_argument("--no-write", action="store_true", help="print, do not write docs/benchmarks.md")
    args = p.parse_args()
    sizes = [int(v) for v in args.sizes.split(",")]
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
            separate.latency += walls
            diff = np.abs(out_b.astype(int) - np.concatenate(outs).astype(int)).max()
            max_diff = max(max_diff, int(diff))
        results[b] = (batched, separate, max_diff)
        print(
            f"B={b}: batched {b / percentile(batched.wall, 50):.3f} faces/s, one at a time "
            f"{b / percentile(separate.wall, 50):.3f} faces/s, max |diff| {max_diff}",
            flush=True,
        )
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
  Per-face latency: batched, every face waits for the whole call; one at a time, one call. Run took
  {seconds:.0f} s on a shared 2-CPU machine; load average at the end {load_end} (other jobs ran on
  it during the run, so later rows (larger B) may see more contention than earlier ones). At B = 1
  both rows run the same work (one face, one call), so their gap shows this run's timing noise.

{chr(10).join(table)}

Not implemented: cross-job micro-batching in the worker (issue 8 item 3's second half: faces of
different queued jobs sharing one sampler loop). The worker runs one job at a time; only the faces of
one photo are batched (`max_batch`), which is what this table measures.
"""
    print(body)
    if not args.no_write:
        write_section("batching", body)


if __name__ == "__main__":
    main()
