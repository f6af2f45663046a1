"""Synthetic degradations for blind face restoration: y = { [ (x ⊛ k)↓r + n ]_JPEG(q) }↑r.

../shared/method.md names the degradation types (blur, downsampling, noise, JPEG) but not their ranges;
the ranges here are DifFace's own, i.e. the settings its released SwinIR restorer was trained with
(upstream `configs/training/swinir_ffhq512.yaml`, the GFPGAN-style model): a 41×41 Gaussian kernel,
isotropic or anisotropic with probability ½ each, σ ∈ [0.1, 15] px; down-sampling factor r ∈ [0.8, 32]
(bilinear, then bilinear back to the input size); additive Gaussian noise with std ∈ [0, 20] in 8-bit
units; JPEG quality q ∈ [30, 100]; grey with probability 0.01. Using DifFace's ranges is our decision
(documented here and in docs/benchmarks.md), not something the DynFaceRestore paper states.

Everything is a pure function of its inputs: parameters are drawn from a `numpy.random.Generator` or a
seed, the noise from a seed, and JPEG is encoded and decoded in memory (Pillow) — no file I/O. Images
are uint8 (H, W, 3) RGB numpy arrays, as the pipeline takes them; the float work is done in torch.
`severity_set` makes the mild → severe test sets the benchmarks use.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

KernelType = Literal["iso", "aniso"]


@dataclass(frozen=True)
class DegradationRanges:
    """Where each parameter is drawn from (uniformly; JPEG quality as an integer, both ends included)."""

    blur_sigma: tuple[float, float] = (0.1, 15.0)  # px, each axis of the Gaussian kernel
    downsample: tuple[float, float] = (0.8, 32.0)  # factor r (< 1 up-samples first)
    noise: tuple[float, float] = (0.0, 20.0)  # std in 8-bit units
    jpeg_quality: tuple[int, int] = (30, 100)
    kernel_size: int = 41
    kernel_types: tuple[KernelType, ...] = ("iso", "aniso")
    kernel_probs: tuple[float, ...] = (0.5, 0.5)
    gray_prob: float = 0.01

    def __post_init__(self) -> None:
        for name in ("blur_sigma", "downsample", "noise", "jpeg_quality"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} range must satisfy 0 ≤ low ≤ high, got {(lo, hi)}")
        if self.blur_sigma[0] <= 0 or self.downsample[0] <= 0:
            raise ValueError("blur sigma and downsample factor must be > 0")
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ValueError(f"jpeg_quality must lie in [1, 100], got {self.jpeg_quality}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and ≥ 1, got {self.kernel_size}")
        if len(self.kernel_types) != len(self.kernel_probs) or not math.isclose(sum(self.kernel_probs), 1.0):
            raise ValueError("kernel_probs must match kernel_types and sum to 1")
        if not 0.0 <= self.gray_prob <= 1.0:
            raise ValueError("gray_prob must be in [0, 1]")


#: DifFace's training degradation (see the module docstring).
DIFFACE_RANGES = DegradationRanges()

#: Mild → severe sub-ranges of DIFFACE_RANGES (each a slice of every parameter's range; no grey).
SEVERITY_LEVELS: dict[str, DegradationRanges] = {
    "mild": DegradationRanges(blur_sigma=(0.1, 1.0), downsample=(0.8, 2.0), noise=(0.0, 3.0),
                              jpeg_quality=(80, 100), gray_prob=0.0),
    "moderate": DegradationRanges(blur_sigma=(1.0, 3.0), downsample=(2.0, 4.0), noise=(3.0, 8.0),
                                  jpeg_quality=(60, 80), gray_prob=0.0),
    "severe": DegradationRanges(blur_sigma=(3.0, 7.0), downsample=(4.0, 8.0), noise=(8.0, 14.0),
                                jpeg_quality=(40, 60), gray_prob=0.0),
    "extreme": DegradationRanges(blur_sigma=(7.0, 15.0), downsample=(8.0, 32.0), noise=(14.0, 20.0),
                                 jpeg_quality=(30, 40), gray_prob=0.0),
}  # fmt: skip


@dataclass(frozen=True)
class DegradationParams:
    """One draw of the degradation. `theta` is the anisotropic kernel's rotation (radians)."""

    kernel_type: KernelType
    sigma_x: float
    sigma_y: float
    theta: float
    downsample: float
    noise: float  # std, 8-bit units
    jpeg_quality: int
    gray: bool = False
    kernel_size: int = 41

    @property
    def blur_sigma(self) -> float:
        """One-number blur of the kernel: √(σx·σy) (= σ for an isotropic kernel)."""
        return math.sqrt(self.sigma_x * self.sigma_y)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "blur_sigma": self.blur_sigma}


def sample_params(rng: np.random.Generator, ranges: DegradationRanges = DIFFACE_RANGES) -> DegradationParams:
    """Draw one parameter set from `ranges` with `rng` (the same generator state gives the same draw)."""
    kernel_type = ranges.kernel_types[int(rng.choice(len(ranges.kernel_types), p=ranges.kernel_probs))]
    lo, hi = ranges.blur_sigma
    sigma_x = float(rng.uniform(lo, hi))
    if kernel_type == "iso":
        sigma_y, theta = sigma_x, 0.0
    else:
        sigma_y, theta = float(rng.uniform(lo, hi)), float(rng.uniform(-math.pi, math.pi))
    return DegradationParams(
        kernel_type=kernel_type,
        sigma_x=sigma_x,
        sigma_y=sigma_y,
        theta=theta,
        downsample=float(rng.uniform(*ranges.downsample)),
        noise=float(rng.uniform(*ranges.noise)),
        jpeg_quality=int(rng.integers(ranges.jpeg_quality[0], ranges.jpeg_quality[1], endpoint=True)),
        gray=bool(rng.random() < ranges.gray_prob),
        kernel_size=ranges.kernel_size,
    )


def gaussian_kernel(sigma_x: float, sigma_y: float, theta: float, size: int) -> np.ndarray:
    """Normalised (size, size) float64 bivariate Gaussian with axes σx, σy rotated by θ."""
    half = size // 2
    ax = np.arange(-half, half + 1, dtype=np.float64)
    xx, yy = np.meshgrid(ax, ax)
    c, s = math.cos(theta), math.sin(theta)
    u = c * xx + s * yy
    v = -s * xx + c * yy
    k = np.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return k / k.sum()


def _blur(x: torch.Tensor, kernel: np.ndarray) -> torch.Tensor:
    """(1, C, H, W) ⊛ kernel per channel, reflect (101) padding like cv2.filter2D's default.

    Raises ValueError for an image with a side of at most half the kernel: reflect padding mirrors the
    image once, so it cannot reach that far (torch would fail with an opaque RuntimeError).
    """
    k = torch.from_numpy(kernel).to(x.dtype)
    pad = kernel.shape[0] // 2
    if min(x.shape[-2:]) <= pad:
        raise ValueError(
            f"image is {x.shape[-2]}×{x.shape[-1]} px; the {kernel.shape[0]}×{kernel.shape[1]} blur kernel "
            f"needs at least {pad + 1} px a side"
        )
    channels = x.shape[1]
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    return F.conv2d(xp, k.expand(channels, 1, *k.shape).contiguous(), groups=channels)


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bilinear resampling without anti-aliasing (cv2.INTER_LINEAR's behaviour)."""
    if x.shape[-2:] == (h, w):
        return x
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=False)


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode uint8 (H, W, 3) as JPEG at `quality` in memory and decode it again."""
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB")).copy()


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) float in [0, 1] → uint8 (H, W, 3)."""
    return (x[0].clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _kernel_blur(image: np.ndarray, params: DegradationParams) -> torch.Tensor:
    """uint8 (H, W, 3) ⊛ the params' kernel, as (1, 3, H, W) float in [0, 1]."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    x = torch.tensor(image).permute(2, 0, 1)[None].float() / 255.0
    return _blur(x, gaussian_kernel(params.sigma_x, params.sigma_y, params.theta, params.kernel_size))


def blur_only(image: np.ndarray, params: DegradationParams) -> np.ndarray:
    """The first step of `degrade` alone: uint8 (H, W, 3) ⊛ the params' kernel, rounded to uint8 (no
    resampling, noise or JPEG; `degrade` with quality 100 still adds JPEG's block error)."""
    return _to_uint8(_kernel_blur(image, params))


def degrade(image: np.ndarray, params: DegradationParams, seed: int) -> np.ndarray:
    """Apply `params` to uint8 (H, W, 3): blur → down-sample by r → noise (seeded) → JPEG → back to H×W.

    Deterministic: the same image, params and seed give the same bytes. Returns uint8 (H, W, 3).
    """
    x = _kernel_blur(image, params)  # checks the image first
    h, w = image.shape[:2]
    small_h = max(1, int(h / params.downsample))
    small_w = max(1, int(w / params.downsample))
    x = _resize(x, small_h, small_w)
    if params.noise > 0:
        noise = np.random.default_rng(seed).standard_normal(x.shape) * (params.noise / 255.0)
        x = x + torch.from_numpy(noise).to(x.dtype)
    small = jpeg_roundtrip(_to_uint8(x), params.jpeg_quality)
    x = torch.from_numpy(small).permute(2, 0, 1)[None].float() / 255.0
    x = _resize(x, h, w)
    out = _to_uint8(x)
    return to_gray(out) if params.gray else out


def to_gray(image: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma, as cv2's RGB→GRAY, repeated over the three channels (uint8 HxWx3)."""
    luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.repeat(np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def random_degrade(
    image: np.ndarray, seed: int | Sequence[int], ranges: DegradationRanges = DIFFACE_RANGES
) -> tuple[np.ndarray, DegradationParams]:
    """Draw parameters from `ranges` and apply them; `seed` (an int or a sequence of ints, e.g.
    (run_seed, image_index)) fixes both the draw and the noise."""
    seq = np.random.SeedSequence(seed)
    param_seed, noise_seed = seq.spawn(2)
    params = sample_params(np.random.default_rng(param_seed), ranges)
    return degrade(image, params, int(noise_seed.generate_state(1)[0])), params


@dataclass(frozen=True)
class DegradedFace:
    """One member of a severity set: which source image, which level, the draw and the result."""

    source: int  # index into the images given to `severity_set`
    level: str
    params: DegradationParams
    image: np.ndarray = field(repr=False)


def severity_set(
    images: Sequence[np.ndarray],
    *,
    seed: int = 0,
    levels: dict[str, DegradationRanges] | None = None,
    per_image: int = 1,
) -> list[DegradedFace]:
    """Every image degraded `per_image` times at every level (mild → severe by default).

    Each face's seed is derived from (seed, level name, the image's pixels, repeat), never from positions,
    so a face does not change when other images or levels are added, removed or reordered. Only arrays
    identify an image here, so identical images get identical draws.
    """
    levels = SEVERITY_LEVELS if levels is None else levels
    keys = [image_key(image) for image in images]
    out = []
    for name, ranges in levels.items():
        level = stable_key(name.encode())
        for i, (image, key) in enumerate(zip(images, keys, strict=True)):
            for rep in range(per_image):
                degraded, params = random_degrade(image, (seed, level, key, rep), ranges)
                out.append(DegradedFace(i, name, params, degraded))
    return out


def stable_key(*parts: bytes | np.ndarray) -> int:
    """A 128-bit seed component naming `parts` (a level name, a file's path, C-contiguous pixels) the same
    in every process: Python's hash() of str is salted per process, and positions shift as items come and
    go."""
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:  # each part's length first: ("ab", "c") and ("a", "bc") name different things
        digest.update(memoryview(part).nbytes.to_bytes(8, "little"))
        digest.update(part)
    return int.from_bytes(digest.digest(), "little")


def image_key(image: np.ndarray) -> int:
    """`stable_key` of an array's shape, dtype and pixels (hashed in place, not copied)."""
    return stable_key(f"{image.shape} {image.dtype.str} ".encode(), np.ascontiguousarray(image))


def with_params(params: DegradationParams, **changes: Any) -> DegradationParams:
    """A copy of `params` with some fields changed (for controlled one-factor sweeps)."""
    return replace(params, **changes)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) between two uint8 images of the same shape; inf when identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)
