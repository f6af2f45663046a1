"""Background super-resolution of whole photos: Real-ESRGAN's RRDBNet, run in tiles.

With `upscale` > 1, faces are restored by the diffusion pipeline and pasted on top of an upscaled
photo; this module makes that photo when a background model is configured
(`DYNFACE_BACKGROUND_MODEL`). Unconfigured (`none`, the default), the background is a Lanczos
resize (`models.faces.upscale_image`). Either way the background only shows outside the face
masks. At `upscale` 1 the photo is never run through the model: it stays exactly as decoded.

The model's own scale (2 or 4) rarely has to equal the requested `upscale` (1-4): the model runs
once and its output is Lanczos-resized to exactly `upscale` times the photo, as Real-ESRGAN's
`outscale` and GFPGAN's background upsampler do (x2plus for `upscale` 4 is x2 then a 2x resize;
x4plus for `upscale` 2 is x4 then a halving).

The architecture comes from spandrel (chaiNNer's model loader): it recognises RRDBNet from the
state dict's key names, infers its width, depth and scale (Real-ESRGAN's x2 model pixel-unshuffles
its input) and unpickles with a restricted unpickler, so the published files load as they are.

Tiles: the photo is cut into about `tile`-pixel squares, each run with `overlap` pixels of context
on every side that are cut from its output, so memory stays bounded on large photos. A tile's
core equals the untiled result wherever the overlap covers the network's receptive field; the
published 23-block net's nominal field is larger than any practical overlap, so seams can differ
from an untiled run by small amounts (Real-ESRGAN's own tiling uses 10 pixels of context).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from spandrel import ImageModelDescriptor, ModelLoader

from models import weights
from models.faces import resize_to
from models.speed import SpeedOptions, memory_format

NONE = "none"
#: DYNFACE_BACKGROUND_MODEL values (each also the manifest name of its file) and the model's scale.
BACKGROUND_MODELS: dict[str, int] = {"realesrgan_x2plus": 2, "realesrgan_x4plus": 4}

#: The tiny profile's stand-in: the same RRDBNet layout at toy width and depth. spandrel's RRDBNet
#: fixes the growth channels at 32, as every published file has them.
TINY_RRDBNET = {"num_feat": 16, "num_block": 1}
_GROWTH_CHANNELS = 32


@dataclass(frozen=True)
class BackgroundConfig:
    """Which background model, and the tiling it runs with (input pixels)."""

    model: str = NONE
    tile: int = 512  # tile side; 0 = the whole photo in one pass
    overlap: int = 32  # context on each side of a tile

    def __post_init__(self) -> None:
        if self.model != NONE and self.model not in BACKGROUND_MODELS:
            raise ValueError(
                f"Unknown background model {self.model!r}; choose from {[NONE, *BACKGROUND_MODELS]}."
            )
        if self.tile < 0 or self.overlap < 0:
            raise ValueError(f"tile and overlap must be ≥ 0, got {self.tile} and {self.overlap}")

    @classmethod
    def from_env(cls) -> BackgroundConfig:
        """$DYNFACE_BACKGROUND_MODEL, $DYNFACE_BACKGROUND_TILE, $DYNFACE_BACKGROUND_TILE_OVERLAP, for the
        CLI (`dynface restore`, `dynface weights pull`): models/ does not import app/'s Settings, which
        the worker reads them from."""
        default = cls()
        return cls(
            model=os.environ.get("DYNFACE_BACKGROUND_MODEL") or default.model,
            tile=int(os.environ.get("DYNFACE_BACKGROUND_TILE") or default.tile),
            overlap=int(os.environ.get("DYNFACE_BACKGROUND_TILE_OVERLAP") or default.overlap),
        )

    @property
    def weight_names(self) -> tuple[str, ...]:
        """Manifest names of the files this configuration needs."""
        return () if self.model == NONE else (self.model,)


class BackgroundUpscaler:
    """An RRDBNet (spandrel descriptor) that upscales RGB uint8 photos tile by tile.

    `weights` says where the parameters came from (the file name, or "random (tiny profile)"),
    for `info`, which /v1/models shows.
    """

    def __init__(self, model: ImageModelDescriptor, config: BackgroundConfig, weights: str) -> None:
        if model.architecture.id != "ESRGAN" or model.scale != BACKGROUND_MODELS[config.model]:
            raise ValueError(
                f"{weights}: expected an RRDBNet (ESRGAN family) of scale "
                f"{BACKGROUND_MODELS[config.model]} for {config.model}, got {model.architecture.id} "
                f"of scale {model.scale}"
            )
        self.model = model.eval()
        self.config = config
        self.weights = weights
        self._memory_format = torch.contiguous_format

    @property
    def scale(self) -> int:
        return int(self.model.scale)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def info(self) -> dict[str, Any]:
        return {
            "model": self.config.model,
            "scale": self.scale,
            "weights": self.weights,
            "tile": self.config.tile,
            "tile_overlap": self.config.overlap,
        }

    def to(self, device: torch.device, dtype: torch.dtype, speed: SpeedOptions) -> BackgroundUpscaler:
        """Place it like the pipeline's other networks: its device, precision (fp16 on CUDA by
        default) and memory format."""
        self.model.to(device, dtype)
        self._memory_format = memory_format(speed)
        self.model.model.to(memory_format=self._memory_format)
        return self

    def upscale(self, rgb: np.ndarray, factor: float) -> np.ndarray:
        """`rgb` (H, W, 3) uint8 upscaled to exactly (round(H·factor), round(W·factor), 3).

        Factor 1 returns a copy without running the model, so that photos that are not upscaled
        keep their background exactly as decoded.
        """
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected uint8 HxWx3, got {rgb.dtype} {rgb.shape}")
        if factor == 1:
            return rgb.copy()
        h, w = rgb.shape[:2]
        target = (max(1, round(w * factor)), max(1, round(h * factor)))
        out = self.super_resolve(rgb)
        return out if (out.shape[1], out.shape[0]) == target else resize_to(out, target)

    @torch.inference_mode()
    def super_resolve(self, rgb: np.ndarray) -> np.ndarray:
        """The model's output at its own scale, (H·s, W·s, 3) uint8, assembled tile by tile on the
        host: the device holds the photo (uint8) and one tile's activations at a time."""
        h, w = rgb.shape[:2]
        s = self.scale
        # Tile corners on the grid the model pads its input to: pixel-unshuffle (x2 model) groups
        # then line up with an untiled run's.
        grid = self.model.size_requirements.multiple_of
        overlap = _round_up(self.config.overlap, grid)
        image = torch.tensor(rgb, device=self.device)  # a copy: decoded photos may be read-only
        out = np.empty((h * s, w * s, 3), np.uint8)
        for y0, y1 in _spans(h, self.config.tile, grid):
            for x0, x1 in _spans(w, self.config.tile, grid):
                iy0, ix0 = max(y0 - overlap, 0), max(x0 - overlap, 0)
                iy1, ix1 = min(y1 + overlap, h), min(x1 + overlap, w)
                x = image[iy0:iy1, ix0:ix1].permute(2, 0, 1)[None].to(self.model.dtype).div(255)
                y = self.model(x.contiguous(memory_format=self._memory_format))[0]
                core = y[:, (y0 - iy0) * s : (y1 - iy0) * s, (x0 - ix0) * s : (x1 - ix0) * s]
                pixels = core.float().mul(255).round().to(torch.uint8).permute(1, 2, 0)
                out[y0 * s : y1 * s, x0 * s : x1 * s] = pixels.cpu().numpy()
        return out


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _spans(length: int, tile: int, grid: int) -> list[tuple[int, int]]:
    """[start, end) of equal-ish tiles covering `length` (starts on `grid`): no thin last tile."""
    if tile == 0 or length <= tile:
        return [(0, length)]
    step = _round_up(math.ceil(length / math.ceil(length / tile)), grid)
    return [(start, min(start + step, length)) for start in range(0, length, step)]


def load(config: BackgroundConfig, weights_dir: str | Path) -> BackgroundUpscaler | None:
    """The configured model from its published file in `weights_dir` (None when it is `none`).

    Never downloads: an absent file raises MissingWeightsError naming it and its pull command.
    """
    if config.model == NONE:
        return None
    (entry,) = weights.select([config.model])
    path = Path(weights_dir) / entry.path
    if not path.is_file():
        raise weights.MissingWeightsError([entry.name], weights_dir)
    model = ModelLoader().load_from_file(path)
    if not isinstance(model, ImageModelDescriptor):
        raise ValueError(f"{path}: not an image-to-image model")
    return BackgroundUpscaler(model, config, entry.file_name)


def tiny(config: BackgroundConfig) -> BackgroundUpscaler | None:
    """The tiny profile's background model: the configured model's layout and scale at toy size,
    with seeded random weights. Never a published file, so tiny output cannot pass for real."""
    if config.model == NONE:
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = rrdbnet_state_dict(BACKGROUND_MODELS[config.model], **TINY_RRDBNET)
    model = ModelLoader().load_from_state_dict({"params_ema": state})
    assert isinstance(model, ImageModelDescriptor)  # RRDBNet is an image-to-image model
    return BackgroundUpscaler(model, config, "random (tiny profile)")


def rrdbnet_state_dict(
    scale: int, *, num_feat: int = 64, num_block: int = 23, gain: float = 0.6
) -> dict[str, torch.Tensor]:
    """Random weights with the key names and shapes of Real-ESRGAN's RRDBNet files (BasicSR's
    `RRDBNet(num_in_ch=3, num_out_ch=3, scale=scale, num_grow_ch=32)`; the published files hold
    this under "params_ema"). Draws from torch's global generator.

    `gain` scales He-normal weights down, and the last convolution's bias is 0.5, so a random net's
    output varies across mid-grey instead of clipping at black or white.
    """
    if scale not in (2, 4):
        raise ValueError(f"Real-ESRGAN RRDBNet files have scale 2 or 4, got {scale}")
    in_channels = 3 * (4 if scale == 2 else 1)  # x2: the input is pixel-unshuffled by 2
    gc = _GROWTH_CHANNELS
    shapes = {"conv_first": (num_feat, in_channels)}
    for b in range(num_block):
        for r in (1, 2, 3):
            for c in range(1, 5):
                shapes[f"body.{b}.rdb{r}.conv{c}"] = (gc, num_feat + (c - 1) * gc)
            shapes[f"body.{b}.rdb{r}.conv5"] = (num_feat, num_feat + 4 * gc)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        shapes[name] = (num_feat, num_feat)
    shapes["conv_last"] = (3, num_feat)
    state = {}
    for name, (c_out, c_in) in shapes.items():
        state[f"{name}.weight"] = torch.randn(c_out, c_in, 3, 3) * gain * math.sqrt(2 / (9 * c_in))
        state[f"{name}.bias"] = torch.zeros(c_out)
    state["conv_last.bias"] += 0.5
    return state
