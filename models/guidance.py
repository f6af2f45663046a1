"""Closed-form Gaussian-deblurring guidance (method.md §5, our formulation).

At every DDIM step the prior's clamped prediction x̂0 is pulled towards consistency with the
Gaussian-blurred estimate ŷ^σ from DBLM:

    x̃0 = argmin_x ‖G_σ * x − ŷ^σ‖² + ρ_i ‖x − x̂0‖²,   ρ_i = v · ᾱ_i / (1 − ᾱ_i),
    x0′ = x̂0 + g ⊙ (x̃0 − x̂0).

Because G_σ is a known Gaussian and the boundary rule of `models.blur` (half-sample symmetric extension
to the full 2H×2W period) makes the blur diagonal in that period's DFT, the minimiser is exactly
x̃0 = crop F⁻¹[(conj(F G)·F ext(ŷ) + ρ·F ext(x̂0)) / (|F G|² + ρ)] — no iterations, no wrap-around seam.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.blur import gaussian_otf_rfft, irfft_cropped, rfft_extended
from models.schedule import RespacedSchedule


def _per_image(value: float | Tensor, like: Tensor) -> float | Tensor:
    """Scalars stay scalars; a per-image (N,) tensor becomes (N, 1, 1, 1) to broadcast over spectra."""
    if isinstance(value, Tensor) and value.dim():
        return value.to(device=like.device, dtype=like.real.dtype).reshape(-1, 1, 1, 1)
    return float(value)


def _require_positive(name: str, value: float | Tensor) -> None:
    """ValueError unless every entry is finite and > 0: at 0 the solve is 0/0 wherever the OTF
    underflows (a σ = 4 OTF squared is 0 in float32 at high frequencies), so the result would be NaN."""
    t = torch.as_tensor(value)
    if not bool((torch.isfinite(t) & (t > 0)).all()):
        raise ValueError(f"{name} must be finite and > 0, got {value}")


def _require_per_image(name: str, value: float | Tensor, n: int) -> None:
    """ValueError unless `value` is a scalar (float or 0-dim tensor) or one entry per image, (n,)."""
    if isinstance(value, Tensor) and value.dim() and tuple(value.shape) != (n,):
        raise ValueError(
            f"{name} must be a float or a per-image ({n},) tensor, got shape {tuple(value.shape)}"
        )


def _solve(x0_hat: Tensor, y_spec: Tensor, otf: Tensor, rho: float | Tensor) -> Tensor:
    """The pointwise Fourier solve, given the (precomputable) spectrum of ŷ and the real, even OTF."""
    h, w = x0_hat.shape[-2:]
    x_spec = rfft_extended(x0_hat)
    r = _per_image(rho, x_spec)
    sol = (otf * y_spec + r * x_spec) / (otf * otf + r)
    return irfft_cropped(sol, h, w).to(x0_hat.dtype)


def closed_form_x0(x0_hat: Tensor, y_blur: Tensor, sigma: float | Tensor, rho: float | Tensor) -> Tensor:
    """argmin_x ‖G_σ * x − y_blur‖² + ρ‖x − x0_hat‖² for (N, C, H, W) images (method.md §5).

    Boundary handling: both images are extended half-sample symmetrically to 2H×2W, the problem is
    solved per frequency there, and the top-left H×W is returned. With `models.blur.gaussian_blur` as
    the blur operator this is the exact minimiser (see module doc of models.blur). `sigma` and `rho`:
    floats or per-image (N,) tensors; ρ finite and > 0, else ValueError (ρ → 0 is pure deconvolution,
    ρ → ∞ returns x0_hat). Computed in float32 at least, returned in x0_hat's dtype.
    """
    _require_positive("rho", rho)
    h, w = x0_hat.shape[-2:]
    y_spec = rfft_extended(y_blur)
    return _solve(x0_hat, y_spec, gaussian_otf_rfft(sigma, h, w, y_spec), rho)


def rho_at(alpha_bar: float | Tensor, v: float | Tensor) -> float | Tensor:
    """ρ = v·ᾱ/(1−ᾱ): the ratio of the estimate's error variance v to x̂0's error variance (1−ᾱ)/ᾱ.

    Early (noisy) steps have small ρ, so the blurred estimate dominates; as noise falls ρ grows and the
    prior is trusted more.
    """
    return v * alpha_bar / (1.0 - alpha_bar)


class GaussianGuidance:
    """Callable `guide(x0_hat, i[, rows]) -> x0′` for `models.sampler.ddim_sample` (per-image data
    is sliced to `rows` when only some images are being sampled, see `models.sampler.Guide`).

    Holds ŷ^σ (N, C, H, W) in [-1,1], σ (float or per-image (N,)), the estimate's error variance v
    (float or (N,), finite and > 0; [-1,1]² units), a global `scale` and an optional per-pixel map
    g ∈ [0,1] of shape (N, 1, H, W) (DGSA; None = uniform); other shapes or v ≤ 0 raise ValueError.
    The applied weight is scale·g (scale alone if no map). The spectrum of ŷ and the OTF are computed
    once here, so each step costs one FFT pair.

    x0′ is clamped to [-1,1] like the prior's x̂0 (the data range), which keeps a zero weight an exact
    identity: with g ≡ 0 the sampler follows the unguided path bit for bit.
    """

    def __init__(
        self,
        y_blur: Tensor,
        sigma: float | Tensor,
        v: float | Tensor,
        schedule: RespacedSchedule,
        *,
        scale: float = 1.0,
        scale_map: Tensor | None = None,
    ) -> None:
        n, _, h, w = y_blur.shape
        if scale_map is not None and tuple(scale_map.shape) != (n, 1, h, w):
            raise ValueError(f"scale_map must be {(n, 1, h, w)}, got {tuple(scale_map.shape)}")
        _require_per_image("sigma", sigma, n)
        _require_per_image("v", v, n)
        _require_positive("v", v)
        self.y_blur = y_blur
        self.sigma = sigma
        self.v = v
        self.schedule = schedule
        self.scale = scale
        self.scale_map = scale_map
        self._y_spec = rfft_extended(y_blur)
        self._otf = gaussian_otf_rfft(sigma, h, w, self._y_spec)

    def weight(self) -> float | Tensor:
        """The per-pixel guidance weight g·scale (or the scalar scale when there is no map)."""
        return self.scale if self.scale_map is None else self.scale * self.scale_map

    def __call__(self, x0_hat: Tensor, index: int, rows: Tensor | None = None, /) -> Tensor:
        """x0′ for x0_hat at respaced index `index`; `rows` (int64) says which of the N images held
        here x0_hat's rows are (None: all N, in order), as the sampler passes when only the faces that
        have reached their start step are being sampled."""
        v, y_spec, otf, g = self.v, self._y_spec, self._otf, self.weight()
        if rows is not None:
            # Per-image quantities have a leading N axis; a scalar σ's OTF (2h, w+1) is shared.
            rows = rows.to(y_spec.device)
            y_spec = y_spec[rows]
            v = v[rows.to(v.device)] if isinstance(v, Tensor) and v.dim() else v
            otf = otf[rows] if otf.dim() == 4 else otf
            g = g[rows.to(g.device)] if isinstance(g, Tensor) else g
        rho = rho_at(self.schedule.alpha_bar(index), v)
        x_tilde = _solve(x0_hat, y_spec, otf, rho)
        if isinstance(g, Tensor):
            g = g.to(device=x0_hat.device, dtype=x0_hat.dtype)
        return (x0_hat + g * (x_tilde - x0_hat)).clamp(-1.0, 1.0)
