"""Automatic fidelity: DDIM eta from a robust noise estimate (method.md §7, our formulation).

The authors set eta per sample as "std/10"; without a trained DGSA we read std as the input's noise
standard deviation in 8-bit units, measured robustly so that face edges and texture do not count as
noise: Immerkær's noise-estimation mask (a product of two second differences, which annihilates
constant and linear intensity) followed by the median absolute deviation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# [1,-2,1]ᵀ[1,-2,1]: zero response to planes, and for white noise of std s its output has std
# s·‖M‖₂ = s·√36 = 6s.
_MASK = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])
_MASK_NORM = 6.0
# MAD → std for a Gaussian: 1/Φ⁻¹(3/4).
_MAD_TO_STD = 1.4826


def robust_noise_std(images: Tensor) -> Tensor:
    """Per-image noise std in 8-bit units (float64, shape (N,)).

    Accepts uint8 images channels-last (N, H, W, C) or (H, W, C) as decoded (the project's uint8
    convention), or float images in [-1,1] channels-first (N, C, H, W) or (C, H, W) (the model
    convention). Each channel is filtered with the Immerkær mask (valid region, no padding), and
    std = 1.4826 · median(|r − median r|) / 6 over all channels' responses: the median ignores the
    minority of pixels on edges, where the response is structure rather than noise.
    """
    if images.dtype == torch.uint8:
        x = images.unsqueeze(0) if images.dim() == 3 else images
        x = x.permute(0, 3, 1, 2).to(torch.float64)
    else:
        x = images.unsqueeze(0) if images.dim() == 3 else images
        x = (x.to(torch.float64) + 1.0) * 127.5
    n, c, h, w = x.shape
    mask = _MASK.to(device=x.device, dtype=torch.float64).view(1, 1, 3, 3)
    r = F.conv2d(x.reshape(n * c, 1, h, w), mask).reshape(n, -1)
    mad = (r - r.median(dim=1, keepdim=True).values).abs().median(dim=1).values
    return (_MAD_TO_STD * mad / _MASK_NORM).cpu()


def auto_eta(std_8bit: float | Tensor) -> float | Tensor:
    """eta = clamp(std/10, 0, 1): noisier inputs get a more stochastic (less input-bound) sampler."""
    if isinstance(std_8bit, Tensor):
        return (std_8bit / 10.0).clamp(0.0, 1.0)
    return min(max(std_8bit / 10.0, 0.0), 1.0)
