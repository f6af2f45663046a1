"""Tests for models/images.py: every Pillow mode, hostile input, EXIF orientation, encoding."""

from __future__ import annotations

import io
import itertools
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageCms

from app.settings import Settings
from models import images
from models.errors import InvalidImageError, OutputTooLargeError, TooManyPixelsError, UnsupportedFormatError
from models.images import (
    FACE_SIZE,
    PNG_COMPRESS_LEVEL,
    check_image,
    check_output_sizes,
    decode_image,
    encode_image,
    load_rgb,
    output_sizes,
    resolve_format,
)
from tests.conftest import aligned_png

MAX = 10_000_000


def _save(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb_pattern(h: int = 6, w: int = 9, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------- modes


def test_rgb_png_exact() -> None:
    a = _rgb_pattern()
    d = decode_image(_save(Image.fromarray(a), "PNG"), max_pixels=MAX)
    assert d.format == "PNG" and d.size == (9, 6) and not d.grayscale and d.alpha is None
    assert d.rgb.dtype == np.uint8 and d.rgb.shape == (6, 9, 3)
    np.testing.assert_array_equal(d.rgb, a)
    assert d.warnings == []


def test_rgba_splits_alpha() -> None:
    a = np.random.default_rng(1).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    d = decode_image(_save(Image.fromarray(a, "RGBA"), "PNG"), max_pixels=MAX)
    np.testing.assert_array_equal(d.rgb, a[:, :, :3])
    np.testing.assert_array_equal(d.alpha, a[:, :, 3])
    assert not d.grayscale


def test_l_is_grayscale_with_three_equal_channels() -> None:
    g = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    d = decode_image(_save(Image.fromarray(g, "L"), "PNG"), max_pixels=MAX)
    assert d.grayscale and d.alpha is None and d.rgb.shape == (6, 8, 3)
    for c in range(3):
        np.testing.assert_array_equal(d.rgb[:, :, c], g)


def test_la_is_grayscale_plus_alpha() -> None:
    la = np.stack([np.full((4, 4), 100, np.uint8), np.arange(16, dtype=np.uint8).reshape(4, 4)], 2)
    d = decode_image(_save(Image.fromarray(la, "LA"), "PNG"), max_pixels=MAX)
    assert d.grayscale
    assert (d.rgb == 100).all()
    np.testing.assert_array_equal(d.alpha, la[:, :, 1])


def test_bilevel_mode_1_is_grayscale_0_or_255() -> None:
    im = Image.new("1", (8, 4), 0)
    im.putpixel((3, 2), 1)
    d = decode_image(_save(im, "PNG"), max_pixels=MAX)
    assert d.grayscale and d.alpha is None
    assert d.rgb[2, 3].tolist() == [255, 255, 255] and d.rgb.sum() == 3 * 255


def test_palette_without_transparency_is_rgb() -> None:
    im = Image.new("P", (4, 4), 0)
    im.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    im.putpixel((1, 1), 1)
    d = decode_image(_save(im, "PNG"), max_pixels=MAX)
    assert d.alpha is None and not d.grayscale
    assert d.rgb[0, 0].tolist() == [10, 20, 30] and d.rgb[1, 1].tolist() == [200, 100, 50]


def test_palette_with_transparency_gets_alpha() -> None:
    im = Image.new("P", (4, 4), 0)
    im.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    im.putpixel((1, 1), 1)
    d = decode_image(_save(im, "PNG", transparency=0), max_pixels=MAX)
    assert d.alpha is not None
    assert d.alpha[0, 0] == 0 and d.alpha[1, 1] == 255
    assert d.rgb[1, 1].tolist() == [200, 100, 50]


def test_pa_becomes_rgb_plus_alpha() -> None:
    im = Image.new("PA", (3, 2))
    im.putpalette([1, 2, 3, 250, 251, 252] + [0] * 762)
    im.putpixel((0, 0), (1, 77))
    data = _save(im, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "PA"
    d = decode_image(data, max_pixels=MAX)
    assert d.format == "TIFF" and d.alpha is not None and not d.grayscale
    assert d.rgb[0, 0].tolist() == [250, 251, 252] and d.alpha[0, 0] == 77


def test_cmyk_converts_to_rgb() -> None:
    im = Image.new("CMYK", (2, 1))
    im.putpixel((0, 0), (0, 255, 255, 0))  # pure red
    im.putpixel((1, 0), (0, 0, 0, 255))  # black
    d = decode_image(_save(im, "TIFF"), max_pixels=MAX)
    assert d.rgb[0, 0].tolist() == [255, 0, 0] and d.rgb[0, 1].tolist() == [0, 0, 0]
    assert d.alpha is None and not d.grayscale


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_grayscale_is_scaled_not_clipped(fmt: str) -> None:
    wide = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    im = Image.fromarray(wide)
    assert im.mode == "I;16"
    d = decode_image(_save(im, fmt), max_pixels=MAX)
    assert d.grayscale
    assert d.rgb[0, :, 0].tolist() == [0, 1, 128, 255]


def test_32bit_integer_mode_i_uses_16bit_range() -> None:
    im = Image.fromarray(np.array([[0, 257, 65535, 70000]], dtype=np.int32), "I")
    data = _save(im, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    d = decode_image(data, max_pixels=MAX)
    assert d.grayscale and d.rgb[0, :, 0].tolist() == [0, 1, 255, 255]


@pytest.mark.parametrize(
    ("im", "transparent", "alpha"),
    [
        (Image.fromarray(np.array([[0, 255], [128, 0]], np.uint8), "L"), 0, [[0, 255], [255, 0]]),
        (
            Image.fromarray(np.array([[[0, 0, 0], [9, 8, 7]], [[9, 8, 7], [1, 2, 3]]], np.uint8)),
            (9, 8, 7),
            [[255, 0], [0, 255]],
        ),
        (Image.fromarray(np.array([[0, 1000], [65535, 1000]], np.uint16)), 1000, [[255, 0], [255, 0]]),
    ],
    ids=["L", "RGB", "I;16"],
)
def test_png_trns_makes_one_colour_transparent_in_grey_and_rgb(
    im: Image.Image, transparent: object, alpha: list[list[int]]
) -> None:
    """PNG's tRNS chunk names one grey level or RGB colour as transparent, as palette images' do."""
    d = decode_image(_save(im, "PNG", transparency=transparent), max_pixels=MAX)
    assert d.alpha is not None and d.alpha.tolist() == alpha
    assert d.grayscale == (im.mode != "RGB")
    assert d.rgb[0, 0].tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    ("im", "transparent"),
    [
        (Image.fromarray(np.array([[0, 255]], np.uint8), "L"), 7),
        (Image.fromarray(np.array([[[0, 0, 0], [9, 8, 7]]], np.uint8)), (9, 8, 6)),
        (Image.fromarray(np.array([[0, 1000]], np.uint16)), 1001),
    ],
    ids=["L", "RGB", "I;16"],
)
def test_png_trns_colour_no_pixel_has_gives_no_alpha(im: Image.Image, transparent: object) -> None:
    """Nothing is transparent: the result must not come back with an alpha channel it never had."""
    d = decode_image(_save(im, "PNG", transparency=transparent), max_pixels=MAX)
    assert d.alpha is None and d.warnings == []


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _raw_png(width: int, depth: int, colour_type: int, row: bytes, trns: bytes | None) -> bytes:
    """A one-row PNG of any bit depth and colour type, with a tRNS chunk unless ``trns`` is None
    (Pillow writes only some of these)."""
    ihdr = struct.pack(">IIBBBBB", width, 1, depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + (b"" if trns is None else _png_chunk(b"tRNS", trns))
        + _png_chunk(b"IDAT", zlib.compress(b"\0" + row))
        + _png_chunk(b"IEND", b"")
    )


def test_16bit_grey_with_alpha_png_stays_grey() -> None:
    """Pillow opens a 16-bit grey + alpha PNG (colour type 4) as RGBA: it came back in colour (RGBA),
    where 8-bit grey + alpha and 16-bit grey come back grey."""
    row = struct.pack(">4H", 0x8000, 0xFFFF, 0x1234, 0x0000)  # (grey, alpha) × 2
    d = decode_image(_raw_png(2, 16, 4, row, None), max_pixels=MAX)
    assert d.grayscale
    assert (
        d.rgb.tolist() == [[[128] * 3, [18] * 3]] and d.alpha is not None and d.alpha.tolist() == [[255, 0]]
    )
    restored = Image.open(
        io.BytesIO(encode_image(d.rgb, alpha=d.alpha, grayscale=d.grayscale, format="png")[0])
    )
    assert restored.mode == "LA"


@pytest.mark.parametrize(
    ("depth", "row", "levels"),
    [(2, bytes([0b11_01_00_10]), [255, 85, 0, 170]), (4, bytes([0xF1, 0x02]), [255, 17, 0, 34])],
)
def test_low_bit_grey_png_trns_is_the_level_pillow_decodes(depth: int, row: bytes, levels: list[int]) -> None:
    """tRNS holds a 2- or 4-bit grey value (1 here), which Pillow decodes scaled to 8 bits."""
    d = decode_image(_raw_png(4, depth, 0, row, struct.pack(">H", 1)), max_pixels=MAX)
    assert d.rgb[0, :, 0].tolist() == levels
    assert d.alpha is not None and d.alpha.tolist() == [[255, 0, 255, 255]]


def test_16bit_rgb_png_trns_is_ignored_with_a_warning() -> None:
    """Pillow decodes 16-bit RGB to 8 bits (each sample's high byte) but keeps tRNS's 16-bit colour:
    applied, it made the wrong pixels transparent. Pixel 0 is the transparent colour, pixel 1 has
    the same high bytes; no 8-bit alpha can tell them apart."""
    key = (257 * 9, 257 * 8, 257 * 7)
    row = struct.pack(">6H", *key, key[0] + 1, key[1], key[2])
    data = _raw_png(2, 16, 2, row, struct.pack(">3H", *key))
    d = decode_image(data, max_pixels=MAX)
    assert d.rgb.tolist() == [[[9, 8, 7], [9, 8, 7]]] and d.alpha is None
    assert d.warnings == [
        "The PNG's transparent colour is a 16-bit one; it was ignored and the image is opaque."
    ]
    assert check_image(data, max_pixels=MAX).warnings == d.warnings


@pytest.mark.parametrize(
    ("values", "levels"),
    [
        ([0.0, 0.25, 0.5, 1.0], [0, 64, 128, 255]),  # the usual float range [0, 1]
        ([0.0, 127.6, 300.0, -4.0], [0, 128, 255, 0]),  # anything else: 8-bit levels, clipped
        ([float("nan"), float("inf"), float("-inf"), 0.5], [0, 255, 0, 128]),  # range from finite values
    ],
)
def test_float_mode_f_tiff_is_read_by_its_range(values: list[float], levels: list[int]) -> None:
    im = Image.fromarray(np.array([values], dtype=np.float32))
    data = _save(im, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    d = decode_image(data, max_pixels=MAX)
    assert d.grayscale and d.rgb[0, :, 0].tolist() == levels


def _float_levels_whole(values: np.ndarray) -> np.ndarray:
    """The float-TIFF reading as one float64 computation over the whole image: the oracle the blockwise
    conversion must equal exactly."""
    wide = values.astype(np.float64)
    finite = wide[np.isfinite(wide)]
    if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
        wide = wide * 255.0
    return np.clip(np.rint(np.nan_to_num(wide, nan=0.0)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("unit", [True, False])
def test_float_tiff_blocks_equal_the_whole_image_computation(
    unit: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Converted in blocks of rows (7 here), the levels are exactly the whole-image float64 ones: the
    range is judged over every block (the one value outside [0, 1] sits in the last, partial block),
    and NaN, ±inf and the half-levels between 8-bit steps land as they would."""
    monkeypatch.setattr(images, "_FLOAT_BLOCK_SAMPLES", 7 * 30)
    rng = np.random.default_rng(0)
    values = rng.random((50, 30), dtype=np.float32)
    values[3, :4] = [np.nan, np.inf, -np.inf, np.nan]
    values[20, :5] = (np.arange(5, dtype=np.float32) + 0.5) / 255  # k + ½ levels once scaled
    if not unit:
        values *= 300
        values[10, :3] = [-4.0, 127.5, 128.5]
        values[49, 29] = -0.25
    else:
        values[49, 29] = 1.0
    data = _save(Image.fromarray(values), "TIFF")
    d = decode_image(data, max_pixels=MAX)
    expected = _float_levels_whole(values)
    assert d.grayscale and d.alpha is None
    np.testing.assert_array_equal(d.rgb, np.repeat(expected[:, :, None], 3, axis=2))
    monkeypatch.setattr(images, "_FLOAT_BLOCK_SAMPLES", 1 << 20)  # one block
    np.testing.assert_array_equal(decode_image(data, max_pixels=MAX).rgb, d.rgb)


def test_float_tiff_decoding_keeps_no_whole_image_float64_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Python-side allocations (tracemalloc) while decoding a float TIFF stay at ~8 bytes a pixel: the
    float32 samples (4), the grey levels (1) and the RGB result (3), plus one small block of float64
    work. Whole-image float64 copies took 32 bytes a pixel (≈1.3 GB for 40 MP)."""
    import tracemalloc

    monkeypatch.setattr(images, "_FLOAT_BLOCK_SAMPLES", 1 << 12)
    values = np.random.default_rng(0).random((300, 300), dtype=np.float32)
    data = _save(Image.fromarray(values), "TIFF")
    tracemalloc.start()
    try:
        decode_image(data, max_pixels=MAX)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * values.size


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"])
def test_allowed_formats_report_their_name(fmt: str) -> None:
    d = decode_image(_save(Image.fromarray(_rgb_pattern()), fmt), max_pixels=MAX)
    assert d.format == fmt and d.rgb.shape == (6, 9, 3)


# ---------------------------------------------------------------- colour profiles

#: Colorants (XYZ, D50-adapted, as ICC stores them) of sRGB's and Adobe RGB (1998)'s primaries.
SRGB_COLORANTS = np.array(
    [[0.4360747, 0.3850649, 0.1430804], [0.2225045, 0.7168786, 0.0606169], [0.0139322, 0.0971045, 0.7141733]]
)
ADOBE_COLORANTS = np.array(
    [[0.6097559, 0.2052401, 0.1491737], [0.3111242, 0.6256560, 0.0632197], [0.0194811, 0.0608902, 0.7448387]]
)
D50 = (0.9642, 1.0, 0.8249)


def _s15(*values: float) -> bytes:
    """ICC s15Fixed16Number values."""
    return b"".join(struct.pack(">i", round(v * 65536)) for v in values)


def _desc_tag(name: str) -> bytes:
    """An ICC v2 textDescriptionType tag body naming the profile."""
    text = name.encode() + b"\0"
    return b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 2 + 1 + 67)


def _icc_file(device_class_and_space: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    """An ICC v2 profile: the 128-byte header (device class and colour space as given, PCS XYZ, D50
    illuminant), the tag table and the tag bodies, each 4-byte aligned."""
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        data += bytes(-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = (
        struct.pack(">I", offset + len(data))
        + b"lcms"
        + struct.pack(">I", 0x02100000)
        + device_class_and_space
        + b"XYZ "
        + bytes(12)
        + b"acsp"
        + bytes(24)
        + bytes(4)
        + _s15(*D50)
        + bytes(48)
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data


def _icc(colorants: np.ndarray, gamma: float, name: str) -> bytes:
    """A minimal ICC v2 RGB display profile (matrix + one gamma per channel), built byte by byte: Pillow
    can only create sRGB, LAB and XYZ profiles, and a system profile would not be the same everywhere."""

    def xyz(values: object) -> bytes:
        return b"XYZ \0\0\0\0" + _s15(*values)  # type: ignore[misc]

    # curv with one u8Fixed8 entry is a pure gamma; gamma 1 is stored as no entries (identity).
    curve = b"curv\0\0\0\0" + (
        struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0" if gamma != 1 else bytes(4)
    )
    tags = [
        (b"desc", _desc_tag(name)),
        (b"wtpt", xyz(D50)),
        *((sig, xyz(colorants[:, c])) for c, sig in enumerate((b"rXYZ", b"gXYZ", b"bXYZ"))),
        *((sig, curve) for sig in (b"rTRC", b"gTRC", b"bTRC")),
    ]
    return _icc_file(b"mntrRGB ", tags)


def _to_srgb_reference(rgb: np.ndarray, colorants: np.ndarray, gamma: float) -> np.ndarray:
    """The profile's colours in sRGB by the textbook formulas (relative colorimetric, clipped)."""
    xyz = colorants @ ((rgb.reshape(-1, 3).T / 255.0) ** gamma)
    linear = np.clip(np.linalg.solve(SRGB_COLORANTS, xyz), 0, 1)
    encoded = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return (encoded.T * 255).reshape(rgb.shape)


@pytest.mark.parametrize(
    ("colorants", "gamma", "name"),
    [(SRGB_COLORANTS, 1.0, "linear sRGB"), (ADOBE_COLORANTS, 563 / 256, "Adobe-RGB-like")],
)
@pytest.mark.parametrize("with_alpha", [False, True])
def test_embedded_rgb_profile_is_converted_to_srgb_with_a_warning(
    colorants: np.ndarray, gamma: float, name: str, with_alpha: bool
) -> None:
    """Results are written without a profile, so they are read as sRGB: pixels described by another
    profile (here linear-light sRGB, and Adobe RGB's wider primaries) are converted on decoding."""
    rgb = np.array([[[128, 128, 128], [30, 200, 90], [250, 20, 10], [0, 0, 0]]], np.uint8)
    alpha = np.array([[255, 128, 1, 0]], np.uint8)
    im = Image.fromarray(np.dstack([rgb, alpha]) if with_alpha else rgb)
    data = _save(im, "PNG", icc_profile=_icc(colorants, gamma, name))
    d = decode_image(data, max_pixels=MAX)
    expected = _to_srgb_reference(rgb, colorants, gamma)
    assert np.abs(d.rgb - expected).max() <= 1.5
    assert np.abs(d.rgb.astype(int) - rgb).max() >= 20  # the conversion matters
    assert d.warnings == [f"The image's colours were converted from its colour profile ({name}) to sRGB."]
    assert check_image(data, max_pixels=MAX).warnings == d.warnings
    if with_alpha:
        np.testing.assert_array_equal(d.alpha, alpha)


def test_srgb_profile_leaves_pixels_as_they_are() -> None:
    a = _rgb_pattern(16, 16)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for icc in (srgb, _icc(SRGB_COLORANTS, 1.0, "linear sRGB")):
        assert Image.open(io.BytesIO(_save(Image.fromarray(a), "PNG", icc_profile=icc))).info["icc_profile"]
    d = decode_image(_save(Image.fromarray(a), "JPEG", quality=100, icc_profile=srgb), max_pixels=MAX)
    plain = decode_image(_save(Image.fromarray(a), "JPEG", quality=100), max_pixels=MAX)
    np.testing.assert_array_equal(d.rgb, plain.rgb)
    assert d.warnings == []


def test_unreadable_profile_is_ignored_with_a_warning() -> None:
    a = _rgb_pattern()
    d = decode_image(_save(Image.fromarray(a), "PNG", icc_profile=b"not a profile" * 20), max_pixels=MAX)
    np.testing.assert_array_equal(d.rgb, a)
    assert d.warnings == [UNREADABLE]


UNREADABLE = "The image's colour profile could not be read; its colours were used as they are."


def test_profile_without_a_description_is_converted_as_unnamed() -> None:
    """`desc` is the only tag naming a profile; without it the name is None (it used to fail the
    image as invalid_image)."""
    icc = _icc(ADOBE_COLORANTS, 563 / 256, "to be dropped").replace(b"desc", b"dmnd")
    assert ImageCms.ImageCmsProfile(io.BytesIO(icc)).profile.profile_description is None
    d = decode_image(_save(Image.fromarray(_rgb_pattern()), "PNG", icc_profile=icc), max_pixels=MAX)
    assert d.warnings == ["The image's colours were converted from its colour profile (unnamed) to sRGB."]


def test_any_failure_to_probe_a_profile_is_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("not an error Pillow documents")

    monkeypatch.setattr(ImageCms, "profileToProfile", broken)
    a = _rgb_pattern()
    icc = _icc(ADOBE_COLORANTS, 563 / 256, "probe fails")  # a name of its own: not cached by another test
    d = decode_image(_save(Image.fromarray(a), "PNG", icc_profile=icc), max_pixels=MAX)
    np.testing.assert_array_equal(d.rgb, a)
    assert d.warnings == [UNREADABLE]


def test_a_conversion_that_fails_after_its_probe_leaves_the_colours(monkeypatch: pytest.MonkeyPatch) -> None:
    """The API checks the probe; the worker's conversion of the whole image failing must not fail
    the job it accepted: the colours are used as they are, as for an unreadable profile."""
    real = ImageCms.profileToProfile

    def whole_image_fails(im: Image.Image, *args: object, **kwargs: object) -> Image.Image | None:
        if im.size == (216, 1):  # the 6×6×6 probe
            return real(im, *args, **kwargs)  # type: ignore[arg-type]
        raise ImageCms.PyCMSError("out of luck")

    monkeypatch.setattr(ImageCms, "profileToProfile", whole_image_fails)
    a = _rgb_pattern()
    data = _save(Image.fromarray(a), "PNG", icc_profile=_icc(ADOBE_COLORANTS, 563 / 256, "fails later"))
    d = decode_image(data, max_pixels=MAX)
    np.testing.assert_array_equal(d.rgb, a)
    assert d.warnings == [UNREADABLE]


def test_a_profile_is_probed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe (~5 ms) is remembered by the profile's bytes: most phone photos carry the same one."""
    calls: list[tuple[int, int]] = []
    real = ImageCms.profileToProfile

    def counted(im: Image.Image, *args: object, **kwargs: object) -> Image.Image | None:
        calls.append(im.size)
        return real(im, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ImageCms, "profileToProfile", counted)
    images._probe_cached.cache_clear()  # whatever an earlier run of this test left
    data = _save(
        Image.fromarray(_rgb_pattern()), "PNG", icc_profile=_icc(ADOBE_COLORANTS, 2.2, "probed once")
    )
    first, second = (check_image(data, max_pixels=MAX) for _ in range(2))
    assert calls == [(216, 1)]  # the probe; check_image converts no pixels
    assert first == second and "probed once" in first.warnings[0]


def _cmyk_icc(name: str) -> bytes:
    """A minimal ICC v2 CMYK output profile: one 2×2×2×2 lut16 from inks to XYZ in which only black
    ink darkens (XYZ = D50 × (1 − k)) and cyan, magenta and yellow do nothing."""
    grid = b"".join(
        struct.pack(">3H", *(round(v * (1 - k) * 32768) for v in D50))  # XYZ as u1.15
        for _c, _m, _y, k in itertools.product((0, 1), repeat=4)
    )
    identity = struct.pack(">2H", 0, 65535)
    lut = (
        b"mft2\0\0\0\0"
        + bytes([4, 3, 2, 0])
        + _s15(1, 0, 0, 0, 1, 0, 0, 0, 1)
        + struct.pack(">HH", 2, 2)
        + identity * 4
        + grid
        + identity * 3
    )
    tags = [(b"desc", _desc_tag(name)), (b"wtpt", b"XYZ \0\0\0\0" + _s15(*D50)), (b"A2B0", lut)]
    return _icc_file(b"prtrCMYK", tags)


def test_cmyk_jpeg_with_a_cmyk_profile_is_converted_with_it() -> None:
    """Pillow's own CMYK → RGB is the textbook formula, which its profile may contradict: here only
    black ink darkens, so full cyan is white, and half black is sRGB's grey of luminance 1 − 128/255."""
    inks = Image.frombytes("CMYK", (3, 1), bytes([255, 0, 0, 0, 0, 0, 0, 128, 0, 0, 0, 255]))
    data = _save(inks, "JPEG", quality=100, icc_profile=_cmyk_icc("test press"))
    d = decode_image(data, max_pixels=MAX)
    grey = 255 * (1.055 * (1 - 128 / 255) ** (1 / 2.4) - 0.055)
    expected = np.array([[[255] * 3, [grey] * 3, [0] * 3]])
    assert np.abs(d.rgb - expected).max() <= 2
    assert d.warnings == ["The image's colours were converted from its colour profile (test press) to sRGB."]
    assert check_image(data, max_pixels=MAX).warnings == d.warnings


# ---------------------------------------------------------------- hostile input


def _good_jpeg() -> bytes:
    return _save(Image.fromarray(_rgb_pattern(64, 64)), "JPEG", quality=90)


def _good_png() -> bytes:
    return _save(Image.fromarray(_rgb_pattern(64, 64)), "PNG")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        np.random.default_rng(3).bytes(4096),
        _good_jpeg()[: len(_good_jpeg()) // 2],
        _good_jpeg()[:200],
        _good_png()[: len(_good_png()) // 2],
        _good_png()[:40],
        _good_png()[:-30],  # IDAT cut, IEND gone
    ],
    ids=["empty", "one-byte", "random", "jpeg-half", "jpeg-header", "png-half", "png-hdr", "png-tail"],
)
def test_corrupt_or_truncated_is_invalid(data: bytes) -> None:
    with pytest.raises(InvalidImageError):
        decode_image(data, max_pixels=MAX)


def test_png_with_bad_crc_is_invalid() -> None:
    data = bytearray(_good_png())
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF
    with pytest.raises(InvalidImageError):
        decode_image(bytes(data), max_pixels=MAX)


def test_an_animated_gif_cut_anywhere_is_read_or_invalid() -> None:
    """Pillow's `is_animated` parses the second frame's header: cut there (its local palette makes it
    long), it raised struct.error or IndexError past the error mapping, and the API answered 500."""
    frames = [Image.fromarray(_rgb_pattern(16, 16, seed=seed)) for seed in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    data = buf.getvalue()
    outcomes = set()
    for cut in range(1, len(data)):
        try:
            check_image(data[:cut], max_pixels=MAX)
            outcomes.add("read")  # cut after the first frame: it is all that is used
        except InvalidImageError:
            outcomes.add("invalid")
    assert outcomes == {"read", "invalid"}


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height RGB pixels but whose IDAT holds none.

    Since the pixel data is missing, decoding it would fail with InvalidImageError; getting
    TooManyPixelsError instead proves the size was checked before any decoding or allocation.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b""))
        + _png_chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "width,height",
    [(3000, 3000), (100_000, 100_000)],  # ours; past Pillow's own 2x-89 MP DecompressionBombError
)
def test_huge_declared_size_is_refused_before_decoding(width: int, height: int) -> None:
    with pytest.raises(TooManyPixelsError):
        decode_image(_png_declaring(width, height), max_pixels=1_000_000)


def test_limit_is_inclusive() -> None:
    data = _save(Image.fromarray(_rgb_pattern(10, 10)), "PNG")
    assert decode_image(data, max_pixels=100).size == (10, 10)
    with pytest.raises(TooManyPixelsError):
        decode_image(data, max_pixels=99)


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "TGA", "PCX"])
def test_real_image_in_other_format_is_unsupported(fmt: str) -> None:
    with pytest.raises(UnsupportedFormatError):
        decode_image(_save(Image.fromarray(_rgb_pattern(16, 16)), fmt), max_pixels=MAX)


#: The start of an iPhone photo: an ISO base media "ftyp" box of brand heic (then its boxes).
HEIC_START = struct.pack(">I", 24) + b"ftypheic" + bytes(4) + b"mif1heic" + bytes(64)


def test_a_heic_photo_is_an_unsupported_format_not_garbage() -> None:
    """Pillow has no HEIF plugin, so it cannot name the format: without our look at the box, the
    iPhone's default format read as "not a recognised image" (400 instead of 415)."""
    for read in (decode_image, check_image):
        with pytest.raises(UnsupportedFormatError, match=r"HEIF \(HEIC\) is not supported .*JPEG"):
            read(HEIC_START, max_pixels=MAX)


# ---------------------------------------------------------------- EXIF orientation

UPRIGHT = _rgb_pattern(6, 10, seed=7)

# Stored (on-disk) pixels for each EXIF Orientation value, derived from the EXIF 2.3 definition
# of the tag (which corner row 0 / column 0 of the stored image is), independently of Pillow.
STORED = {
    1: UPRIGHT,
    2: UPRIGHT[:, ::-1],
    3: UPRIGHT[::-1, ::-1],
    4: UPRIGHT[::-1, :],
    5: UPRIGHT.transpose(1, 0, 2),
    6: np.rot90(UPRIGHT, k=1),  # displayed after rotating 90 degrees clockwise
    7: np.rot90(UPRIGHT, k=2).transpose(1, 0, 2),
    8: np.rot90(UPRIGHT, k=-1),  # displayed after rotating 90 degrees counter-clockwise
}


def _with_orientation(pixels: np.ndarray, orientation: int, fmt: str = "PNG") -> bytes:
    im = Image.fromarray(np.ascontiguousarray(pixels))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(im, fmt, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_upright_pixels(orientation: int) -> None:
    d = decode_image(_with_orientation(STORED[orientation], orientation), max_pixels=MAX)
    np.testing.assert_array_equal(d.rgb, UPRIGHT)
    assert d.size == (10, 6)


def test_exif_orientation_jpeg() -> None:
    smooth = np.zeros((32, 48, 3), np.uint8)
    smooth[:16, :24] = 255  # a white top-left quadrant survives JPEG well
    d = decode_image(_with_orientation(np.rot90(smooth, k=1), 6, "JPEG"), max_pixels=MAX)
    assert d.size == (48, 32)
    assert np.abs(d.rgb.astype(int) - smooth).mean() < 3


# ---------------------------------------------------------------- animation


def test_animated_gif_first_frame_and_warning() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    d = decode_image(buf.getvalue(), max_pixels=MAX)
    assert d.format == "GIF"
    assert (d.rgb == [255, 0, 0]).all()
    assert len(d.warnings) == 1 and "first one" in d.warnings[0]


def test_animated_webp_first_frame_and_warning() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in [(250, 0, 0), (0, 0, 250)]]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    d = decode_image(buf.getvalue(), max_pixels=MAX)
    assert d.format == "WEBP" and "first one" in d.warnings[0]
    assert np.abs(d.rgb.astype(int) - [250, 0, 0]).max() <= 2


# ---------------------------------------------------------------- encoding


def test_png_keeps_alpha_exactly() -> None:
    rgb, alpha = _rgb_pattern(), np.random.default_rng(2).integers(0, 256, (6, 9), dtype=np.uint8)
    data, media = encode_image(rgb, alpha=alpha, format="png")
    assert media == "image/png"
    d = decode_image(data, max_pixels=MAX)
    np.testing.assert_array_equal(d.rgb, rgb)
    np.testing.assert_array_equal(d.alpha, alpha)


def test_webp_keeps_alpha() -> None:
    rgb = np.full((16, 16, 3), 120, np.uint8)
    alpha = np.zeros((16, 16), np.uint8)
    alpha[4:12, 4:12] = 255
    data, media = encode_image(rgb, alpha=alpha, format="webp")
    assert media == "image/webp"
    d = decode_image(data, max_pixels=MAX)
    np.testing.assert_array_equal(d.alpha, alpha)


def test_jpeg_composites_alpha_on_white() -> None:
    rgb = np.zeros((16, 16, 3), np.uint8)
    alpha = np.zeros((16, 16), np.uint8)
    alpha[:, 8:] = 255
    data, media = encode_image(rgb, alpha=alpha, format="jpeg")
    assert media == "image/jpeg"
    d = decode_image(data, max_pixels=MAX)
    assert d.alpha is None
    assert d.rgb[:, :6].min() > 245 and d.rgb[:, 10:].max() < 10


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_grayscale_stays_grayscale(fmt: str) -> None:
    g = np.tile(np.linspace(0, 255, 16).astype(np.uint8), (16, 1))
    data, _ = encode_image(np.repeat(g[:, :, None], 3, 2), grayscale=True, format=fmt)
    assert Image.open(io.BytesIO(data)).mode == "L"
    d = decode_image(data, max_pixels=MAX)
    assert d.grayscale
    assert np.abs(d.rgb[:, :, 0].astype(int) - g).max() <= 3


def test_grayscale_with_alpha_is_la() -> None:
    data, _ = encode_image(np.zeros((4, 4, 3), np.uint8), alpha=np.full((4, 4), 9, np.uint8), grayscale=True)
    assert Image.open(io.BytesIO(data)).mode == "LA"


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_no_metadata_in_output(fmt: str) -> None:
    source = _with_orientation(STORED[6], 6, "JPEG")
    d = decode_image(source, max_pixels=MAX)
    data, _ = encode_image(d.rgb, format=fmt)
    out = Image.open(io.BytesIO(data))
    assert len(out.getexif()) == 0
    assert "exif" not in out.info and "icc_profile" not in out.info
    assert b"Exif" not in data


def test_encode_rejects_bad_arrays() -> None:
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4, 3), np.uint8), alpha=np.zeros((3, 4), np.uint8))
    for level in (-1, 10):
        with pytest.raises(ValueError, match="png_compress_level"):
            encode_image(np.zeros((4, 4, 3), np.uint8), png_compress_level=level)


def test_png_compress_level_changes_bytes_not_pixels() -> None:
    """Level 0 stores the scanlines (never smaller than them); the default compresses; same pixels."""
    face = decode_image(aligned_png(), max_pixels=MAX).rgb
    stored, _ = encode_image(face, format="png", png_compress_level=0)
    default, _ = encode_image(face, format="png")
    assert len(stored) >= face.shape[0] * (face.shape[1] * 3 + 1) > 2 * len(default)
    for data in (stored, default):
        np.testing.assert_array_equal(decode_image(data, max_pixels=MAX).rgb, face)
    assert Settings().png_compress_level == PNG_COMPRESS_LEVEL  # the service's default is the library's


def test_output_size_limits_of_each_format() -> None:
    """libwebp writes at most 16383 px a side and libjpeg 65500; Pillow only says so when encoding."""
    check_output_sizes({"image": (16383, 10)}, "webp")
    check_output_sizes({"image": (65500, 65500)}, "jpeg")
    check_output_sizes({"image": (200_000, 10)}, "png")
    with pytest.raises(OutputTooLargeError, match=r"comparison would be 16384×10 pixels.*WEBP.*16383"):
        check_output_sizes({"image": (8192, 10), "comparison": (16384, 10)}, "webp")
    with pytest.raises(OutputTooLargeError, match="JPEG"):
        check_output_sizes({"image": (10, 65501)}, "jpeg")


def test_the_pixel_limit_holds_for_every_output() -> None:
    sizes = {"image": (400, 400), "comparison": (800, 400)}
    check_output_sizes(sizes, "png", max_pixels=320_000)
    with pytest.raises(OutputTooLargeError, match=r"comparison would have 800×400 = 320000 pixels.*319999"):
        check_output_sizes(sizes, "png", max_pixels=319_999)


def test_output_sizes_of_photos_and_aligned_faces() -> None:
    assert output_sizes((300, 200), aligned=False, upscale=2, outputs=["image"]) == {"image": (600, 400)}
    assert output_sizes((300, 200), aligned=False, upscale=3, outputs=["comparison"]) == {
        "image": (900, 600),
        "comparison": (1800, 600),  # the input upscaled as the image is, beside it
    }
    assert output_sizes((64, 64), aligned=True, upscale=4, outputs=["faces", "comparison"]) == {
        "image": (4 * FACE_SIZE, 4 * FACE_SIZE),
        "comparison": (8 * FACE_SIZE, 4 * FACE_SIZE),  # the input resized to the face's height
    }


@pytest.mark.parametrize("size", [(4000, 250), (40000, 1000)])
def test_an_aligned_input_must_be_square(size: tuple[int, int]) -> None:
    """The pipeline refuses any other; its comparison (the input's aspect beside a square face)
    exceeded what the API reckoned, up to 172 MP for 40000×1000 at upscale 4."""
    with pytest.raises(InvalidImageError, match=f"square face crop, got {size[0]}×{size[1]}"):
        output_sizes(size, aligned=True, upscale=4, outputs=["comparison"])


def test_resolve_format() -> None:
    assert resolve_format("same", "JPEG") == "jpeg"
    assert resolve_format("same", "WEBP") == "webp"
    assert resolve_format("same", "PNG") == "png"
    for src in ("BMP", "TIFF", "GIF"):
        assert resolve_format("same", src) == "png"
    assert resolve_format("JPEG", "PNG") == "jpeg"
    assert resolve_format("webp", "PNG") == "webp"
    with pytest.raises(UnsupportedFormatError):
        resolve_format("gif", "PNG")


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    with_alpha=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_png_round_trip_is_lossless(h: int, w: int, with_alpha: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (h, w), dtype=np.uint8) if with_alpha else None
    data, _ = encode_image(rgb, alpha=alpha, format="png")
    d = decode_image(data, max_pixels=h * w)
    np.testing.assert_array_equal(d.rgb, rgb)
    if alpha is None:
        assert d.alpha is None
    else:
        np.testing.assert_array_equal(d.alpha, alpha)


# ---------------------------------------------------------------- check_image (the API's check)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


_ONE_FRAME = "The GIF has several frames or pages; only the first one was used."


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", (InvalidImageError, "The upload is empty.")),
        (np.random.default_rng(3).bytes(4096), (InvalidImageError, "The data is not a recognised image.")),
        (_good_jpeg()[: len(_good_jpeg()) // 2], (InvalidImageError, "The image could not be decoded: ")),
        (_good_png()[:-30], (InvalidImageError, "The image could not be decoded: ")),
        (
            _png_declaring(3000, 3000),
            (TooManyPixelsError, "The image has 3000x3000 = 9000000 pixels; the limit is 1000000."),
        ),
        (
            _save(Image.fromarray(_rgb_pattern(16, 16)), "ICO"),
            (UnsupportedFormatError, "Image format ICO is not supported"),
        ),
        (_good_png(), ("PNG", (64, 64), [])),
        # Stored 6 wide and 10 high, with orientation 6: upright it is 10 wide and 6 high.
        (_with_orientation(STORED[6], 6, "JPEG"), ("JPEG", (10, 6), [])),
        (_animated_gif(), ("GIF", (8, 8), [_ONE_FRAME])),
    ],
    ids=["empty", "random", "jpeg-half", "png-tail", "huge", "ico", "png", "exif-jpeg", "animated"],
)
def test_check_image_refuses_and_warns_as_decode_image(data: bytes, expected: tuple) -> None:
    """The API checks uploads with check_image (no arrays built); it must refuse exactly what the
    worker's decode_image refuses, with the same error, and warn the same. Its format and upright
    size are what the API sizes the results by. Each case's outcome is given: a refusal (error class
    and the start of its message) or an acceptance (format, upright (width, height), warnings)."""
    if isinstance(expected[0], type):
        error, message = expected
        with pytest.raises(error) as decoded:
            decode_image(data, max_pixels=1_000_000)
        with pytest.raises(error) as checked:
            check_image(data, max_pixels=1_000_000)
        assert type(checked.value) is type(decoded.value) is error
        assert str(decoded.value).startswith(message), str(decoded.value)
        assert str(checked.value) == str(decoded.value)
    else:
        d = decode_image(data, max_pixels=1_000_000)
        checked = check_image(data, max_pixels=1_000_000)
        assert (d.format, d.size, d.warnings) == expected
        assert (checked.format, checked.size, checked.warnings) == expected


# ---------------------------------------------------------------- files (offline tools)


def test_load_rgb_reads_a_file_as_decode_image_reads_an_upload(tmp_path: Path) -> None:
    path = tmp_path / "rotated.png"
    path.write_bytes(_with_orientation(STORED[6], 6))
    np.testing.assert_array_equal(load_rgb(path, max_pixels=MAX), UPRIGHT)


@pytest.mark.parametrize(
    ("data", "max_pixels", "message"),
    [
        (np.random.default_rng(3).bytes(4096), MAX, "The data is not a recognised image."),
        (
            _save(Image.fromarray(_rgb_pattern(10, 10)), "PNG"),
            99,
            "The image has 10x10 = 100 pixels; the limit is 99.",
        ),
    ],
    ids=["not-an-image", "too-many-pixels"],
)
def test_load_rgb_names_the_file_it_refuses(
    tmp_path: Path, data: bytes, max_pixels: int, message: str
) -> None:
    """The offline tools read folders of files: a refusal is a ValueError that says which file."""
    path = tmp_path / "face.png"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=f"^{re.escape(f'{path}: {message}')}$"):
        load_rgb(path, max_pixels=max_pixels)


def _repeat_a_scan(data: bytes, extra: int) -> bytes:
    """A progressive JPEG with its last scan (an AC refinement: FF DA up to the next marker) repeated
    `extra` more times before its end: libjpeg decodes each over the whole image, warning only."""
    sos = data.rindex(b"\xff\xda")
    scan = data[sos : data.rindex(b"\xff\xd9")]
    return data[:sos] + scan * (1 + extra) + b"\xff\xd9"


def test_a_jpeg_of_repeated_scans_is_refused_before_it_is_decoded() -> None:
    """Decode time grows with the scans, not the pixels or bytes (0.7 ms a scan at 40 MP: a 1 MB
    upload held the API's check 21 s, and the worker as long again). More than MAX_JPEG_SCANS is
    `invalid_image`, refused before any decoding; a normal progressive JPEG and one with a few
    repeated scans still pass."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(buf, "JPEG", progressive=True, quality=90)
    progressive = buf.getvalue()
    assert 1 < progressive.count(b"\xff\xda") < 20
    check_image(progressive, max_pixels=10_000)
    check_image(_repeat_a_scan(progressive, 10), max_pixels=10_000)
    bomb = _repeat_a_scan(progressive, images.MAX_JPEG_SCANS)
    for read in (check_image, decode_image):
        with pytest.raises(InvalidImageError, match=f"at most {images.MAX_JPEG_SCANS} are accepted"):
            read(bomb, max_pixels=10_000)
