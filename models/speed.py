"""GPU fast-path switches of the pipeline, in one small dataclass (`SpeedOptions`).

What each switch does and why its default is what it is (measured equivalence: docs/benchmarks.md,
"GPU path"; tests: tests/models/test_speed_options.py):

- SDPA attention is not a switch: the UNet (models/unet.py) and the restorer (models/swinir.py)
  always call ``F.scaled_dot_product_attention``, which picks a fused kernel on CUDA and is the same
  softmax(q·kᵀ/√d)·v as upstream's hand-written einsum (held to the upstream fixtures at 1e-4).
- ``channels_last``: UNet and restorer weights (and the UNet's input) in NHWC, which cuDNN's fast
  convolution kernels (tensor cores in fp16/bf16) use without transposes. Same arithmetic, only the
  layout and hence the summation order of some kernels changes (≤ 1e-5 here). On by default on
  every device: on this project's CPU neither the tiny restorer nor the tiny UNet was slower with it
  (bench/gpu_path.py; the numbers are in docs/benchmarks.md, "GPU path"); on CUDA it is cuDNN's
  preferred layout.
- ``compile``: ``torch.compile`` of the UNet (the sampler calls it NFE times per face, so it is where
  compile pays). Off by default: the first call (and each new batch size) compiles for tens of
  seconds to minutes, which a worker would pay on its first jobs, and it needs a C++ toolchain (CPU)
  or Triton (CUDA) at run time. ``compile_mode="reduce-overhead"`` adds CUDA graphs (see below).
- ``pin_memory``: input faces are copied host → device from page-locked memory, asynchronously.
  Only ever used when the device is CUDA (pinning needs a CUDA driver).
- precision is the pipeline's ``dtype`` (fp32/fp16/bf16), not repeated here.

CUDA graphs are not captured by hand: the sampler's batch size varies per call (the last batch of
a photo, faces joining the loop at their own start step), guidance and cancellation run between
UNet calls, and each timestep is a new tensor, so a hand-made capture would need static buffers
and a graph per batch size and would silently replay stale inputs if any of that were missed.
``torch.compile(mode="reduce-overhead")`` does the capture with its own guards (re-capturing per
shape), so it is the supported way to get graphs (``DYNFACE_COMPILE_MODE=reduce-overhead``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

CompileMode = Literal["default", "reduce-overhead", "max-autotune"]
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class SpeedOptions:
    """How the pipeline's networks run; none of these change what is computed, only how fast."""

    channels_last: bool = True
    compile: bool = False
    compile_mode: CompileMode = "default"
    pin_memory: bool = True

    def __post_init__(self) -> None:
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")


def memory_format(options: SpeedOptions) -> torch.memory_format:
    return torch.channels_last if options.channels_last else torch.contiguous_format


def apply_memory_format(module: nn.Module, options: SpeedOptions) -> nn.Module:
    """4-D conv weights to NHWC (or back to NCHW) in place; ``Module.to(memory_format=...)`` leaves
    other parameters alone. Both ways, so a module shared with an earlier pipeline gets this one's."""
    return module.to(memory_format=memory_format(options))


def compiled(module: nn.Module, options: SpeedOptions) -> nn.Module:
    """The module itself, or a ``torch.compile`` wrapper of it sharing its parameters.

    ``dynamic=None`` lets dynamo mark the batch size dynamic after the first re-compile instead
    of compiling one graph per batch size; ``fullgraph=False`` so a graph break degrades speed,
    never correctness.
    """
    if not options.compile:
        return module
    return torch.compile(module, mode=options.compile_mode, dynamic=None)  # type: ignore[return-value]


def to_device(x: torch.Tensor, device: torch.device, options: SpeedOptions) -> torch.Tensor:
    """Host tensor → ``device``; through pinned memory, asynchronously, when that is a CUDA device."""
    if device.type == "cuda" and options.pin_memory and x.device.type == "cpu":
        # Safe without a sync: the copy is ordered on the current stream before any use of it.
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def to_host(x: torch.Tensor, options: SpeedOptions) -> torch.Tensor:
    """Device tensor → host; into pinned memory when it is on a CUDA device, so that `to_device` can
    bring it back asynchronously (the copy here is synchronous: the result is ready on return)."""
    if x.device.type == "cuda" and options.pin_memory:
        return torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x)
    return x.cpu()
