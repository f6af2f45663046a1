"""DSST — the Dynamic Starting Step lookup table (method.md §4, our formulation).

For each blur level σk the table gives the respaced DDIM index to start from: the input ŷ^σk is noised
with q_sample at that index and denoised down to 0, so NFE = start index. Two builders write the same
table: `build_analytic` (closed form over the face power spectrum, τ calibrated to DifFace's start) and
`build_empirical` (sweep on validation pairs with ground truth; `sweep_table` runs it on the pipeline's
own sampler). The table also carries P_face, the face power spectrum that the fallback blur estimate
(`models.blur.estimate_blur_sigma`) needs. No file I/O here but reading the packaged default table:
measuring P_face on face images and the `dynface dsst build` command are in `models.dsst_build`.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from models.blur import RadialSpectrum, gaussian_blur, gaussian_otf
from models.schedule import RespacedSchedule

if TYPE_CHECKING:  # the pipeline imports this module
    from models.pipeline import RestorationPipeline

DIFFACE_START_INDEX = 100
"""DifFace's fixed start (respaced ddim250 index 100 ≈ t=400): the baseline and the heaviest level's start."""

FORMAT = "dynface-dsst/1"

LPIPS_WEIGHT = 20.0
"""The empirical score's dB per LPIPS unit (ours: a 0.05 LPIPS change counts like 1 dB of PSNR)."""


@dataclass(frozen=True)
class DSSTable:
    """Blur levels (px at `image_size`, increasing) → respaced start indices (non-decreasing, each in
    1..len(schedule) − 1 of the schedule named by `schedule_spec` and `num_timesteps`).

    `tau` is the analytic builder's calibrated threshold (None for an empirical table);
    `face_power_spectrum` is P_face; `provenance` says how, from what and with which command it was built.
    """

    sigmas: tuple[float, ...]
    start_indices: tuple[int, ...]
    tau: float | None
    face_power_spectrum: RadialSpectrum
    schedule_spec: str = "ddim250"
    num_timesteps: int = 1000
    image_size: int = 512
    method: str = "analytic"
    provenance: str = ""

    def __post_init__(self) -> None:
        if len(self.sigmas) != len(self.start_indices) or not self.sigmas:
            raise ValueError("sigmas and start_indices must be non-empty and of equal length")
        check_sigmas(self.sigmas)
        if any(b < a for a, b in zip(self.start_indices, self.start_indices[1:], strict=False)):
            raise ValueError(f"a heavier blur may not start earlier: {self.start_indices}")
        # Checked here, at load, not per request: an index past the schedule fails inside q_sample (an
        # IndexError that would end a whole batch), and 0 would run no sampling step at all.
        check_start_indices(self.start_indices, len(self.schedule()), f"DSST table ({self.schedule_spec})")

    def level_for(self, sigma: float) -> float:
        """The blur level used for an estimated blur σ̂: the smallest σk ≥ σ̂ (the heaviest if none)."""
        return self.sigmas[self._level(sigma)]

    def start_index_for(self, sigma: float) -> int:
        """Start index for an estimated blur σ̂, via `level_for`'s rule (method.md §3)."""
        return self.start_indices[self._level(sigma)]

    def _level(self, sigma: float) -> int:
        for k, s in enumerate(self.sigmas):
            if s >= sigma - 1e-9:
                return k
        return len(self.sigmas) - 1

    def schedule(self) -> RespacedSchedule:
        """The schedule whose respaced indices the table refers to."""
        return RespacedSchedule.from_spec(self.schedule_spec, num_timesteps=self.num_timesteps)

    def to_json(self) -> str:
        """Serialise (floats written with repr, so a round trip is exact)."""
        return json.dumps(
            {
                "format": FORMAT,
                "method": self.method,
                "sigmas": list(self.sigmas),
                "start_indices": list(self.start_indices),
                "tau": self.tau,
                "schedule": {"spec": self.schedule_spec, "num_timesteps": self.num_timesteps},
                "image_size": self.image_size,
                "provenance": self.provenance,
                "face_power_spectrum": {
                    "freqs": self.face_power_spectrum.freqs.tolist(),
                    "power": self.face_power_spectrum.power.tolist(),
                },
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> DSSTable:
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} table: format={data.get('format')!r}")
        spectrum = data["face_power_spectrum"]
        return cls(
            sigmas=tuple(float(s) for s in data["sigmas"]),
            start_indices=tuple(int(i) for i in data["start_indices"]),
            tau=None if data["tau"] is None else float(data["tau"]),
            face_power_spectrum=RadialSpectrum(
                freqs=torch.tensor(spectrum["freqs"], dtype=torch.float64),
                power=torch.tensor(spectrum["power"], dtype=torch.float64),
            ),
            schedule_spec=data["schedule"]["spec"],
            num_timesteps=int(data["schedule"]["num_timesteps"]),
            image_size=int(data["image_size"]),
            method=data["method"],
            provenance=data["provenance"],
        )


def check_start_indices(starts: Sequence[int], schedule_length: int, what: str) -> None:
    """ValueError unless every start is a respaced index with at least one sampling step: 1..length − 1.

    Start i runs DDIM steps i−1 … 0, so start 0 would return the noised estimate with neither a prior
    step nor guidance; `what` names the indices in the message.
    """
    bad = [int(i) for i in starts if not 1 <= int(i) < schedule_length]
    if bad:
        raise ValueError(
            f"{what} start indices must be in 1..{schedule_length - 1} (respaced indices of a "
            f"{schedule_length}-step schedule; 0 would run no sampling step), got {bad} in "
            f"{tuple(int(i) for i in starts)}"
        )


def check_sigmas(sigmas: Sequence[float]) -> tuple[float, ...]:
    """The blur levels as floats; ValueError unless they are finite, positive and strictly increasing."""
    sigmas = tuple(float(s) for s in sigmas)
    if not sigmas or not all(math.isfinite(s) and s > 0 for s in sigmas):
        raise ValueError(f"blur levels must be positive numbers of px, got {sigmas}")
    if any(b <= a for a, b in itertools.pairwise(sigmas)):
        raise ValueError(f"blur levels must be strictly increasing, got {sigmas}")
    return sigmas


def blur_distortion(face_power_spectrum: RadialSpectrum, sigma: float, image_size: int) -> float:
    """E_ω[|1 − F G_σ(ω)|² P_face(ω)] over the 2S×2S grid of an S×S image (the boundary rule's grid).

    By Parseval this is the expected per-pixel squared difference between a face and its blurred copy.
    """
    n = 2 * image_size
    otf = gaussian_otf(sigma, n, n)
    return float(((1.0 - otf) ** 2 * face_power_spectrum.on_grid(n, n)).mean())


def build_analytic(
    schedule: RespacedSchedule,
    face_power_spectrum: RadialSpectrum,
    sigmas: Sequence[float],
    heaviest_start: int = DIFFACE_START_INDEX,
    *,
    image_size: int = 512,
    provenance: str = "",
) -> DSSTable:
    """Start index i*(σk) = smallest i ≥ 1 with ᾱ_i·D(σk) ≤ τ·(1 − ᾱ_i), D = `blur_distortion` (method.md §4).

    ᾱ/(1−ᾱ) falls with i, so i* is where the noise first hides the blur difference. τ is calibrated so
    the heaviest level lands exactly on `heaviest_start` (DifFace's 100): τ = D_max·√(snr_h·snr_{h−1}),
    the geometric middle of the admissible interval [D_max·snr_h, D_max·snr_{h−1}), so no rounding can
    move it. Lighter levels have smaller D and hence start earlier; NFE never exceeds the baseline.
    """
    sigmas = check_sigmas(sigmas)
    if not 1 <= heaviest_start < len(schedule):
        raise ValueError(f"heaviest_start must be in 1..{len(schedule) - 1}")
    abar = schedule.alphas_cumprod
    snr = abar / (1.0 - abar)
    dist = [blur_distortion(face_power_spectrum, s, image_size) for s in sigmas]
    d_max = max(dist)
    if d_max <= 0:  # τ would be 0 and every level start at 0
        raise ValueError("the faces' spectrum has no power that a blur removes (flat images?)")
    tau = d_max * math.sqrt(float(snr[heaviest_start]) * float(snr[heaviest_start - 1]))
    # At least 1: a blur so light that index 0 already hides it (σ ≲ 0.1 px) would otherwise start at 0,
    # which runs no sampling step and so neither the prior nor the guidance (the output would be the
    # estimate plus index-0 noise). One step is the least that restores anything.
    starts = tuple(max(1, int(torch.nonzero(abar * d <= tau * (1.0 - abar))[0])) for d in dist)
    # Invariants, not input checks: D grows with σ (sigmas checked above) and τ is calibrated on it.
    assert all(b >= a for a, b in itertools.pairwise(starts)), starts
    assert starts[-1] == heaviest_start, (starts, heaviest_start)
    note = (
        f"tau calibrated so the heaviest level (sigma={sigmas[-1]:g}) starts at index {heaviest_start} of "
        f"{schedule.spec}; " + ", ".join(f"D({s:g})={d:.4g}" for s, d in zip(sigmas, dist, strict=True))
    )
    return DSSTable(
        sigmas=sigmas,
        start_indices=starts,
        tau=tau,
        face_power_spectrum=face_power_spectrum,
        schedule_spec=schedule.spec,
        num_timesteps=schedule.num_timesteps,
        image_size=image_size,
        method="analytic",
        provenance=f"{provenance}\nanalytic: {note}; tau={tau:.6g}".strip(),
    )


def psnr(restored: Tensor, target: Tensor) -> Tensor:
    """Per-image PSNR (dB) of (N, C, H, W) images in [-1,1] (peak-to-peak range 2)."""
    mse = ((restored.double() - target.double()) ** 2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(4.0 / mse.clamp(min=1e-12))


def build_empirical(
    restore_fn: Callable[[Tensor, float, int], Tensor],
    pairs: Sequence[tuple[Tensor, Tensor]],
    sigmas: Sequence[float],
    candidate_indices: Sequence[int],
    *,
    face_power_spectrum: RadialSpectrum,
    schedule_spec: str = "ddim250",
    num_timesteps: int = 1000,
    image_size: int = 512,
    perceptual: Callable[[Tensor, Tensor], Tensor] | None = None,
    perceptual_weight: float = LPIPS_WEIGHT,
    provenance: str = "",
) -> DSSTable:
    """Pick each level's start by sweeping `candidate_indices` on validation pairs (y, x_gt), batches
    of (N, 3, H, W) images in [-1, 1].

    `restore_fn(y, σk, start_index) → restored` runs the whole restoration at that level and start (it
    may make the level's input from y itself, as `sweep_table` does);
    score = mean over images of PSNR(restored, x_gt) − perceptual_weight · perceptual(restored, x_gt).
    The perceptual term is injected (e.g. LPIPS, lower is better; per image (N,), or the batch's mean);
    by default it is absent and the score is PSNR only. Ties keep the smaller index (fewer NFE). A
    heavier level never starts earlier than a lighter one (running maximum), so noise in a small sweep
    cannot invert the table.
    """
    sigmas = check_sigmas(sigmas)  # before the sweep, which the table's own check would follow
    candidates = sorted(int(i) for i in candidate_indices)
    if not candidates:
        raise ValueError("no candidate start indices to sweep")
    length = len(RespacedSchedule.from_spec(schedule_spec, num_timesteps=num_timesteps))
    check_start_indices(candidates, length, "candidate")  # likewise before the sweep
    images = sum(len(x) for _, x in pairs)
    best, lines = [], []
    for sigma in sigmas:
        scores = []
        for start in candidates:
            per_image = []
            for y, x in pairs:
                restored = restore_fn(y, sigma, start)
                score = psnr(restored, x)
                if perceptual is not None:
                    score = score - perceptual_weight * perceptual(restored, x).double()
                per_image.append(score.expand(len(x)))
            scores.append(float(torch.cat(per_image).mean()))
        best.append(candidates[max(range(len(candidates)), key=lambda k, s=scores: (s[k], -k))])
        lines.append(
            f"sigma={sigma:g}: " + ", ".join(f"{i}:{s:.3f}" for i, s in zip(candidates, scores, strict=True))
        )
    starts = []
    for b in best:
        starts.append(max(b, starts[-1]) if starts else b)
    scorer = "PSNR" if perceptual is None else f"PSNR - {perceptual_weight:g}*perceptual"
    return DSSTable(
        sigmas=sigmas,
        start_indices=tuple(starts),
        tau=None,
        face_power_spectrum=face_power_spectrum,
        schedule_spec=schedule_spec,
        num_timesteps=num_timesteps,
        image_size=image_size,
        method="empirical",
        provenance=f"{provenance}\nempirical ({images} validation faces, score {scorer}):\n"
        + "\n".join(lines),
    )


def sweep_table(
    pipe: RestorationPipeline,
    faces: Tensor,
    sigmas: Sequence[float],
    candidate_indices: Sequence[int],
    *,
    face_power_spectrum: RadialSpectrum,
    eta: float,
    seed: int = 0,
    perceptual: Callable[[Tensor, Tensor], Tensor] | None = None,
    perceptual_weight: float = LPIPS_WEIGHT,
    provenance: str = "",
) -> DSSTable:
    """The empirical DSST (method.md §4) on the pipeline's own sampler, scored by `build_empirical`.

    For each level σk the clean validation faces x ((N, 3, 512, 512) in [-1, 1]) are blurred to that
    level, ŷ^σk = G_σk * x with the very Gaussian the guidance assumes (our choice of degradation: an
    exact DBLM output, so the sweep measures the start step alone, not the DBLM's error), then restored
    by `pipe.sample_at_level` from every candidate start, `pipe.max_batch` faces at a time, at DDIM
    `eta`. Face k always draws its noise from seed + k: candidates differ in their start only.
    """

    def restore(x: Tensor, sigma: float, start: int) -> Tensor:
        out = []
        for first in range(0, len(x), pipe.max_batch):
            chunk = x[first : first + pipe.max_batch].to(pipe.device)
            estimate = gaussian_blur(chunk, sigma)
            restored = pipe.sample_at_level(estimate, sigma, start, eta=eta, seed=seed + first)
            out.append(restored.clamp(-1, 1).cpu())  # what a user gets (the output is 8-bit)
        return torch.cat(out)

    return build_empirical(
        restore,
        [(faces, faces)],
        sigmas,
        candidate_indices,
        face_power_spectrum=face_power_spectrum,
        schedule_spec=pipe.schedule.spec,
        num_timesteps=pipe.schedule.num_timesteps,
        image_size=512,
        perceptual=perceptual,
        perceptual_weight=perceptual_weight,
        provenance=f"{provenance}\nsweep: faces blurred to each level (G_sigma * x), DDIM eta {eta:g}, "
        f"seed {seed}, the pipeline's sampler and training-free DGSA map".strip(),
    )


@lru_cache(maxsize=1)
def default_table() -> DSSTable:
    """The shipped table, models/data/dsst_default.json (its provenance holds the command that built it)."""
    text = resources.files("models").joinpath("data", "dsst_default.json").read_text(encoding="utf-8")
    return DSSTable.from_json(text)
