"""Decoding of untrusted uploads and encoding of results (Pillow + numpy only, no torch).

The API imports this module to validate uploads before a job is queued, so it must stay cheap to
import and must never decode pixels it has not first checked the size of. Every image leaves
`decode_image` in one normalised shape (uint8 RGB plus an optional uint8 alpha plane) so the rest
of the pipeline never has to care about Pillow modes.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from models.errors import (
    InvalidImageError,
    OutputTooLargeError,
    PipelineError,
    TooManyPixelsError,
    UnsupportedFormatError,
)

OutputFormat = Literal["png", "jpeg", "webp"]
T = TypeVar("T")

#: Pillow format names we accept (only these plugins ever parse an upload). Pillow's JPEG plugin
#: also opens the multi-picture JPEGs ("MPO") that many phones write; those are reported as
#: "JPEG" because that is what they are to a user.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")

_MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

#: Formats a result can be written in, by source format, for `format="same"`. Sources we cannot
#: or should not write back (BMP: huge; TIFF: not displayable in browsers; GIF: 256 colours)
#: become PNG, which is lossless and universally supported.
_SAME_FORMAT: dict[str, OutputFormat] = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}

#: Largest side each output format can be written with (libjpeg's and libwebp's limits; Pillow
#: raises only when encoding, after all the restoration work). PNG's limit (2³¹−1) is never reached.
MAX_OUTPUT_SIDE: dict[OutputFormat, int] = {"png": 2**31 - 1, "jpeg": 65_500, "webp": 16_383}

#: Most start-of-scan markers a JPEG upload may hold. A progressive JPEG is decoded scan by scan over
#: the whole image, and libjpeg accepts repeated scans with a mere warning: a 1 MB file of repeated
#: 12-byte scans took 21 s to check at 40 MP (0.7 ms a scan), and as long again in the worker.
#: Real photos have 1 (baseline) to a few dozen; embedded thumbnails and MPO frames add a few. The
#: same bound libjpeg-turbo's documentation gives as an example for its scan limit.
MAX_JPEG_SCANS = 500

#: Side of the square aligned face the pipeline restores (an `aligned` input is resized to it). Here,
#: not in models.pipeline, because the API sizes results with it and must not import torch.
FACE_SIZE = 512

#: Pixels an aligned face file read by the offline tools (training, `dsst build`) may have: 4096²,
#: 4× the largest aligned-face releases (FFHQ, CelebA-HQ: 1024²) a side. Bigger is no aligned face,
#: and is refused from its header rather than decoded only to be resized or refused by its size.
FACE_FILE_MAX_PIXELS = 4096 * 4096

#: ICC colour space (`xcolor_space`) an embedded profile must have to be applied, by source mode
#: (palette entries are RGB). Other modes' pixels are used as they are.
_PROFILE_SPACES: dict[str, str] = {
    **dict.fromkeys(("RGB", "RGBA", "RGBa", "RGBX", "P", "PA"), "RGB "),
    "CMYK": "CMYK",
}

#: Every colour of a 6×6×6 grid: an embedded RGB profile that maps all of them to themselves (±1) is
#: sRGB by another name (cameras and editors embed many), and the pixels are left untouched.
_LEVELS = np.arange(0, 256, 51, dtype=np.uint8)
_PROBE = np.stack(np.meshgrid(_LEVELS, _LEVELS, _LEVELS, indexing="ij"), -1).reshape(1, -1, 3)
#: Every ink mix of a 3×3×3×3 grid: a CMYK profile is always applied, but is first tried on these.
_INKS = np.arange(0, 256, 127, dtype=np.uint8)
_CMYK_PROBE = np.stack(np.meshgrid(*[_INKS] * 4, indexing="ij"), -1).reshape(-1, 4)
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
#: Profiles up to this size have their probe's outcome cached (`_probe_cached`): a few KB is what
#: phones and cameras embed (sRGB, Display P3, Adobe RGB), and big ones must not pin memory.
_CACHED_PROFILE_BYTES = 64 * 1024
_PROFILE_UNREADABLE = "The image's colour profile could not be read; its colours were used as they are."

#: Float (mode F) samples converted to 8 bits at a time (`_float_levels`): 8 MB of float64 work.
_FLOAT_BLOCK_SAMPLES = 1 << 20

#: Colour used under transparent pixels when an image with alpha is written as JPEG.
JPEG_BACKGROUND = (255, 255, 255)

#: zlib level of PNG results (0-9; Pillow's own default is 6). PNG is lossless, so the level trades
#: only encode time on the worker (which holds the GPU meanwhile) against bytes: 3 encoded the test
#: photos and faces in 0.38x the time of 6 for 1.10x the bytes (docs/benchmarks.md, "PNG encoding").
PNG_COMPRESS_LEVEL = 3


@dataclass
class DecodedImage:
    """An upload normalised for the pipeline.

    `rgb` is always HxWx3 uint8 (grayscale sources have three equal channels so models need no
    special case); `grayscale` remembers the source was single-channel so the result can be
    written back as grayscale. `alpha` is HxW uint8, or None when the source had no alpha channel
    (an all-opaque alpha channel is kept as is). `format` is Pillow's name of the source format
    ("JPEG", "PNG", ...), `size` is (width, height) after EXIF orientation, and `warnings` lists
    things the user should know (first frame of an animation used, EXIF unreadable, ...).
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    grayscale: bool
    format: str
    size: tuple[int, int]
    warnings: list[str] = field(default_factory=list)


def decode_image(data: bytes, *, max_pixels: int) -> DecodedImage:
    """Decode an untrusted upload, refusing oversize, corrupt and unsupported images.

    The declared size is checked right after `Image.open` (which reads only the header), so an
    image claiming billions of pixels is refused before any pixel memory is allocated. Pillow's
    own bomb guard (a warning at 89 MP, an error at twice that) is superseded by this lower,
    configurable limit; its error is still mapped to TooManyPixelsError. Global warning filters
    are deliberately not touched: they are process-wide and not thread-safe, and the API decodes
    in a thread pool. Truncated files are errors (ImageFile.LOAD_TRUNCATED_IMAGES is never set),
    because a half-grey face would be "restored" into nonsense.

    Raises InvalidImageError, UnsupportedFormatError or TooManyPixelsError.
    """
    (rgb, alpha, grayscale), fmt, warnings = _read(data, max_pixels, _to_arrays)
    return DecodedImage(
        rgb=rgb,
        alpha=alpha,
        grayscale=grayscale,
        format=fmt,
        size=(rgb.shape[1], rgb.shape[0]),
        warnings=warnings,
    )


def load_rgb(path: Path, *, max_pixels: int) -> np.ndarray:
    """An image file's HxWx3 uint8 RGB as `decode_image` gives an upload's (upright by EXIF, 16-bit
    samples scaled, colours in sRGB, alpha dropped), so the offline tools (training, `dsst build`,
    `dynface eval`) see the pixels the service restores. Its warnings are dropped: there is no user
    to show them to.

    Raises ValueError naming the file for one `decode_image` refuses, OSError for one not read.
    """
    try:
        return decode_image(path.read_bytes(), max_pixels=max_pixels).rgb
    except PipelineError as e:
        raise ValueError(f"{path}: {e.message}") from e


@dataclass(frozen=True)
class CheckedImage:
    """What `check_image` learnt of an upload, as `DecodedImage` has it: Pillow's name of its format,
    its (width, height) after EXIF orientation, and its warnings."""

    format: str
    size: tuple[int, int]
    warnings: list[str]


def check_image(data: bytes, *, max_pixels: int) -> CheckedImage:
    """`decode_image`'s checks — every pixel decoded, the same errors and the same warnings — without
    building its arrays (a quarter of its time on a 512 px PNG): the API's check of an upload it
    queues for a worker that decodes it again."""
    size, fmt, warnings = _read(data, max_pixels, lambda upright, conversion, warnings: upright.size)
    return CheckedImage(format=fmt, size=size, warnings=warnings)


@dataclass(frozen=True)
class _Conversion:
    """An embedded colour profile (its ICC bytes) the pixels are converted from to sRGB, and the
    warning that says so. Parsed only where pixels are converted: `check_image` never needs it."""

    icc: bytes
    warning: str


def _read(
    data: bytes,
    max_pixels: int,
    convert: Callable[[Image.Image, _Conversion | None, list[str]], T],
) -> tuple[T, str, list[str]]:
    """Open, size-check and fully decode an upload, then ``convert`` the upright image, its colour
    conversion (`_source_profile`) and the warnings inside the same error mapping. Returns
    (converted, format name, warnings)."""
    if not data:
        raise InvalidImageError("The upload is empty.")
    try:
        im = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    # The warning is raised (not just issued) when warnings are errors (python -W error).
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise TooManyPixelsError(f"The image is too large: {e}") from e
    except UnidentifiedImageError as e:
        raise _unidentified(data) from e
    except Exception as e:  # any parser failure on untrusted bytes means "not a valid image"
        raise InvalidImageError(f"The image could not be read: {e}") from e

    with im:
        width, height = im.size
        if width * height > max_pixels:
            raise TooManyPixelsError(
                f"The image has {width}x{height} = {width * height} pixels; the limit is {max_pixels}."
            )
        fmt = "JPEG" if im.format == "MPO" else str(im.format)
        # Outside APP segments, FF DA is only ever a start of scan: entropy-coded data stuffs each FF.
        if fmt == "JPEG" and (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:
            raise InvalidImageError(
                f"The JPEG has {scans} scans; at most {MAX_JPEG_SCANS} are accepted (a photo has a few "
                "dozen at most): re-save it, e.g. as a baseline JPEG or PNG."
            )
        warnings: list[str] = []
        try:
            # `is_animated` only looks for a second frame (`n_frames` would walk the whole file), but
            # it parses that frame's header: a cut-off one raises there. MPO's extra frames are
            # previews/depth maps, not content, so they go unmentioned.
            if getattr(im, "is_animated", False) and im.format != "MPO":
                warnings.append(f"The {fmt} has several frames or pages; only the first one was used.")
            im.seek(0)
            _fit_png_key(im, warnings)
            # Pillow opens a 16-bit grey + alpha PNG as RGBA (8 bits each, R = G = B): known only
            # from its raw mode, which `load()` forgets.
            grey_with_alpha = fmt == "PNG" and bool(im.tile) and str(im.tile[0].args).startswith("LA")
            im.load()
            upright = _exif_transpose(im, warnings)
            if grey_with_alpha and upright.mode == "RGBA":
                upright = upright.convert("LA")  # exact: its three channels are equal
            converted = convert(upright, _source_profile(upright, warnings), warnings)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise TooManyPixelsError(f"The image is too large: {e}") from e
        except Exception as e:  # truncated data, bad CRC, broken compression stream, ...
            raise InvalidImageError(f"The image could not be decoded: {e}") from e
    return converted, fmt, warnings


#: Brands of an ISO base media file ("ftyp" box) that HEIF images carry: the iPhone's default photo
#: format (HEIC), which Pillow has no plugin to identify.
_HEIF_BRANDS = frozenset(
    {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
)


def _unidentified(data: bytes) -> InvalidImageError | UnsupportedFormatError:
    """Tell "a real image in a format we refuse" apart from "not an image" for the error code.

    Only headers are parsed here (no `load()`), so trying every Pillow plugin is cheap and safe.
    """
    allowed = ", ".join(ALLOWED_FORMATS)
    try:
        with Image.open(io.BytesIO(data)) as other:
            name = other.format
    except Exception:
        if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
            return UnsupportedFormatError(
                f"Image format HEIF (HEIC) is not supported (allowed: {allowed}): export the photo as JPEG."
            )
        return InvalidImageError("The data is not a recognised image.")
    return UnsupportedFormatError(f"Image format {name} is not supported (allowed: {allowed}).")


def _exif_transpose(im: Image.Image, warnings: list[str]) -> Image.Image:
    """Apply the EXIF Orientation tag; a malformed EXIF block only costs a warning. In place: the
    image is ours and read once, and an upright image is then not copied (1 ms at 512 px)."""
    try:
        ImageOps.exif_transpose(im, in_place=True)
        return im
    except Exception:
        warnings.append("The EXIF data could not be read; the orientation tag was ignored.")
        return im


def _fit_png_key(im: Image.Image, warnings: list[str]) -> None:
    """Make a grey or RGB PNG's transparent colour (tRNS, `info["transparency"]`) one of the 8-bit
    levels Pillow decodes its samples to, before they are decoded (`im.tile` names their bit depth).

    Pillow keeps the file's value: a 2- or 4-bit grey level is scaled here as Pillow scales the
    samples (×85, ×17); a 16-bit RGB colour cannot be told apart once Pillow has kept each sample's
    high byte, so it is dropped with a warning rather than making other colours transparent.
    """
    key = im.info.get("transparency")
    if im.format != "PNG" or im.mode not in ("L", "RGB") or key is None:
        return
    depth = {"L;2": 2, "L;4": 4}.get(im.tile[0].args)
    if depth is not None:
        im.info["transparency"] = key * 255 // (2**depth - 1)
    elif im.tile[0].args != im.mode:  # "RGB;16B"
        del im.info["transparency"]
        warnings.append(
            "The PNG's transparent colour is a 16-bit one; it was ignored and the image is opaque."
        )


def _source_profile(im: Image.Image, warnings: list[str]) -> _Conversion | None:
    """The embedded ICC profile when the pixels must be converted from it to sRGB, else None.

    Results carry no profile (`encode_image`), so they are read as sRGB: colours in another space
    (Display P3 from phones, Adobe RGB from cameras, a press's CMYK) would come back washed out or
    shifted. Only RGB profiles on RGB-like pixels and CMYK ones on CMYK pixels are applied; one that
    cannot be read or used costs a warning, not the job.
    """
    icc = im.info.get("icc_profile")
    space = _PROFILE_SPACES.get(im.mode)
    if not icc or space is None:
        return None
    probe = _probe_cached if len(icc) <= _CACHED_PROFILE_BYTES else _probe_profile
    try:
        name = probe(icc, space)
    except Exception:  # whatever a malformed profile breaks (parsing, a tag, the transform)
        warnings.append(_PROFILE_UNREADABLE)
        return None
    if name is None:
        return None
    warning = f"The image's colours were converted from its colour profile ({name}) to sRGB."
    warnings.append(warning)
    return _Conversion(icc, warning)


def _probe_profile(icc: bytes, space: str) -> str | None:
    """The name of ICC profile ``icc`` when pixels of colour space ``space`` ("RGB " or "CMYK") it
    describes must be converted to sRGB, after converting a probe of them with it; None when it is for
    another space or is sRGB by another name. Raises whatever an unusable profile raises."""
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    if profile.profile.xcolor_space != space:
        return None
    if space == "CMYK":
        # A CMYK profile is never sRGB: converting its probe only shows the profile can be used.
        ImageCms.profileToProfile(
            Image.frombytes("CMYK", (len(_CMYK_PROBE), 1), _CMYK_PROBE.tobytes()),
            profile,
            _SRGB,
            outputMode="RGB",
        )
    else:
        probe = ImageCms.profileToProfile(Image.fromarray(_PROBE), profile, _SRGB)
        assert probe is not None  # profileToProfile returns None only with inPlace=True
        if np.abs(np.asarray(probe, dtype=np.int16) - _PROBE).max() <= 1:
            return None
    return (profile.profile.profile_description or "").strip() or "unnamed"


#: `_probe_profile` remembered by the profile's bytes: the probe costs ~5 ms, and most phone photos
#: carry one of the same few profiles (an unusable profile raises, which is not cached).
_probe_cached = functools.lru_cache(maxsize=32)(_probe_profile)


def _to_srgb(im: Image.Image, conversion: _Conversion | None, mode: str, warnings: list[str]) -> Image.Image:
    """`im` in `mode` ("RGB" or "RGBA"), its colours converted to sRGB by `conversion` if given
    (Pillow's transform copies alpha through). A conversion that fails although its profile passed
    `_source_profile`'s probe leaves the colours as they are, with the warning of an unreadable one."""
    if conversion is not None:
        # CMYK goes to the transform as it is; the RGB-like modes (RGBX, RGBa, P, ...) as `mode`.
        source = im if im.mode == "CMYK" else im.convert(mode)
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(conversion.icc))
            converted = ImageCms.profileToProfile(source, profile, _SRGB, outputMode=mode)
        except ImageCms.PyCMSError:
            warnings[warnings.index(conversion.warning)] = _PROFILE_UNREADABLE
        else:
            assert converted is not None  # profileToProfile returns None only with inPlace=True
            return converted
    return im.convert(mode)


def _to_arrays(
    im: Image.Image, conversion: _Conversion | None, warnings: list[str]
) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """Convert any Pillow mode to (rgb uint8 HxWx3, alpha uint8 HxW | None, grayscale), colours
    converted to sRGB by `conversion` (RGB-like and CMYK modes only, see `_source_profile`).

    Each mode is converted explicitly because Pillow's implicit conversions get three cases wrong
    for us: 16/32-bit integer images are clipped to 0..255 instead of scaled, and palette, grey and
    RGB images lose their PNG transparency (tRNS) unless converted to a mode with alpha. A grey or
    RGB transparent colour that no pixel has gives no alpha plane: the file has no alpha channel.
    """
    mode = im.mode
    transparency = im.info.get("transparency")
    if mode.startswith("I;16") or mode == "I":
        # Pillow represents 16-bit PNG/TIFF samples as I;16* or I; we assume the 16-bit range
        # (0..65535) for I too, and scale with rounding: 65535 -> 255, 257 -> 1.
        wide = np.asarray(im, dtype=np.float64)
        gray = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        # tRNS names one raw 16-bit level as transparent; Pillow's converters would lose it.
        keyed = None if transparency is None else wide == transparency
        alpha = None if keyed is None or not keyed.any() else np.where(keyed, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2), alpha, True
    if mode == "F":
        gray = _float_levels(np.asarray(im, dtype=np.float32))
        return np.repeat(gray[:, :, None], 3, axis=2), None, True
    if mode in ("1", "L", "RGB") and transparency is not None:
        keyed = im.convert("LA" if mode in ("1", "L") else "RGBA")  # Pillow maps tRNS to alpha here
        if keyed.getchannel("A").getextrema()[0] < 255:
            im, mode = keyed, keyed.mode
    if mode in ("1", "L"):
        gray = np.asarray(im.convert("L"), dtype=np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2), None, True
    if mode in ("LA", "La"):
        la = np.asarray(im.convert("LA"), dtype=np.uint8)
        gray, alpha = la[:, :, 0], np.ascontiguousarray(la[:, :, 1])
        return np.repeat(gray[:, :, None], 3, axis=2), alpha, True
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
        mode = im.mode
    if mode in ("RGBA", "RGBa"):
        rgba = np.asarray(_to_srgb(im, conversion, "RGBA", warnings), dtype=np.uint8)
        return np.ascontiguousarray(rgba[:, :, :3]), np.ascontiguousarray(rgba[:, :, 3]), False
    # RGB, RGBX, CMYK, YCbCr, LAB, HSV: no alpha; Pillow's converters to RGB are correct here (CMYK
    # by the textbook formula, without an embedded profile).
    return np.asarray(_to_srgb(im, conversion, "RGB", warnings), dtype=np.uint8).copy(), None, False


def _float_levels(samples: np.ndarray) -> np.ndarray:
    """uint8 levels of float samples (mode F, 32-bit float TIFF), which have no fixed range: the usual
    one is [0, 1], read as 0..255; finite values outside it mean 8-bit levels, clipped. NaN reads as 0,
    ±inf as 255/0. The arithmetic is float64's, run over blocks of rows: whole-image float64 copies
    would take ~1.3 GB at 40 MP."""
    rows = max(1, _FLOAT_BLOCK_SAMPLES // max(1, samples.shape[1]))
    blocks = [samples[r : r + rows] for r in range(0, samples.shape[0], rows)]
    lo, hi = np.inf, -np.inf
    for block in blocks:
        finite = np.isfinite(block)
        lo = min(lo, float(np.min(block, where=finite, initial=np.inf)))
        hi = max(hi, float(np.max(block, where=finite, initial=-np.inf)))
    unit = lo <= hi and lo >= 0.0 and hi <= 1.0  # lo > hi: no finite value at all
    levels = np.empty(samples.shape, np.uint8)
    for r, block in zip(range(0, samples.shape[0], rows), blocks, strict=True):
        wide = block.astype(np.float64)
        if unit:
            wide *= 255.0
        np.nan_to_num(wide, copy=False, nan=0.0)
        np.clip(np.rint(wide, out=wide), 0, 255, out=wide)
        levels[r : r + rows] = wide
    return levels


def check_png_compress_level(level: int) -> None:
    if not 0 <= level <= 9:
        raise ValueError(f"png_compress_level must be in 0..9, got {level}")


def output_sizes(
    size: tuple[int, int], *, aligned: bool, upscale: int, outputs: Collection[str]
) -> dict[str, tuple[int, int]]:
    """(width, height) of each photo-sized result of an upload of upright `size`: "image" (the photo,
    or an `aligned` input's FACE_SIZE face, times `upscale`), and "comparison" when `outputs` ask for
    it (the input resized to the image's height, beside it). Faces and crops are FACE_SIZE squares,
    within every limit. The API sizes a submission's results with it, the pipeline a photo's.

    Raises InvalidImageError for an `aligned` input that is not square: it is meant to be the face.
    """
    width, height = size
    if aligned:
        if width != height:
            raise InvalidImageError(f"aligned=true needs a square face crop, got {width}×{height}.")
        width = height = FACE_SIZE
    image = (width * upscale, height * upscale)
    sizes = {"image": image}
    if "comparison" in outputs:
        sizes["comparison"] = (2 * image[0], image[1])
    return sizes


def check_output_sizes(
    sizes: dict[str, tuple[int, int]], fmt: OutputFormat, *, max_pixels: int | None = None
) -> None:
    """Refuse (OutputTooLargeError) results (`output_sizes`) that `fmt` cannot be written with (see
    `MAX_OUTPUT_SIDE`) or, given `max_pixels`, with more pixels than that, before any work is spent."""
    limit = MAX_OUTPUT_SIDE[fmt]
    for what, (width, height) in sizes.items():
        if max_pixels is not None and width * height > max_pixels:
            raise OutputTooLargeError(
                f"The {what} would have {width}×{height} = {width * height} pixels; the limit is "
                f"{max_pixels}: ask for a smaller upscale."
            )
        if max(width, height) > limit:
            raise OutputTooLargeError(
                f"The {what} would be {width}×{height} pixels, but {fmt.upper()} allows at most {limit} "
                "pixels a side: ask for a smaller upscale or another output format."
            )


def resolve_format(requested: str, source_format: str) -> OutputFormat:
    """Map an output-format option ("png" | "jpeg" | "webp" | "same") to a concrete format.

    "same" follows the source where we can write it, else PNG (see `_SAME_FORMAT`).
    """
    req = requested.lower()
    if req == "same":
        return _SAME_FORMAT.get(source_format.upper(), "png")
    if req in _MEDIA_TYPES:
        return req  # type: ignore[return-value]
    raise UnsupportedFormatError(f"Output format {requested!r} is not supported (png, jpeg, webp or same).")


def encode_image(
    rgb: np.ndarray,
    *,
    alpha: np.ndarray | None = None,
    grayscale: bool = False,
    format: str = "png",
    quality: int = 95,
    png_compress_level: int = PNG_COMPRESS_LEVEL,
) -> tuple[bytes, str]:
    """Encode a result; returns (bytes, media type). No metadata (EXIF, ICC, text) is written.

    The image is built fresh from arrays, so nothing of the upload's metadata (GPS position,
    camera serial, ...) can leak into a result, and pixels are already upright so no Orientation
    tag is needed. `grayscale=True` writes a single-channel (L / LA) image, using ITU-R 601 luma
    of `rgb`, so grayscale uploads come back grayscale even though models output colour.
    Alpha is kept for PNG and WebP. JPEG has no alpha: the image is composited over white
    (`JPEG_BACKGROUND`), which is how transparent regions look on almost every page a user will
    view them on, and avoids the black fringes of simply dropping the channel.
    WebP has no grayscale mode; a grayscale WebP is written as RGB with equal channels.
    `quality` applies to JPEG and WebP; at 90 and above JPEG chroma is not subsampled (4:4:4)
    because 4:2:0 visibly smears restored facial detail. `png_compress_level` (0-9) changes a PNG's
    size and encode time, never its pixels.
    """
    fmt = resolve_format(format, "PNG")
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be uint8 HxWx3, got {rgb.dtype} {rgb.shape}")
    if alpha is not None and (alpha.dtype != np.uint8 or alpha.shape != rgb.shape[:2]):
        raise ValueError(f"alpha must be uint8 {rgb.shape[:2]}, got {alpha.dtype} {alpha.shape}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    check_png_compress_level(png_compress_level)

    im = Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")
    if fmt == "jpeg" and alpha is not None:
        background = Image.new("RGB", im.size, JPEG_BACKGROUND)
        im = Image.composite(im, background, Image.fromarray(np.ascontiguousarray(alpha), "L"))
        alpha = None
    if grayscale:
        im = im.convert("L")
    if alpha is not None:
        im.putalpha(Image.fromarray(np.ascontiguousarray(alpha), mode="L"))

    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, format="PNG", compress_level=png_compress_level)
    elif fmt == "jpeg":
        im.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    else:
        if im.mode in ("L", "LA"):
            im = im.convert("RGBA" if im.mode == "LA" else "RGB")
        im.save(buf, format="WEBP", quality=quality)
    return buf.getvalue(), _MEDIA_TYPES[fmt]
