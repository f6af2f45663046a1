"""Gaussian blur with the one boundary rule dynface uses everywhere, plus face power spectra.

Boundary rule (used by `gaussian_blur`, the closed-form guidance in `guidance.py`, power spectra and the
blur estimate): an H×W image is extended *half-sample symmetrically* (mirrored with the edge row/column
repeated, numpy's "symmetric" mode) to its full 2H×2W period, blurred there by circular convolution in
the Fourier domain, and cropped back to the top-left H×W. Compared with a plain FFT this removes the
wrap-around seam (opposite edges never mix); compared with "reflect-pad by ⌈4σ⌉, FFT, crop" it agrees
away from the border and has one decisive property: the blur is then a fixed linear operator A whose
least-squares problems are solved *exactly* by a pointwise Fourier division on the 2H×2W grid (every
pixel appears exactly twice in the extension, and the symmetric kernel maps symmetric signals to
symmetric signals), so `guidance.closed_form_x0` is the true minimiser, not an approximation of it.

The Gaussian is defined by its frequency response exp(-2π²σ²|f|²) (f in cycles/pixel) rather than by a
truncated sampled kernel: it is real, even and has unit DC gain, and Gaussians compose exactly,
G_a * G_b = G_√(a²+b²), which the DBLM fallback (ŷ^σk = G_√(σk²-σ̂²) * R(y)) relies on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def work_dtype(x: Tensor) -> torch.dtype:
    """FFT working precision: half types are lifted to float32 (cuFFT half needs power-of-2 sizes and
    its rounding would swamp the deconvolution); float32/float64 are kept."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def symmetric_extend(x: Tensor) -> Tensor:
    """(…, H, W) → (…, 2H, 2W): half-sample symmetric extension to one full period (see module doc)."""
    x = torch.cat([x, x.flip(-1)], dim=-1)
    return torch.cat([x, x.flip(-2)], dim=-2)


def _as_sigma(sigma: float | Tensor, dtype: torch.dtype, device: torch.device | None) -> Tensor:
    """σ as a tensor broadcastable over (N, C, h, w): scalar → (), per-image (N,) → (N, 1, 1, 1)."""
    s = torch.as_tensor(sigma, dtype=dtype, device=device)
    return s.reshape(-1, 1, 1, 1) if s.dim() else s


def _otf(sigma: float | Tensor, fy: Tensor, fx: Tensor) -> Tensor:
    """exp(-2π²σ²(fy²+fx²)) on the grid spanned by the 1-D frequency vectors fy (rows) and fx (cols)."""
    s = _as_sigma(sigma, fy.dtype, fy.device)
    f2 = fy[:, None] ** 2 + fx[None, :] ** 2
    return torch.exp(-2.0 * math.pi**2 * s**2 * f2)


def gaussian_otf(
    sigma: float | Tensor,
    h: int,
    w: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """Optical transfer function of G_σ on an h×w FFT grid (torch.fft.fftfreq order).

    Real and even, so conj(OTF) = OTF. `sigma` a float → (h, w); a tensor of shape (N,) → (N, 1, h, w).
    For an H×W image under the module's boundary rule, use h = 2H, w = 2W.
    """
    fy = torch.fft.fftfreq(h, dtype=dtype, device=device)
    fx = torch.fft.fftfreq(w, dtype=dtype, device=device)
    return _otf(sigma, fy, fx)


def rfft_extended(x: Tensor) -> Tensor:
    """rfft2 of the symmetric extension of x (…, H, W) → (…, 2H, W+1), in `work_dtype(x)`."""
    return torch.fft.rfft2(symmetric_extend(x.to(work_dtype(x))))


def irfft_cropped(spectrum: Tensor, h: int, w: int) -> Tensor:
    """Inverse of `rfft_extended`: back to the 2H×2W period and crop the top-left H×W."""
    return torch.fft.irfft2(spectrum, s=(2 * h, 2 * w))[..., :h, :w]


def gaussian_otf_rfft(sigma: float | Tensor, h: int, w: int, like: Tensor) -> Tensor:
    """OTF matching `rfft_extended` of an h×w image: on the (2h, w+1) half-plane grid."""
    dt = like.real.dtype
    fy = torch.fft.fftfreq(2 * h, dtype=dt, device=like.device)
    fx = torch.fft.rfftfreq(2 * w, dtype=dt, device=like.device)
    return _otf(sigma, fy, fx)


def gaussian_blur(x: Tensor, sigma: float | Tensor) -> Tensor:
    """G_σ * x for x (N, C, H, W) under the module's boundary rule; `sigma` float or per-image (N,).

    σ = 0 is the identity. Output has x's dtype (computed in `work_dtype`).
    """
    h, w = x.shape[-2:]
    spec = rfft_extended(x)
    return irfft_cropped(spec * gaussian_otf_rfft(sigma, h, w, spec), h, w).to(x.dtype)


def compose_sigma(*sigmas: float) -> float:
    """σ of G_σ1 * G_σ2 * … : Gaussians compose by adding variances."""
    return math.sqrt(sum(s * s for s in sigmas))


def residual_sigma(target: float, current: float) -> float:
    """σ such that G_σ * G_current = G_target (the DBLM fallback's top-up blur); needs target ≥ current."""
    if target < current:
        raise ValueError(f"cannot reach blur {target} from a blurrier {current}")
    return math.sqrt(target * target - current * current)


@dataclass(frozen=True)
class RadialSpectrum:
    """A radially averaged power spectrum: `power[k]` at radial frequency `freqs[k]` (cycles/pixel).

    Normalised per pixel (|F x|² / number of FFT samples), so by Parseval its mean over a full FFT grid is
    the mean squared (zero-mean) pixel value: values do not depend on the image size. Float64, CPU.
    """

    freqs: Tensor  # (K,) increasing
    power: Tensor  # (K,)

    def __post_init__(self) -> None:
        # Checked where a spectrum is made or loaded (a DSST table file): `at` would index past the
        # end of a shorter `power`, or interpolate nonsense, for every face.
        f, p = self.freqs, self.power
        if f.ndim != 1 or p.shape != f.shape or f.numel() < 2:
            raise ValueError(
                f"a power spectrum needs ≥ 2 frequencies and one power each, got {f.shape} / {p.shape}"
            )
        if not (torch.isfinite(f).all() and torch.isfinite(p).all()) or (p < 0).any():
            raise ValueError("a power spectrum's frequencies and powers must be finite, its powers ≥ 0")
        if (f[1:] <= f[:-1]).any():
            raise ValueError("a power spectrum's frequencies must be strictly increasing")

    def at(self, r: Tensor) -> Tensor:
        """Linear interpolation at radial frequencies r (any shape); held constant beyond the ends."""
        f = self.freqs.to(r.device, r.dtype)
        p = self.power.to(r.device, r.dtype)
        r = r.clamp(f[0], f[-1])
        hi = torch.searchsorted(f, r.contiguous()).clamp(1, f.numel() - 1)
        lo = hi - 1
        t = (r - f[lo]) / (f[hi] - f[lo])
        return p[lo] + t * (p[hi] - p[lo])

    def on_grid(self, h: int, w: int) -> Tensor:
        """The profile evaluated on an h×w FFT grid (fftfreq order), float64 (h, w)."""
        fy = torch.fft.fftfreq(h, dtype=torch.float64)
        fx = torch.fft.fftfreq(w, dtype=torch.float64)
        return self.at(torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2))


def radial_profiles(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image radial power profiles of (N, C, H, W) images: (freqs (K,), power (N, K)), float64.

    Each channel's mean is removed first (the DC term says nothing about blur, and G_σ has unit DC gain),
    the FFT is taken of the symmetric extension (no seam leakage), |F x|² is averaged over channels and
    then over rings of width 1/min(H, W) cycles/pixel (two samples of the 2H×2W grid, so no ring is
    empty); `freqs` is the mean radius of each ring.
    """
    x = images.to(torch.float64)
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    he, we = 2 * x.shape[-2], 2 * x.shape[-1]
    power = (torch.fft.rfft2(symmetric_extend(x)).abs() ** 2 / (he * we)).mean(dim=1)  # (N, he, we//2+1)
    fy = torch.fft.fftfreq(he, dtype=torch.float64, device=x.device)
    fx = torch.fft.rfftfreq(we, dtype=torch.float64, device=x.device)
    r = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2).flatten()
    # rfft stores half the plane: interior columns stand for themselves and their mirror image.
    mult = torch.full((fx.numel(),), 2.0, dtype=torch.float64, device=x.device)
    mult[0] = mult[-1] = 1.0
    mult = mult.expand(he, -1).flatten()
    ring = torch.round(r * min(x.shape[-2:])).long()
    counts = torch.bincount(ring, weights=mult)
    freqs = torch.bincount(ring, weights=mult * r) / counts
    sums = torch.stack([torch.bincount(ring, weights=mult * p) for p in power.flatten(1)])
    return freqs.cpu(), (sums / counts).cpu()


def radial_power_spectrum(images: Tensor) -> RadialSpectrum:
    """Mean radial power spectrum of (N, C, H, W) images in [-1,1] (P_face when given clean faces)."""
    freqs, power = radial_profiles(images)
    return RadialSpectrum(freqs=freqs, power=power.mean(dim=0))


def estimate_blur_sigma(
    images: Tensor,
    face_power_spectrum: RadialSpectrum,
    *,
    f_min: float = 0.03,
    floor_ratio: float = 3.0,
    sigma_max: float = 8.0,
) -> Tensor:
    """Blur σ̂ (pixels) per image (N, C, H, W) in [-1,1] by fitting |F x|² ≈ c·|F G_σ|²·P_face (method.md §3).

    In log form log(S/P_face) = log c − 4π²σ²f², a straight line in f², so σ̂² = −slope/(4π²) by least
    squares over rings; the free gain c absorbs contrast differences between faces. Fitted band: from
    `f_min` (below it the face layout and lighting, not blur, dominate) up to the first ring whose power
    falls to `floor_ratio` × the noise floor (median power over 0.4–0.5 cycles/pixel): beyond that the
    spectrum is quantisation/noise, not attenuated face, and would bend the line. Result clamped to
    [0, sigma_max]. Returns float64 (N,) on the CPU.
    """
    freqs, power = radial_profiles(images)
    prior = face_power_spectrum.at(freqs)
    floor_band = (freqs >= 0.4) & (freqs <= 0.5)
    out = []
    for s in power:
        floor = s[floor_band].median()
        above = (s > floor_ratio * floor) | (freqs < f_min)
        stop = int(torch.nonzero(~above)[0]) if (~above).any() else freqs.numel()
        band = (freqs >= f_min) & (torch.arange(freqs.numel()) < stop) & (prior > 0)
        if int(band.sum()) < 3:  # nothing above the floor: blurred beyond measurement
            out.append(sigma_max)
            continue
        u = freqs[band] ** 2
        y = torch.log((s[band] - floor) / prior[band])
        slope = ((u - u.mean()) * (y - y.mean())).sum() / ((u - u.mean()) ** 2).sum()
        var = float(-slope / (4 * math.pi**2))
        out.append(math.sqrt(min(max(var, 0.0), sigma_max**2)))
    return torch.tensor(out, dtype=torch.float64)
