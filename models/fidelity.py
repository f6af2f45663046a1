"""Automatic fidelity: DDIM eta from a robust noise estimate (method.md §7, our formulation).

The authors set eta per sample as "std/10"; without a trained DGSA we read std as the input's noise
standard deviation in 8-bit units, measured robustly so that face edges and texture do not count as
noise: Immerkær's noise-estimation mask (a product of two second differences, which annihilates
constant and linear intensity), then a scale estimate from the smaller half of the responses.

Where it is measured matters as much as how: resampling smooths noise away (a bilinear 4× enlargement
is piecewise linear, which the mask annihilates), so the pipeline measures each face on its source
pixels at native resolution (`box_noise_std`), never on the 512 crop it was enlarged to.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# [1,-2,1]ᵀ[1,-2,1]: zero response to planes, and for white noise of std s its output has std
# s·‖M‖₂ = s·√36 = 6s.
_MASK = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])
_MASK_NORM = 6.0
# For d = s·|Z| (Z standard normal) the smaller half is |Z| ≤ q = Φ⁻¹(3/4), whose mean is
# E[|Z| | |Z| ≤ q] = 4·(φ(0) − φ(q)) = 2·√(2/π)·(1 − exp(−q²/2)) ≈ 0.3247: mean / that = s.
_Q = 0.6744897501960817
_HALF_MEAN = 2.0 * math.sqrt(2.0 / math.pi) * (1.0 - math.exp(-(_Q**2) / 2.0))
#: The mask needs a 3×3 neighbourhood.
_MIN_SIDE = 3
#: `box_noise_std` measures at most this many pixels a side, centred in the box.
BOX_MAX_SIDE = 1024


def robust_noise_std(images: Tensor) -> Tensor:
    """Per-image noise std in 8-bit units (float64, shape (N,)).

    Accepts uint8 images channels-last (N, H, W, C) or (H, W, C) as decoded (the project's uint8
    convention), or float images in [-1,1] channels-first (N, C, H, W) or (C, H, W) (the model
    convention); at least 3×3. Each channel is filtered with the Immerkær mask (valid region, no
    padding); with d = |r − median r| over all channels' responses, std = mean(smaller half of d) /
    (6 · 0.3247). Like the MAD (the median of d) it ignores the upper half, where edges put structure
    rather than noise; unlike the MAD it averages instead of picking one value, and on 8-bit input
    (integer responses) the MAD moves in steps of 1.4826/6 ≈ 0.25 and never reads below that step.
    """
    if images.dtype == torch.uint8:
        x = images.unsqueeze(0) if images.dim() == 3 else images
        x = x.permute(0, 3, 1, 2).to(torch.float64)
    else:
        x = images.unsqueeze(0) if images.dim() == 3 else images
        x = (x.to(torch.float64) + 1.0) * 127.5
    n, c, h, w = x.shape
    if min(h, w) < _MIN_SIDE:
        raise ValueError(f"noise estimation needs at least {_MIN_SIDE}×{_MIN_SIDE} pixels, got {w}×{h}")
    mask = _MASK.to(device=x.device, dtype=torch.float64).view(1, 1, 3, 3)
    r = F.conv2d(x.reshape(n * c, 1, h, w), mask).reshape(n, -1)
    d = (r - r.median(dim=1, keepdim=True).values).abs()
    half = max(1, d.shape[1] // 2)
    # The smaller half's sum without a full sort: everything below the half-th value, plus as many
    # copies of that value as fill the half (ties at integer responses are common).
    kth = d.kthvalue(half, dim=1, keepdim=True).values
    below = d < kth
    total = (d * below).sum(dim=1) + (half - below.sum(dim=1)) * kth.squeeze(1)
    return (total / half / (_HALF_MEAN * _MASK_NORM)).cpu()


def box_noise_std(rgb: np.ndarray, box: tuple[float, float, float, float]) -> float:
    """Noise std (8-bit) of a face's source pixels: the box (x0, y0, x1, y1) of a uint8 (H, W, 3)
    photo, widened to whole pixels (and to 3×3 where the photo allows), at most its central
    `BOX_MAX_SIDE`² pixels (noise is stationary: ~3 M responses are plenty, and a close-up portrait's
    box can be 4000² px). 0.0 for a photo too small to measure (under 3 px a side)."""
    h, w = rgb.shape[:2]
    if min(h, w) < _MIN_SIDE:
        return 0.0
    x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x1, y1 = min(w, math.ceil(box[2])), min(h, math.ceil(box[3]))
    x0, y0 = max(0, min(x0, x1 - _MIN_SIDE)), max(0, min(y0, y1 - _MIN_SIDE))
    x1, y1 = min(w, max(x1, x0 + _MIN_SIDE)), min(h, max(y1, y0 + _MIN_SIDE))
    dx, dy = max(0, (x1 - x0 - BOX_MAX_SIDE) // 2), max(0, (y1 - y0 - BOX_MAX_SIDE) // 2)
    x0, x1, y0, y1 = x0 + dx, min(x1, x0 + dx + BOX_MAX_SIDE), y0 + dy, min(y1, y0 + dy + BOX_MAX_SIDE)
    return float(robust_noise_std(torch.from_numpy(np.ascontiguousarray(rgb[y0:y1, x0:x1])))[0])


def auto_eta(std_8bit: float | Tensor) -> float | Tensor:
    """eta = clamp(std/10, 0, 1): noisier inputs get a more stochastic (less input-bound) sampler."""
    if isinstance(std_8bit, Tensor):
        return (std_8bit / 10.0).clamp(0.0, 1.0)
    return min(max(std_8bit / 10.0, 0.0), 1.0)
