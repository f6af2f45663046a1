"""Blur operator and closed-form guidance: explicit-matrix solve, oracle fidelity, DGSA-map identities."""

from __future__ import annotations

import math

import pytest
import torch
from oracle import GaussianPrior

from models.blur import compose_sigma, gaussian_blur, gaussian_otf, residual_sigma
from models.guidance import GaussianGuidance, closed_form_x0, rho_at
from models.sampler import ddim_sample
from models.schedule import RespacedSchedule, q_sample


def _blur_matrix_1d(n: int, sigma: float) -> torch.Tensor:
    """The boundary rule written out as matrices: crop · circulant(Gaussian) · symmetric extension."""
    ext = torch.cat([torch.eye(n), torch.eye(n).flip(0)]).double()  # (2n, n): x0..x_{n-1}, x_{n-1}..x0
    f = torch.fft.fftfreq(2 * n, dtype=torch.float64)
    kernel = torch.fft.ifft(torch.exp(-2 * math.pi**2 * sigma**2 * f**2)).real  # periodic, even
    idx = (torch.arange(2 * n)[:, None] - torch.arange(2 * n)[None, :]) % (2 * n)
    circulant = kernel[idx]
    return (circulant @ ext)[:n]


def test_blur_and_closed_form_match_explicit_matrix_solve() -> None:
    h, w, sigma, rho = 12, 10, 1.3, 0.05
    g = torch.Generator().manual_seed(0)
    x_true = torch.rand(1, 2, h, w, generator=g, dtype=torch.float64) * 2 - 1
    x0_hat = torch.rand(1, 2, h, w, generator=g, dtype=torch.float64) * 2 - 1
    a = torch.kron(_blur_matrix_1d(h, sigma), _blur_matrix_1d(w, sigma))  # row-major (H·W)²
    y = gaussian_blur(x_true, sigma)
    torch.testing.assert_close(y.flatten(2), (a @ x_true.flatten(2).mT).mT, rtol=0, atol=1e-12)

    lhs = a.T @ a + rho * torch.eye(h * w, dtype=torch.float64)
    rhs = a.T @ y.flatten(2).mT + rho * x0_hat.flatten(2).mT
    direct = torch.linalg.solve(lhs, rhs).mT.reshape(1, 2, h, w)
    torch.testing.assert_close(closed_form_x0(x0_hat, y, sigma, rho), direct, rtol=0, atol=1e-10)


def _sampled_kernel_blur_matrix_1d(n: int, sigma: float) -> torch.Tensor:
    """Blur written independently of any FFT: a sampled, normalised Gaussian kernel (radius ⌈6σ⌉)
    applied with half-sample symmetric padding (numpy's "symmetric": x[-1] = x[0], x[n] = x[n-1])."""
    radius = math.ceil(6 * sigma)
    assert radius < n
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    matrix = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for tap, weight in zip(taps.long().tolist(), kernel.tolist(), strict=True):
            j = i + tap
            j = -j - 1 if j < 0 else (2 * n - 1 - j if j >= n else j)
            matrix[i, j] += weight
    return matrix


def test_fourier_solve_matches_spatial_domain_kernel_solve() -> None:
    """The FFT blur and the Fourier closed form against a purely spatial operator (sampled kernel,
    symmetric padding) and its normal equations solved directly. The two blurs differ only by the
    sampled kernel's aliasing (≈ 1e-6 here); a circular (wrap-around) blur would be off by ~0.3."""
    h, w, sigma, rho = 16, 14, 1.5, 0.05
    g = torch.Generator().manual_seed(2)
    x_true = torch.rand(1, 3, h, w, generator=g, dtype=torch.float64) * 2 - 1
    x0_hat = torch.rand(1, 3, h, w, generator=g, dtype=torch.float64) * 2 - 1
    a = torch.kron(_sampled_kernel_blur_matrix_1d(h, sigma), _sampled_kernel_blur_matrix_1d(w, sigma))
    y = (a @ x_true.flatten(2).mT).mT.reshape(1, 3, h, w)
    torch.testing.assert_close(gaussian_blur(x_true, sigma), y, rtol=0, atol=1e-5)

    lhs = a.T @ a + rho * torch.eye(h * w, dtype=torch.float64)
    direct = torch.linalg.solve(lhs, a.T @ y.flatten(2).mT + rho * x0_hat.flatten(2).mT).mT.reshape(y.shape)
    fourier = closed_form_x0(x0_hat, y, sigma, rho)
    torch.testing.assert_close(fourier, direct, rtol=0, atol=1e-6)
    # and the solve did something: it is far from both inputs
    assert float((fourier - x0_hat).abs().max()) > 0.1 and float((fourier - y).abs().max()) > 0.1


def test_blur_properties() -> None:
    x = torch.randn(3, 2, 16, 20, dtype=torch.float64)
    torch.testing.assert_close(
        gaussian_blur(gaussian_blur(x, 1.0), 2.0), gaussian_blur(x, compose_sigma(1.0, 2.0))
    )
    assert residual_sigma(compose_sigma(1.5, 2.0), 1.5) == 2.0
    torch.testing.assert_close(gaussian_blur(x, 0.0), x)
    per_image = gaussian_blur(x, torch.tensor([0.5, 1.0, 3.0]))
    for k, s in enumerate((0.5, 1.0, 3.0)):
        torch.testing.assert_close(per_image[k], gaussian_blur(x[k : k + 1], s)[0])
    torch.testing.assert_close(gaussian_blur(x, 2.0).mean(dim=(-2, -1)), x.mean(dim=(-2, -1)))  # unit DC gain
    otf = gaussian_otf(2.0, 8, 6)
    assert otf.shape == (8, 6) and float(otf[0, 0]) == 1.0
    assert gaussian_blur(x.half(), 1.0).dtype == torch.float16


def test_closed_form_limits_and_rho() -> None:
    x0_hat = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1
    y = gaussian_blur(torch.rand(2, 3, 16, 16, dtype=torch.float64), 1.5)
    torch.testing.assert_close(closed_form_x0(x0_hat, y, 1.5, 1e12), x0_hat)
    sol = closed_form_x0(x0_hat, y, 1.5, 1e-9)
    # consistent with the data: per frequency the residual is G·ρ/(G²+ρ)·X ≤ (√ρ/2)·|X|
    torch.testing.assert_close(gaussian_blur(sol, 1.5), y, rtol=0, atol=1e-4)
    rhos = torch.tensor([0.1, 2.0], dtype=torch.float64)
    both = closed_form_x0(x0_hat, y, 1.5, rhos)
    for k in range(2):
        torch.testing.assert_close(
            both[k], closed_form_x0(x0_hat[k : k + 1], y[k : k + 1], 1.5, float(rhos[k]))[0]
        )
    assert rho_at(0.5, 0.01) == 0.01
    assert rho_at(0.9, 1.0) > rho_at(0.3, 1.0)  # prior trusted more as noise falls


def _guided_setup() -> tuple[
    GaussianPrior, RespacedSchedule, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    prior = GaussianPrior(size=16)
    s = RespacedSchedule.from_spec("ddim250")
    g = torch.Generator().manual_seed(1)
    x_true = prior.sample(16, g)
    y = gaussian_blur(x_true, 1.5)
    x_start = q_sample(y, s, 100, torch.randn(x_true.shape, generator=g, dtype=torch.float64))
    draws = torch.randn(100, *x_true.shape, generator=g, dtype=torch.float64)
    return prior, s, x_true, y, x_start, draws


def _rms(t: torch.Tensor) -> float:
    return float(t.pow(2).mean().sqrt())


def test_oracle_guidance_restores_data_consistency() -> None:
    """(b) With a Gaussian-blurred observation of a true image (started like the pipeline, from
    q_sample(ŷ, 100)), closed-form guidance makes blur(result) reproduce the observation and lowers the
    error to the true image, compared with the same sampler and noise without guidance."""
    prior, s, x_true, y, x_start, draws = _guided_setup()

    def sample(guide: GaussianGuidance | None) -> torch.Tensor:
        return ddim_sample(prior.eps_model(), x_start, s, 100, 0.5, guide=guide, noise=lambda k: draws[k])

    free = sample(None)
    guided = sample(GaussianGuidance(y, 1.5, 1e-6, s))
    resid_free, resid_guided = _rms(gaussian_blur(free, 1.5) - y), _rms(gaussian_blur(guided, 1.5) - y)
    # observation scale: rms(y - μ) ≈ 0.1; the tiny v keeps ρ ≤ 0.01 at the last step
    assert resid_guided < 2e-3 and resid_guided < 0.05 * resid_free
    assert _rms(guided - x_true) < 0.8 * _rms(free - x_true)


def test_dgsa_map_zero_is_no_guidance_and_one_is_uniform() -> None:
    """(d) g ≡ 0 follows the unguided path bit for bit; g ≡ 1 equals uniform guidance."""
    prior, s, _, y, x_start, draws = _guided_setup()

    def sample(guide: GaussianGuidance | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        path: list[torch.Tensor] = []

        def eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            path.append(x_t.clone())
            return prior.eps_model()(x_t, t)

        return ddim_sample(eps, x_start, s, 60, 0.5, guide=guide, noise=lambda k: draws[k]), path

    n = y.shape[0]
    free, free_path = sample(None)
    zero, zero_path = sample(GaussianGuidance(y, 1.5, 1e-3, s, scale_map=torch.zeros(n, 1, 16, 16)))
    assert torch.equal(zero, free) and all(
        torch.equal(a, b) for a, b in zip(zero_path, free_path, strict=True)
    )

    uniform, _ = sample(GaussianGuidance(y, 1.5, 1e-3, s))
    ones, _ = sample(
        GaussianGuidance(y, 1.5, 1e-3, s, scale_map=torch.ones(n, 1, 16, 16, dtype=torch.float64))
    )
    assert torch.equal(ones, uniform) and not torch.equal(uniform, free)


def test_nonpositive_variance_or_rho_is_rejected_not_nan() -> None:
    """v = 0 (or ρ = 0) would make the solve 0/0 where a σ = 4 OTF squared underflows: a ValueError,
    never a NaN image. Tiny positive values stay finite."""
    s = RespacedSchedule.from_spec("ddim250")
    x0_hat = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = gaussian_blur(x0_hat, 4.0)
    for bad in (0.0, -1e-3, math.nan, math.inf, torch.tensor([1e-3, 0.0])):
        with pytest.raises(ValueError, match="rho must be finite and > 0"):
            closed_form_x0(x0_hat.expand(2, -1, -1, -1), y.expand(2, -1, -1, -1), 4.0, bad)
        with pytest.raises(ValueError, match="v must be finite and > 0"):
            GaussianGuidance(y.expand(2, -1, -1, -1), 4.0, bad, s)
    assert torch.isfinite(closed_form_x0(x0_hat, y, 4.0, 1e-30)).all()
    assert torch.isfinite(GaussianGuidance(y, 4.0, 1e-30, s)(x0_hat, 50)).all()


def test_per_image_values_need_one_entry_per_image() -> None:
    """σ and v are floats or (N,) tensors: a one-element tensor for N = 2 is rejected up front instead
    of failing with an IndexError at the first step that passes `rows`."""
    s = RespacedSchedule.from_spec("ddim250")
    y = torch.zeros(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"sigma must be a float or a per-image \(2,\) tensor"):
        GaussianGuidance(y, torch.tensor([4.0]), 0.01, s)
    with pytest.raises(ValueError, match=r"v must be a float or a per-image \(2,\) tensor"):
        GaussianGuidance(y, 4.0, torch.tensor([0.01]), s)
    with pytest.raises(ValueError, match=r"scale_map must be \(2, 1, 16, 16\)"):
        GaussianGuidance(y, 4.0, 0.01, s, scale_map=torch.ones(1, 1, 16, 16))
    guide = GaussianGuidance(y, torch.tensor(4.0), torch.tensor([0.01, 0.02]), s)  # 0-dim σ: a scalar
    assert guide(y[1:], 50, torch.tensor([1])).shape == (1, 3, 16, 16)
