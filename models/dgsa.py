"""DGSA — Dynamic Guidance Scaling Adjuster (method.md "Our formulation" §6).

The guidance strength g (values in [0,1], multiplying the closed-form correction x̃0 − x̂0) should be
high on structural contours, where the blur-level estimate is trustworthy and fidelity matters, and
low in detailed or uncertain regions, where the diffusion prior should generate detail.

- trained: `DGSANet`, a small UNet on (ŷ^σk, R(y)) predicting the per-pixel log-variance s of the
  DBLM estimate's error (trained with `dgsa_loss`, a Gaussian NLL); `scale_from_logvar` turns it into
  g = 1 / (1 + exp(s) / c): confident pixels (small variance) get g → 1.
- fallback: `coherence_scale_map`, the structure-tensor coherence of the estimate's luminance —
  ≈1 on single-orientation edges (contours), ≈0 in flat areas and isotropic texture — mapped to
  [g_min, 1], so guidance never switches fully off.

Images are in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.blur import gaussian_blur

# ITU-R BT.601 luma weights: the structure that matters for contours is in luminance.
_LUMA = (0.299, 0.587, 0.114)


class _ConvBlock(nn.Sequential):
    """Two 3×3 conv → GroupNorm → SiLU layers."""

    def __init__(self, cin: int, cout: int) -> None:
        groups = math.gcd(8, cout)
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.GroupNorm(groups, cout),
            nn.SiLU(),
            nn.Conv2d(cout, cout, 3, padding=1),
            nn.GroupNorm(groups, cout),
            nn.SiLU(),
        )


class DGSANet(nn.Module):
    """Small UNet: concat(ŷ^σ, R(y)) (6 channels, [0,1]) → per-pixel log-variance s (1 channel).

    A UNet rather than a plain CNN because whether a pixel belongs to a contour or to texture is a
    question about its neighbourhood at several scales. Any input size works (reflect-padded to a
    multiple of 2^(levels−1), cropped back).
    """

    def __init__(self, base_channels: int = 32, channel_mult: Sequence[int] = (1, 2, 4)) -> None:
        super().__init__()
        widths = [base_channels * m for m in channel_mult]
        self.stride = 2 ** (len(widths) - 1)
        self.encoders = nn.ModuleList()
        cin = 6
        for w in widths:
            self.encoders.append(_ConvBlock(cin, w))
            cin = w
        self.downs = nn.ModuleList(nn.Conv2d(w, w, 3, stride=2, padding=1) for w in widths[:-1])
        self.decoders = nn.ModuleList(
            _ConvBlock(w_deep + w_skip, w_skip)
            for w_deep, w_skip in zip(widths[:0:-1], widths[-2::-1], strict=True)
        )
        self.head = nn.Conv2d(widths[0], 1, 3, padding=1)

    def forward(self, estimate: Tensor, restored: Tensor) -> Tensor:
        """estimate ŷ^σ, restored R(y): (B, 3, H, W) in [0,1] → log-variance (B, 1, H, W)."""
        h, w = estimate.shape[-2:]
        x = torch.cat([estimate, restored], dim=1) * 2 - 1
        pad_h, pad_w = (-h) % self.stride, (-w) % self.stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x)
            if i < len(self.downs):
                skips.append(x)
                x = self.downs[i](x)
        for dec in self.decoders:
            skip = skips.pop()
            x = dec(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="nearest"), skip], dim=1))
        return self.head(x)[:, :, :h, :w]


def dgsa_loss(logvar: Tensor, estimate: Tensor, target: Tensor) -> Tensor:
    """Gaussian NLL of the DBLM error (estimate − target) under variance exp(logvar), averaged over pixels.

    logvar (B,1,H,W) is shared by the RGB channels; minimised at exp(s) = the local squared error.
    """
    var = logvar.exp().expand_as(estimate)
    return F.gaussian_nll_loss(estimate, target.to(estimate.dtype), var)


def scale_from_logvar(s: Tensor, c: float) -> Tensor:
    """g = 1 / (1 + exp(s) / c), in (0, 1), decreasing in s; c is the variance at which g = ½.

    Computed as sigmoid(log c − s), which is the same value without overflowing exp(s) (in float32 it
    rounds to exactly 0 or 1 once |log c − s| exceeds ~17).
    """
    if c <= 0:
        raise ValueError(f"scale_from_logvar: c must be positive, got {c}")
    return torch.sigmoid(math.log(c) - s)


def _luminance(y: Tensor) -> Tensor:
    if y.shape[1] == 1:
        return y
    weights = torch.tensor(_LUMA, dtype=y.dtype, device=y.device).view(1, 3, 1, 1)
    return (y * weights).sum(dim=1, keepdim=True)


def _central_gradients(img: Tensor) -> tuple[Tensor, Tensor]:
    """∂x, ∂y by central differences with replicate padding (no spurious edges at the border)."""
    p = F.pad(img, (1, 1, 1, 1), mode="replicate")
    gx = (p[..., 1:-1, 2:] - p[..., 1:-1, :-2]) / 2
    gy = (p[..., 2:, 1:-1] - p[..., :-2, 1:-1]) / 2
    return gx, gy


def coherence_scale_map(
    y: Tensor,
    g_min: float = 0.2,
    window_sigma: float = 2.0,
    grad_sigma: float = 1.0,
    eps: float = 1e-4,
) -> Tensor:
    """Training-free DGSA map: g = g_min + (1 − g_min) · coherence, shape (B, 1, H, W), values in [g_min, 1].

    coherence = ((λ1 − λ2) / (λ1 + λ2 + eps))² of the structure tensor J = G_window * (∇L ∇Lᵀ) of the
    luminance L (gradients taken after a G_grad pre-blur against pixel noise), then smoothed by
    G_window so g varies gently. λ1 ≫ λ2 (one orientation: a contour) → 1; λ1 ≈ λ2 (isotropic
    texture) → 0; flat areas → 0 because `eps` (squared luminance gradient per pixel, [0,1] units;
    1e-4 ≈ a 2.5/255 step per pixel) outweighs their tiny gradient energy.
    """
    if not 0.0 <= g_min <= 1.0:
        raise ValueError(f"g_min must be in [0, 1], got {g_min}")
    lum = _luminance(y.float())
    if grad_sigma > 0:
        lum = gaussian_blur(lum, grad_sigma)
    gx, gy = _central_gradients(lum)
    jxx, jxy, jyy = gaussian_blur(torch.cat([gx * gx, gx * gy, gy * gy], dim=1), window_sigma).unbind(1)
    # (λ1 − λ2)² = (Jxx − Jyy)² + 4Jxy², λ1 + λ2 = trace J — no eigen-decomposition needed.
    coherence = ((jxx - jyy) ** 2 + 4 * jxy**2) / (jxx + jyy + eps) ** 2
    coherence = gaussian_blur(coherence.unsqueeze(1), window_sigma).clamp(0.0, 1.0)
    return (g_min + (1.0 - g_min) * coherence).to(y.dtype)
