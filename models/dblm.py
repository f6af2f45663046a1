"""DBLM — Dynamic Blur-Level Mapping (method.md "Our formulation" §2).

DBLM turns an unknown, blind degradation into a *known* one: for each blur level σk it estimates
ŷ^σk ≈ G_σk * x, the clean face under a Gaussian blur, so that guidance can use the exact kernel.

Two sources of estimates, reported by name (`DBLM_TRAINED` / `DBLM_FALLBACK`):
- trained: `DBLMNet`, DifFace's SwinIR restorer architecture with a K×3 + K channel head — one RGB
  estimate per level plus a per-pixel log-variance s_k (heteroscedastic uncertainty), trained with
  `dblm_loss`.
- fallback (no trained weights): `fallback_estimates` treats the released restorer's output as
  already blurred, R(y) ≈ G_σ̂ * x, and uses that Gaussians compose:
  ŷ^σk = G_√(σk²−σ̂²) * R(y) for σk ≥ σ̂. σ̂ comes from `models.blur.estimate_blur_sigma`.

Ranges: estimates are in [0, 1], the same range as the restorer R (and as DBLMNet's input), so the
trained net can start from R's weights; the fallback is range-agnostic (normalised Gaussian blurs
are linear and keep constants). σ values are in pixels of the tensor they are applied to (the
method's defaults are for 512×512 faces; scale them when working at another size).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import skip_init

from models.blur import gaussian_blur, residual_sigma
from models.swinir import SwinIR

DBLM_TRAINED = "trained"
DBLM_FALLBACK = "fallback"


@dataclass(frozen=True)
class DBLMConfig:
    """`backbone`: SwinIR config keys (DifFace's `restorer_swinir` layout); `sigmas`: blur levels σk in px."""

    backbone: Mapping[str, Any]
    sigmas: tuple[float, ...] = (1.0, 2.0, 4.0)


class DBLMOutput(NamedTuple):
    estimates: Tensor  # (B, K, 3, H, W) ŷ^σk in [0, 1] (not clamped)
    logvar: Tensor  # (B, K, H, W) s_k: log of the per-pixel error variance, in [0,1]² units


class Float32Conv2d(nn.Conv2d):
    """An nn.Conv2d that computes in float32 whatever autocast or its own weights' dtype say: its input,
    weight and bias are cast up and autocast is off for it."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            bias = self.bias.float() if self.bias is not None else None
            return self._conv_forward(x.float(), self.weight.float(), bias)


class DBLMNet(nn.Module):
    """Blind degraded face y in [0,1] → K Gaussian-blurred clean-face estimates + K log-variance maps.

    The backbone is `models.swinir.SwinIR` with a 4K-channel final conv; every other weight has the
    restorer's name and shape (under `backbone.`), so training can start from the released restorer.
    The final conv computes in float32 (`Float32Conv2d`, the same parameters under the same names).
    """

    def __init__(self, config: DBLMConfig) -> None:
        super().__init__()
        if not config.sigmas or any(s <= 0 for s in config.sigmas):
            raise ValueError(f"DBLM sigmas must be a non-empty tuple of positive floats, got {config.sigmas}")
        self.config = config
        self.sigmas = tuple(float(s) for s in config.sigmas)
        self.backbone = SwinIR(**config.backbone, out_chans=4 * len(self.sigmas))
        # The head in float32 even under autocast (training's bf16) or in a half-precision pipeline: its
        # bf16 output is rounded to ~1 8-bit level in [0.5, 1), and casting it up afterwards restores
        # nothing. Built uninitialised (no RNG drawn) and given the SwinIR head's own parameters.
        last = self.backbone.conv_last
        head = skip_init(
            Float32Conv2d, last.in_channels, last.out_channels, last.kernel_size, last.stride, last.padding
        )
        head.weight, head.bias = last.weight, last.bias
        self.backbone.conv_last = head

    def forward(self, y: Tensor) -> DBLMOutput:
        k = len(self.sigmas)
        raw = self.backbone.reconstruct(y)  # float32: the head is a Float32Conv2d
        b, _, h, w = raw.shape
        # Same de-normalisation as the restorer's output, per level.
        mean = self.backbone.rgb_mean(raw).unsqueeze(1)
        estimates = raw[:, : 3 * k].reshape(b, k, 3, h, w) / self.backbone.img_range + mean
        return DBLMOutput(estimates, raw[:, 3 * k :])


def blur_levels(x: Tensor, sigmas: Sequence[float]) -> Tensor:
    """Stack G_σk * x for every level: (B, C, H, W) → (B, K, C, H, W) — the DBLM training targets."""
    return torch.stack([gaussian_blur(x, float(s)) for s in sigmas], dim=1)


def dblm_loss(pred: Tensor, logvar: Tensor, clean: Tensor, sigmas: Sequence[float]) -> Tensor:
    """Σ_k [ L1(ŷ^σk, G_σk*x) + Gaussian NLL(ŷ^σk; G_σk*x, exp(s_k)) ], each term a per-level mean.

    pred (B,K,3,H,W), logvar (B,K,H,W) (one variance shared by the RGB channels of a pixel), clean
    (B,3,H,W) in pred's range. The NLL is torch's (constant dropped, variance floored at 1e-6 with
    gradients kept), so for a fixed s_k the loss is smallest when pred equals the blurred targets.
    """
    if pred.shape[1] != len(sigmas) or logvar.shape[1] != len(sigmas):
        raise ValueError(
            f"dblm_loss: {len(sigmas)} sigmas but pred {tuple(pred.shape)}, logvar {tuple(logvar.shape)}"
        )
    target = blur_levels(clean, sigmas).to(pred.dtype)
    var = logvar.exp().unsqueeze(2).expand_as(pred)
    per_pixel = (pred - target).abs() + F.gaussian_nll_loss(pred, target, var, reduction="none")
    return per_pixel.mean(dim=(0, 2, 3, 4)).sum()


def _per_image(sigma_hat: float | Sequence[float] | Tensor, batch: int) -> list[float]:
    values = sigma_hat.flatten().tolist() if isinstance(sigma_hat, Tensor) else sigma_hat
    if isinstance(values, (int, float)):
        return [float(values)] * batch
    if len(values) != batch:
        raise ValueError(f"sigma_hat has {len(values)} values for a batch of {batch}")
    return [float(v) for v in values]


def fallback_estimates(
    restored: Tensor, sigma_hat: float | Sequence[float] | Tensor, sigmas: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """Training-free DBLM: ŷ^σk = G_√(σk²−σ̂²) * R(y) for σk ≥ σ̂.

    restored: R(y) (B, C, H, W), any range; sigma_hat: its estimated blur σ̂ (e.g. from
    `models.blur.estimate_blur_sigma`), one value or one per image. Returns (estimates
    (B, K, C, H, W), usable (B, K) bool). Levels sharper than R(y) (σk < σ̂) cannot be reached by
    blurring: they are marked unusable and hold R(y) unchanged (the closest estimate there is, never
    NaN) — callers must pick a usable level.
    """
    per_image = _per_image(sigma_hat, restored.shape[0])
    usable = [[s >= s_hat for s in sigmas] for s_hat in per_image]
    levels = []
    for k, s in enumerate(sigmas):
        extra = [
            residual_sigma(s, s_hat) if ok[k] else 0.0 for s_hat, ok in zip(per_image, usable, strict=True)
        ]
        blurred = gaussian_blur(restored, torch.tensor(extra, device=restored.device))
        reachable = torch.tensor([ok[k] for ok in usable], device=restored.device).view(-1, 1, 1, 1)
        levels.append(torch.where(reachable, blurred, restored))
    return torch.stack(levels, dim=1), torch.tensor(usable, dtype=torch.bool, device=restored.device)
