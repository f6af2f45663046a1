"""Errors the pipeline raises; each carries the machine-readable code the API reports."""


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


class Cancelled(PipelineError):
    """Raised at a cancel check (between stages, diffusion steps or background tiles) when the
    caller asked to stop."""

    code = "canceled"
