"""Background super-resolution of whole photos: Real-ESRGAN's RRDBNet, run in tiles.

With `upscale` > 1, faces are restored by the diffusion pipeline and pasted on top of an upscaled
photo; this module makes that photo when a background model is configured
(`DYNFACE_BACKGROUND_MODEL`). Unconfigured (`none`, the default), the background is a Lanczos
resize (`models.faces.upscale_image`). Either way the background only shows outside the face
masks. At `upscale` 1 the photo is never run through the model: it stays exactly as decoded.

The model's own scale (2 or 4) rarely has to equal the requested `upscale` (1-4): the model runs
once and its output is Lanczos-resized to exactly `upscale` times the photo, as Real-ESRGAN's
`outscale` and GFPGAN's background upsampler do (x2plus for `upscale` 4 is x2 then a 2x resize;
x4plus for `upscale` 2 is x4 then a halving). Each tile's output is resized straight into the
result, so the model's whole output (4 times the result's pixels for x4plus at `upscale` 2: 768 MB
for a 16 MP photo) never exists at once; memory is bounded by the result and one tile.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from spandrel import ImageModelDescriptor, ModelLoader

from models import weights
from models.errors import Cancelled
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

    def upscale(
        self, rgb: np.ndarray, factor: float, *, should_cancel: Callable[[], bool] | None = None
    ) -> np.ndarray:
        """`rgb` (H, W, 3) uint8 upscaled to exactly (round(H·factor), round(W·factor), 3); a true
        `should_cancel()` stops it before its next tile (`models.errors.Cancelled`, as the sampler's).

        Factor 1 returns a copy without running the model, so that photos that are not upscaled
        keep their background exactly as decoded. At the model's own scale this is `super_resolve`;
        at any other, each tile's output is Lanczos-resized into the result (`_lanczos`) with the
        margin the kernel reaches into (cut from the tile's context), so that the model's whole output
        is never held. A tile's result pixels then equal a resize of the whole output wherever its
        margin equals the neighbouring tile's core, as with an overlap covering the receptive field.
        """
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected uint8 HxWx3, got {rgb.dtype} {rgb.shape}")
        if factor == 1:
            return rgb.copy()
        h, w = rgb.shape[:2]
        rows, cols = _Axis.of(h, self.scale, factor), _Axis.of(w, self.scale, factor)
        if rows.size == h * self.scale and cols.size == w * self.scale:
            return self.super_resolve(rgb, should_cancel=should_cancel)
        out = np.empty((rows.size, cols.size, 3), np.uint8)
        for (y0, y1), (x0, x1), pixels in self._tiles(rgb, rows.source, cols.source, should_cancel):
            ty0, ty1, tx0, tx1 = rows.target(y0), rows.target(y1), cols.target(x0), cols.target(x1)
            if ty1 > ty0 and tx1 > tx0:
                box_y = rows.box(ty0, ty1, rows.source(y0, y1)[0])
                box_x = cols.box(tx0, tx1, cols.source(x0, x1)[0])
                out[ty0:ty1, tx0:tx1] = _lanczos(pixels, (ty1 - ty0, tx1 - tx0), box_y, box_x)
        return out

    def super_resolve(
        self, rgb: np.ndarray, *, should_cancel: Callable[[], bool] | None = None
    ) -> np.ndarray:
        """The model's output at its own scale, (H·s, W·s, 3) uint8, assembled tile by tile on the
        host: the device holds the photo (uint8) and one tile's activations at a time. A true
        `should_cancel()` stops it before its next tile."""
        h, w = rgb.shape[:2]
        s = self.scale

        def core(start: int, end: int) -> tuple[int, int]:
            return start * s, end * s

        out = np.empty((h * s, w * s, 3), np.uint8)
        for (y0, y1), (x0, x1), pixels in self._tiles(rgb, core, core, should_cancel):
            out[y0 * s : y1 * s, x0 * s : x1 * s] = pixels
        return out

    @torch.inference_mode()
    def _tiles(
        self,
        rgb: np.ndarray,
        rows: Callable[[int, int], tuple[int, int]],
        cols: Callable[[int, int], tuple[int, int]],
        should_cancel: Callable[[], bool] | None,
    ) -> Iterator[tuple[tuple[int, int], tuple[int, int], np.ndarray]]:
        """For each tile: its core's input rows and columns, and the model's output (uint8) over the
        output rows `rows(core rows)` and columns `cols(core columns)` (the core's, or more). Each tile
        runs with `overlap` pixels of context, or more where those output pixels need it. A true
        `should_cancel()` before a tile raises `Cancelled` instead of running it."""
        h, w = rgb.shape[:2]
        s = self.scale
        # Tile corners on the grid the model pads its input to: pixel-unshuffle (x2 model) groups
        # then line up with an untiled run's.
        grid = self.model.size_requirements.multiple_of
        overlap = _round_up(self.config.overlap, grid)
        image = torch.tensor(rgb, device=self.device)  # a copy: decoded photos may be read-only
        for y0, y1 in _spans(h, self.config.tile, grid):
            qy0, qy1 = rows(y0, y1)
            iy0, iy1 = _context(y0, y1, qy0, qy1, h, s, overlap, grid)
            for x0, x1 in _spans(w, self.config.tile, grid):
                qx0, qx1 = cols(x0, x1)
                ix0, ix1 = _context(x0, x1, qx0, qx1, w, s, overlap, grid)
                # A tile of a large photo takes seconds on a GPU (minutes on a CPU): a job canceled
                # meanwhile stops before the next one, and one whose tiles have all run keeps them.
                if should_cancel is not None and should_cancel():
                    raise Cancelled("Canceled while upscaling the background.")
                x = image[iy0:iy1, ix0:ix1].permute(2, 0, 1)[None].to(self.model.dtype).div(255)
                y = self.model(x.contiguous(memory_format=self._memory_format))[0]
                part = y[:, qy0 - iy0 * s : qy1 - iy0 * s, qx0 - ix0 * s : qx1 - ix0 * s]
                pixels = part.float().mul(255).round().to(torch.uint8).permute(1, 2, 0)
                yield (y0, y1), (x0, x1), pixels.cpu().numpy()


@dataclass(frozen=True)
class _Axis:
    """One axis of `BackgroundUpscaler.upscale`: `n` photo pixels, `n·scale` model-output pixels and
    `size` result pixels, split between tiles at result pixels that are multiples of `step`."""

    n: int
    scale: int
    size: int
    step: int

    @classmethod
    def of(cls, n: int, scale: int, factor: float) -> _Axis:
        size = max(1, round(n * factor))
        # At an integer factor, result tiles starting on multiples of `step` start on whole output
        # pixels, where Pillow resamples a tile exactly as the whole image (a fractional box edge is
        # rounded to float32, which moves rare pixels of other factors by 1).
        step = size // math.gcd(n * scale, size) if float(factor).is_integer() else 1
        return cls(n, scale, size, step)

    @property
    def ratio(self) -> float:
        """Model-output pixels per result pixel."""
        return self.n * self.scale / self.size

    def target(self, start: int) -> int:
        """The first result pixel of the tile whose core starts at photo pixel `start` (`size` at `n`)."""
        return start * self.size // self.n // self.step * self.step

    def source(self, start: int, end: int) -> tuple[int, int]:
        """The output pixels Pillow's Lanczos reads for the result pixels of the core [start, end): its
        3-lobe kernel, widened by the reduction when shrinking, around the first and last pixel's
        centre, plus one pixel for rounding."""
        t0, t1 = self.target(start), self.target(end)
        reach = 3 * max(self.ratio, 1.0)
        first = math.floor((t0 + 0.5) * self.ratio - reach) - 1
        last = math.ceil((t1 - 0.5) * self.ratio + reach) + 1
        return max(0, first), min(self.n * self.scale, last)

    def box(self, t0: int, t1: int, origin: int) -> tuple[float, float]:
        """Where result pixels [t0, t1) lie in output pixels counted from `origin`."""
        total = self.n * self.scale
        return t0 * total / self.size - origin, t1 * total / self.size - origin


def _context(
    start: int, end: int, out_start: int, out_end: int, length: int, scale: int, overlap: int, grid: int
) -> tuple[int, int]:
    """The input span a tile runs on: its core [start, end) with `overlap` pixels of context, widened to
    the output pixels [out_start, out_end) it must produce; the start on the model's `grid`."""
    first = min(start - overlap, out_start // scale // grid * grid)
    return max(0, first), min(length, max(end + overlap, -(-out_end // scale)))


def _lanczos(
    pixels: np.ndarray, size: tuple[int, int], rows: tuple[float, float], cols: tuple[float, float]
) -> np.ndarray:
    """The `rows` × `cols` box of `pixels` Lanczos-resized to `size` (height, width): Pillow's
    horizontal pass, then its vertical one, each rounded to 8 bits. Two explicit passes, because
    Pillow picks the order of its own from the sizes (Pillow 13 goes vertically first for some shapes,
    tall photos shrunk among them), so a tile and the whole image could take different orders, and the
    order changes the 8-bit intermediate."""
    im = Image.fromarray(pixels)
    im = im.resize((size[1], im.height), Image.Resampling.LANCZOS, box=(cols[0], 0, cols[1], im.height))
    im = im.resize((size[1], size[0]), Image.Resampling.LANCZOS, box=(0, rows[0], size[1], rows[1]))
    return np.asarray(im)


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
