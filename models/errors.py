"""Errors the pipeline raises; each carries the machine-readable code the API reports."""


class ConfigurationError(ValueError):
    """A setting, or the file it names, that the pipeline cannot use: a DSST table or trained DBLM/DGSA
    weights missing, damaged or mismatched. Raised by `RestorationPipeline.from_pretrained` before any
    network loads; not a job's failure (no code): a worker reports it in state `misconfigured`."""


class PipelineError(Exception):
    """A job-level failure with a stable `code` (part of the public API) and a human message."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidImageError(PipelineError):
    code = "invalid_image"


class UnsupportedFormatError(PipelineError):
    code = "unsupported_format"


class TooManyPixelsError(PipelineError):
    code = "too_many_pixels"


class OutputTooLargeError(PipelineError):
    """A result the output format cannot hold (the API refuses the same at submission, same code)."""

    code = "output_too_large"


class NoFaceError(PipelineError):
    code = "no_face"


class DeviceOutOfMemoryError(PipelineError):
    """The device ran out of memory on one photo's own work (the pipeline then frees its cache and
    goes on with the other photos). The code names CUDA, the public API's spelling for any device."""

    code = "cuda_oom"

    def __init__(
        self, message: str = "The GPU ran out of memory on this photo; try a smaller image or upscale."
    ) -> None:
        super().__init__(message)


class Cancelled(PipelineError):
    """Raised at a cancel check (between stages, diffusion steps or background tiles) when the
    caller asked to stop."""

    code = "canceled"
