"""Stand-in ImageNet backbones in a temporary torch.hub cache, for plumbing tests of LPIPS paths.

The real torchvision files cannot be downloaded here. A state dict of the right architecture with
random weights, at the file name torchvision looks for, makes the code under test find, load and run
the network exactly as it would the real one; the numbers it produces mean nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models import AlexNet_Weights, alexnet

from models.evaluate import torch_hub_checkpoint


def stand_in_alexnet_hub(hub_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point torch.hub at `hub_root` ($TORCH_HOME) and write a random AlexNet where torchvision's
    ImageNet AlexNet would be cached; returns that file. The classifier (unused by LPIPS, 95% of the
    parameters) is stored as broadcast zeros, so the file is ~10 MB instead of ~240 MB."""
    monkeypatch.setenv("TORCH_HOME", str(hub_root))
    path = torch_hub_checkpoint(AlexNet_Weights.DEFAULT.url)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = alexnet().state_dict()
    small = {k: v if k.startswith("features.") else torch.zeros(()).expand(v.shape) for k, v in state.items()}
    torch.save(small, path)
    return path
