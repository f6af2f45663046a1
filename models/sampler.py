"""DDIM sampling over a respaced schedule, matching upstream DifFace's restoration loop.

Upstream convention (see ../shared/fixtures/README.md): the input is noised *at* respaced index
`start_index` (q_sample) and the loop then denoises at i = start_index−1 … 0, calling the UNet with the
original timestep `timestep_map[i]`; ᾱ_prev is ᾱ[i−1], or 1 at i = 0. Hence one denoiser evaluation per
step and **NFE = start_index** exactly; the sampler reports it through `callback(step, total)`, whose
`step` after the last call equals the number of evaluations made (`total` = start_index).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from models.errors import Cancelled
from models.schedule import RespacedSchedule

EpsModel = Callable[[Tensor, Tensor], Tensor]
Guide = Callable[[Tensor, int], Tensor]


def ddim_sample(
    eps_model: EpsModel,
    x_start: Tensor,
    schedule: RespacedSchedule,
    start_index: int,
    eta: float,
    *,
    guide: Guide | None = None,
    noise: Callable[[int], Tensor] | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> Tensor:
    """Run DDIM from `x_start` (already at respaced index `start_index`) down to a clean x0 in [-1,1].

    eps_model(x_t, t) → ε, with t the original timesteps as an int64 tensor of shape (N,) on x's
    device (the caller slices the UNet's first 3 channels and casts to its own dtype). Each step:
      x̂0 = clamp(√(1/ᾱ)·x_t − √(1/ᾱ−1)·ε, −1, 1);
      without `guide`, the update uses upstream's raw ε (the clamp does not alter ε);
      with `guide(x̂0, i) → x0′`, ε is re-derived from x0′ as ε′ = ε + √(ᾱ/(1−ᾱ))·(x̂0 − x0′), which is
        (x_t − √ᾱ·x0′)/√(1−ᾱ) whenever the clamp did not bite, and leaves ε untouched where the guide
        changed nothing (so a zero-weight guide is bit-identical to no guide);
      σ = eta·√((1−ᾱprev)/(1−ᾱ))·√(1−ᾱ/ᾱprev);
      x_prev = √ᾱprev·x0′ + √(1−ᾱprev−σ²)·ε′ + σ·z (z not added at i = 0).
    Noise z: with eta > 0 one draw per step *including* i = 0 (as upstream, so seeded streams line up);
    `noise(k)` gives the k-th draw (k = 0 at i = start_index−1), else `torch.randn` with `generator`.
    With eta = 0 nothing is drawn.

    Coefficients are float64 values cast to the state dtype and combined in that dtype, as upstream.
    State precision: half-precision inputs are sampled in float32 (the 1/√ᾱ amplification over many
    steps would otherwise accumulate fp16 rounding) and the result is returned in x_start's dtype.
    `should_cancel()` is checked before every step (raises `models.errors.Cancelled`);
    `callback(step, total)` runs after every step with step = 1 … total = start_index (= NFE so far).
    """
    if not 0 <= start_index < len(schedule):
        raise ValueError(f"start_index {start_index} outside 0..{len(schedule) - 1}")
    if eta < 0:
        raise ValueError(f"eta must be ≥ 0, got {eta}")
    state_dtype = torch.float32 if x_start.dtype in (torch.float16, torch.bfloat16) else x_start.dtype
    x = x_start.to(state_dtype)

    def coef(value: float) -> Tensor:
        # Scalars become 0-dim tensors in the state dtype *before* any arithmetic, exactly as upstream
        # casts its float64 tables with `.float()`: the tiny-UNet loop is chaotic (a 1e-6 change moves
        # pixels by 0.1), so only op-for-op identical rounding reproduces the fixture.
        return torch.tensor(value, dtype=state_dtype, device=x.device)

    total = start_index
    for step, i in enumerate(range(start_index - 1, -1, -1)):
        if should_cancel is not None and should_cancel():
            raise Cancelled("restoration was cancelled")
        abar, abar_prev = schedule.alpha_bar(i), schedule.alpha_bar(i - 1)
        t = torch.full((x.shape[0],), int(schedule.timestep_map[i]), dtype=torch.int64, device=x.device)
        eps = eps_model(x, t).to(state_dtype)
        x0 = (coef(math.sqrt(1.0 / abar)) * x - coef(math.sqrt(1.0 / abar - 1.0)) * eps).clamp(-1.0, 1.0)
        if guide is not None:
            x0_guided = guide(x0, i).to(state_dtype)
            eps = eps + coef(math.sqrt(abar / (1.0 - abar))) * (x0 - x0_guided)
            x0 = x0_guided
        ab, ab_prev = coef(abar), coef(abar_prev)
        sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
        x = x0 * torch.sqrt(ab_prev) + torch.sqrt((1 - ab_prev - sigma**2).clamp(min=0)) * eps
        if eta > 0:
            z = noise(step) if noise is not None else _randn(x, generator)
            if i > 0:
                x = x + sigma * z.to(device=x.device, dtype=state_dtype)
        if callback is not None:
            callback(step + 1, total)
    return x.clamp(-1.0, 1.0).to(x_start.dtype)


def _randn(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """One standard-normal draw shaped like the state, on its device, from `generator` if given."""
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
