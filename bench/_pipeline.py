"""Pipeline helpers shared by the benches: `--device` and its default profile, the networks a bench
runs (a profile's real weights where they are present, else its architecture with seeded random
weights) and a count of the UNet evaluations a pipeline really makes (FaceFacts.nfe is the start
index the pipeline chose, so a check against it could never fail)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models import weights
from models.pipeline import RestorationPipeline, prior_weights, real_networks, tiny_networks
from models.profiles import Profile
from models.swinir import SwinIR
from models.unet import IDDPMUNet


@dataclass(frozen=True)
class Networks:
    profile: Profile
    unet: IDDPMUNet
    restorer: SwinIR
    weights: str  # what the weights are, said in every report that uses them
    random: bool  # random weights (always the tiny profile's; the real one's without its files)


def networks(profile: Profile, weights_dir: Path | None = None) -> Networks:
    """The real profile's released prior and restorer when both are in `weights_dir` (default: the
    weights store's); otherwise, and always for the tiny profile, the architecture with the seeded
    random weights of `tiny_networks`. Speed, batching and layout/precision agreement do not depend
    on the weight values; fp16 overflow and the restorer's output (hence the blur level) do."""
    wdir = weights.resolve_dir(weights_dir)
    if profile.real:
        if not weights.missing_for([*prior_weights(wdir), "difface_swinir"], wdir):
            unet, restorer, files = real_networks(profile, wdir)
            return Networks(
                profile, unet, restorer, f"real weights ({files['prior']}, {files['restorer']})", False
            )
        unet, restorer = tiny_networks(profile)
        missing = f"**random weights** (seed 0): the released ones are not in `{wdir}`"
        return Networks(profile, unet, restorer, missing, True)
    unet, restorer = tiny_networks(profile)
    return Networks(profile, unet, restorer, "the tiny profile's toy networks (random weights, seed 0)", True)


def default_profile(device: torch.device) -> str:
    """The real 512 px networks on CUDA (what a GPU run is for), the tiny ones on CPU (a smoke check)."""
    return "real" if device.type == "cuda" else "tiny"


def parse_device(parser: argparse.ArgumentParser, text: str) -> torch.device:
    """`--device`: cpu, cuda or cuda:N, checked against the GPUs torch sees (a clear usage error)."""
    try:
        device = torch.device(text)
    except RuntimeError as e:
        parser.error(f"--device {text}: {e}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {text}: only cpu and cuda[:N] are benchmarked")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {text}: torch sees no CUDA device here; use --device cpu")
        count = torch.cuda.device_count()
        if (device.index or 0) >= count:
            parser.error(f"--device {text}: torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        device = torch.device("cuda", device.index or 0)
    return device


class UNetCalls(nn.Module):
    """Counts what passes through a pipeline's UNet: `calls` forwards and `faces` face-evaluations
    (the sum of their batch sizes). `count(pipe)` installs it in place of `pipe._unet_call`, the
    callable the sampler's `_eps` uses, so it sees every evaluation the service would make."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.faces = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.faces += x.shape[0]
        return self.inner(x, t)

    @classmethod
    def count(cls, pipe: RestorationPipeline) -> UNetCalls:
        counter = cls(pipe._unet_call)
        pipe._unet_call = counter
        return counter
