"""Gaussian-prior oracle shared by the sampler/guidance/DSST tests.

Data x0 = μ + F⁻¹(√S · F w) on a periodic H×W single-channel image (w white, F the orthonormal 2-D DFT),
i.e. x0 ~ N(μ, Σ) with Σ diagonal in the DFT basis with eigenvalues S(ω). Everything a diffusion sampler
needs is then closed-form per frequency: the exact MMSE denoiser E[x0 | x_t], hence the exact ε, and the
exact law of the *discretised* DDIM chain driven by that denoiser (a scalar linear-Gaussian recursion
per frequency), so the sampler's Monte-Carlo statistics can be checked against numbers computed without
the sampler's code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from models.blur import RadialSpectrum
from models.schedule import RespacedSchedule, linear_betas


@dataclass(frozen=True)
class GaussianPrior:
    """Stationary Gaussian prior with a radial spectrum S(f) = amplitude / (1 + (f/f0)²)^(exponent/2)."""

    size: int = 16
    amplitude: float = 0.05
    f0: float = 0.15
    exponent: float = 1.0
    mean_amplitude: float = 0.2

    def spectrum_fn(self, f: Tensor) -> Tensor:
        """S at radial frequency f (cycles/pixel)."""
        return self.amplitude / (1.0 + (f / self.f0) ** 2) ** (self.exponent / 2)

    @property
    def spectrum(self) -> Tensor:
        """S on the H×W DFT grid, float64 (H, W)."""
        f = torch.fft.fftfreq(self.size, dtype=torch.float64)
        return self.spectrum_fn(torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2))

    @property
    def mean(self) -> Tensor:
        """μ: a smooth pattern (1, 1, H, W), so the mean path is exercised too."""
        n = torch.arange(self.size, dtype=torch.float64)
        wave = torch.cos(2 * math.pi * n / self.size)
        return (self.mean_amplitude * wave[:, None] * wave[None, :]).reshape(1, 1, self.size, self.size)

    def radial_spectrum(self) -> RadialSpectrum:
        """S as a radial profile in the normalisation of models.blur (per-pixel power)."""
        freqs = torch.linspace(0.0, 0.75, 301, dtype=torch.float64)
        return RadialSpectrum(freqs=freqs, power=self.spectrum_fn(freqs))

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        w = torch.randn(n, 1, self.size, self.size, generator=generator, dtype=torch.float64)
        return self.mean + torch.fft.ifft2(self.spectrum.sqrt() * torch.fft.fft2(w)).real

    def posterior_mean(self, x_t: Tensor, abar: float) -> Tensor:
        """E[x0 | x_t] for x_t = √ᾱ x0 + √(1−ᾱ) ε: per frequency √ᾱS/(ᾱS + 1 − ᾱ) on x_t − √ᾱ μ."""
        gain = math.sqrt(abar) * self.spectrum / (abar * self.spectrum + 1.0 - abar)
        centred = x_t - math.sqrt(abar) * self.mean
        return self.mean + torch.fft.ifft2(gain * torch.fft.fft2(centred)).real

    def eps_model(self, num_timesteps: int = 1000) -> Callable[[Tensor, Tensor], Tensor]:
        """The exact ε-predictor E[ε | x_t], called like the UNet with original timesteps (N,)."""
        base = torch.cumprod(1.0 - linear_betas(num_timesteps), dim=0)

        def eps(x_t: Tensor, t: Tensor) -> Tensor:
            abar = float(base[int(t[0])])
            assert bool((t == t[0]).all())
            x0 = self.posterior_mean(x_t.double(), abar)
            return ((x_t.double() - math.sqrt(abar) * x0) / math.sqrt(1.0 - abar)).to(x_t.dtype)

        return eps

    def chain_law(self, schedule: RespacedSchedule, start_index: int, eta: float) -> tuple[Tensor, Tensor]:
        """Exact output law of DDIM with this denoiser, started from N(0, I) at `start_index`.

        Returns (mean gain c, variance v) per frequency (H, W): the output's DFT has mean c·F(μ) and
        (orthonormal-DFT) variance v. Mirrors the DDIM update, one scalar recursion per frequency.
        """
        s = self.spectrum
        m = torch.zeros_like(s)  # mean of the state, in units of F(μ)
        v = torch.ones_like(s)
        for i in range(start_index - 1, -1, -1):
            ab = float(schedule.alphas_cumprod[i])
            abp = 1.0 if i == 0 else float(schedule.alphas_cumprod[i - 1])
            k = math.sqrt(ab) * s / (ab * s + 1.0 - ab)  # x̂0 = μ + k (x_t − √ᾱ μ)
            sig = eta * math.sqrt((1 - abp) / (1 - ab)) * math.sqrt(1 - ab / abp)
            c = math.sqrt(max(1 - abp - sig**2, 0.0)) / math.sqrt(1 - ab)
            # x_prev = √ᾱp x̂0 + c (x_t − √ᾱ x̂0) + σ z, linear in x_t and μ
            a_x = math.sqrt(abp) * k + c * (1 - math.sqrt(ab) * k)
            a_mu = (math.sqrt(abp) - c * math.sqrt(ab)) * (1 - math.sqrt(ab) * k)
            m = a_x * m + a_mu
            v = a_x**2 * v + (sig**2 if i > 0 else 0.0)
        return m, v
