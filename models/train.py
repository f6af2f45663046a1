"""Training of DynFaceRestore's two learned nets: `dynface train dblm CONFIG`, `dynface train dgsa CONFIG`.

Data: a folder of aligned 512×512 clean faces (FFHQ layout: any nested *.png / *.jpg), mirrored at random
(DifFace's use_hflip) and degraded on the fly by `models.degradations` (DifFace's ranges), both seeded by
(seed, epoch, the file's relative path) so a run — and a resumed run — sees the same inputs. Losses are
the ones the networks' modules define (../shared/method.md, "Our formulation" §2 and §6):

- DBLM: `models.dblm.dblm_loss` — Σ_k L1 + Gaussian NLL against G_σk * x, the backbone initialised
  from the restorer R's weights (DifFace's SwinIR) with every level's head starting at R's head; plus
  the optional `lpips_weight` · Σ_k LPIPS(ŷ^σk, G_σk * x) (torchmetrics' LPIPS; off by default, as
  method.md makes it optional and the paper states no DBLM loss).
- DGSA: `models.dgsa.dgsa_loss` — Gaussian NLL of a frozen trained DBLM's error at every level, with
  the inputs in exactly the convention `RestorationPipeline._guide` feeds it (estimate and R(y) in
  [0, 1], errors in [0, 1] units), so the trained map means at inference what it meant in training.

Around them: AdamW, an EMA of the weights (what is exported), autocast (CUDA; bf16 on CPU on request),
checkpoint/resume (model, EMA, optimizer, grad scaler, step, RNG states), DDP under torchrun
(WORLD_SIZE > 1) with a DistributedSampler, TensorBoard scalars in `<out_dir>/logs` (rank 0), tqdm.
The exported EMA weights are `<out_dir>/<kind>.safetensors` + `<kind>.json` (`models.trained`), loadable
with `RestorationPipeline.from_pretrained(..., dblm_weights=..., dgsa_weights=...)`, and their
weights-manifest entry (size + sha256) is printed and written to `<kind>.manifest.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import os
import random
import sys
import time
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
import yaml
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from models import images, trained, weights
from models.dblm import DBLMConfig, DBLMNet, blur_levels, dblm_loss
from models.degradations import DIFFACE_RANGES, SEVERITY_LEVELS, random_degrade, stable_key, to_gray
from models.dgsa import DGSANet, dgsa_loss
from models.profiles import PROFILES, Profile
from models.swinir import SwinIR, swinir_from_checkpoint

log = logging.getLogger(__name__)

FACE_SIZE = 512  # the degradation ranges and the σk are defined on 512×512 aligned faces
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}

Kind = Literal["dblm", "dgsa"]


# ---------------------------------------------------------------------------------------------- config
class DataConfig(BaseModel):
    """Where the clean faces are and how they are turned into training pairs."""

    model_config = ConfigDict(extra="forbid")

    root: Path  # FFHQ aligned 512 (images1024x1024 resized to 512, or the 512 release)
    # Training resolution. Faces are degraded at 512 (where the ranges are defined) and then resized;
    # the σk are scaled by size/512. Below 512 only for smoke tests: the nets run at 512 in the pipeline,
    # and the real profile's refuses nets trained at another size (recorded as `train_size`).
    size: int = Field(default=FACE_SIZE, ge=64)
    # "difface": DifFace's full ranges (our choice, models/degradations.py; the paper gives none).
    degradation: Literal["difface", "mild", "moderate", "severe", "extreme"] = "difface"
    # Mirror the clean face left-right (half the draws) before it is degraded: DifFace trains its
    # restorer so (use_hflip in its swinir_ffhq512.yaml); aligned faces are near-symmetric.
    hflip: bool = True
    seed: int = 0
    num_workers: int = Field(default=4, ge=0)
    max_images: int | None = Field(default=None, ge=1)
    # Sanity check: train on the first batch over and over (a loss that does not fall then is a bug).
    overfit_batch: bool = False


class TrainConfig(BaseModel):
    """One training run. The paper (method.md) states no training hyper-parameter: every default here
    is ours, chosen as usual values for a SwinIR/UNet regressor, and is marked so."""

    model_config = ConfigDict(extra="forbid")

    kind: Kind
    out_dir: Path
    data: DataConfig
    # Network sizes: "real" = DifFace's restorer layout (the nets the real pipeline loads), "tiny" = the
    # toy sizes of the tiny profile (tests).
    profile: Literal["real", "tiny"] = "real"
    # Where the real profile's restorer R (difface_swinir) is; default $DYNFACE_WEIGHTS_DIR.
    weights_dir: Path | None = None
    # DBLM: start from R's weights (method.md §2 makes DBLM "DifFace's restorer architecture").
    init_from_restorer: bool = True
    # DGSA: the trained DBLM whose error it learns to predict (required for kind=dgsa).
    dblm_weights: Path | None = None
    dgsa_base_channels: int = Field(default=32, ge=1)  # paper silent; DGSANet's default
    dgsa_channel_mult: tuple[int, ...] = (1, 2, 4)  # paper silent; DGSANet's default
    # DBLM's optional LPIPS term (method.md §2: "+ LPIPS optional"; the paper states no DBLM loss), so
    # off by default. Its backbone's ImageNet weights must be in torch.hub's cache: nothing downloads.
    lpips_weight: float = Field(default=0.0, ge=0)
    # VGG: what the LPIPS authors recommend for optimisation (AlexNet for evaluation, as `dynface eval`).
    lpips_net: Literal["vgg", "alex"] = "vgg"

    batch_size: int = Field(default=4, ge=1)  # per process; paper silent
    max_steps: int = Field(default=200_000, ge=1)  # paper silent
    lr: float = Field(default=1e-4, gt=0)  # AdamW; paper silent
    weight_decay: float = Field(default=0.0, ge=0)  # paper silent
    betas: tuple[float, float] = (0.9, 0.999)  # paper silent (AdamW's defaults)
    grad_clip: float | None = Field(default=1.0, gt=0)  # paper silent; guards the NLL's early spikes
    ema_decay: float = Field(default=0.999, ge=0, lt=1)  # paper silent
    # Autocast on CUDA; bf16 needs no loss scaling (exp(s) in the NLL overflows fp16 more easily).
    amp: bool = True
    amp_dtype: Literal["bf16", "fp16"] = "bf16"
    cpu_bf16: bool = False  # bf16 autocast on CPU (off: CPU runs are for tests, fp32 is exact)
    seed: int = 0
    log_every: int = Field(default=50, ge=1)
    ckpt_every: int = Field(default=2000, ge=1)

    @model_validator(mode="after")
    def _lpips_is_a_dblm_term(self) -> TrainConfig:
        if self.kind != "dblm" and self.lpips_weight > 0:
            raise ValueError("lpips_weight is a term of the DBLM loss; a DGSA run has none")
        return self

    def train_sigmas(self) -> tuple[float, ...]:
        """The blur levels in px at the training size (the method's σk are at 512)."""
        scale = self.data.size / FACE_SIZE
        return tuple(s * scale for s in self.net_profile().method.sigmas)

    def net_profile(self) -> Profile:
        return PROFILES[self.profile]


def load_config(path: str | Path, kind: Kind, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML or JSON config (by suffix) and validate it; `kind` comes from the subcommand."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    syntax = "JSON" if path.suffix.lower() == ".json" else "YAML"
    try:
        data = json.loads(text) if syntax == "JSON" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:  # json's JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not valid {syntax}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a mapping, got {type(data).__name__}")
    if data.get("kind", kind) != kind:
        raise ValueError(f"{path} is a {data['kind']!r} config, not {kind!r}")
    return TrainConfig.model_validate({**data, **(overrides or {}), "kind": kind})


# ------------------------------------------------------------------------------------------------ data
#: How a face's degradation is seeded, recorded in checkpoints: a resume under another rule would
#: silently train on other inputs than the interrupted run.
DATA_SEEDING = "relative-path"


def data_key(relative: Path) -> int:
    """`stable_key` of a file's path under the data root, the same on every machine: posix separators,
    NFC (macOS may hand out NFD names), and undecodable bytes kept as they are (surrogateescape)."""
    name = unicodedata.normalize("NFC", relative.as_posix())
    return stable_key(name.encode("utf-8", "surrogateescape"))


class FaceFolder(Dataset[tuple[Tensor, Tensor]]):
    """(clean, degraded) pairs in [0, 1], (3, size, size); the degradation of a file in epoch e (and
    whether its clean face is mirrored first, `DataConfig.hflip`) is seeded by (seed, e, its path
    relative to the root), so it depends neither on workers, ranks or batch order nor on which other
    files are in the folder."""

    def __init__(self, config: DataConfig) -> None:
        root = config.root
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise FileNotFoundError(f"no *.png / *.jpg faces under {root}")
        self.paths = paths[: config.max_images]
        self.keys = [data_key(p.relative_to(root)) for p in self.paths]
        self.size = config.size
        self.seed = config.seed
        self.hflip = config.hflip
        self.ranges = (
            DIFFACE_RANGES if config.degradation == "difface" else SEVERITY_LEVELS[config.degradation]
        )
        self.epoch = 0  # set before each epoch's DataLoader is built (workers copy it then)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        # Decoded as the service decodes uploads: the nets learn on the pixels they will be given.
        clean = images.load_rgb(self.paths[index], max_pixels=images.FACE_FILE_MAX_PIXELS)
        if clean.shape[:2] != (FACE_SIZE, FACE_SIZE):
            resized = Image.fromarray(clean).resize((FACE_SIZE, FACE_SIZE), Image.Resampling.LANCZOS)
            clean = np.array(resized)
        seed = (self.seed, self.epoch, self.keys[index])
        if self.hflip and flip_drawn(seed):
            clean = np.ascontiguousarray(clean[:, ::-1])
        degraded, params = random_degrade(clean, seed, self.ranges)
        if params.gray:  # a grey input's target is grey too (DifFace's gt_gray): colour cannot be inferred
            clean = to_gray(clean)
        pair = torch.stack([_to_tensor(clean), _to_tensor(degraded)])
        if self.size != FACE_SIZE:
            pair = F.interpolate(pair, size=(self.size, self.size), mode="area")
        return pair[0], pair[1]


def flip_drawn(seed: tuple[int, ...]) -> bool:
    """Whether the face seeded `seed` is mirrored (probability 1/2). Drawn from the third child of the
    SeedSequence whose first two `random_degrade` spawns for the degradation: independent of it, and
    the degradations stay the same whether flips are on or off."""
    child = np.random.SeedSequence(seed, spawn_key=(2,))
    return bool(np.random.default_rng(child).random() < 0.5)


def _to_tensor(image: np.ndarray) -> Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0


# ----------------------------------------------------------------------------------------------- tasks
class _Task:
    """What differs between DBLM and DGSA training: the net, its frozen helpers, the loss, the export."""

    net: nn.Module
    arch: dict[str, Any]
    export_info: dict[str, Any]  # recorded in the exported JSON besides the run's config

    def to(self, device: torch.device) -> None:
        raise NotImplementedError

    def loss_terms(self, net: nn.Module, clean: Tensor, degraded: Tensor) -> dict[str, Tensor]:
        """The loss's weighted terms by name (the loss is their sum; each is logged)."""
        raise NotImplementedError


def _restorer(config: TrainConfig) -> SwinIR:
    """R: the tiny profile's seeded toy SwinIR, or DifFace's released restorer from the weights dir."""
    profile = config.net_profile()
    if profile.name == "tiny":
        from models.pipeline import tiny_networks  # the exact toy R the tiny pipeline uses

        return tiny_networks(profile)[1].eval()
    from models.pipeline import loading_weights

    root = weights.resolve_dir(config.weights_dir)
    (entry,) = weights.select(["difface_swinir"])
    if weights.missing_for(["difface_swinir"], root):
        raise weights.MissingWeightsError(["difface_swinir"], root)
    # A file that is there but does not load: an error naming it and the pull that replaces it (a
    # FileNotFoundError, which cli_train prints), not torch's unpickling traceback and advice.
    with loading_weights([entry.name], root):
        return swinir_from_checkpoint(root / entry.path, profile.swinir)


class _DBLMTask(_Task):
    def __init__(self, config: TrainConfig) -> None:
        profile = config.net_profile()
        net_config = DBLMConfig(backbone=profile.swinir, sigmas=profile.method.sigmas)
        self.net = DBLMNet(net_config)
        self.arch = trained.dblm_arch(net_config)
        self.export_info = {}
        self.sigmas = config.train_sigmas()
        self.lpips_weight = config.lpips_weight
        # Built (and its weights checked) before any step, so a missing file fails the run at once.
        self.lpips = lpips_network(config.lpips_net) if config.lpips_weight > 0 else None
        if config.init_from_restorer:
            _init_from_restorer(self.net, _restorer(config))

    def to(self, device: torch.device) -> None:
        self.net.to(device)
        if self.lpips is not None:
            self.lpips.to(device)

    def loss_terms(self, net: nn.Module, clean: Tensor, degraded: Tensor) -> dict[str, Tensor]:
        out = net(degraded)
        estimates = out.estimates.float()
        terms = {"l1_nll": dblm_loss(estimates, out.logvar.float(), clean, self.sigmas)}
        if self.lpips is not None:
            terms["lpips"] = self.lpips_weight * lpips_term(self.lpips, estimates, clean, self.sigmas)
        return terms


def lpips_network(net_type: Literal["vgg", "alex"]) -> nn.Module:
    """torchmetrics' LPIPS network (frozen, eval mode) for use as a differentiable loss.

    Its linear layers ship with torchmetrics; the backbone's ImageNet weights are torchvision's file in
    torch.hub's cache, checked here first so that a missing file is an error naming it, never a
    download attempt.
    """
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    from models.evaluate import torch_hub_checkpoint

    url = {"alex": AlexNet_Weights.DEFAULT.url, "vgg": VGG16_Weights.DEFAULT.url}[net_type]
    backbone = torch_hub_checkpoint(url)
    if not backbone.is_file():
        raise FileNotFoundError(
            f"lpips_weight > 0 needs the {net_type} LPIPS backbone: torchvision's ImageNet weights "
            f"{backbone.name} not found at {backbone} (no download here: place the file from {url}, "
            "or set lpips_weight: 0)"
        )
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    # The metric object accumulates scores across calls; its `net` is the per-image distance alone.
    return LearnedPerceptualImagePatchSimilarity(net_type=net_type, normalize=True).net


def lpips_term(network: nn.Module, pred: Tensor, clean: Tensor, sigmas: Sequence[float]) -> Tensor:
    """Σ_k mean_b LPIPS(ŷ^σk, G_σk * x), the same per-level sum of means as `dblm_loss`.

    pred (B, K, 3, H, W) and clean (B, 3, H, W) in [0, 1] (pred not clamped: the gradient must pass).
    """
    b, k = pred.shape[:2]
    target = blur_levels(clean, sigmas).to(pred.dtype)
    per_image = network(pred.flatten(0, 1), target.flatten(0, 1), normalize=True)
    return per_image.reshape(b, k).mean(dim=0).sum()


def _init_from_restorer(dblm: DBLMNet, restorer: SwinIR) -> None:
    """Copy R into the backbone; every level's RGB head starts as R's head (ŷ^σk = R(y) at step 0, a
    close first guess of a blurred clean face), the log-variance head at s = 0."""
    state = restorer.state_dict()
    head_w, head_b = state.pop("conv_last.weight"), state.pop("conv_last.bias")
    missing, unexpected = dblm.backbone.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"conv_last.weight", "conv_last.bias"}:
        raise ValueError(
            f"restorer does not match the DBLM backbone: missing {missing}, unexpected {unexpected}"
        )
    k = len(dblm.sigmas)
    with torch.no_grad():
        last = dblm.backbone.conv_last
        last.weight.zero_()
        last.bias.zero_()
        last.weight[: 3 * k] = head_w.repeat(k, 1, 1, 1)
        last.bias[: 3 * k] = head_b.repeat(k)


class _DGSATask(_Task):
    def __init__(self, config: TrainConfig) -> None:
        if config.dblm_weights is None:
            raise ValueError("kind=dgsa needs dblm_weights: DGSA learns the error of a trained DBLM")
        # DGSA learns this DBLM's errors on this run's inputs: it must be one made for them.
        dblm = trained.load(config.dblm_weights, "dblm", profile=config.profile, size=config.data.size)
        self.dblm = dblm.requires_grad_(False)
        # The pipeline runs this DGSA only beside this very DBLM file (`trained.check_dgsa_pairing`).
        self.export_info = {"dblm_sha256": weights.file_sha256(config.dblm_weights)}
        self.restorer = _restorer(config).requires_grad_(False)
        self.net = DGSANet(config.dgsa_base_channels, config.dgsa_channel_mult)
        self.arch = trained.dgsa_arch(config.dgsa_base_channels, config.dgsa_channel_mult)
        self.sigmas = config.train_sigmas()
        # The targets are the profile's levels: a DBLM made for other levels has other errors to learn.
        levels = config.net_profile().method.sigmas
        if len(levels) != len(self.dblm.sigmas) or not all(
            math.isclose(a, b, rel_tol=1e-6) for a, b in zip(self.dblm.sigmas, levels, strict=True)
        ):
            raise ValueError(
                f"the DBLM's blur levels {self.dblm.sigmas} are not the profile's {tuple(levels)}"
            )

    def to(self, device: torch.device) -> None:
        for m in (self.net, self.dblm, self.restorer):
            m.to(device)

    def loss_terms(self, net: nn.Module, clean: Tensor, degraded: Tensor) -> dict[str, Tensor]:
        # The pipeline's conventions (RestorationPipeline._guide): DGSA sees R(y) clamped to [0,1] and the
        # DBLM estimate as it is (not clamped), and its log-variance is that of the estimate's error in
        # [0,1]² units.
        with torch.no_grad():
            restored = self.restorer(degraded).float().clamp(0, 1)
            estimates = self.dblm(degraded).estimates.float()
            targets = blur_levels(clean, self.sigmas)
        # All levels in one forward (DDP expects one forward per backward); equal-sized levels, so the
        # mean over the stacked batch is the mean of the per-level losses.
        k = len(self.sigmas)
        flat = estimates.flatten(0, 1)
        logvar = net(flat, restored.repeat_interleave(k, dim=0)).float()
        return {"nll": dgsa_loss(logvar, flat, targets.flatten(0, 1))}


def _task(config: TrainConfig) -> _Task:
    return _DBLMTask(config) if config.kind == "dblm" else _DGSATask(config)


# ------------------------------------------------------------------------------------------ run state
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed() -> _Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; one process otherwise (no process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return _Dist(torch_dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


def _rng_state() -> dict[str, Any]:
    """The process's global generators. No CUDA generator: training draws nothing on a GPU (the
    degradations and flips come from numpy generators seeded per face, the sampler's order from its
    own CPU generator; the nets have no dropout and LPIPS stays in eval mode), and the states of every
    visible GPU, once saved, could not be restored on a machine with fewer (an IndexError on resume)."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    """`_rng_state`'s generators; the CUDA states older checkpoints hold are not used (see there)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def checkpoint_path(config: TrainConfig) -> Path:
    return config.out_dir / "checkpoints" / "last.pt"


class RunExistsError(ValueError):
    """A run without --resume in an out_dir that holds an earlier run (`cli_train`: a usage error)."""


def check_fresh_out_dir(config: TrainConfig) -> None:
    """Refuse to start afresh where an earlier run left its checkpoint, TensorBoard events or exported
    weights: the new run would replace the checkpoint (restarting at step 0) and the export, and add a
    second event file over the same steps."""
    out = config.out_dir
    found = [p for p in (checkpoint_path(config), out / f"{config.kind}.safetensors") if p.exists()]
    found += sorted((out / "logs").glob("events.out.tfevents.*"))
    if found:
        names = ", ".join(str(p.relative_to(out)) for p in found[:3]) + (" …" if len(found) > 3 else "")
        raise RunExistsError(
            f"{out} already holds a run ({names}): pass --resume to continue it, or set another "
            "out_dir (or remove that one) to start a new run"
        )


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict[str, Any]) -> None:
    """A checkpoint's GradScaler state into `scaler`. A disabled scaler (bf16, or fp16 on the CPU, where
    autocast is bf16) saves an empty state, which an enabled one refuses: a run resumed with fp16 on
    CUDA then starts with a fresh scaler, as any fp16 run does (it calibrates its scale in a few steps)."""
    if state:
        scaler.load_state_dict(state)


#: Config fields a resume may change: they do not alter the trained weights, so the exported config
#: (which records the resumed run's values) still describes how they were made. max_steps extends (or
#: ends) the run; log_every, ckpt_every and num_workers only change when things are written or how
#: fast batches load (each face's degradation is seeded by its path, not by the worker); out_dir is
#: where the checkpoint was found. Every other field shapes the run (an edited lr, say, would be
#: overwritten by the checkpoint's optimizer state; an edited batch_size or data root would move the
#: data position), so a difference is refused rather than silently ignored or half applied.
RESUMABLE_CHANGES = frozenset({"max_steps", "log_every", "ckpt_every", "data.num_workers", "out_dir"})


#: Fields added after checkpoints were written without them, with the value that gives the behaviour
#: those checkpoints were trained with: such a run resumes with that value set.
ADDED_FIELDS = {"data.hflip": False}


def check_resume_config(config: TrainConfig, saved: dict[str, Any], ckpt: Path) -> None:
    """Raise ValueError naming every field (other than `RESUMABLE_CHANGES`) in which `config` differs
    from `saved`, the config stored in the checkpoint `ckpt` (read with `ADDED_FIELDS` where absent)."""
    now, then = _flatten(config.model_dump(mode="json")), ADDED_FIELDS | _flatten(saved)
    differ = sorted(
        k for k in now.keys() | then.keys() if k not in RESUMABLE_CHANGES and now.get(k) != then.get(k)
    )
    if differ:
        changes = "; ".join(
            f"{k} (checkpoint {then.get(k, '(absent)')!r}, config {now.get(k, '(absent)')!r})" for k in differ
        )
        raise ValueError(
            f"cannot resume from {ckpt}: the config differs from the checkpoint's in {changes}. Restore "
            f"those values (only {', '.join(sorted(RESUMABLE_CHANGES))} may change on a resume), or "
            "start a new run in another out_dir"
        )


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"data": {"root": r}} → {"data.root": r}, so a difference names the nested field."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@dataclass
class TrainResult:
    """What a run did: its losses per step (this process's, this invocation only) and its outputs."""

    steps: int
    losses: list[float] = field(default_factory=list)
    weights: Path | None = None
    manifest: weights.WeightFile | None = None


# ------------------------------------------------------------------------------------------------ loop
def check_resume_inputs(export_info: dict[str, Any], saved: dict[str, Any], ckpt: Path) -> None:
    """A resumed run must learn from the files the checkpoint's run began with (a DGSA run: the same
    DBLM file, whose sha256 its export records). Checkpoints written before `export_info` was saved
    cannot tell, and resume."""
    recorded = saved.get("export_info", export_info)
    changed = sorted(k for k in recorded.keys() | export_info.keys() if recorded.get(k) != export_info.get(k))
    if changed:
        raise ValueError(
            f"cannot resume from {ckpt}: the run began with {recorded}, the files named now give "
            f"{export_info} (changed: {changed}). Name the files the run began with, or start the run "
            "afresh."
        )


def data_position(dataset: FaceFolder, processes: int) -> dict[str, Any]:
    """What decides, besides the config, which faces each step's batches hold: the number of processes
    (the global batch, and each one's share of an epoch) and the faces (their number sets the steps
    per epoch; their list, which file has which index in the sampler's shuffled order)."""
    keys = ",".join(map(str, dataset.keys))  # each file's path key, in index order
    return {
        "processes": processes,
        "faces": len(dataset),
        "faces_sha256": hashlib.sha256(keys.encode("ascii")).hexdigest(),
    }


#: How `check_resume_data` names the entries of `data_position`.
DATA_POSITION_NAMES = {
    "processes": "processes (torchrun --nproc_per_node)",
    "faces": "faces used from data.root",
    "faces_sha256": "sha256 of the face files' paths in order",
}


def check_resume_data(position: dict[str, Any], saved: dict[str, Any], ckpt: Path) -> None:
    """A resumed run must continue with the batches the interrupted one would have seen: with another
    number of processes, or faces added, removed or renamed, the same step lands elsewhere in other
    epochs and batches. Checkpoints written before `data_position` was saved cannot tell, and resume."""
    recorded = saved.get("data_position", position)
    changed = [k for k in position if recorded.get(k) != position[k]]
    if changed:
        what = "; ".join(
            f"{DATA_POSITION_NAMES[k]} (checkpoint {recorded.get(k)!r}, now {position[k]!r})" for k in changed
        )
        raise ValueError(
            f"cannot resume from {ckpt}: its data position would move, {what}. Resume with "
            f"{recorded['processes']} process(es) and the faces the run began with, or start a new run "
            "in another out_dir"
        )


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train until `config.max_steps` (continuing from the last checkpoint with `resume`), then export.
    Without `resume`, an out_dir that holds a run is refused (`RunExistsError`, `check_fresh_out_dir`)."""
    dist = _init_distributed()
    if torch.cuda.is_available():
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    ckpt = checkpoint_path(config)
    if not resume:  # before anything is built or written: a refused start costs nothing
        check_fresh_out_dir(config)
        if dist.world > 1:  # every rank has looked before rank 0 writes its first event file
            torch_dist.barrier()
    state = None
    if resume and ckpt.is_file():  # checked before the nets are built: a refused resume costs nothing
        # On the CPU: torch.set_rng_state takes only a CPU tensor; load_state_dict moves the rest.
        state = torch.load(ckpt, map_location="cpu", weights_only=False)  # our own file: RNG states
        check_resume_config(config, state["config"], ckpt)
        if state.get("data_seeding") != DATA_SEEDING:
            raise ValueError(
                f"{ckpt} was written by a version that seeded each face's degradation by its index in "
                "the folder, not its path: resumed, it would not see the batches it was trained on. "
                "Start the run afresh (without --resume, or delete the checkpoint)."
            )
    dataset = FaceFolder(config.data)
    position = data_position(dataset, dist.world)
    if state is not None:  # still before the nets are built
        check_resume_data(position, state, ckpt)
    torch.manual_seed(config.seed)  # same init on every rank; DDP also broadcasts rank 0's weights
    task = _task(config)
    if state is not None:
        check_resume_inputs(task.export_info, state, ckpt)
    task.to(device)
    model = task.net.train()
    # Buffers are copied, not averaged: the nets' only buffers are SwinIR's constant attention indices
    # and masks (no batch-norm statistics), and an average of the int64 indices, computed in float and
    # truncated back, corrupts them.
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=False)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )
    amp_dtype = torch.bfloat16 if config.amp_dtype == "bf16" else torch.float16
    use_amp = config.amp and (device.type == "cuda" or config.cpu_bf16)
    if device.type == "cpu":
        amp_dtype = torch.bfloat16  # CPU autocast is bf16 only
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)

    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        # Older checkpoints hold averaged (corrupted) buffers. The next update copies the net's, but a
        # finished run is exported without one.
        for ema_buffer, buffer in zip(ema.module.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)
        optimizer.load_state_dict(state["optimizer"])
        load_scaler_state(scaler, state["scaler"])
        step = int(state["step"])
        _set_rng_state(state["rng"])
        if dist.main:
            log.info("resumed from %s at step %d", ckpt, step)
    elif resume and dist.main:
        log.warning("no checkpoint at %s: starting from step 0", ckpt)

    trained_net: nn.Module = model
    if dist.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        trained_net = DistributedDataParallel(model, device_ids=ids)

    sampler = DistributedSampler(
        dataset, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=config.data.seed, drop_last=True
    )
    per_epoch = len(sampler) // config.batch_size
    if per_epoch == 0:
        raise ValueError(
            f"{len(dataset)} faces cannot fill one batch of {config.batch_size} "
            f"on each of {dist.world} process(es)"
        )
    # `tensorboard --logdir <out_dir>/logs`. Rank 0 only (the others' scalars are all-reduced into
    # its). On resume, events after the checkpoint's step (logged by the interrupted run after its
    # last checkpoint) are purged.
    purge = step + 1 if resume else None
    writer = SummaryWriter(str(config.out_dir / "logs"), purge_step=purge) if dist.main else None
    bar = tqdm(total=config.max_steps, initial=step, disable=not (progress and dist.main), unit="step")
    result = TrainResult(steps=step)
    started = time.perf_counter()
    try:
        for clean, degraded in _batches(dataset, sampler, config, per_epoch, step, device):
            if step >= config.max_steps:  # resumed from a finished run: nothing left but the export
                break
            autocast: AbstractContextManager[Any] = (
                torch.autocast(device.type, dtype=amp_dtype) if use_amp else nullcontext()
            )
            with autocast:
                terms = task.loss_terms(trained_net, clean, degraded)
                loss = torch.stack(list(terms.values())).sum()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            # The norm is logged; an infinite limit measures it without clipping.
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or math.inf)
            scaler.step(optimizer)
            scaler.update()
            ema.update_parameters(model)
            step += 1
            value = float(loss.detach())
            result.losses.append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if step % config.log_every == 0 or step == config.max_steps:
                values = torch.stack([loss.detach(), *(t.detach() for t in terms.values())]).float()
                if dist.world > 1:  # every rank reaches this step: log the mean over all ranks' batches
                    torch_dist.all_reduce(values)
                    values /= dist.world
                if writer is not None:
                    total, *parts = values.tolist()
                    writer.add_scalar("loss/total", total, step)
                    for name, part in zip(terms, parts, strict=True):
                        writer.add_scalar(f"loss/{name}", part, step)
                    writer.add_scalar("optim/lr", optimizer.param_groups[0]["lr"], step)
                    writer.add_scalar("optim/grad_norm", float(grad_norm), step)
                    rate = len(result.losses) / (time.perf_counter() - started)
                    writer.add_scalar("speed/steps_per_s", rate, step)
            if dist.main and (step % config.ckpt_every == 0 or step == config.max_steps):
                _save_checkpoint(
                    ckpt, model, ema, optimizer, scaler, step, config, task.export_info, position
                )
            if step >= config.max_steps:  # before fetching another batch
                break
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    result.steps = step
    if dist.main:
        result.weights, result.manifest = export(config, ema.module, task.arch, step, **task.export_info)
    if dist.world > 1:
        torch_dist.barrier()
    return result


def _batches(
    dataset: FaceFolder,
    sampler: DistributedSampler[int],
    config: TrainConfig,
    per_epoch: int,
    start_step: int,
    device: torch.device,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches from `start_step` on, forever: epoch e = step // per_epoch uses the sampler's epoch-e order
    and the dataset's epoch-e degradations, so a resumed run continues with exactly the batches the
    uninterrupted run would have seen."""
    if config.data.overfit_batch:
        first = next(iter(_epoch_batches(dataset, sampler, config, per_epoch, 0, 0)))
        pair = tuple(t.to(device) for t in first)
        yield from itertools.repeat(pair)  # type: ignore[misc]
        return
    for epoch in itertools.count(start_step // per_epoch):
        skip = start_step - epoch * per_epoch if epoch == start_step // per_epoch else 0
        for clean, degraded in _epoch_batches(dataset, sampler, config, per_epoch, epoch, skip):
            yield clean.to(device, non_blocking=True), degraded.to(device, non_blocking=True)


def _epoch_batches(
    dataset: FaceFolder,
    sampler: DistributedSampler[int],
    config: TrainConfig,
    per_epoch: int,
    epoch: int,
    skip: int,
) -> Iterable[tuple[Tensor, Tensor]]:
    sampler.set_epoch(epoch)
    dataset.epoch = epoch
    order = list(sampler)
    batches = [order[i * config.batch_size : (i + 1) * config.batch_size] for i in range(skip, per_epoch)]
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=config.data.num_workers,
        pin_memory=torch.cuda.is_available(),
    )


def _save_checkpoint(
    path: Path,
    model: nn.Module,
    ema: AveragedModel,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    step: int,
    config: TrainConfig,
    export_info: dict[str, Any],
    position: dict[str, Any],
) -> None:
    """Everything a resume needs, written to a temp file, synced and renamed (a crash never leaves half a
    file; a failed write leaves no temp file behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "step": step,
        "rng": _rng_state(),
        "config": config.model_dump(mode="json"),
        "data_seeding": DATA_SEEDING,
        "export_info": export_info,  # what the run learns from (`check_resume_inputs`)
        "data_position": position,  # `check_resume_data`
    }
    tmp = path.with_suffix(".tmp")
    try:
        with tmp.open("wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # the data reaches the disk before the rename does
        os.replace(tmp, path)
    except BaseException:  # a full disk or Ctrl-C mid-write: the last good checkpoint stays as it was
        tmp.unlink(missing_ok=True)
        raise


def export(
    config: TrainConfig, net: nn.Module, arch: dict[str, Any], step: int, **info: Any
) -> tuple[Path, weights.WeightFile]:
    """Write the EMA weights (`<kind>.safetensors` + `.json`, with `info` in the JSON) and their manifest
    entry; print the entry."""
    path = config.out_dir / f"{config.kind}.safetensors"
    trained.save(
        net,
        config.kind,
        arch,
        path,
        profile=config.profile,
        steps=step,
        train_size=config.data.size,
        config=config.model_dump(mode="json"),
        **info,
    )
    description = f"dynface {config.kind.upper()} ({config.profile} sizes), EMA weights after {step} steps"
    entry = trained.manifest_entry(path, f"dynface_{config.kind}", description)
    text = trained.manifest_json(entry)
    path.with_suffix(".manifest.json").write_text(text + "\n", encoding="utf-8")
    print(f"wrote {path} and {trained.config_path(path).name}; manifest entry:\n{text}")
    return path, entry


# ------------------------------------------------------------------------------------------------- CLI
def cli_train(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.train_kind)
    except (OSError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = train(config, resume=args.resume, progress=not args.no_progress)
    except RunExistsError as e:  # a usage error, as a bad config is
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:  # missing weights or faces, a DGSA run without a DBLM
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    print(f"trained {config.kind} for {result.steps} steps")
    return 0
