"""DynFaceRestore, top to bottom as in the paper's figure.

    decode → detect/align → DBLM (ŷ^σ, blur level) → DSST start step → guided DDIM sampling (× DGSA)
    → paste back → encode

`restore_photo` runs the whole figure on an uploaded file (`restore_photos` on several, their faces
sharing the sampler: the worker's cross-job batching); `restore_faces` is the face-level core
(DBLM → DSST → sampling) on aligned 512×512 crops. Every stage is timed. The method and the choices
that are ours (not the paper's) are in ../shared/method.md and docs/method.md.

The DifFace baseline (`mode="difface"`) runs through the same code: R(y) is noised at DifFace's fixed
start (index 100 of ddim250) and sampled without guidance, so the two modes are compared fairly.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import cache, partial
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models import background as bg
from models import faces as face_ops
from models import images, trained, weights
from models.blur import estimate_blur_sigma
from models.dblm import DBLMNet, fallback_estimates
from models.dgsa import DGSANet, coherence_scale_map, scale_from_logvar
from models.dsst import DSSTable, check_start_indices, default_table
from models.errors import Cancelled, ConfigurationError, DeviceOutOfMemoryError, NoFaceError, PipelineError
from models.fidelity import auto_eta, box_noise_std, robust_noise_std
from models.guidance import GaussianGuidance
from models.images import FACE_SIZE
from models.profiles import PROFILES, Profile
from models.sampler import ddim_sample
from models.schedule import RespacedSchedule, q_sample
from models.speed import SpeedOptions, apply_memory_format, compiled, memory_format, to_device, to_host
from models.swinir import SwinIR, swinir_from_checkpoint
from models.unet import IDDPMUNet
from models.unet_convert import unet_from_hf_difface, unet_from_upstream_checkpoint

STAGES = ("decode", "detect", "dblm", "sample", "paste", "encode")
# DifFace's default DDIM eta, used by the baseline mode when the caller asks for "auto".
DIFFACE_DEFAULT_ETA = 0.5
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: What `dtype` may be: a DTYPES name, or "auto" (`auto_dtype`).
DTYPE_CHOICES = ("auto", *DTYPES)
#: What `RestoreOptions.outputs` may ask for: the whole photo, the restored aligned faces, the
#: aligned input crops they came from, and input | output side by side.
OUTPUT_KINDS = ("image", "faces", "crops", "comparison")

log = logging.getLogger(__name__)

Mode = Literal["dynfacerestore", "difface"]
ProgressFn = Callable[[str, int, int], None]
CancelFn = Callable[[], bool]
_T = TypeVar("_T")


def auto_dtype(device: torch.device) -> str:
    """dtype "auto": fp16 on CUDA (half the memory, tensor cores; held to fp32 in docs/benchmarks.md,
    "GPU path"), fp32 elsewhere (CPUs have no fast fp16 path)."""
    return "fp16" if device.type == "cuda" else "fp32"


@dataclass(frozen=True)
class RestoreOptions:
    """Per-request options; plain JSON-able fields so they travel through the queue as they are."""

    mode: Mode = "dynfacerestore"
    fidelity: float | None = None  # DDIM eta in [0, 1]; None = "auto" (per face, method.md §7)
    seed: int | None = None
    aligned: bool = False  # the input already is an aligned 512×512 face
    upscale: int = 1
    only_center_face: bool = False
    detector: str | None = None  # facexlib model name; None = the profile's default
    outputs: tuple[str, ...] = ("image",)  # a subset of OUTPUT_KINDS
    format: str = "png"
    on_no_face: Literal["fail", "passthrough"] = "fail"
    max_faces: int | None = None  # faces restored per photo (largest first); None = the pipeline's cap
    min_face_size: float = 0.0  # px, shorter box side; smaller detections are ignored
    color_correction: Literal["none", "wavelet", "adain"] = "none"  # restored face -> input colours


#: The `RestoreOptions` one sampler batch shares (the arguments of `restore_faces` besides the seed):
#: photos that agree on them can have their faces restored together (`restore_photos`); every other
#: option, the seed included, is per photo.
SAMPLER_OPTIONS = ("mode", "fidelity")


def sampler_key(options: RestoreOptions) -> tuple[Any, ...]:
    """What photos must have in common for `restore_photos` to batch their faces."""
    return tuple(getattr(options, name) for name in SAMPLER_OPTIONS)


@dataclass(frozen=True)
class PhotoRequest:
    """One photo of a `restore_photos` call, with its own progress and cancel callbacks."""

    data: bytes
    options: RestoreOptions
    progress: ProgressFn | None = None
    should_cancel: CancelFn | None = None


@dataclass(frozen=True)
class FaceFacts:
    """What the method decided for one face."""

    # Chosen DBLM level σk (px at 512), or the fallback's σ̂ where R(y) is blurrier than every level;
    # 0.0 in the baseline, which picks no level.
    blur_sigma: float
    start_step: int  # respaced start index (the DSST entry, or 100 in the baseline)
    eta: float
    nfe: int  # UNet evaluations spent on this face
    dblm: str  # "trained" | "fallback" | "none" (baseline)
    dgsa: str  # "trained" | "fallback" | "none" (baseline)


@dataclass
class FacesResult:
    faces: np.ndarray  # uint8 (N, 512, 512, 3)
    facts: list[FaceFacts]
    timings: dict[str, float]
    seed: int


@dataclass(frozen=True)
class FaceReport:
    box: tuple[float, float, float, float]
    score: float
    facts: FaceFacts

    def to_dict(self) -> dict[str, Any]:
        return {"box": list(self.box), "score": self.score, **asdict(self.facts)}


@dataclass
class PhotoResult:
    image: bytes
    media_type: str
    faces: list[bytes]  # restored aligned faces, when asked for
    comparison: bytes | None  # input | output side by side, when asked for
    face_reports: list[FaceReport]
    timings: dict[str, float]  # wall seconds per stage, as this photo waited for them
    # `timings` with each stage run for several photos' faces at once (dblm, sample) as this photo's
    # part of it (the time divided among them): what this photo cost, `timings` when it ran alone.
    stage_shares: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    seed: int = 0
    crops: list[bytes] = field(default_factory=list)  # aligned input faces, when asked for
    faces_dropped: int = 0  # detected but not restored (over the max_faces cap); also in warnings


#: How one photo of `restore_photos` ended: its result, or the error of that photo alone.
PhotoOutcome = PhotoResult | PipelineError | ValueError
_PhotoError = PipelineError | ValueError


class StageTimer:
    """Wall-clock seconds per pipeline stage (synchronising CUDA so GPU time lands in its stage)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def copy(self) -> StageTimer:
        """A timer that goes on from this one's seconds."""
        timer = StageTimer(self.device)
        timer.seconds.update(self.seconds)
        return timer


@dataclass
class _Guide:
    """What sampling needs of the DBLM + DGSA + DSST outcome for a batch of faces (tensors at 512, in
    [-1, 1])."""

    estimate: Tensor  # ŷ^σ at each face's level (R(y) in the baseline)
    sigma: list[float]
    start: list[int]
    eta: list[float]
    scale_map: Tensor | None  # DGSA g (N, 1, H, W) in [0, 1]; None in the baseline
    dblm: str
    dgsa: str


class _Restored(NamedTuple):
    """One photo's faces out of the shared stages (what `_finish_photo` takes with the photo)."""

    faces: np.ndarray  # (N, 512, 512, 3)
    facts: list[FaceFacts]
    seconds: dict[str, float]  # its time in the shared stages (dblm, sample)
    shares: dict[str, float]  # its part of that time: each try's divided among the photos in it


@dataclass
class _Photo:
    """One photo of `restore_photos` between detection and paste-back."""

    options: RestoreOptions
    report: ProgressFn
    should_cancel: CancelFn
    timer: StageTimer  # its own stages; the shared ones (dblm, sample) are added when it is pasted
    warnings: list[str]
    decoded: images.DecodedImage
    format: images.OutputFormat  # what its results are written as
    crops: np.ndarray  # aligned faces (N, 512, 512, 3); N = 0 when none was found (passthrough)
    affines: np.ndarray
    found: face_ops.Detections
    noise_std: list[float] | None  # per face, as the model sees it (auto fidelity); None: unused
    seed: int


class RestorationPipeline:
    """The restoration networks plus the method's tables and knobs, ready to run on one device."""

    def __init__(
        self,
        profile: Profile,
        unet: IDDPMUNet,
        restorer: SwinIR,
        *,
        dsst: DSSTable | None = None,
        dblm: DBLMNet | None = None,
        dgsa: DGSANet | None = None,
        weights_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: str = "fp32",
        max_batch: int = 8,
        max_pixels: int = 40_000_000,
        max_faces: int = 32,
        weight_versions: dict[str, str] | None = None,
        speed: SpeedOptions | None = None,
        background: bg.BackgroundUpscaler | None = None,
        png_compress_level: int = images.PNG_COMPRESS_LEVEL,
    ) -> None:
        if dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {list(DTYPE_CHOICES)}, got {dtype!r}")
        if max_batch < 1 or max_faces < 1:
            raise ValueError("max_batch and max_faces must be ≥ 1")
        images.check_png_compress_level(png_compress_level)  # at construction, not at the first job
        self.profile = profile
        self.device = torch.device(device)
        self.dtype_name = auto_dtype(self.device) if dtype == "auto" else dtype
        self.dtype = DTYPES[self.dtype_name]
        # Upstream's half precision: the UNet's block convolutions in `dtype`, the rest float32 (unet.py).
        self.unet = unet.to(self.device).to_precision(self.dtype).eval()
        self.restorer = restorer.to(self.device, self.dtype).eval()
        self.dblm = dblm.to(self.device, self.dtype).eval() if dblm is not None else None
        self.dgsa = dgsa.to(self.device, self.dtype).eval() if dgsa is not None else None
        # Fast-path switches (models/speed.py): layout and compilation only, never the arithmetic.
        self.speed = speed or SpeedOptions()
        self._memory_format = memory_format(self.speed)
        apply_memory_format(self.unet, self.speed)
        apply_memory_format(self.restorer, self.speed)
        # `self.unet` stays the plain module (state_dict, info, tests); the sampler calls this one.
        self._unet_call = compiled(self.unet, self.speed)
        # Upscales what lies outside the faces; None = Lanczos resize (models/background.py).
        self.background = background.to(self.device, self.dtype, self.speed) if background else None
        self.dsst = dsst or default_table()
        self.schedule = RespacedSchedule.from_spec(profile.method.respacing)
        _check_parts(profile, self.dsst, self.dblm)
        self.weights_dir = weights.resolve_dir(weights_dir)
        self.max_batch = max_batch
        self.max_pixels = max_pixels
        # Bounds a job's time on crowd photos; a request may lower it, never raise it.
        self.max_faces = max_faces
        self.weight_versions = weight_versions or {}
        self.png_compress_level = png_compress_level
        self._detectors: dict[str, face_ops.FaceDetector] = {}
        self._parser = _optional_parser(self.weights_dir, self.device)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path = "real",
        *,
        weights_dir: str | Path | None = None,
        download: bool = False,
        dsst_table: str | Path | None = None,
        dblm_weights: str | Path | None = None,
        dgsa_weights: str | Path | None = None,
        background_config: bg.BackgroundConfig | None = None,
        **kwargs: Any,
    ) -> RestorationPipeline:
        """`"tiny"`: toy networks with seeded random weights (not a restoration, flagged everywhere).
        `"real"` or a directory: DifFace's released prior and restorer from the weights directory
        (a path given here is used as that directory; `weights.profile_and_dir` reads both, as the
        worker's report and `dynface weights` do). With `download`, files the profile needs
        and lacks are fetched first (unless $DYNFACE_OFFLINE), then its optional files (parsing
        net, other detector) on a best-effort basis; otherwise missing required files raise
        `MissingWeightsError` naming them and the command that fetches them.
        `dsst_table` (a `dynface dsst build` JSON), `dblm_weights` / `dgsa_weights` (`dynface train`
        .safetensors, their .json beside them): unset, the shipped table and the training-free fallbacks
        are used. `background_config` (default: none, a Lanczos resize) picks the background
        super-resolution model: one more required file for the real profile; the tiny profile gets a
        seeded random toy version of it and never reads or fetches the real file. These come only from
        the arguments: the worker passes its Settings, the CLI its flags and DYNFACE_* variables."""
        profile_name, wdir = weights.profile_and_dir(str(name_or_path), weights_dir)
        profile = PROFILES[profile_name]
        # Before the big networks load, so a mismatched file fails at once (and cheaply, on a retry).
        try:
            parts = _trained_parts(profile, dsst_table, dblm_weights, dgsa_weights, kwargs.get("dsst"))
        except (ValueError, FileNotFoundError) as e:
            raise ConfigurationError(str(e)) from e
        kwargs.update(parts)
        background_config = background_config or bg.BackgroundConfig()
        required = [
            *profile_weights(profile, wdir),
            *(background_config.weight_names if profile.real else ()),
        ]
        if download:
            weights.pull(required, wdir)
            _pull_optional(profile.optional_weights, wdir)
        if profile.name == "tiny":
            unet, restorer = tiny_networks(profile)
            background = bg.tiny(background_config)
            return cls(profile, unet, restorer, weights_dir=wdir, background=background, **kwargs)
        missing = weights.missing_for(required, wdir)
        if missing:
            raise weights.MissingWeightsError([m.name for m in missing], wdir)
        unet, restorer, versions = real_networks(profile, wdir)
        kwargs.update(weight_versions=versions, background=load_background(background_config, wdir))
        return cls(profile, unet, restorer, weights_dir=wdir, **kwargs)

    @property
    def info(self) -> dict[str, Any]:
        """What is loaded, for /readyz, /v1/models and job reports."""
        return {
            "profile": self.profile.name,
            "real": self.profile.real,
            "device": str(self.device),
            "dtype": self.dtype_name,
            "image_size": self.profile.image_size,
            "weights": self.weight_versions,
            "dblm": "trained" if self.dblm is not None else "fallback",
            "dgsa": "trained" if self.dgsa is not None else "fallback",
            "dsst": {"sigmas": list(self.dsst.sigmas), "start_indices": list(self.dsst.start_indices)},
            "default_detector": self.profile.detector,
            "background": self.background.info if self.background is not None else {"model": bg.NONE},
            "max_batch": self.max_batch,
            "speed": asdict(self.speed),
        }

    # ------------------------------------------------------------------ whole photo
    def restore_photo(
        self,
        data: bytes,
        options: RestoreOptions,
        progress: ProgressFn | None = None,
        should_cancel: CancelFn | None = None,
    ) -> PhotoResult:
        """One uploaded file through the whole figure: the one-photo case of `restore_photos`."""
        (outcome,) = self.restore_photos([PhotoRequest(data, options, progress, should_cancel)])
        if isinstance(outcome, PhotoResult):
            return outcome
        raise outcome

    def restore_photos(self, requests: Sequence[PhotoRequest]) -> list[PhotoOutcome]:
        """Several uploaded files whose faces share the sampler: each photo is decoded, detected,
        pasted back and encoded on its own; the faces of all of them go through one `restore_faces`
        batch (in `max_batch` chunks). Photo j's face k draws its noise from seed_j + k exactly as
        when photo j is restored alone, so what a photo gets does not depend on its companions (up to
        the float rounding of batched kernels, as between the faces of one photo).

        The photos must agree on `SAMPLER_OPTIONS`. Returns, in order, each photo's result or the
        `PipelineError` / `ValueError` that ended that photo alone (bad file, no face, bad options, or
        `DeviceOutOfMemoryError`: the device ran out of memory on its detection, paste-back or
        encoding); such an error in the shared stages (dblm, sample) ends the photos in them, so
        `Cancelled` ends the photos with faces once every one of them asks to stop. Out of memory
        there with several photos, each photo's faces go through the shared stages again alone (the
        same seeds, so the same faces; the failed try's time stays in its timings), and only a photo
        that runs out alone too ends `DeviceOutOfMemoryError`. Other exceptions (a bug) propagate and
        end them all. Progress and cancellation are per photo: the shared stages report to each photo
        in them, and their times are in each one's timings; a photo that asks to stop ends `Cancelled`
        at its next step of its own (detection, joining the shared stages, paste-back, each
        background tile, encoding) while the others go on.
        """
        if len({sampler_key(r.options) for r in requests}) > 1:
            raise ValueError(f"photos restored together must agree on {SAMPLER_OPTIONS}")
        outcomes: dict[int, PhotoOutcome] = {}
        photos: dict[int, _Photo] = {}
        for i, request in enumerate(requests):
            started = self._or_own_error(partial(self._start_photo, request))
            if isinstance(started, _Photo):
                photos[i] = started
            else:
                outcomes[i] = started
        for i, photo in photos.items():
            try:  # canceled during its own detection or a later photo's: it stays out of the batch
                _stop_if_canceled(photo.should_cancel, "DBLM")
            except Cancelled as e:
                outcomes[i] = e

        with_faces = {i: photo for i, photo in photos.items() if len(photo.crops) and i not in outcomes}
        # Passthrough photos keep their (no) faces.
        restored = {i: _Restored(photo.crops, [], {}, {}) for i, photo in photos.items()}
        for i, done in self._restore_shared(with_faces, StageTimer(self.device), {}).items():
            if isinstance(done, _Restored):
                restored[i] = done
            else:
                outcomes[i] = done

        for i, photo in photos.items():
            if i not in outcomes:
                outcomes[i] = self._or_own_error(partial(self._finish_photo, photo, *restored[i]))
        return [outcomes[i] for i in range(len(requests))]

    def _restore_shared(
        self, batch: dict[int, _Photo], timer: StageTimer, paid: dict[str, float]
    ) -> dict[int, _Restored | _PhotoError]:
        """The shared stages (DBLM → DSST → sampling) on the faces of `batch`'s photos together: each
        photo's restored faces, or the error that ended them. When the device runs out of memory on
        the faces of several photos, each photo's go again alone (the same seeds: the same faces),
        so that only a photo too large by itself fails; its time in the failed batch stays counted,
        in its timings whole and in its shares divided among that batch's photos. ``paid``: each
        photo's shares of the tries before this one."""
        if not batch:
            return {}
        before = dict(timer.seconds)
        together = self._or_own_error(partial(self._restore_together, list(batch.values()), timer))
        shares = {
            stage: paid.get(stage, 0.0) + (seconds - before.get(stage, 0.0)) / len(batch)
            for stage, seconds in timer.seconds.items()
        }
        if isinstance(together, list):
            return {
                i: _Restored(faces, facts, timer.seconds, shares)
                for i, (faces, facts) in zip(batch, together, strict=True)
            }
        if isinstance(together, DeviceOutOfMemoryError) and len(batch) > 1:  # too many faces at once
            return {
                i: self._restore_shared({i: photo}, timer.copy(), shares)[i] for i, photo in batch.items()
            }
        return dict.fromkeys(batch, together)

    def _restore_together(
        self, batch: list[_Photo], timer: StageTimer
    ) -> list[tuple[np.ndarray, list[FaceFacts]]]:
        """One `_restore_faces` call on the faces of all of `batch`, photo j's face k drawing from
        seed_j + k; it reports to each photo and stops once every one of them asks."""

        def report(stage: str, step: int, total: int) -> None:
            for photo in batch:
                photo.report(stage, step, total)

        faces, facts = self._restore_faces(
            np.concatenate([p.crops for p in batch]),
            [_face_generator(p.seed, k, self.device) for p in batch for k in range(len(p.crops))],
            mode=batch[0].options.mode,
            fidelity=batch[0].options.fidelity,
            # A batch shares mode and fidelity, so its photos all have noise_std or none does.
            noise_std=None
            if any(p.noise_std is None for p in batch)
            else [s for p in batch for s in p.noise_std],
            progress=report,
            should_cancel=lambda: all(p.should_cancel() for p in batch),
            timer=timer,
        )
        ends = np.cumsum([len(p.crops) for p in batch])
        return [
            (faces[first:end], facts[first:end]) for first, end in zip([0, *ends[:-1]], ends, strict=True)
        ]

    def _or_own_error(self, stage: Callable[[], _T]) -> _T | _PhotoError:
        """`stage()`, or the error that ends the photo(s) it works on alone: their own (bad file, no
        face, bad options, canceled), or `DeviceOutOfMemoryError` once the device ran out of memory on
        them, their memory then freed for the other photos."""
        try:
            return stage()
        except (PipelineError, ValueError) as e:
            return e
        except torch.OutOfMemoryError:
            pass  # freed after the handler: until then its traceback holds the stage's tensors
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return DeviceOutOfMemoryError()

    def _start_photo(self, request: PhotoRequest) -> _Photo:
        """Decode and detect/align one photo (its faces not yet restored)."""
        options = request.options
        timer = StageTimer(self.device)
        report = request.progress or (lambda stage, step, total: None)
        cancel = request.should_cancel or (lambda: False)
        warnings: list[str] = []
        if not self.profile.real:
            warnings.append(_TINY_WARNING)

        report("decode", 0, 0)
        with timer("decode"):
            decoded = images.decode_image(request.data, max_pixels=self.max_pixels)
            warnings += decoded.warnings

        unknown = set(options.outputs) - set(OUTPUT_KINDS)
        if unknown:
            raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {OUTPUT_KINDS}")
        fmt = images.resolve_format(options.format, decoded.format)
        # Before any detection or sampling: the encoder would refuse the result only at the end. A
        # library has no output pixel limit; the API sets one (`max_output_pixels`).
        sizes = images.output_sizes(
            decoded.size, aligned=options.aligned, upscale=options.upscale, outputs=options.outputs
        )
        images.check_output_sizes(sizes, fmt)
        _stop_if_canceled(cancel, "detection")
        report("detect", 0, 0)
        with timer("detect"):
            crops, affines, found = self._detect_and_align(decoded.rgb, options, warnings)
            noise_std = self._face_noise(decoded.rgb, crops, affines, found, options)

        if len(crops) == 0:
            if options.on_no_face == "fail":
                raise NoFaceError("No face was found in the image.")
            warnings.append("No face was found; the image is returned without restoration.")
            seed = options.seed or 0
        else:
            seed = draw_seed() if options.seed is None else options.seed
        return _Photo(
            options, report, cancel, timer, warnings, decoded, fmt, crops, affines, found, noise_std, seed
        )

    def _finish_photo(
        self,
        photo: _Photo,
        restored: np.ndarray,
        facts: list[FaceFacts],
        shared: dict[str, float],
        shares: dict[str, float],
    ) -> PhotoResult:
        """Paste one photo's restored faces back and encode what it asked for."""
        options, decoded, crops, affines = photo.options, photo.decoded, photo.crops, photo.affines
        found, timer, report = photo.found, photo.timer, photo.report
        warnings, seed = photo.warnings, photo.seed
        if len(crops):  # the shared stages' time is this photo's time in them
            timer.seconds.update(shared)

        # Transparent pixels must not bleed into visible ones when the photo is upscaled.
        upscale_background = partial(
            self._upscale_background, alpha=decoded.alpha, should_cancel=photo.should_cancel
        )
        alpha = decoded.alpha
        _stop_if_canceled(photo.should_cancel, "paste-back")  # its batch may have sampled on for others
        report("paste", 0, 0)
        with timer("paste"):
            if options.color_correction != "none" and len(restored):
                restored = face_ops.color_correct(restored, crops, options.color_correction)
            if options.aligned:  # the whole picture is the face: there is no background (Lanczos)
                face = restored[0] if len(restored) else decoded.rgb
                if alpha is not None and alpha.shape != face.shape[:2]:
                    alpha = face_ops.resize_to(alpha, (face.shape[1], face.shape[0]))  # as the face was
                output = _upscale_with_alpha(face, options.upscale, alpha, face_ops.upscale_image)
            elif len(restored):
                output = face_ops.paste_faces(
                    decoded.rgb,
                    restored,
                    affines,
                    options.upscale,
                    parser=self._parser,
                    upscale_background=upscale_background,
                )
            else:
                output = upscale_background(decoded.rgb, options.upscale)
            if alpha is not None and alpha.shape != output.shape[:2]:
                # Resized as the upscalers above resized it to divide the premultiplied colours.
                alpha = face_ops.resize_to(alpha, (output.shape[1], output.shape[0]))

        _stop_if_canceled(photo.should_cancel, "encoding")
        report("encode", 0, 0)
        with timer("encode"):
            encode = partial(
                images.encode_image,
                grayscale=decoded.grayscale,
                format=photo.format,
                png_compress_level=self.png_compress_level,
            )
            image, media_type = encode(output, alpha=alpha)

            def encode_all(faces: np.ndarray) -> list[bytes]:
                return [encode(f)[0] for f in faces]

            face_files = encode_all(restored) if "faces" in options.outputs else []
            crop_files = encode_all(crops) if "crops" in options.outputs else []
            comparison = None
            if "comparison" in options.outputs:
                before = (
                    face_ops.upscale_image(decoded.rgb, options.upscale)
                    if not options.aligned
                    else decoded.rgb
                )
                pair = face_ops.comparison_image(before, output)
                comparison = encode(pair)[0]

        reports = [FaceReport(f.box, f.score, facts) for f, facts in zip(found.faces, facts, strict=True)]
        return PhotoResult(
            image,
            media_type,
            face_files,
            comparison,
            reports,
            timer.seconds,
            {**timer.seconds, **shares},
            warnings,
            seed,
            crops=crop_files,
            faces_dropped=found.dropped,
        )

    def _detect_and_align(
        self, rgb: np.ndarray, options: RestoreOptions, warnings: list[str]
    ) -> tuple[np.ndarray, np.ndarray, face_ops.Detections]:
        """Aligned crops (N, 512, 512, 3), their affines and the detections they came from."""
        if options.aligned:  # square: `images.output_sizes` refused any other
            h, w = rgb.shape[:2]
            crop = rgb if h == FACE_SIZE else face_ops.resize_to(rgb, (FACE_SIZE, FACE_SIZE))
            if h != FACE_SIZE:
                warnings.append(f"The aligned face was {w}×{h}; it was resized to {FACE_SIZE}×{FACE_SIZE}.")
            whole = face_ops.DetectedFace((0.0, 0.0, float(w), float(h)), 1.0, np.empty((0, 2), np.float32))
            s = FACE_SIZE / w  # the resize's affine, pixel centres at +0.5 (as `face_ops.align`'s)
            resize = np.array([[[s, 0.0, (s - 1) / 2], [0.0, s, (s - 1) / 2]]])
            return crop[None], resize, face_ops.Detections([whole])
        if options.max_faces is not None and options.max_faces < 1:
            raise ValueError("max_faces must be ≥ 1")
        cap = self.max_faces if options.max_faces is None else min(options.max_faces, self.max_faces)
        found = self._detector(options.detector or self.profile.detector).detect(
            rgb,
            only_center_face=options.only_center_face,
            min_face_size=options.min_face_size,
            max_faces=cap,
        )
        warnings += found.warnings
        crops, affines = face_ops.align(rgb, found.faces, FACE_SIZE)
        return crops, affines, found

    def _face_noise(
        self,
        rgb: np.ndarray,
        crops: np.ndarray,
        affines: np.ndarray,
        found: face_ops.Detections,
        options: RestoreOptions,
    ) -> list[float] | None:
        """Each face's noise std as the model sees it, for auto fidelity with the fallback DGSA, in its
        box (the whole input for `aligned`). Measured on the source pixels, except for a face that an
        anti-aliased resampling shrank into its crop (detected faces shrunk over 2×, `_warp`'s
        low-pass; large aligned inputs, Lanczos-resized): that averages the noise away for real, so
        it is measured on the crop (docs/method.md, "Auto fidelity"). A plain bilinear warp, enlarging
        or mildly shrinking, only correlates the noise into blobs the estimate misses, yet it is still
        there. A crop region the photo does not wholly cover (its border fill would read as no noise)
        is measured at the source too. None when nothing would use it (a given fidelity, the
        baseline, a trained DGSA)."""
        if options.fidelity is not None or options.mode != "dynfacerestore" or self.dgsa is not None:
            return None
        averaged_below = 1.0 if options.aligned else face_ops.ANTI_ALIAS_SCALE  # crop px per source px
        h, w = rgb.shape[:2]
        stds = []
        for crop, affine, face in zip(crops, affines, found.faces, strict=True):
            x0, y0, x1, y1 = face.box
            corners = np.array([[x0, y0, 1], [x1, y0, 1], [x0, y1, 1], [x1, y1, 1]]) @ affine.T
            (cx0, cy0), (cx1, cy1) = corners.min(axis=0), corners.max(axis=0)
            region = np.array([[cx0, cy0], [cx1, cy0], [cx0, cy1], [cx1, cy1]])
            sx, sy = np.linalg.solve(affine[:, :2], (region - affine[:, 2]).T)  # its corners in the photo
            covered = sx.min() >= 0 and sy.min() >= 0 and sx.max() <= w and sy.max() <= h
            if np.sqrt(abs(np.linalg.det(affine[:, :2]))) < averaged_below and covered:
                stds.append(box_noise_std(crop, (cx0, cy0, cx1, cy1)))
            else:
                stds.append(box_noise_std(rgb, face.box))
        return stds

    def _detector(self, name: str) -> face_ops.FaceDetector:
        """Detectors are built once per name and kept, so jobs pay no load time.

        A detector whose weights are absent fails the job with a message naming the file and
        the command that fetches it (never a download, never an anonymous internal error).
        """
        if name not in self._detectors:
            try:
                with loading_weights([name], self.weights_dir):
                    detector = face_ops.FaceDetector(self.weights_dir, name, self.device)  # type: ignore[arg-type]
            # Absent, or there but not loading (UnloadableWeightsError): the error names the file and its fix.
            except weights.MissingWeightsError as e:
                raise PipelineError(f"Face detector {name} is not available: {e}") from e
            self._detectors[name] = detector
        return self._detectors[name]

    def load_detector(self) -> None:
        """Load the profile's default detector now (workers call this before taking jobs)."""
        self._detector(self.profile.detector)

    def _upscale_background(
        self,
        rgb: np.ndarray,
        factor: float,
        alpha: np.ndarray | None = None,
        should_cancel: CancelFn | None = None,
    ) -> np.ndarray:
        """The photo behind the pasted faces: the background model's output (which stops between
        tiles once `should_cancel`), or a Lanczos resize. With a (not fully opaque) `alpha`, colours
        are upscaled premultiplied by it."""
        upscale = (
            face_ops.upscale_image
            if self.background is None
            else partial(self.background.upscale, should_cancel=should_cancel)
        )
        return _upscale_with_alpha(rgb, factor, alpha, upscale)

    # ------------------------------------------------------------------ aligned faces
    def restore_faces(
        self,
        faces: np.ndarray,
        *,
        mode: Mode = "dynfacerestore",
        fidelity: float | None = None,
        seed: int | None = None,
        noise_std: Sequence[float] | None = None,
        progress: ProgressFn | None = None,
        should_cancel: CancelFn | None = None,
    ) -> FacesResult:
        """Restore aligned faces (uint8 (N, 512, 512, 3)), `max_batch` at a time through the sampler.

        `noise_std` (8-bit units, one per face) feeds auto fidelity without a trained DGSA: give it
        when the crops were enlarged from their source (measure there, `models.fidelity.box_noise_std`);
        None measures it on `faces` themselves, right when they are the native pixels or were shrunk from
        them with anti-aliasing (`_face_noise`).

        Face k's noise comes from its own generator seeded with seed + k, so its result does not depend
        on the other faces or on how they are batched: restoring it alone with seed + k reproduces it.
        """
        timer = StageTimer(self.device)
        seed = draw_seed() if seed is None else seed
        generators = [_face_generator(seed, k, self.device) for k in range(len(faces))]
        restored, facts = self._restore_faces(
            faces,
            generators,
            mode=mode,
            fidelity=fidelity,
            noise_std=noise_std,
            progress=progress,
            should_cancel=should_cancel,
            timer=timer,
        )
        return FacesResult(restored, facts, timer.seconds, seed)

    @torch.inference_mode()
    def _restore_faces(
        self,
        faces: np.ndarray,
        generators: list[torch.Generator],
        *,
        mode: Mode,
        fidelity: float | None,
        noise_std: Sequence[float] | None,
        progress: ProgressFn | None,
        should_cancel: CancelFn | None,
        timer: StageTimer,
    ) -> tuple[np.ndarray, list[FaceFacts]]:
        """`restore_faces` (and `restore_photos`) with face i's noise drawn from generators[i]."""
        if faces.ndim != 4 or faces.shape[1:] != (FACE_SIZE, FACE_SIZE, 3) or faces.dtype != np.uint8:
            raise ValueError(
                f"faces must be uint8 (N, {FACE_SIZE}, {FACE_SIZE}, 3), got {faces.dtype} {faces.shape}"
            )
        if mode not in ("dynfacerestore", "difface"):
            raise ValueError(f"unknown mode {mode!r}")
        if fidelity is not None and not 0.0 <= fidelity <= 1.0:
            raise ValueError(f"fidelity must be in [0, 1], got {fidelity}")
        if len(generators) != len(faces):
            raise ValueError(f"{len(generators)} generators for {len(faces)} faces")
        if noise_std is not None and len(noise_std) != len(faces):
            raise ValueError(f"{len(noise_std)} noise stds for {len(faces)} faces")
        if len(faces) == 0:  # nothing to sample (and np.concatenate refuses an empty list)
            return faces.copy(), []
        report = progress or (lambda stage, step, total: None)
        cancel = should_cancel or (lambda: False)

        firsts = range(0, len(faces), self.max_batch)
        batches = [faces[i : i + self.max_batch] for i in firsts]
        noise = [None if noise_std is None else noise_std[i : i + self.max_batch] for i in firsts]
        out, facts = [], []
        # Every chunk's guide comes before any sampling: the progress total is the sum of their starts.
        # Guides wait for their chunk on the host, and results go back there, so the device holds one
        # chunk's at most: `max_batch` bounds its memory, not the number of faces.
        guides: list[_Guide] = []
        report("dblm", 0, len(faces))
        with timer("dblm"):
            for b, s in zip(batches, noise, strict=True):
                guides.append(self._to_host(self._guide(self._to_tensor(b), mode, fidelity, s)))
                _stop_if_canceled(cancel, "sampling")
        # One batched sampler loop per batch, as long as its latest-starting face; each face makes its
        # own start's worth of steps (its NFE), joining the loop when it reaches that start.
        total = sum(max(g.start) for g in guides)
        done = 0
        with timer("sample"):
            for b, guide in enumerate(guides):
                x0 = self._sample(
                    guide,
                    generators[b * self.max_batch : (b + 1) * self.max_batch],
                    lambda step, base=done: report("sample", base + step, total),
                    cancel,
                )
                done += max(guide.start)
                out.append(_to_uint8(x0))
                facts += [
                    FaceFacts(s, st, e, st, guide.dblm, guide.dgsa)
                    for s, st, e in zip(guide.sigma, guide.start, guide.eta, strict=True)
                ]
        return np.concatenate(out), facts

    def _to_tensor(self, faces: np.ndarray) -> Tensor:
        # torch cannot wrap a read-only array safely: copy only such (or a strided) input.
        host = torch.from_numpy(np.require(faces, requirements=("C", "W")))
        x = to_device(host, self.device, self.speed).permute(0, 3, 1, 2)
        return x.float() / 127.5 - 1.0

    def _guide(
        self, y: Tensor, mode: Mode, fidelity: float | None, noise_std: Sequence[float] | None
    ) -> _Guide:
        """DBLM → level σk → DSST start; DGSA map; eta. All at 512, in float32. `noise_std`: per
        face, as the model sees it (`_face_noise`; None: measured on y itself)."""
        method = self.profile.method
        # R(y) (~181 GFLOP a face) runs on first use: the baseline, the fallback DBLM and a trained DGSA
        # read it; a trained DBLM with the fallback DGSA does not.
        restored = cache(partial(self._restore, y))
        n = y.shape[0]
        if mode == "difface":
            eta = DIFFACE_DEFAULT_ETA if fidelity is None else fidelity
            start = method.baseline_start_index
            return _Guide(restored(), [0.0] * n, [start] * n, [eta] * n, None, "none", "none")

        if self.dblm is not None:
            estimates, logvar = self.dblm(((y + 1) / 2).to(self.dtype))
            estimates = estimates.float() * 2 - 1
            # logvar is in [0,1]² units; std in 8-bit units is 255·√exp(s).
            std_8bit = 255.0 * torch.exp(0.5 * logvar.float()).mean(dim=(-2, -1))  # (N, K)
            reliable = std_8bit <= method.level_threshold
            level = [_first_true_or_last(row) for row in reliable]
            least_sigma = [0.0] * n
            dblm_kind = "trained"
        else:
            sigma_hat = estimate_blur_sigma(restored(), self.dsst.face_power_spectrum)
            estimates, usable = fallback_estimates(restored(), sigma_hat, self.dsst.sigmas)
            level = [_first_true_or_last(row) for row in usable]
            # Blurrier than every level (σ̂ > σ_K), R(y) ≈ G_σ̂ * x is its own estimate: guided with G_σ̂,
            # its own kernel (G_σK would pull G_σK * x towards a blurrier face: over-smoothing), from
            # the heaviest level's start. Elsewhere σk ≥ σ̂.
            least_sigma = [float(s) for s in sigma_hat]
            dblm_kind = "fallback"
        idx = torch.arange(n, device=y.device)
        estimate = estimates[idx, torch.tensor(level, device=y.device)]
        sigma = [max(float(self.dsst.sigmas[k]), least) for k, least in zip(level, least_sigma, strict=True)]
        start = [self.dsst.start_index_for(s) for s in sigma]

        if self.dgsa is not None:
            # DGSA works in [0,1] like DBLM: its log-variance is in [0,1]² units.
            unit = [((t + 1) / 2).to(self.dtype) for t in (estimate, restored())]
            dgsa_logvar = self.dgsa(*unit).float()
            scale_map = scale_from_logvar(dgsa_logvar, c=(method.level_threshold / 255.0) ** 2)
            std_bar = 255.0 * torch.exp(0.5 * dgsa_logvar).mean(dim=(1, 2, 3))
            dgsa_kind = "trained"
        else:
            scale_map = coherence_scale_map((estimate + 1) / 2, g_min=method.dgsa_min_scale)
            std_bar = robust_noise_std(y) if noise_std is None else torch.tensor(noise_std)
            dgsa_kind = "fallback"
        eta = [float(auto_eta(float(s))) for s in std_bar] if fidelity is None else [fidelity] * n
        return _Guide(estimate, sigma, start, eta, scale_map, dblm_kind, dgsa_kind)

    def _to_host(self, guide: _Guide) -> _Guide:
        """`guide` off the device until `_sample` takes it back (pinned on CUDA: a fast copy back)."""
        scale_map = None if guide.scale_map is None else to_host(guide.scale_map, self.speed)
        return replace(guide, estimate=to_host(guide.estimate, self.speed), scale_map=scale_map)

    def _restore(self, y: Tensor) -> Tensor:
        """DifFace's restorer R(y): [-1,1] in and out, at 512."""
        r = self.restorer(((y + 1) / 2).to(self.dtype)).float()
        return (r.clamp(0, 1) * 2 - 1).contiguous()

    @torch.inference_mode()
    def sample_at_level(self, estimate: Tensor, sigma: float, start: int, *, eta: float, seed: int) -> Tensor:
        """The guided sampler alone, at a given level and start (the empirical DSST builder's sweep,
        models/dsst.py `sweep_table`): ŷ^σ (N, 3, 512, 512) in [-1, 1] → x0 (N, 3, 512, 512) in [-1, 1].
        Scale map: the training-free DGSA's (a trained DGSA would need R(y), which a sweep on given
        estimates has not); face k's noise is seeded with seed + k, as in `restore_faces`."""
        estimate = estimate.to(self.device, torch.float32)
        n = estimate.shape[0]
        scale_map = coherence_scale_map((estimate + 1) / 2, g_min=self.profile.method.dgsa_min_scale)
        levels = ([sigma] * n, [start] * n, [eta] * n)
        guide = _Guide(estimate, *levels, scale_map, dblm="given", dgsa="fallback")
        generators = [_face_generator(seed, k, self.device) for k in range(n)]
        return self._sample(guide, generators, lambda step: None, lambda: False)

    def _sample(
        self,
        guide: _Guide,
        generators: list[torch.Generator],
        on_step: Callable[[int], None],
        cancel: CancelFn,
    ) -> Tensor:
        """Sample all faces of `guide` in one DDIM loop, each from its own start step with its own eta
        (see models.sampler) and drawing noise from its own generator; returns x0 at 512."""
        size = self.profile.image_size
        estimate = _resize(to_device(guide.estimate, self.device, self.speed), size)
        # q_sample's noise is each face's first draw, exactly as a one-face batch would take it.
        shape = (1, *estimate.shape[1:])
        noise = torch.cat([torch.randn(shape, generator=g, device=self.device) for g in generators])
        start = torch.tensor(guide.start, dtype=torch.int64)
        x_start = q_sample(estimate, self.schedule, start, noise)
        guide_fn = None
        if guide.scale_map is not None:
            work_sigma = [s * size / FACE_SIZE for s in guide.sigma]
            guide_fn = GaussianGuidance(
                estimate,
                torch.tensor(work_sigma, device=self.device),
                self.profile.method.guidance_variance,
                self.schedule,
                scale=self.profile.method.guidance_scale,
                scale_map=_resize(to_device(guide.scale_map, self.device, self.speed), size),
            )
        x0 = ddim_sample(
            self._eps,
            x_start,
            self.schedule,
            start,
            guide.eta,
            guide=guide_fn,
            generator=generators,
            callback=lambda step, total: on_step(step),
            should_cancel=cancel,
        )
        return _resize(x0.float(), FACE_SIZE)

    def _eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        """The prior's noise prediction (first 3 of its 6 output channels), in float32. x_t goes in as
        the sampler holds it (float32): the UNet casts it for its half-precision blocks itself and its
        float32 head returns eps unrounded, as upstream's fp16 mode does."""
        x = x_t.to(memory_format=self._memory_format)
        return self._unet_call(x, t)[:, :3].float()


_TINY_WARNING = (
    "Profile 'tiny': small random weights for tests and demos. This output is NOT a face restoration."
)


def _trained_parts(
    profile: Profile,
    dsst_table: str | Path | None,
    dblm_weights: str | Path | None,
    dgsa_weights: str | Path | None,
    dsst: DSSTable | None,
) -> dict[str, Any]:
    """Constructor kwargs for the files given. A named file that is missing or wrong (or does not fit
    the profile or the table, `_check_parts`) raises here, at load time. DBLM and DGSA run on the
    aligned FACE_SIZE crops, so a file trained for another profile or at another size is refused
    (`trained.load`); the tiny profile's toy nets restore nothing, so its files may come from a smoke
    run at a small size (`DataConfig.size`). A trained DGSA predicts the errors of the trained DBLM it
    was trained with, so it is refused without that DBLM file (`trained.check_dgsa_pairing`): beside
    the fallback DBLM, or another trained one, its map would mean nothing."""
    parts: dict[str, Any] = {}
    named: list[str] = []
    size = FACE_SIZE if profile.real else None
    if dsst_table is not None:
        named.append(str(dsst_table))
        try:  # a malformed table (start indices out of its schedule too) names its file
            parts["dsst"] = DSSTable.from_json(Path(dsst_table).expanduser().read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{dsst_table}: {e}") from e
    dblm_path = Path(dblm_weights).expanduser() if dblm_weights is not None else None
    if dblm_path is not None:
        named.append(str(dblm_weights))
        parts["dblm"] = trained.load(dblm_path, "dblm", profile=profile.name, size=size)
    if dgsa_weights is not None:
        dgsa_path = Path(dgsa_weights).expanduser()
        parts["dgsa"] = trained.load(dgsa_path, "dgsa", profile=profile.name, size=size)
        if dblm_path is None:
            raise ValueError(
                f"{dgsa_weights}: a trained DGSA needs the trained DBLM it was trained with (--dblm-weights, "
                "DYNFACE_DBLM_WEIGHTS): it predicts that DBLM's errors, not the fallback DBLM's. Give that "
                "DBLM file too, or no DGSA file (the training-free DGSA)"
            )
        trained.check_dgsa_pairing(dgsa_path, dblm_path)
    try:
        _check_parts(profile, parts.get("dsst") or dsst or default_table(), parts.get("dblm"))
    except ValueError as e:
        raise ValueError(f"{', '.join(named)}: {e}" if named else str(e)) from e
    return parts


def _check_parts(profile: Profile, dsst: DSSTable, dblm: DBLMNet | None) -> None:
    """Refuse a DSST table or trained DBLM that does not fit: the table's start indices are indices of
    its own schedule and its σk are px at its image size (the pipeline's: `profile`'s schedule, σ at
    FACE_SIZE), and DBLM output k is read as the table's level k. Every start, the baseline's too, is
    in 1..len(schedule) − 1 (`check_start_indices`) once this passes, not found wrong by a request."""
    schedule = RespacedSchedule.from_spec(profile.method.respacing)
    have = (dsst.schedule_spec, dsst.num_timesteps, dsst.image_size)
    want = (schedule.spec, schedule.num_timesteps, FACE_SIZE)
    if have != want:
        raise ValueError(
            "the DSST table is for schedule {} of {} timesteps with σ in px at {}; profile {!r} needs "
            "{} of {} with σ at {}".format(*have, profile.name, *want)
        )
    # The table's own starts are already in 1..len − 1 of its schedule (DSSTable checks them), which was
    # just found to be this one; the baseline's start comes from the profile and is checked here.
    baseline = [profile.method.baseline_start_index]
    check_start_indices(baseline, len(schedule), f"profile {profile.name!r} baseline")
    if dblm is not None and (
        len(dblm.sigmas) != len(dsst.sigmas)
        or not all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(dblm.sigmas, dsst.sigmas, strict=True))
    ):
        raise ValueError(
            f"the DBLM's blur levels {dblm.sigmas} are not the DSST table's {dsst.sigmas} "
            "(the DBLM's output k is used as the table's level k)"
        )


#: The prior's other published format, the Hugging Face copy (OAOA/DifFace).
HF_PRIOR = ("hf_difface_unet", "hf_difface_config")


def prior_weights(weights_dir: Path) -> tuple[str, ...]:
    """Manifest names of the prior a real pipeline loads: upstream's checkpoint (what `weights pull`
    fetches), or the Hugging Face copy where only that is present (`dynface weights pull --only
    hf_difface_unet --only hf_difface_config`, e.g. where GitHub's release host is unreachable)."""
    if weights.missing_for(["difface_prior"], weights_dir) and not weights.missing_for(HF_PRIOR, weights_dir):
        return HF_PRIOR
    return ("difface_prior",)


def profile_weights(profile: Profile, weights_dir: Path) -> list[str]:
    """Manifest names of the files `profile` requires, with the prior in the format `prior_weights`
    picks (the background model's file, a setting, comes on top)."""
    return [
        n
        for name in profile.required_weights
        for n in (prior_weights(weights_dir) if name == "difface_prior" else (name,))
    ]


def _load_problem(error: BaseException) -> str:
    """What went wrong reading a checkpoint, in a line: torch's own text for a refused pickle suggests
    loading it with weights_only=False, which would run whatever a damaged or foreign file holds."""
    text = str(error)
    if "Weights only load failed" in text:
        found = text.partition("WeightsUnpickler error:")[2].strip().split("\n", 1)[0].strip()
        text = f"not a checkpoint torch reads safely{f': {found}' if found else ''}"
    line = text.strip().split("\n", 1)[0]
    line = line if len(line) <= 200 else line[:197] + "..."
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


#: Errors that say the code or its environment is wrong (a broken facexlib or torchvision install, a
#: bug), never the file: a fresh copy of gigabytes of weights would fix none of them.
_NOT_THE_FILE = (ImportError, AttributeError, TypeError, NameError, AssertionError, NotImplementedError)


@contextmanager
def loading_weights(names: Sequence[str], weights_dir: Path) -> Iterator[None]:
    """Load the file of manifest entry `names[0]` (with the files of the others it comes with) only if
    it can be trusted, and name it with its fix when it does not load.

    First the files whose sha256 is pinned (the detectors and the parser, up to ~110 MB: ~0.1 s) are
    hashed, wherever they came from (a pull checked them, but not a hand copy of an offline host's):
    one that does not match raises `weights.UnloadableWeightsError`, not loaded. Then a failure to
    read or load becomes that error too, naming the file and the `--force` pull that replaces it:
    torch's and safetensors' read errors (an empty or cut-short file, another format), missing or
    mismatched keys (another network's checkpoint). A worker then waits in `missing_weights` rather
    than exiting on an error that names no file. A file this process may not read raises
    `weights.UnreadableWeightsError` saying how to make it readable (a worker: `misconfigured`).
    Passed through: a file that is not there (MissingWeightsError), other OS errors, running out of
    memory and device errors (a detector loads onto the device), errors of the code rather than the
    file (`_NOT_THE_FILE`), and any error loading files that are all pinned (and matched: the published
    files, so the fault is elsewhere): a fresh copy would fix none of them."""
    entries = [m for m in weights.MANIFEST if m.name in names]
    pinned = [m.name for m in entries if m.sha256 is not None]
    for status in weights.verify(weights_dir, names=pinned) if pinned else ():
        if status.state == "corrupt":  # a missing one is left to the loader, which says what it needs
            raise weights.UnloadableWeightsError(names, weights_dir, status.path, status.detail)
    try:
        yield
    except PermissionError as e:
        path = e.filename or (weights_dir / entries[0].path if entries else weights_dir)
        raise weights.UnreadableWeightsError(names, path, e) from e
    except (OSError, MemoryError, torch.OutOfMemoryError, torch.AcceleratorError, *_NOT_THE_FILE):
        raise
    except Exception as e:
        entry = next((m for m in entries if m.name == names[0]), None)
        # Not a published file (an unknown detector name), or the published one: not the file's fault.
        if entry is None or len(pinned) == len(entries):
            raise
        path = weights_dir / entry.path
        raise weights.UnloadableWeightsError(names, weights_dir, path, _load_problem(e)) from e


def real_networks(profile: Profile, weights_dir: Path) -> tuple[IDDPMUNet, SwinIR, dict[str, str]]:
    """DifFace's released prior (in the format `prior_weights` picks) and restorer from `weights_dir`,
    with the file each came from (`info`'s "weights"). The files must be there; one that does not load
    raises `weights.UnloadableWeightsError` (`loading_weights`)."""
    prior = prior_weights(weights_dir)
    with loading_weights(prior, weights_dir):
        unet, prior_file = _load_prior(weights_dir, prior, profile.unet)
    (restorer_entry,) = weights.select(["difface_swinir"])
    with loading_weights([restorer_entry.name], weights_dir):
        restorer = swinir_from_checkpoint(weights_dir / restorer_entry.path, profile.swinir)
    return unet, restorer, {"prior": prior_file, "restorer": restorer_entry.file_name}


def load_background(config: bg.BackgroundConfig, weights_dir: Path) -> bg.BackgroundUpscaler | None:
    """`bg.load`, with a model file that does not load reported as `loading_weights` does."""
    with loading_weights(config.weight_names or ("none",), weights_dir):
        return bg.load(config, weights_dir)


def _load_prior(weights_dir: Path, names: tuple[str, ...], config: dict[str, Any]) -> tuple[IDDPMUNet, str]:
    """The prior UNet from the files `prior_weights` chose, and the file it came from (for `info`). The
    Hub copy carries its own config: it must be the profile's, so both formats load the same network."""
    if names != HF_PRIOR:
        (entry,) = weights.select(["difface_prior"])
        return unet_from_upstream_checkpoint(weights_dir / entry.path, config), entry.file_name
    (entry,) = weights.select(["hf_difface_unet"])
    unet = unet_from_hf_difface((weights_dir / entry.path).parent)
    found = json.loads(json.dumps({key: unet.config[key] for key in config}))
    if found != json.loads(json.dumps(config)):
        raise ValueError(
            f"The Hugging Face prior in {weights_dir / entry.path} is not this profile's UNet: {found}"
        )
    return unet, entry.path


def _optional_parser(weights_dir: Path, device: torch.device) -> face_ops.FaceParser | None:
    """The face parser where its (optional) file is there; one that does not load, or cannot be read
    (an OS error: permissions, say), is logged with its fix and left out, as an absent one is:
    paste-back then uses the feathered crop mask."""
    try:
        with loading_weights(["parsenet"], weights_dir):
            return face_ops.FaceParser.if_available(weights_dir, device)
    except OSError as e:  # UnloadableWeightsError and UnreadableWeightsError included
        log.warning("running without the optional face parser: %s", e)
        return None


def _pull_optional(names: Sequence[str], wdir: Path) -> None:
    """Fetch files the profile works without (better paste masks, the other detector); a failure
    (offline, no network) is logged, never fatal, since the service runs fine without them."""
    for name, e in weights.pull_optional(names, wdir)[1]:
        log.warning("optional weights %s not fetched: %s", name, e)


def tiny_networks(profile: Profile) -> tuple[IDDPMUNet, SwinIR]:
    """Toy networks with weights drawn from a fixed seed, the same on every machine and run.

    Upstream zero-initialises some output layers; those are re-drawn small so the random prior's
    prediction still depends on its input (a zero UNet would make the sampler trivially constant)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = IDDPMUNet(**profile.unet)
        restorer = SwinIR(**profile.swinir)
        for p in (*unet.parameters(), *restorer.parameters()):
            if p.dim() > 1 and not p.any():
                torch.nn.init.normal_(p, std=1e-2)
    return unet, restorer


def _upscale_with_alpha(
    rgb: np.ndarray,
    factor: float,
    alpha: np.ndarray | None,
    upscale: Callable[[np.ndarray, float], np.ndarray],
) -> np.ndarray:
    """`upscale` (an RGB upscaler) on colours premultiplied by a (not fully opaque) `alpha`, so that
    transparent pixels do not bleed into visible ones (`face_ops.upscale_premultiplied`)."""
    if alpha is None or factor == 1 or alpha.min() == 255:  # nothing would be premultiplied
        return upscale(rgb, factor)
    return face_ops.upscale_premultiplied(rgb, alpha, factor, upscale)


def _stop_if_canceled(cancel: CancelFn, before: str) -> None:
    """Between stages, as the sampler between steps: the same `Cancelled`, so the worker ends the
    job canceled."""
    if cancel():
        raise Cancelled(f"Canceled before {before}.")


def draw_seed() -> int:
    """A seed for a call that gave none (reported back, so the result can be reproduced)."""
    return int(torch.randint(0, 2**31 - 1, ()).item())


def _face_generator(seed: int, face: int, device: torch.device) -> torch.Generator:
    """The generator of the `face`-th face of a call: seeded with seed + face (mod 2⁶⁴, the seed range)."""
    return torch.Generator(device=device).manual_seed((seed + face) % 2**64)


def _first_true_or_last(row: Tensor) -> int:
    hits = torch.nonzero(row)
    return int(hits[0]) if len(hits) else row.numel() - 1


def _resize(x: Tensor, size: int) -> Tensor:
    if x.shape[-1] == size:
        return x
    return F.interpolate(
        x, size=(size, size), mode="bicubic" if size > x.shape[-1] else "area", align_corners=None
    )


def _to_uint8(x: Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
