"""DDIM sampling over a respaced schedule, matching upstream DifFace's restoration loop.

Upstream convention (see ../shared/fixtures/README.md): the input is noised *at* respaced index
`start_index` (q_sample) and the loop then denoises at i = start_index−1 … 0, calling the UNet with the
original timestep `timestep_map[i]`; ᾱ_prev is ᾱ[i−1], or 1 at i = 0. Hence one denoiser evaluation per
step and **NFE = start_index** exactly.

Per-sample starts and etas (DSST gives each face its own start, auto fidelity its own eta) run as one
batched loop from the largest start: a sample joins when the loop reaches its start index, so every
sample still makes exactly its own start_index steps, and before that it is neither read nor written.
Only the samples that have started are passed to the denoiser (the batch is sliced), so a batch costs
Σ start_index evaluations of one image, not B × max(start_index).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from models.errors import Cancelled
from models.schedule import RespacedSchedule

EpsModel = Callable[[Tensor, Tensor], Tensor]
#: A generator for the whole batch, or one per sample (then a sample's draws depend on it alone).
Generators = torch.Generator | Sequence[torch.Generator] | None


class Guide(Protocol):
    """`guide(x0_hat, i, rows) -> x0′` on the active samples.

    `rows` is None when x0_hat holds the whole batch, else the int64 indices (into the batch given to
    the sampler) of the rows of x0_hat, in order — needed by guides that hold per-sample data once
    samples start at different steps. Guides without that parameter work whenever all starts agree.
    """

    def __call__(self, x0_hat: Tensor, index: int, rows: Tensor | None = None, /) -> Tensor: ...


def ddim_sample(
    eps_model: EpsModel,
    x_start: Tensor,
    schedule: RespacedSchedule,
    start_index: int | Sequence[int] | Tensor,
    eta: float | Sequence[float] | Tensor,
    *,
    guide: Guide | Callable[[Tensor, int], Tensor] | None = None,
    noise: Callable[[int], Tensor] | None = None,
    generator: Generators = None,
    callback: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> Tensor:
    """Run DDIM from `x_start` (sample b already at respaced index start_index[b]) down to x0 in [-1,1].

    `start_index` and `eta`: one value for the batch, or one per sample (sequence or (B,) tensor).
    eps_model(x_t, t) → ε, with t the original timesteps as an int64 tensor of shape (n,) on x's
    device, n the number of samples active at that step (the caller slices the UNet's first 3 channels
    and casts to its own dtype). Each step, for the active samples:
      x̂0 = clamp(√(1/ᾱ)·x_t − √(1/ᾱ−1)·ε, −1, 1);
      without `guide`, the update uses upstream's raw ε (the clamp does not alter ε);
      with `guide(x̂0, i[, rows]) → x0′`, ε is re-derived from x0′ as ε′ = ε + √(ᾱ/(1−ᾱ))·(x̂0 − x0′),
        which is (x_t − √ᾱ·x0′)/√(1−ᾱ) whenever the clamp did not bite, and leaves ε untouched where
        the guide changed nothing (so a zero-weight guide is bit-identical to no guide);
      σ = eta·√((1−ᾱprev)/(1−ᾱ))·√(1−ᾱ/ᾱprev);
      x_prev = √ᾱprev·x0′ + √(1−ᾱprev−σ²)·ε′ + σ·z (z not added at i = 0).
    Noise z: a sample with eta > 0 takes one draw per step of its own *including* i = 0 (as upstream,
    so seeded streams line up); a sample with eta = 0 takes none. Sources, in order of precedence:
      `noise(k)` gives the whole batch's k-th draw (k = 0 at i = max start − 1), rows picked from it;
      `generator` as a sequence (one per sample): sample b draws a (1, …) tensor from generator[b], so
        its result does not depend on the other samples of the batch;
      `generator` as one generator (or None, torch's default): one draw shaped like the noisy active
        rows per step.

    Coefficients are float64 values cast to the state dtype and combined in that dtype, as upstream.
    State precision: half-precision inputs are sampled in float32 (the 1/√ᾱ amplification over many
    steps would otherwise accumulate fp16 rounding) and the result is returned in x_start's dtype.
    `should_cancel()` is checked before every step (raises `models.errors.Cancelled`);
    `callback(step, total)` runs after every step with step = 1 … total = max start index.
    """
    n = x_start.shape[0]
    starts = _per_sample(start_index, n, "start_index")
    etas = [float(e) for e in _per_sample(eta, n, "eta")]
    if any(not 0 <= s < len(schedule) for s in starts):
        raise ValueError(f"start_index {starts} outside 0..{len(schedule) - 1}")
    if any(e < 0 for e in etas):
        raise ValueError(f"eta must be ≥ 0, got {etas}")
    if not isinstance(generator, torch.Generator | None) and len(generator) != n:
        raise ValueError(f"{len(generator)} generators for a batch of {n}")
    state_dtype = torch.float32 if x_start.dtype in (torch.float16, torch.bfloat16) else x_start.dtype
    x = x_start.to(state_dtype, copy=True)  # rows are updated in place below: never write x_start
    eta_col = torch.tensor(etas, dtype=state_dtype, device=x.device).reshape(-1, *[1] * (x.dim() - 1))

    total = max(starts, default=0)
    for step, i in enumerate(range(total - 1, -1, -1)):
        if should_cancel is not None and should_cancel():
            raise Cancelled("restoration was cancelled")
        active = [b for b in range(n) if starts[b] > i]
        if len(active) == n:  # the common case, and the only one for a scalar start: no copies
            rows = None
            x = _ddim_step(eps_model, x, schedule, i, eta_col, guide, rows)
        else:
            rows = torch.tensor(active, dtype=torch.int64, device=x.device)
            x[rows] = _ddim_step(eps_model, x[rows], schedule, i, eta_col[rows], guide, rows)
        noisy = [b for b in active if etas[b] > 0]
        if noisy:
            z = _draw(noise, generator, step, noisy, x)
            if i > 0 and len(noisy) == n:  # drawn at i = 0 too (and discarded), as upstream does
                x = x + _sigma(schedule, i, eta_col) * z
            elif i > 0:
                idx = torch.tensor(noisy, dtype=torch.int64, device=x.device)
                x[idx] = x[idx] + _sigma(schedule, i, eta_col[idx]) * z
        if callback is not None:
            callback(step + 1, total)
    return x.clamp(-1.0, 1.0).to(x_start.dtype)


def _ddim_step(
    eps_model: EpsModel,
    x: Tensor,
    schedule: RespacedSchedule,
    i: int,
    eta: Tensor,
    guide: Guide | Callable[[Tensor, int], Tensor] | None,
    rows: Tensor | None,
) -> Tensor:
    """One deterministic DDIM update of the active samples x (all at index i) to i−1, before noise."""
    t = torch.full((x.shape[0],), int(schedule.timestep_map[i]), dtype=torch.int64, device=x.device)
    eps = eps_model(x, t).to(x.dtype)
    abar = schedule.alpha_bar(i)
    x0 = (_coef(math.sqrt(1.0 / abar), x) * x - _coef(math.sqrt(1.0 / abar - 1.0), x) * eps).clamp(-1.0, 1.0)
    if guide is not None:
        x0_guided = (guide(x0, i) if rows is None else guide(x0, i, rows)).to(x.dtype)  # type: ignore[call-arg]
        eps = eps + _coef(math.sqrt(abar / (1.0 - abar)), x) * (x0 - x0_guided)
        x0 = x0_guided
    ab_prev = _coef(schedule.alpha_bar(i - 1), x)
    sigma = _sigma(schedule, i, eta)
    return x0 * torch.sqrt(ab_prev) + torch.sqrt((1 - ab_prev - sigma**2).clamp(min=0)) * eps


def _sigma(schedule: RespacedSchedule, i: int, eta: Tensor) -> Tensor:
    """DDIM's σ at step i for per-sample etas (n, 1, …); 0 where eta is 0."""
    ab, ab_prev = _coef(schedule.alpha_bar(i), eta), _coef(schedule.alpha_bar(i - 1), eta)
    return eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)


def _coef(value: float, like: Tensor) -> Tensor:
    # Scalars become 0-dim tensors in the state dtype *before* any arithmetic, exactly as upstream
    # casts its float64 tables with `.float()`: the tiny-UNet loop is chaotic (a 1e-6 change moves
    # pixels by 0.1), so only op-for-op identical rounding reproduces the fixture.
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def _draw(
    noise: Callable[[int], Tensor] | None, generator: Generators, step: int, rows: list[int], x: Tensor
) -> Tensor:
    """Standard-normal draws for batch rows `rows` (in order) at loop step `step`, in x's dtype."""
    if noise is not None:
        z = noise(step)
        z = z if len(rows) == x.shape[0] else z[torch.tensor(rows, device=z.device)]
    elif generator is None or isinstance(generator, torch.Generator):
        z = torch.randn((len(rows), *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
    else:
        shape = (1, *x.shape[1:])
        z = torch.cat(
            [torch.randn(shape, generator=generator[b], device=x.device, dtype=x.dtype) for b in rows]
        )
    return z.to(device=x.device, dtype=x.dtype)


def _per_sample(value: float | Sequence[float] | Tensor, n: int, name: str) -> list[Any]:
    """A scalar broadcast to the batch, or a per-sample sequence / (n,) tensor checked for length."""
    if isinstance(value, Tensor):
        value = value.tolist() if value.dim() else value.item()
    if isinstance(value, int | float):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} values for a batch of {n}")
    return values
