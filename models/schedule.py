"""Noise schedules: iDDPM linear betas and guided-diffusion timestep respacing.

The numbers here must be bit-identical to upstream DifFace (guided-diffusion's `get_named_beta_schedule`,
`space_timesteps` and `SpacedDiffusion`), because every start index in the DSST table and every
fixture refers to *respaced* indices of exactly this schedule. That is why the construction mirrors
upstream step by step (numpy float64 linspace, re-derived betas, cumprod of the respaced betas) instead
of simply indexing the base ᾱ: the two differ in the last bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def linear_betas(num_timesteps: int = 1000) -> Tensor:
    """iDDPM's linear beta schedule (float64, shape (T,)).

    Scaled by 1000/T so that any T spans the same noise range as the original 1000-step schedule.
    numpy's linspace is used on purpose: torch.linspace rounds the second half differently.
    """
    scale = 1000 / num_timesteps
    betas = np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
    return torch.from_numpy(betas)


def space_timesteps(num_timesteps: int, spec: str) -> list[int]:
    """Original timesteps kept by a respacing spec (guided-diffusion's `space_timesteps`, sorted).

    `"ddimN"`: the stride s for which `range(0, T, s)` has exactly N entries (as DDIM papers do).
    `"a,b,c"` (or a single count like `"250"`): the T steps are cut into equal sections and each
    section keeps that many evenly spaced steps, rounded as upstream does.
    """
    if spec.startswith("ddim"):
        desired = int(spec[len("ddim") :])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot create exactly {desired} steps with an integer stride from {num_timesteps}")
    counts = [int(x) for x in spec.split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for k, count in enumerate(counts):
        size = size_per + (1 if k < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        frac_stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        # Accumulated in floating point, as upstream does: j·stride rounds differently at the .5 ties
        # (e.g. "21" at T=1000 keeps 499 here, 500 with round(j·stride)).
        position = 0.0
        for _ in range(count):
            steps.append(start + round(position))
            position += frac_stride
        start += size
    return sorted(set(steps))


@dataclass(frozen=True)
class RespacedSchedule:
    """A respaced diffusion schedule, indexed by *respaced* index i = 0 … len-1.

    `timestep_map[i]` is the original timestep (0 … T-1) the UNet is called with (unscaled, as the
    DifFace prior was trained with `rescale_timesteps=False`); `alphas_cumprod[i]` is ᾱ at that step.
    Both live on the CPU: the sampler reads scalars from them, so they never need to follow the images.
    """

    spec: str
    num_timesteps: int
    timestep_map: Tensor  # int64 (S,)
    alphas_cumprod: Tensor  # float64 (S,)

    @classmethod
    def from_spec(cls, spec: str = "ddim250", num_timesteps: int = 1000) -> RespacedSchedule:
        """Build exactly as guided-diffusion's SpacedDiffusion does from the linear schedule."""
        use = space_timesteps(num_timesteps, spec)
        base = np.cumprod(1.0 - linear_betas(num_timesteps).numpy())
        new_betas, last = [], 1.0
        for t in use:
            new_betas.append(1.0 - base[t] / last)
            last = base[t]
        alphas_cumprod = np.cumprod(1.0 - np.array(new_betas, dtype=np.float64))
        return cls(
            spec=spec,
            num_timesteps=num_timesteps,
            timestep_map=torch.tensor(use, dtype=torch.int64),
            alphas_cumprod=torch.from_numpy(alphas_cumprod),
        )

    def __len__(self) -> int:
        return int(self.timestep_map.numel())

    def alpha_bar(self, index: int) -> float:
        """ᾱ at respaced index `index` as a Python float (1.0 for index -1, i.e. 'before step 0')."""
        return 1.0 if index < 0 else float(self.alphas_cumprod[index])


def q_sample(x0: Tensor, schedule: RespacedSchedule, index: int | Tensor, noise: Tensor) -> Tensor:
    """Forward diffusion to respaced `index`: √ᾱ·x0 + √(1-ᾱ)·noise.

    `index` is an int (same step for the batch) or an int64 tensor of shape (N,) (one step per image,
    as DSST gives different faces different starts). Coefficients are formed in float64 and cast to
    x0's dtype, as upstream does.
    """
    abar = schedule.alphas_cumprod[torch.as_tensor(index, dtype=torch.int64).cpu()]
    shape = (-1,) + (1,) * (x0.dim() - 1) if abar.dim() else ()
    a = abar.sqrt().to(device=x0.device, dtype=x0.dtype).reshape(shape)
    s = (1.0 - abar).sqrt().to(device=x0.device, dtype=x0.dtype).reshape(shape)
    return a * x0 + s * noise
