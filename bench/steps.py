"""Diffusion steps (UNet evaluations, NFE) per face: `dynfacerestore` vs the `difface` baseline.

Set: the real aligned faces in ../shared/testdata/aligned, each degraded at every level of
`models.degradations.SEVERITY_LEVELS` (mild → extreme slices of DifFace's training ranges).

Pipeline: `RestorationPipeline.from_pretrained(--profile, weights_dir=--weights-dir)` on `--device`, dtype
auto (as the worker): by default the tiny profile on CPU and the real one (its released weights, which
must be in `--weights-dir`) on CUDA. Column A and the report's wording follow the weights it loaded.

NFE per face = the respaced start index (DDIM runs start … 1, one UNet call per step; the run checks it
by counting the UNet calls of one face sampled from each start it reports). The baseline is
DifFace's fixed start (index 100 of ddim250). For `dynfacerestore` the start comes from the DSST table
(models/data/dsst_default.json) at the blur level chosen for the face; three ways of choosing it are
reported, because the pipeline's own choice depends on the restorer:

A. pipeline: `RestorationPipeline._guide` — the exact decision code of `restore_faces` (σ̂ of R(y) →
   smallest level σk ≥ σ̂ → DSST start), run without the sampling. With the real profile's released
   weights it is the deployed pipeline's decision (training-free DBLM/DGSA fallbacks, as shipped). On
   the tiny profile R is a random network, so A is NOT what the real model would decide: it only shows
   the code path runs, and the report says so wherever it gives A.
B. known σ: the DSST table applied to the degradation's own kernel blur √(σx·σy) (ground truth). Ignores
   the extra blur of the down/up-sampling and the noise/JPEG, and assumes R(y) keeps the input's blur.
C. σ̂ of the input: the pipeline's blur estimator (`models.blur.estimate_blur_sigma`, the fallback's rule)
   applied to the degraded input y instead of R(y), then the table. Restorer-independent, but outside the
   estimator's domain: it fits a noise-free blurred face (what R(y) should be), and on y the noise and
   the JPEG block error (mid-frequency, above the 0.4-0.5 cycles/px band it takes as the noise floor;
   even quality 100 alone is enough) flatten the spectrum against P_face, so it reads about 0 px even at
   the extreme level. C understates heavy faces' NFE; it is not the deployed pipeline's NFE.
D. σ̂ of the blur only: the same estimator on the clean face blurred by the same kernel alone (no
   resampling, noise or JPEG), then the table: whether the estimator sees the kernel itself.

Usage: OMP_NUM_THREADS=1 .venv/bin/python -m bench.steps [--images 20] [--device cpu|cuda[:N]]
       [--profile tiny|real] [--weights-dir DIR] [--skip-pipeline] [--no-write]
The real model's figure: .venv/bin/python -m bench.steps --images 20 --profile real [--device cuda]
(on CPU the real restorer at 512 px on every face, and the NFE count's up to 100 real UNet calls per
start, take a long time).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench._pipeline import UNetCalls, default_profile, parse_device
from bench._report import (
    ALIGNED,
    FIGURES,
    SHARED,
    figure_link,
    header,
    pyplot,
    save_figure,
    shown,
    write_section,
)
from models import weights
from models.blur import estimate_blur_sigma
from models.degradations import SEVERITY_LEVELS, DegradedFace, blur_only, severity_set
from models.dsst import DSSTable
from models.pipeline import RestorationPipeline, profile_weights
from models.profiles import PROFILES

FIGURE = FIGURES / "steps_nfe_by_level.png"
WEIGHTS = SHARED / "weights"
#: Issue 8's target: mixed-set NFE per face at most this fraction of the baseline's.
TARGET = 0.5


@dataclass(frozen=True)
class ColumnA:
    """The pipeline whose own decision column A reports: only real weights make A a real-model number."""

    real: bool
    weights: str  # what its networks are, said wherever A's numbers are

    @classmethod
    def of(cls, pipe: RestorationPipeline) -> ColumnA:
        if pipe.profile.real:
            return cls(True, f"released weights ({', '.join(pipe.weight_versions.values())})")
        return cls(False, "the tiny profile's toy networks (random weights, seed 0)")

    @property
    def name(self) -> str:
        return "A: real pipeline" if self.real else "A: tiny pipeline ⚠"

    @property
    def legend(self) -> str:
        if self.real:
            return "A: pipeline's decision, real weights"
        return "A: pipeline, tiny profile (random R) — not a real-model number"


@dataclass
class Row:
    level: str
    known_sigma: float
    baseline: int
    b_known: int
    c_input: int
    c_sigma_hat: float
    a_pipeline: int | None
    a_sigma: float | None
    d_blur_only: int
    d_sigma_hat: float


def load_faces(n: int) -> list[np.ndarray]:
    files = sorted(ALIGNED.glob("*.png"))[:n]
    if not files:
        raise SystemExit(f"no aligned faces in {ALIGNED}")
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def to_tensor(faces: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.inference_mode()
def decide(
    pipe: RestorationPipeline,
    table: DSSTable,
    faces: list[DegradedFace],
    images: list[np.ndarray],
    batch: int,
    with_pipeline: bool,
) -> list[Row]:
    rows: list[Row] = []
    baseline_checked = False
    for i in range(0, len(faces), batch):
        chunk = faces[i : i + batch]
        y = to_tensor(np.stack([f.image for f in chunk]))
        sigma_hat = estimate_blur_sigma(y, table.face_power_spectrum)
        # D: the same kernel alone (no resampling, noise or JPEG): does the estimator see the blur at all?
        blurred = np.stack([blur_only(images[f.source], f.params) for f in chunk])
        d_hat = estimate_blur_sigma(to_tensor(blurred), table.face_power_spectrum).tolist()
        # noise_std None: measured on y itself, as restore_faces does for crops without a source photo.
        if not baseline_checked:  # the baseline's start through the pipeline's own code, once
            g = pipe._guide(y[:1].to(pipe.device), "difface", None, None)
            baseline = g.start[0]
            baseline_checked = True
        a_start: list[int | None] = [None] * len(chunk)
        a_sigma: list[float | None] = [None] * len(chunk)
        if with_pipeline:
            g = pipe._guide(y.to(pipe.device), "dynfacerestore", None, None)
            a_start, a_sigma = list(g.start), list(g.sigma)
        for f, sh, ast, asg, dh in zip(chunk, sigma_hat.tolist(), a_start, a_sigma, d_hat, strict=True):
            rows.append(
                Row(
                    level=f.level,
                    known_sigma=f.params.blur_sigma,
                    baseline=baseline,
                    b_known=table.start_index_for(f.params.blur_sigma),
                    c_input=table.start_index_for(sh),
                    c_sigma_hat=sh,
                    a_pipeline=ast,
                    a_sigma=asg,
                    d_blur_only=table.start_index_for(dh),
                    d_sigma_hat=dh,
                )
            )
        print(f"  {min(i + batch, len(faces))}/{len(faces)} faces decided", flush=True)
    return rows


def count_nfe(pipe: RestorationPipeline, starts: Sequence[int]) -> dict[int, int]:
    """UNet evaluations of one face sampled from each start (`sample_at_level`, the sampler loop
    `restore_faces` runs), counted by wrapping the pipeline's UNet; raises unless each equals its
    start, the premise of every NFE in the report."""
    counter = UNetCalls.count(pipe)
    estimate = torch.zeros(1, 3, 512, 512)
    counted = {}
    try:
        for start in starts:
            before = counter.faces
            pipe.sample_at_level(estimate, pipe.dsst.sigmas[0], start, eta=0.0, seed=0)
            counted[start] = counter.faces - before
    finally:
        pipe._unet_call = counter.inner  # the pipeline as it was: later counts do not nest
    if any(n != start for start, n in counted.items()):
        raise RuntimeError(f"UNet evaluations per face differ from the start index: {counted}")
    return counted


def plot(rows: list[Row], levels: list[str], column_a: ColumnA | None, out: Path = FIGURE) -> None:
    plt = pyplot()
    series = [
        ("difface baseline (fixed start)", "baseline", "#888888", None),
        ("B: DSST at known kernel σ", "b_known", "#1f77b4", None),
        ("C: DSST at σ̂ of degraded input", "c_input", "#2ca02c", None),
        ("D: DSST at σ̂ of blur-only input", "d_blur_only", "#9467bd", None),
    ]
    if column_a is not None:
        series.append((column_a.legend, "a_pipeline", "#d62728", None if column_a.real else "//"))
    x = np.arange(len(levels) + 1)
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    for k, (label, attr, color, hatch) in enumerate(series):
        means = [np.mean([getattr(r, attr) for r in rows if r.level == lvl]) for lvl in levels]
        means.append(np.mean([getattr(r, attr) for r in rows]))
        ax.bar(x + (k - (len(series) - 1) / 2) * width, means, width, label=label, color=color, hatch=hatch,
               edgecolor="white" if hatch is None else "black")  # fmt: skip
    base = rows[0].baseline
    ax.axhline(
        TARGET * base, color="black", linestyle="--", linewidth=1, label=f"target: {TARGET} × baseline"
    )
    names = [
        f"{lvl}\nσ∈[{SEVERITY_LEVELS[lvl].blur_sigma[0]:g},{SEVERITY_LEVELS[lvl].blur_sigma[1]:g}]"
        for lvl in levels
    ]
    ax.set_xticks(x, [*names, "mixed set"])
    ax.set_ylabel("UNet evaluations (NFE) per face, mean")
    ax.set_title(
        "NFE per face by degradation level (ddim250 respacing; DSST = models/data/dsst_default.json)"
    )
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_ylim(0, base * 1.35)
    fig.tight_layout()
    save_figure(fig, out)


def report(
    head: str,
    rows: list[Row],
    levels: list[str],
    column_a: ColumnA | None,
    args: argparse.Namespace,
    n_images: int,
    seconds: float,
    nfe_counted: dict[int, int],
    table: DSSTable,
    pipeline: str,
) -> str:
    """The section: `column_a` None when column A was not run; `pipeline` says which pipeline made
    the baseline check, the NFE count and (when run) column A."""
    base = rows[0].baseline
    checked = "counted for every start reported here, one face sampled per start: " + ", ".join(
        f"start {k} → {v} UNet calls" for k, v in sorted(nfe_counted.items())
    )

    def stats(attr: str, sel: list[Row]) -> str:
        v = [getattr(r, attr) for r in sel]
        return f"{np.mean(v):.1f} ({np.mean(v) / base:.2f}×)"

    cols = [
        "level",
        "faces",
        "known kernel σ (px)",
        "baseline NFE",
        "B: known σ",
        "C: σ̂ of input",
        "σ̂ of input",
        "D: σ̂ of blur only",
        "σ̂ of blur only",
    ]
    if column_a is not None:
        cols.append(column_a.name)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for lvl in [*levels, "mixed set"]:
        sel = rows if lvl == "mixed set" else [r for r in rows if r.level == lvl]
        ks = [r.known_sigma for r in sel]
        sh = [r.c_sigma_hat for r in sel]
        cells = [
            f"**{lvl}**" if lvl == "mixed set" else lvl,
            str(len(sel)),
            f"{min(ks):.2f}–{max(ks):.2f}",
            f"{np.mean([r.baseline for r in sel]):.0f}",
            stats("b_known", sel),
            stats("c_input", sel),
            f"{np.median(sh):.2f} (median)",
            stats("d_blur_only", sel),
            f"{np.median([r.d_sigma_hat for r in sel]):.2f} (median)",
        ]
        if column_a is not None:
            cells.append(stats("a_pipeline", sel))
        lines.append("| " + " | ".join(cells) + " |")

    def chosen(attr: str) -> str:
        c = Counter(getattr(r, attr) for r in rows)
        return ", ".join(f"start {k}: {v}" for k, v in sorted(c.items()))

    def verdict(ratio: float) -> str:
        return f"{ratio:.2f}× — **{'met' if ratio <= TARGET else 'not met'}**"

    mixed = {a: np.mean([getattr(r, a) for r in rows]) / base for a in ("b_known", "c_input", "d_blur_only")}
    verdicts = [
        f"- B (known σ), a proxy: the table's start for the true kernel blur, i.e. the NFE if R(y) kept the "
        f"input's blur and the estimator read it exactly: {verdict(mixed['b_known'])}.",
        f"- D (σ̂ of blur only), a proxy: the estimator on the kernel alone, without the noise and JPEG it "
        f"would face: {verdict(mixed['d_blur_only'])}.",
        f"- C (σ̂ of the degraded input): {verdict(mixed['c_input'])}, but **not a valid proxy**: the "
        "estimator outside its domain reads about 0 px and understates heavy faces' NFE.",
    ]
    proxies = {"b_known": "B", "d_blur_only": "D"}
    met = [name for attr, name in proxies.items() if mixed[attr] <= TARGET]
    summary = f"Valid proxies meeting it: {', '.join(met) if met else 'none'} (of B, D)."
    a_ratio = np.mean([r.a_pipeline for r in rows]) / base if column_a is not None else None
    if column_a is not None and column_a.real:
        assert a_ratio is not None
        a_meaning = (
            f"- **{column_a.name}** — the pipeline's decision code (`_guide`: σ̂ of R(y) → level → start) "
            f"with the real profile's {column_a.weights}: the deployed pipeline's NFE on these faces\n"
            "  (training-free DBLM/DGSA fallbacks, as shipped).\n"
        )
        a_line = (
            f"- A (real pipeline, {column_a.weights}): {chosen('a_pipeline')}; mixed-set ratio "
            f"{a_ratio:.2f}×.\n"
        )
        verdicts.append(f"- A (the real pipeline's own decision): {verdict(a_ratio)}.")
        summary += f" Column A, the real model's `dynfacerestore` NFE: {verdict(a_ratio)}."
    else:
        a_meaning = (
            "- No column here is a real-model measurement: that needs the real weights (`dynface weights "
            "pull`) and this script with `--profile real` (column A then becomes the real decision).\n"
        )
        summary += (
            " No column is the real model's `dynfacerestore` NFE: that is column A with `--profile real`."
        )
        if column_a is None:
            a_line = "- A (the pipeline's decision) skipped in this run (`--skip-pipeline`).\n"
        else:
            assert a_ratio is not None
            a_meaning = (
                f"- **{column_a.name}** — the pipeline's real decision code (`_guide`) with the **tiny "
                "profile's random\n  restorer**. It exercises the code path; its numbers say nothing about "
                "the real model.\n" + a_meaning
            )
            a_line = (
                f"- A (tiny profile, random restorer — **not** a real-model number): {chosen('a_pipeline')}; "
                f"mixed-set ratio {a_ratio:.2f}×.\n"
            )
            verdicts.append(
                f"- A (tiny pipeline): {verdict(a_ratio)}, but **not a real-model number** (random restorer)."
            )
    return (
        head
        + f"""- set: {n_images} real aligned faces (`{shown(ALIGNED)}`, sorted, first {n_images}) ×
  {len(levels)} levels ({", ".join(levels)}) × {args.per_image} draw(s), seed {args.seed} →
  {len(rows)} degraded faces (`models.degradations.severity_set`); run took {seconds:.0f} s.
- pipeline (baseline check, NFE count, column A): {pipeline}.
- DSST table: `models/data/dsst_default.json`, σk → start = {
            dict(zip(table.sigmas, table.start_indices, strict=True))
        } (analytic builder, P_face from
  the same low-quality test faces; not validated empirically). Baseline start checked through
  `RestorationPipeline._guide(mode="difface")`: {base}.
- NFE counts UNet evaluations only (= start index: {checked}). Besides the UNet, the baseline runs the
  restorer R once per face, and so does `dynfacerestore` with the training-free DBLM (as here) or a
  trained DGSA; with a trained DBLM and the training-free DGSA it does not run R at all
  (`RestorationPipeline._guide`). `dynfacerestore` also computes the DGSA map (a trained DGSA: one
  more small network forward).

What each column means — read before quoting a number:
- **B: known σ** — DSST table at the degradation's true kernel blur √(σx·σy). Ground-truth input to the
  table; ignores the resampling blur, noise and JPEG. Not what the deployed pipeline decides.
- **C: σ̂ of input** — the pipeline's blur estimator (fallback rule) on the *degraded input y* rather than
  on R(y), then the table. Outside the estimator's domain: it fits a noise-free blurred face (what R(y)
  should be); on y, noise and the JPEG block error (mid-frequency, above the 0.4–0.5 cycles/px band the
  estimator takes as the noise floor; a quality-100 JPEG of a σ = 8 px blur alone reads 0 px) flatten the
  spectrum against P_face, so σ̂ reads about 0 px even at the extreme level. **C understates the NFE of
  heavy faces**; it is not the deployed pipeline's NFE.
- **D: σ̂ of blur only** — the same estimator on the clean face blurred by the same kernel only (no
  resampling, noise or JPEG): whether the estimator sees the kernel itself. σ̂ columns give the median
  estimate in px at 512 (clamped to 8 px).
{a_meaning}
{chr(10).join(lines)}

Cells: mean NFE per face (ratio to the baseline). Starts chosen — B: {chosen("b_known")}; C: {
            chosen("c_input")
        }; D: {chosen("d_blur_only")}.
{a_line}
Issue 8 target: mixed-set NFE ≤ {TARGET}× the baseline's. Per column:
{chr(10).join(verdicts)}

{summary}

{figure_link("NFE per face by level", FIGURE.name)}
"""
    )


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20, help="aligned faces to use (of 20)")
    p.add_argument("--per-image", type=int, default=1, help="draws per face and level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=4, help="faces per restorer forward in column A")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--profile", choices=sorted(PROFILES), help="default: real on CUDA, tiny on CPU")
    p.add_argument(
        "--weights-dir",
        type=Path,
        default=WEIGHTS,
        help="the real profile's released weights, and the detector's",
    )
    p.add_argument(
        "--skip-pipeline", action="store_true", help="skip column A (the pipeline's restorer on every face)"
    )
    p.add_argument(
        "--no-write", action="store_true", help="print, do not write docs/benchmarks.md or the figure"
    )
    args = p.parse_args(argv)
    device = parse_device(p, args.device)
    profile = PROFILES[args.profile or default_profile(device)]
    wdir = args.weights_dir
    if profile.real and weights.missing_for(profile_weights(profile, wdir), wdir):
        p.error(
            f"--profile real needs the real profile's released weights, which are not in {wdir}: pass "
            "--weights-dir (`dynface weights pull` fetches them)"
        )
    if not args.no_write:
        pyplot()
    # Before the run, as every bench: the date and how busy the CPUs were are the start's.
    head = header("Steps: NFE per face, dynfacerestore vs difface", device)
    t0 = time.perf_counter()
    images = load_faces(args.images)
    print(f"degrading {len(images)} faces × {len(SEVERITY_LEVELS)} levels", flush=True)
    faces = severity_set(images, seed=args.seed, per_image=args.per_image)
    pipe = RestorationPipeline.from_pretrained(
        profile.name, weights_dir=wdir, max_batch=args.batch, device=device, dtype="auto"
    )
    column_a = ColumnA.of(pipe)
    rows = decide(pipe, pipe.dsst, faces, images, args.batch, with_pipeline=not args.skip_pipeline)
    starts = {r.baseline for r in rows} | {r.b_known for r in rows} | {r.c_input for r in rows}
    starts |= {r.d_blur_only for r in rows} | {r.a_pipeline for r in rows if r.a_pipeline is not None}
    nfe_counted = count_nfe(pipe, sorted(starts))
    levels = list(SEVERITY_LEVELS)
    shown_a = None if args.skip_pipeline else column_a
    pipeline = (
        f'`RestorationPipeline.from_pretrained("{profile.name}")` on `{device}`, dtype {pipe.dtype_name}, '
        f"{column_a.weights}"
    )
    seconds = time.perf_counter() - t0
    body = report(head, rows, levels, shown_a, args, len(images), seconds, nfe_counted, pipe.dsst, pipeline)
    if args.no_write:
        print(body)
        return
    plot(rows, levels, shown_a)
    write_section("steps", body)


if __name__ == "__main__":
    main()
