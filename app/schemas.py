"""Request and response models: the public API contract (rendered into the OpenAPI document).

The job envelope follows Replicate's predictions (id, status, urls, timestamps, error, outputs) so
clients written for that style work with little change. Public JSON is built from our Redis record
by `restoration_view`, which the worker also uses for webhook bodies: one renderer, one shape.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Status = Literal["queued", "processing", "succeeded", "failed", "canceled"]
Stage = Literal["decode", "detect", "dblm", "sample", "paste", "encode"]
OutputKind = Literal["image", "faces", "crops", "comparison"]
Detector = Literal["retinaface_resnet50", "retinaface_mobile0.25"]


class RestorationOptions(BaseModel):
    """What to do with the photo. Every field is optional; unknown fields are rejected (422)."""

    model_config = ConfigDict(extra="forbid")

    fidelity: Literal["auto"] | float = Field(
        "auto",
        description='"auto": per-sample DDIM eta from the estimated noise level; or a number in '
        "[0, 1] (0 = most faithful to the input, 1 = most generative).",
    )
    mode: Literal["dynfacerestore", "difface"] = Field(
        "dynfacerestore", description="dynfacerestore (default) or the DifFace baseline."
    )
    aligned: bool = Field(
        False,
        description="The input is already an aligned face (no detection): a square crop, restored at "
        "512x512 (another size is resized, with a warning).",
    )
    upscale: int = Field(1, ge=1, le=4, description="Upscale factor of the whole photo.")
    only_center_face: bool = Field(False, description="Restore only the face closest to the centre.")
    detector: Detector | None = Field(None, description="Face detector (default: the model profile's).")
    outputs: list[OutputKind] = Field(
        default_factory=lambda: ["image"],
        min_length=1,
        description="Results to produce: the whole image, the restored aligned faces, the aligned input "
        "faces they came from (crops), a side-by-side comparison.",
    )
    format: Literal["png", "jpeg", "webp", "same"] = Field(
        "same", description='Output format; "same" follows the input (PNG when it cannot).'
    )
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="Sampling seed for reproducible results.")
    max_faces: int | None = Field(
        None,
        ge=1,
        description="Most faces restored in this photo (the largest are kept; the others are counted in "
        "`faces_dropped` and a warning). Default and upper bound: the server's limit (DYNFACE_MAX_FACES).",
    )
    min_face_size: float = Field(
        0.0,
        ge=0.0,
        allow_inf_nan=False,
        description="Ignore detected faces whose shorter box side is below this many pixels.",
    )
    color_correction: Literal["none", "wavelet", "adain"] = Field(
        "none",
        description="Match each restored face's colours to the input face: wavelet (low frequencies) "
        "or adain (per-channel mean and std); none keeps the model's colours.",
    )
    on_no_face: Literal["fail", "passthrough"] = Field(
        "fail", description="fail: the job fails with no_face; passthrough: return the input (upscaled)."
    )
    webhook: str | None = Field(
        None,
        description="https URL that receives the final job JSON (POST; signed as Standard Webhooks when "
        "the server has a webhook secret).",
    )

    @field_validator("fidelity")
    @classmethod
    def _fidelity_range(cls, v: str | float) -> str | float:
        if isinstance(v, float) and not 0.0 <= v <= 1.0:
            raise ValueError("fidelity must be 'auto' or a number in [0, 1]")
        return v

    @field_validator("outputs")
    @classmethod
    def _unique_outputs(cls, v: list[str]) -> list[str]:
        return sorted(set(v), key=v.index)

    def pipeline_options(self) -> dict[str, Any]:
        """Plain fields for models.pipeline.RestoreOptions (the worker builds the dataclass)."""
        data = self.model_dump(exclude={"webhook"})
        data["fidelity"] = None if self.fidelity == "auto" else float(self.fidelity)
        return data


class RestorationRequest(RestorationOptions):
    """JSON form of POST /v1/restorations: the image as a data URL plus the options."""

    image: str = Field(..., description="data:image/...;base64,... (the photo)")


class Progress(BaseModel):
    step: int
    total: int


class StageTimings(BaseModel):
    decode: float | None = None
    detect: float | None = None
    dblm: float | None = None
    sample: float | None = None
    paste: float | None = None
    encode: float | None = None


class Timings(BaseModel):
    queue_wait_seconds: float | None = None
    inference_seconds: float | None = None
    stages: StageTimings = Field(default_factory=StageTimings)
    batch_jobs: int | None = Field(
        None,
        description="Jobs whose faces were restored in one batch with this one's, itself included "
        "(DYNFACE_WORKER_BATCH_MAX_JOBS); their shared stages (dblm, sample) count in each one's times.",
    )


class Face(BaseModel):
    box: list[float] = Field(description="[x0, y0, x1, y1] in input pixels")
    score: float | None = None
    start_step: int | None = Field(None, description="Diffusion start step chosen for this face.")
    eta: float | None = Field(None, description="DDIM eta used (fidelity).")


class ErrorInfo(BaseModel):
    code: str = Field(
        description="Stable machine-readable code, e.g. invalid_image, no_face, cuda_oom, timeout "
        "(all codes with their HTTP status: docs/design.md, 'API error codes')."
    )
    message: str = Field(description="Human-readable explanation.")


class ErrorResponse(BaseModel):
    """The body of every error response (4xx/5xx)."""

    error: ErrorInfo


#: OpenAPI `responses` entries shared by the routers: any error, and a 503 (`redis_unavailable`,
#: `queue_full`), which is always sent with Retry-After.
ERROR_DOC: dict[str, Any] = {"model": ErrorResponse, "description": "Error (see `error.code`)."}
RETRY_AFTER_DOC = {
    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
}
UNAVAILABLE_DOC: dict[str, Any] = {**ERROR_DOC, "headers": RETRY_AFTER_DOC}


class Outputs(BaseModel):
    image: str | None = None
    faces: list[str] = Field(default_factory=list, description="Restored aligned faces, in `faces` order.")
    crops: list[str] = Field(
        default_factory=list, description="The aligned input faces the restored ones came from."
    )
    comparison: str | None = None


class Urls(BaseModel):
    self: str
    result: str | None = Field(
        description="The main result: the restored photo, else the comparison, else the first face, else "
        "the first crop — the first of these the job asked for in `outputs` (once it succeeded: that it "
        "produced); null when there is none (e.g. only `faces` and no face was found) and once the job "
        "failed or was canceled."
    )
    cancel: str


class Restoration(BaseModel):
    """A restoration job (Replicate-style prediction)."""

    id: str
    status: Status
    stage: Stage | None = Field(None, description="Pipeline stage while processing; null otherwise.")
    progress: Progress | None = Field(
        None, description="Diffusion steps done / to do (kept at the final count once finished)."
    )
    queue_position: int | None = Field(
        None, description="Jobs ahead of this one (0 = next); queued jobs only."
    )
    created_at: dt.datetime
    started_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    attempts: int = Field(0, description="Times a worker started this job (>1 after a worker was lost).")
    options: RestorationOptions
    timings: Timings = Field(default_factory=Timings)
    faces: list[Face] = Field(default_factory=list)
    faces_dropped: int = Field(
        0, description="Faces detected but not restored because of `max_faces` (also in `warnings`)."
    )
    warnings: list[str] = Field(default_factory=list)
    error: ErrorInfo | None = None
    outputs: Outputs | None = Field(None, description="URLs of the results (succeeded jobs only).")
    urls: Urls


class MissingWeight(BaseModel):
    """A weight file a worker needs and lacks, and the command that fetches it."""

    name: str = Field(description="Manifest name (`dynface weights list`).")
    path: str = Field(description="Where the worker looks for the file.")
    command: str = Field(description="Shell command that downloads it into that directory.")


class ModelInfo(BaseModel):
    """What one live worker has loaded."""

    worker: str
    state: str = Field(description="loading | missing_weights | misconfigured | ready | busy | stopping")
    device: str | None = None
    profile: str | None = None
    real: bool | None = None
    info: dict[str, Any] = Field(default_factory=dict)
    missing_weights: list[MissingWeight] = Field(
        default_factory=list,
        description="State missing_weights: the files it waits for (it retries loading on its own).",
    )
    weights_command: str | None = Field(
        None, description="State missing_weights: the command that fetches all of `missing_weights`."
    )
    config_error: str | None = Field(
        None,
        description="State misconfigured: why a setting or the file it names cannot be used (a DSST "
        "table, trained DBLM/DGSA weights); it retries loading on its own.",
    )


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    warnings: list[str] = Field(default_factory=list)


class ReadyResponse(BaseModel):
    ready: bool
    reasons: list[str] = Field(default_factory=list)
    auth: Literal["api_key", "open"]
    queue_depth: int | None = None
    workers: list[ModelInfo] = Field(
        default_factory=list,
        description="Live workers; empty for a caller without a valid key when API keys are configured.",
    )


def profile_notice(info: dict[str, Any]) -> str | None:
    """The warning every job response carries while workers run a non-real (random-weight) profile."""
    if info.get("real", True):
        return None
    return (
        f"Profile {info.get('profile')!r} is not a real model (random weights): results are not restorations."
    )


def _ts(value: float | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromtimestamp(value, tz=dt.UTC)


#: Single results before list ones: the whole photo is what most clients want.
_MAIN_RESULT = (("image", "image"), ("comparison", "comparison"), ("faces", "faces/0"), ("crops", "crops/0"))


def _main_result(record: dict[str, Any], requested: list[str], base: str) -> str | None:
    """The URL for `urls.result`: the first output that exists once the job succeeded (a list one
    only when non-empty), or that was requested while it may still succeed (fetching it says
    `not_ready`); None once it failed or was canceled, which leaves no result to fetch."""
    status = record["status"]
    if status in ("failed", "canceled"):
        return None
    if status == "succeeded":
        have = {k for k, v in (record.get("outputs") or {}).items() if v}
    else:
        have = set(requested)
    return next((f"{base}/{path}" for kind, path in _MAIN_RESULT if kind in have), None)


def restoration_view(record: dict[str, Any], queue_position: int | None = None) -> Restoration:
    """Render a Redis record as the public job JSON (API responses and webhook bodies)."""
    base = f"{record['base_url'].rstrip('/')}/v1/restorations/{record['id']}"
    outputs = None
    produced = record.get("outputs")
    if record["status"] == "succeeded" and produced:
        outputs = Outputs(
            image=f"{base}/image" if "image" in produced else None,
            faces=[f"{base}/faces/{k}" for k in range(len(produced.get("faces", [])))],
            crops=[f"{base}/crops/{k}" for k in range(len(produced.get("crops", [])))],
            comparison=f"{base}/comparison" if "comparison" in produced else None,
        )
    step, total = record.get("step"), record.get("total")
    options = RestorationOptions.model_validate(record["options"])
    return Restoration(
        id=record["id"],
        status=record["status"],
        stage=record.get("stage"),
        progress=Progress(step=step, total=total) if total else None,
        queue_position=queue_position if record["status"] == "queued" else None,
        created_at=_ts(record["created_at"]),
        started_at=_ts(record.get("started_at")),
        completed_at=_ts(record.get("completed_at")),
        attempts=record.get("attempts", 0),
        options=options,
        timings=Timings.model_validate(record.get("timings") or {}),
        faces=[Face.model_validate(f) for f in record.get("faces") or []],
        faces_dropped=record.get("faces_dropped") or 0,
        warnings=record.get("warnings") or [],
        error=ErrorInfo.model_validate(record["error"]) if record.get("error") else None,
        outputs=outputs,
        urls=Urls(self=base, result=_main_result(record, options.outputs, base), cancel=base),
    )
