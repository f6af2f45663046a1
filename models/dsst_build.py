"""`dynface dsst build`: a DSST table (models.dsst) from a folder of clean aligned faces.

Reads the faces, measures P_face on them (`face_power_spectrum`), runs the analytic builder or the sweep
on the pipeline's own sampler, and writes the table as JSON with its provenance: the command line that
rebuilds it.
"""

from __future__ import annotations

import argparse
import itertools
import math
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm import tqdm

from models import images
from models.blur import RadialSpectrum, radial_profiles
from models.cli import output_file_problem, write_atomically
from models.dsst import LPIPS_WEIGHT, DSSTable, build_analytic, check_sigmas, sweep_table
from models.evaluate import device_problem
from models.schedule import RespacedSchedule

if TYPE_CHECKING:
    from models.pipeline import RestorationPipeline

FACE_SUFFIXES = {".png", ".jpg", ".jpeg"}
#: Options that only the sweep uses (`--method sweep`), by their flag.
SWEEP_OPTIONS = {
    "candidates": "--candidates",
    "eta": "--eta",
    "seed": "--seed",
    "lpips_weight": "--lpips-weight",
    "device": "--device",
}


def load_face(path: Path, image_size: int) -> Tensor:
    """One aligned image_size² face as (1, 3, S, S) float64 in [-1, 1]; any other size is an error.

    Decoded as the service decodes uploads (`images.load_rgb`): P_face is measured on the pixels the
    pipeline restores, not on a 16-bit face clipped to white or a face lying on its side."""
    rgb = images.load_rgb(path, max_pixels=images.FACE_FILE_MAX_PIXELS)
    height, width = rgb.shape[:2]
    if (width, height) != (image_size, image_size):
        raise ValueError(f"{path} is {width}×{height}, expected aligned {image_size}² faces")
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].to(torch.float64) / 127.5 - 1.0


def face_power_spectrum(paths: Sequence[Path], image_size: int) -> RadialSpectrum:
    """P_face: the mean radial power spectrum of aligned image_size² faces (in [-1, 1]).

    One face at a time: a 512 face's spectrum is taken on a 1024² grid in float64.
    """
    if not paths:
        raise ValueError("no faces to measure P_face on")
    freqs, total = None, None
    # disable=None: a bar on a terminal only, not in logs.
    for path in tqdm(paths, desc="P_face", unit="face", disable=None):
        freqs, power = radial_profiles(load_face(path, image_size))
        total = power[0] if total is None else total + power[0]
    assert freqs is not None and total is not None
    return RadialSpectrum(freqs=freqs, power=total / len(paths))


def cli_build(args: argparse.Namespace) -> int:
    from models.profiles import PROFILES

    # Before any face is read or model loaded: a usage error costs nothing, and the table is never
    # built for nothing (an --out that cannot be written failed only after all the work).
    if args.prior not in ("real", "tiny") and not Path(args.prior).is_dir():  # as from_pretrained reads it
        print(
            f"error: --prior must be real, tiny or an existing weights directory, got {args.prior!r}",
            file=sys.stderr,
        )
        return 2
    profile = PROFILES["tiny" if args.prior == "tiny" else "real"]
    schedule = RespacedSchedule.from_spec(profile.method.respacing)
    given = {flag for name, flag in SWEEP_OPTIONS.items() if getattr(args, name) is not None}
    if args.method == "analytic" and given:
        print(f"error: {', '.join(sorted(given))} only apply to --method sweep", file=sys.stderr)
        return 2
    if args.method == "sweep" and args.heaviest_start is not None:
        print(
            "error: --heaviest-start only applies to --method analytic (sweep: --candidates)", file=sys.stderr
        )
        return 2
    if args.method == "sweep" and args.max_faces is None:
        print(
            "error: --method sweep needs --max-faces N (e.g. 100): it holds all N faces and their "
            "restorations in memory and samples every (level, candidate) on all of them",
            file=sys.stderr,
        )
        return 2
    problem = (
        _bad_numbers(args, len(schedule))
        or output_file_problem("--out", args.out, "dsst.json")
        or device_problem(args.device)
    )
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    paths = sorted(p for p in args.faces.rglob("*") if p.suffix.lower() in FACE_SUFFIXES)[: args.max_faces]
    if not paths:
        print(f"error: no *.png / *.jpg faces under {args.faces}", file=sys.stderr)
        return 2
    sigmas = tuple(args.sigmas) if args.sigmas else profile.method.sigmas
    options: list[tuple[str, object]] = [
        ("--method", args.method),
        ("--prior", args.prior),
        ("--faces", args.faces),
        ("--out", args.out),
        ("--sigmas", sigmas),
        ("--max-faces", args.max_faces),
        ("--note", args.note),
    ]
    build: Callable[[RadialSpectrum, str], DSSTable]
    if args.method == "analytic":
        heaviest = profile.method.baseline_start_index if args.heaviest_start is None else args.heaviest_start
        options.append(("--heaviest-start", heaviest))

        def build(spectrum: RadialSpectrum, provenance: str) -> DSSTable:
            return build_analytic(schedule, spectrum, sigmas, heaviest, image_size=512, provenance=provenance)

    else:
        # Every 10th index up to DifFace's start: NFE never exceeds the baseline's, as in the analytic table.
        candidates = tuple(args.candidates or range(10, profile.method.baseline_start_index + 1, 10))
        options += [
            ("--candidates", candidates),
            ("--eta", args.eta),
            ("--seed", args.seed),
            ("--lpips-weight", args.lpips_weight),
        ]

        def build(spectrum: RadialSpectrum, provenance: str) -> DSSTable:
            return _sweep(args, paths, sigmas, candidates, spectrum, provenance)

    provenance = (
        (f"{args.note} " if args.note else "")
        + f"P_face = mean radial power spectrum of {len(paths)} aligned 512px faces from {args.faces} "
        f"(prior {args.prior!r}). Built with: dynface dsst build {_command_line(options)}"
    )
    try:
        table = build(face_power_spectrum(paths, 512), provenance)
    except ValueError as e:  # faces of the wrong size, or flat ones
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:  # the prior's or LPIPS's weights
        print(f"error: {e}", file=sys.stderr)
        return 1
    write_atomically(args.out, (table.to_json() + "\n").encode("utf-8"))
    how = f"tau {table.tau:.4g}" if table.tau is not None else "by the sweep"
    print(f"wrote {args.out}: sigmas {table.sigmas} -> start indices {table.start_indices} ({how})")
    return 0


def _bad_numbers(args: argparse.Namespace, schedule_length: int) -> str | None:
    """What is wrong with `dsst build`'s numeric options (None if nothing), checked before any face is
    read or any model loaded; a start index is one of the prior's schedule, 1..schedule_length − 1."""
    starts = f"1..{schedule_length - 1}"
    if args.sigmas is not None:
        try:
            check_sigmas(args.sigmas)
        except ValueError as e:
            return f"--sigmas: {e}"
    if args.max_faces is not None and args.max_faces < 1:
        return f"--max-faces must be ≥ 1, got {args.max_faces}"
    if args.heaviest_start is not None and not 1 <= args.heaviest_start < schedule_length:
        return f"--heaviest-start must be a start index in {starts}, got {args.heaviest_start}"
    if args.candidates is not None and not all(1 <= c < schedule_length for c in args.candidates):
        return f"--candidates must be start indices in {starts}, got {args.candidates}"
    if args.eta is not None and not 0 <= args.eta <= 1:  # DDIM's eta; NaN fails too
        return f"--eta must be in [0, 1], got {args.eta}"
    if args.lpips_weight is not None and not (math.isfinite(args.lpips_weight) and args.lpips_weight >= 0):
        return f"--lpips-weight must be a number ≥ 0, got {args.lpips_weight}"
    return None


def _command_line(options: Sequence[tuple[str, object]]) -> str:
    """The options as a shell command line (tuples as several words; None left out)."""
    words: list[str] = []
    for flag, value in options:
        if value is not None:
            words += [flag, *map(str, value)] if isinstance(value, tuple) else [flag, str(value)]
    return shlex.join(words)


def _sweep(
    args: argparse.Namespace,
    paths: Sequence[Path],
    sigmas: Sequence[float],
    candidates: Sequence[int],
    spectrum: RadialSpectrum,
    provenance: str,
) -> DSSTable:
    """`--method sweep`: the prior's pipeline, the faces, the LPIPS scorer (unless weight 0), the sweep."""
    from models.evaluate import Unavailable, lpips_metric
    from models.pipeline import DIFFACE_DEFAULT_ETA, RestorationPipeline

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    weight = LPIPS_WEIGHT if args.lpips_weight is None else args.lpips_weight
    perceptual = None
    if weight > 0:
        try:
            metric = lpips_metric(device)  # `dynface eval`'s LPIPS (AlexNet), on [0, 1] images
        except Unavailable as e:
            raise FileNotFoundError(
                f"the sweep's score needs LPIPS: {e}; or --lpips-weight 0 (PSNR only)"
            ) from e

        def perceptual(restored: Tensor, x: Tensor) -> Tensor:
            # Face by face: AlexNet on all N faces at once would need memory in proportion to N.
            pairs = zip((restored + 1) / 2, (x + 1) / 2, strict=True)
            return torch.tensor([metric(r[None], t[None]) for r, t in pairs])

    pipe = RestorationPipeline.from_pretrained(args.prior, device=device)
    _print_sweep_progress(pipe, len(paths), len(sigmas) * len(candidates))
    faces = torch.cat([load_face(p, 512).float() for p in paths])
    return sweep_table(
        pipe,
        faces,
        sigmas,
        candidates,
        face_power_spectrum=spectrum,
        eta=DIFFACE_DEFAULT_ETA if args.eta is None else args.eta,
        seed=args.seed or 0,
        perceptual=perceptual,
        perceptual_weight=weight,
        provenance=provenance,
    )


def _print_sweep_progress(pipe: RestorationPipeline, faces: int, runs: int) -> None:
    """Print a line to stderr as each of the sweep's `runs` (level, candidate) pairs begins: on real
    faces the sweep runs for hours, and `sweep_table` reports nothing before it ends. It calls
    `pipe.sample_at_level` once per `pipe.max_batch` of the `faces`, run after run, so counting those
    calls on this pipeline tells which run begins."""
    sample = pipe.sample_at_level
    calls_per_run = math.ceil(faces / pipe.max_batch)
    calls = itertools.count()

    def counted(estimate: Tensor, sigma: float, start: int, *, eta: float, seed: int) -> Tensor:
        call = next(calls)
        if call % calls_per_run == 0:
            run = call // calls_per_run + 1
            print(f"sweep {run}/{runs}: sigma {sigma:g}, start {start}", file=sys.stderr, flush=True)
        return sample(estimate, sigma, start, eta=eta, seed=seed)

    pipe.sample_at_level = counted  # type: ignore[method-assign]
