"""Hostile and odd uploads against the real API (real Redis, real decoder, no mocks).

Why: the API is the only thing between the internet and the GPU workers. Every malformed request
must be answered with a 4xx in the one error shape and a stable code, never a 5xx and never a
queued job; every odd-but-valid image (16-bit, CMYK, palette, LA, animated, EXIF-rotated) must be
accepted and come out right. The bad-input corpus is generated deterministically (fixed seed) so a
failure reproduces exactly; its size is asserted so it cannot silently shrink. A bounded
schemathesis run then fuzzes every operation of the OpenAPI document for 5xx and schema drift.
"""

from __future__ import annotations

import base64
import io
import random
import signal
import struct
import subprocess
import sys
import uuid
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from PIL import Image
from rel_support import TERMINAL, ApiServer
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.main import create_app
from app.schemas import RestorationOptions
from app.settings import Settings
from models.images import decode_image, encode_image
from tests.conftest import (
    EXIF_STORED_AS,
    aligned_png,
    base_settings,
    purge,
    settings_env,
    start_workers,
    wait_for,
)

SEED = 20240606
MIN_BAD_CASES = 300
FACE = Image.open(io.BytesIO(aligned_png())).convert("RGB")
SMALL = FACE.resize((64, 64))
EXTENSIONS = ("png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff")
CTYPES = ("image/png", "image/jpeg", "image/webp", "application/octet-stream")


def encoded(im: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def error_code(r: httpx.Response) -> str:
    """The code of a response in the error shape; fails on any other shape."""
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return str(body["error"]["code"])


# --- decompression bombs: huge declared dimensions in a tiny file (only headers are valid) ------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 256)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def gif_bomb(w: int, h: int) -> bytes:
    screen = b"GIF89a" + struct.pack("<HHBBB", w, h, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b";"


def bmp_bomb(w: int, h: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 16, 0, 0, 54) + info + b"\0" * 16


def jpeg_bomb(w: int, h: int) -> bytes:
    """A real JPEG whose SOF0 header claims ``w`` x ``h``."""
    data = bytearray(encoded(SMALL, "JPEG", quality=80))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


# --- the generated corpus --------------------------------------------------------------------------


@dataclass
class Case:
    """One request (keyword arguments of ``TestClient.post``) and the error it must get."""

    name: str
    status: int
    code: str
    request: dict[str, Any] = field(default_factory=dict)
    app: str = "default"  # "default" or "tiny_pixels" (max_pixels=64*64)


def multipart(
    data: bytes, filename: str = "x.png", ctype: str = "image/png", **fields: Any
) -> dict[str, Any]:
    return {"files": {"image": (filename, data, ctype)}, "data": {"aligned": "true", **fields}}


def data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def json_body(image: str, **options: Any) -> dict[str, Any]:
    return {"json": {"image": image, **options}}


def raw(body: bytes, ctype: str | None) -> dict[str, Any]:
    return {"content": body, "headers": {"content-type": ctype} if ctype is not None else {}}


def bad_cases() -> list[Case]:
    """Every malformed request, generated from a fixed seed (same list on every run)."""
    rng = random.Random(SEED)
    png = encoded(SMALL, "PNG")
    cases: list[Case] = []

    def add(name: str, status: int, code: str, request: dict[str, Any], app: str = "default") -> None:
        cases.append(Case(f"#{len(cases)} {name}", status, code, request, app))

    # 0-byte uploads under every image name and declared type, and as an empty data URL.
    for ext in EXTENSIONS:
        for ctype in (f"image/{ext}", "application/octet-stream"):
            add(f"empty.{ext} as {ctype}", 400, "invalid_image", multipart(b"", f"empty.{ext}", ctype))
        add(f"empty data URL {ext}", 400, "invalid_image", json_body(f"data:image/{ext};base64,"))

    # Truncated files: random cut points, always before the last chunk a decoder could do without.
    sources = {
        "PNG": encoded(SMALL, "PNG"),
        "JPEG": encoded(SMALL, "JPEG", quality=90),
        "WEBP": encoded(SMALL, "WEBP"),
        "GIF": encoded(SMALL, "GIF"),
        "BMP": encoded(SMALL, "BMP"),
        "TIFF": encoded(SMALL, "TIFF"),
        "PNG16": encoded(SMALL.convert("L").convert("I;16"), "PNG"),
    }
    for fmt, full in sources.items():
        cuts = sorted(rng.sample(range(1, len(full) - 32), 14))
        for cut in cuts:
            add(
                f"{fmt} cut at {cut}/{len(full)}",
                400,
                "invalid_image",
                multipart(full[:cut], f"t.{fmt.lower()}"),
            )
        for cut in cuts[:3]:
            add(f"{fmt} cut at {cut} (JSON)", 400, "invalid_image", json_body(data_url(full[:cut])))
    # An animated GIF cut in its second frame's header (image descriptor, local palette): Pillow parses
    # it to tell whether there is a second frame, and raised errors of its own there.
    animated = encoded(
        SMALL, "GIF", save_all=True, append_images=[SMALL.transpose(Image.Transpose.ROTATE_180)]
    )
    full_frame = b"\x2c\0\0\0\0" + struct.pack("<HH", *SMALL.size)  # a frame's descriptor at (0, 0)
    second = animated.index(full_frame, animated.index(full_frame) + 1)
    for cut in (second + 1, second + 10, second + 400):
        add(
            f"animated GIF cut at {cut} (second frame)",
            400,
            "invalid_image",
            multipart(animated[:cut], "a.gif"),
        )

    # Random bytes named like images; and real magic numbers followed by garbage.
    for ext in EXTENSIONS:
        for size in (1, 7, 64, 1000, 20_000):
            noise = rng.randbytes(size)
            add(f"noise {size}B .{ext}", 400, "invalid_image", multipart(noise, f"n.{ext}", f"image/{ext}"))
    # (No GIF here: random bytes after "GIF89a" declare random, mostly huge, dimensions: a bomb.)
    magics = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"RIFF\0\0\0\0WEBPVP8 ", b"BM", b"II*\0", b"MM\0*"]
    for magic in magics:
        for size in (0, 16, 300, 5000):
            junk = magic + rng.randbytes(size)
            add(f"magic {magic[:4]!r}+{size}B", 400, "invalid_image", multipart(junk, "m.png"))

    # Real images in formats we do not accept.
    for fmt in ("ICO", "PCX", "TGA", "PPM", "SGI", "XBM", "AVIF"):
        im = {"ICO": SMALL.resize((32, 32)), "XBM": SMALL.convert("1")}.get(fmt, SMALL)
        add(f"format {fmt}", 415, "unsupported_format", multipart(encoded(im, fmt), f"x.{fmt.lower()}"))
        add(f"format {fmt} (JSON)", 415, "unsupported_format", json_body(data_url(encoded(im, fmt))))
    # An iPhone photo (HEIC), which no Pillow plugin identifies: its ISO base media "ftyp" box.
    heic = struct.pack(">I", 24) + b"ftypheic" + bytes(4) + b"mif1heic" + rng.randbytes(2000)
    add("format HEIC", 415, "unsupported_format", multipart(heic, "IMG_0001.HEIC", "image/heic"))

    # Bodies that are neither multipart nor JSON.
    for ctype in (
        "image/png",
        "image/jpeg",
        "application/octet-stream",
        "text/plain",
        "text/html",
        "application/xml",
        "application/x-www-form-urlencoded",
        "multipart/mixed; boundary=x",
        "multipart/related; boundary=x",
        "application/json-patch+json",
        "application/x-json",
        "application/jsonl",
        None,
    ):
        for body in (png, b"image=" + png[:64]):
            add(f"raw body as {ctype}", 415, "unsupported_format", raw(body, ctype))

    # Decompression bombs: more pixels than max_pixels (40 MP) declared in a few hundred bytes. Sizes
    # straddle Pillow's own warning (89 MP) and error (179 MP) thresholds and go far beyond them.
    bombs: dict[str, Callable[[int, int], bytes]] = {"png": png_bomb, "gif": gif_bomb, "bmp": bmp_bomb}
    bombs["jpg"] = jpeg_bomb
    for kind, make in bombs.items():
        limit = 65_535 if kind in ("gif", "jpg") else 1_000_000
        dims = [(7_000, 7_000), (10_000, 10_000), (13_000, 13_000), (65_535, 65_535)]
        dims += [(rng.randint(40_001, limit), rng.randint(1_001, 65_535)) for _ in range(6)]
        for w, h in dims:
            w, h = min(w, limit), min(h, limit)
            add(f"{kind} bomb {w}x{h}", 413, "too_many_pixels", multipart(make(w, h), f"b.{kind}"))
        add(f"{kind} bomb (JSON)", 413, "too_many_pixels", json_body(data_url(make(20_000, 20_000))))
    # An honest image over a lowered limit (DYNFACE_MAX_PIXELS=4096).
    for side in (65, 80, 128, 512):
        add(
            f"{side}px over max_pixels",
            413,
            "too_many_pixels",
            multipart(encoded(SMALL.resize((side, side)), "PNG")),
            "tiny_pixels",
        )

    # Multipart framing: oversized fields, too many fields or files, no boundary, garbage.
    for name in ("webhook", "seed", "zzz", "outputs"):
        for size in (1024 * 1024 + 1, 3 * 1024 * 1024):
            add(f"field {name} of {size}B", 400, "invalid_request", multipart(png, **{name: "x" * size}))
    for n in (33, 40, 64, 200):
        fields = {f"f{i}": "1" for i in range(n)}
        add(
            f"{n} fields",
            400,
            "invalid_request",
            {"files": {"image": ("x.png", png, "image/png")}, "data": fields},
        )
    for n in (2, 3, 10):
        files = [("image", (f"{i}.png", png, "image/png")) for i in range(n)]
        add(f"{n} files", 400, "invalid_request", {"files": files})
    add("multipart without boundary", 400, "invalid_request", raw(b"--x\r\n\r\n", "multipart/form-data"))
    for i in range(3):
        body = rng.randbytes(200)
        add(f"garbage multipart {i}", 400, "invalid_request", raw(body, "multipart/form-data; boundary=abc"))
    add("no image field", 422, "invalid_option", {"files": {"img": ("x.png", png, "image/png")}})
    text_image = {"files": {"aligned": (None, "true")}, "data": {"image": "iVBORw0KGgo="}}
    add("image sent as a text field", 422, "invalid_option", text_image)
    add("form-urlencoded image", 415, "unsupported_format", {"data": {"image": "iVBORw0KGgo="}})
    add("empty multipart", 422, "invalid_option", raw(b"--abc--\r\n", "multipart/form-data; boundary=abc"))

    # Invalid option values (types, ranges, unknown keys), as multipart text fields.
    form_bad: list[tuple[str, str]] = [
        ("fidelity", "-0.1"),
        ("fidelity", "1.5"),
        ("fidelity", "abc"),
        ("fidelity", "nan"),
        ("fidelity", "inf"),
        ("mode", "gfpgan"),
        ("aligned", "maybe"),
        ("aligned", "2"),
        ("upscale", "0"),
        ("upscale", "5"),
        ("upscale", "1.5"),
        ("upscale", "x"),
        ("upscale", "-1"),
        ("only_center_face", "sure"),
        ("detector", "yolo"),
        ("outputs", "video"),
        ("outputs", "image,video"),
        ("outputs", ","),
        ("format", "gif"),
        ("format", "tiff"),
        ("seed", "-1"),
        ("seed", str(2**32)),
        ("seed", "abc"),
        ("seed", "1.5"),
        ("max_faces", "0"),
        ("max_faces", "-3"),
        ("max_faces", "x"),
        ("min_face_size", "-1"),
        ("min_face_size", "nan"),
        ("min_face_size", "inf"),
        ("min_face_size", "x"),
        ("color_correction", "red"),
        ("on_no_face", "ignore"),
        ("webhook", "ftp://example.com/hook"),
        ("webhook", "not a url"),
        ("webhook", "javascript:alert(1)"),
        ("bogus", "1"),
        ("Aligned", "true"),
        ("image_url", "https://example.com/a.png"),
        ("__proto__", "{}"),
    ]
    for key, value in form_bad:
        add(f"form {key}={value[:20]!r}", 422, "invalid_option", multipart(png, **{key: value}))

    # The same in JSON, with JSON types.
    good_url = data_url(png)
    json_bad: list[tuple[str, Any]] = [
        ("fidelity", 2),
        ("fidelity", -1),
        ("fidelity", "abc"),
        ("fidelity", [0.5]),
        ("fidelity", None),
        ("mode", 1),
        ("aligned", "maybe"),
        ("aligned", 2),
        ("aligned", []),
        ("upscale", 0),
        ("upscale", 5),
        ("upscale", 1.5),
        ("upscale", "x"),
        ("upscale", None),
        ("detector", "yolo"),
        ("outputs", []),
        ("outputs", ["video"]),
        ("outputs", "image"),
        ("outputs", [1]),
        ("format", "gif"),
        ("seed", -1),
        ("seed", 2**32),
        ("seed", 1.5),
        ("seed", "abc"),
        ("max_faces", 0),
        ("min_face_size", -1),
        ("min_face_size", "inf"),
        ("color_correction", True),
        ("on_no_face", "ignore"),
        ("webhook", 5),
        ("webhook", "ftp://example.com/hook"),
        ("bogus", 1),
        ("options", {"aligned": True}),
        ("Image", good_url),
    ]
    for key, value in json_bad:
        add(f"json {key}={value!r:.20}", 422, "invalid_option", json_body(good_url, **{key: value}))

    # JSON bodies that are wrong as a whole.
    for body in (b"[1, 2]", b'"image"', b"42", b"null", b"{}", b'{"image": 5}', b'{"image": null}'):
        add(f"json body {body[:12]!r}", 422, "invalid_option", raw(body, "application/json"))
    for body in (b"{not json", b"", b'{"image": "data:', b"\xff\xfe{}", b'{"image": "x"'):
        add(f"json syntax {body[:12]!r}", 400, "invalid_request", raw(body, "application/json"))
    for image in (
        "https://example.com/a.png",
        "data:text/html;base64,PGh0bWw+",
        "data:image/png,rawdata",
        "data:image/png;base64,@@@@",
        "data:image/png;base64,iVBORw0KGgo",  # bad padding
        "file:///etc/passwd",
        "../../etc/passwd",
    ):
        add(f"json image {image[:24]!r}", 400, "invalid_image", json_body(image))

    # Path-like and hostile file names with bad data: the name changes nothing about the answer.
    for name in (
        "../../etc/passwd",
        "/etc/shadow.png",
        "..\\..\\win.ini",
        "a/b/../../c.png",
        "x.png\r\nX-Evil: 1",
    ):
        add(f"filename {name!r} (bad data)", 400, "invalid_image", multipart(b"\0" * 40, name))
    return cases


@pytest.fixture
def clients(make_settings: Callable[..., Settings]) -> Iterator[dict[str, TestClient]]:
    apps = {"default": make_settings(), "tiny_pixels": make_settings(max_pixels=64 * 64)}
    with TestClient(create_app(apps["default"])) as a, TestClient(create_app(apps["tiny_pixels"])) as b:
        yield {"default": a, "tiny_pixels": b}


def test_generated_bad_inputs_get_their_4xx_code_and_queue_nothing(
    clients: dict[str, TestClient], redis_conn: redis.Redis
) -> None:
    """≥300 malformed requests: each one a 4xx in the error shape with its exact code (no 5xx, no
    stack trace), and none of them leaves a job, an input blob or an RQ job behind."""
    cases = bad_cases()
    assert len(cases) >= MIN_BAD_CASES, len(cases)
    assert len({c.name for c in cases}) == len(cases), "case names must be unique"
    wrong: list[str] = []
    for case in cases:
        r = clients[case.app].post("/v1/restorations", **case.request)
        got = (
            r.status_code,
            error_code(r) if r.headers.get("content-type") == "application/json" else r.text,
        )
        if got != (case.status, case.code):
            wrong.append(f"{case.name}: expected {case.status} {case.code}, got {got} {r.text[:160]}")
        assert "Traceback" not in r.text
    assert not wrong, f"{len(wrong)}/{len(cases)} wrong:\n" + "\n".join(wrong)
    for c in clients.values():
        s = c.app.state.services.settings
        assert list(redis_conn.scan_iter(match=f"{s.key_prefix}:job:*")) == []
        assert list(redis_conn.scan_iter(match=f"{s.key_prefix}:input:*")) == []
        assert c.app.state.services.queue.count == 0


@pytest.fixture(scope="module")
def property_client(redis_conn: redis.Redis) -> Iterator[TestClient]:
    """One app for the hypothesis properties (function-scoped fixtures do not reset between examples);
    a deep queue so accepted examples never hit queue_full."""
    settings = base_settings(uuid.uuid4().hex[:10], max_queue_depth=100_000)
    with TestClient(create_app(settings)) as c:
        yield c
    purge(redis_conn, settings)


@hsettings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(max_size=4096), ext=st.sampled_from(EXTENSIONS), ctype=st.sampled_from(CTYPES))
def test_property_arbitrary_bytes_are_a_4xx_never_a_5xx(
    property_client: TestClient, data: bytes, ext: str, ctype: str
) -> None:
    """Whatever bytes arrive under an image name and type, the answer is a 4xx error envelope with an
    upload-related code (arbitrary short bytes are never a decodable image with a face)."""
    r = property_client.post("/v1/restorations", **multipart(data, f"x.{ext}", ctype))
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])
    assert error_code(r) in {"invalid_image", "unsupported_format", "too_many_pixels", "invalid_request"}


_OPTION_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.text(max_size=8), max_size=3),
)
_OPTION_NAMES = st.sampled_from([*RestorationOptions.model_fields, "unknown_option"])


@hsettings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(options=st.dictionaries(_OPTION_NAMES, _OPTION_VALUES, max_size=4))
def test_property_arbitrary_json_options_are_accepted_or_invalid_option(
    property_client: TestClient, options: dict[str, Any]
) -> None:
    """Any JSON options with a valid image: 202 (then they validate as the schema says) or 422
    invalid_option naming the problem — never a 5xx, never another code."""
    body = {"image": data_url(aligned_png()), "aligned": True, **options}
    r = property_client.post("/v1/restorations", json=body)
    if r.status_code == 202:
        job = r.json()
        for key, value in options.items():
            if key in ("fidelity", "mode", "format", "detector", "on_no_face", "color_correction"):
                assert job["options"][key] == value or job["options"][key] == str(value), (key, value, job)
    else:
        assert r.status_code == 422 and error_code(r) == "invalid_option", (r.status_code, r.text[:300])
        assert r.json()["error"]["message"]


def test_bomb_between_pillow_thresholds_is_too_many_pixels_when_warnings_are_errors(
    client: TestClient,
) -> None:
    """A 100 MP header sits between Pillow's warning (89 MP) and error (179 MP) thresholds. Under
    ``python -W error`` (how some deployments and CI run) Pillow raises its warning as an exception;
    our lower limit must still answer 413 too_many_pixels, not a generic 400."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        r = client.post("/v1/restorations", **multipart(png_bomb(10_000, 10_000)))
    assert r.status_code == 413 and error_code(r) == "too_many_pixels", r.text


def test_bomb_never_allocates_pixels() -> None:
    """The size check runs on the header alone: refusing a 4-gigapixel GIF must take no memory, so
    it is refused quickly even with a limit above Pillow's own (Pillow would raise later)."""
    from models.errors import PipelineError

    for data in (gif_bomb(65_535, 65_535), png_bomb(1_000_000, 1_000_000)):
        with pytest.raises(PipelineError) as e:
            decode_image(data, max_pixels=40_000_000)
        assert e.value.code == "too_many_pixels"


# --- odd but valid images ---------------------------------------------------------------------------


def _valid_uploads() -> dict[str, tuple[bytes, str]]:
    """Unusual but legitimate uploads → (bytes, file name)."""
    frames = [SMALL, SMALL.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    palette_t = SMALL.convert("P")
    palette_t.info["transparency"] = 0
    return {
        "16-bit gray PNG": (encoded(SMALL.convert("L").convert("I;16"), "PNG"), "a.png"),
        "16-bit TIFF": (encoded(SMALL.convert("L").convert("I;16"), "TIFF"), "a.tif"),
        "CMYK JPEG": (encoded(SMALL.convert("CMYK"), "JPEG"), "a.jpg"),
        "CMYK TIFF": (encoded(SMALL.convert("CMYK"), "TIFF"), "a.tiff"),
        "palette PNG": (encoded(SMALL.convert("P"), "PNG"), "a.png"),
        "palette PNG + transparency": (encoded(palette_t, "PNG"), "a.png"),
        "LA PNG": (encoded(SMALL.convert("LA"), "PNG"), "a.png"),
        "L PNG": (encoded(SMALL.convert("L"), "PNG"), "a.png"),
        "1-bit PNG": (encoded(SMALL.convert("1"), "PNG"), "a.png"),
        "RGBA WebP": (encoded(SMALL.convert("RGBA"), "WEBP", lossless=True), "a.webp"),
        "MPO-free JPEG with EXIF 6": (encoded(SMALL, "JPEG", exif=_exif(6)), "a.jpg"),
        "animated GIF": (
            encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50),
            "a.gif",
        ),
        "animated WebP": (
            encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50),
            "a.webp",
        ),
        "multi-page TIFF": (encoded(frames[0], "TIFF", save_all=True, append_images=frames[1:]), "a.tif"),
        "extension lies (PNG named .jpg)": (encoded(SMALL, "PNG"), "photo.jpg"),
        "path-like name ../../etc/passwd": (encoded(SMALL, "PNG"), "../../etc/passwd"),
        "absolute name /tmp/x.png": (encoded(SMALL, "PNG"), "/tmp/x.png"),
        "windows name ..\\..\\x.png": (encoded(SMALL, "PNG"), "..\\..\\x.png"),
    }


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def test_odd_valid_images_are_accepted_and_animations_say_first_frame(
    client: TestClient, redis_conn: redis.Redis, settings: Settings
) -> None:
    """16-bit, CMYK, palette, LA, 1-bit, animated and multi-page images are valid uploads: 202, with
    a warning that only the first frame is used for animations (the documented behaviour, see
    docs/configuration.md). Path-like file names are accepted and never stored or echoed."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    assert "only the first frame is restored" in doc
    for name, (data, filename) in _valid_uploads().items():
        r = client.post("/v1/restorations", **multipart(data, filename))
        assert r.status_code == 202, (name, r.text)
        job = r.json()
        first_frame = [w for w in job["warnings"] if "only the first one was used" in w]
        multi = name.startswith(("animated", "multi-page"))
        assert bool(first_frame) == multi, (name, job["warnings"])
        assert "passwd" not in r.text and "x.png" not in r.text
    for key in redis_conn.scan_iter(match=f"{settings.key_prefix}:job:*"):
        assert not any(b"passwd" in v or b"x.png" in v for v in redis_conn.hgetall(key).values())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_before_anything_sees_the_pixels(orientation: int) -> None:
    """EXIF orientations 1–8: the decoded pixels are the upright photo (lossless PNG with an eXIf
    chunk, so equality is exact), so the detector never sees a sideways face."""
    upright = np.asarray(SMALL.resize((48, 32)))
    inverse = EXIF_STORED_AS[orientation]
    stored = Image.fromarray(upright) if inverse is None else Image.fromarray(upright).transpose(inverse)
    decoded = decode_image(encoded(stored, "PNG", exif=_exif(orientation)), max_pixels=10**6)
    assert decoded.size == (48, 32)
    assert np.array_equal(decoded.rgb, upright)


def test_alpha_is_kept_and_grayscale_stays_grayscale_through_decode_and_encode() -> None:
    """The image-level contract the worker relies on: alpha planes survive to PNG/WebP results
    (exact values), grayscale sources are flagged and written back single-channel."""
    rng = np.random.default_rng(SEED)
    alpha = rng.integers(0, 256, (40, 40), dtype=np.uint8)
    rgba = np.dstack([np.asarray(SMALL.resize((40, 40))), alpha])
    for src, fmt in ((Image.fromarray(rgba, "RGBA"), "PNG"), (Image.fromarray(rgba, "RGBA"), "WEBP")):
        d = decode_image(
            encoded(src, fmt, lossless=True) if fmt == "WEBP" else encoded(src, fmt), max_pixels=10**6
        )
        assert d.alpha is not None and np.array_equal(d.alpha, alpha) and not d.grayscale
        out, media = encode_image(d.rgb, alpha=d.alpha, grayscale=d.grayscale, format=fmt.lower())
        back = Image.open(io.BytesIO(out))
        assert back.mode == "RGBA" and media == f"image/{fmt.lower()}"
        assert np.array_equal(np.asarray(back)[:, :, 3], alpha)
    la = Image.fromarray(np.dstack([np.asarray(SMALL.convert("L").resize((40, 40))), alpha]), "LA")
    d = decode_image(encoded(la, "PNG"), max_pixels=10**6)
    assert d.grayscale and d.alpha is not None and np.array_equal(d.alpha, alpha)
    out, _ = encode_image(d.rgb, alpha=d.alpha, grayscale=True, format="png")
    assert Image.open(io.BytesIO(out)).mode == "LA"
    for src in (SMALL.convert("L"), SMALL.convert("L").convert("I;16"), SMALL.convert("1")):
        d = decode_image(encoded(src, "PNG"), max_pixels=10**6)
        assert d.grayscale and d.alpha is None
        for fmt, mode in (("png", "L"), ("jpeg", "L")):
            out, _ = encode_image(d.rgb, grayscale=True, format=fmt)
            assert Image.open(io.BytesIO(out)).mode == mode, (src.mode, fmt)


def test_exif_rotated_photos_find_their_face_in_a_real_worker(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """End to end with a real tiny-profile worker and the real face detector: a photo stored
    sideways / upside down with an EXIF tag still yields its one face (the detector would miss a
    rotated face), and an LA upload comes back LA. (All 8 orientations run in test_rel_faults.)"""
    s = make_settings()
    workers = start_workers(s, tmp_path, n=1)
    try:
        with TestClient(create_app(s)) as c:
            photo = FACE.resize((256, 256))
            jobs: dict[str, str] = {}
            for o, turn in ((6, Image.Transpose.ROTATE_90), (3, Image.Transpose.ROTATE_180)):
                data = encoded(photo.transpose(turn), "JPEG", quality=92, exif=_exif(o))
                r = c.post("/v1/restorations", **multipart(data, "p.jpg", aligned="false"))
                assert r.status_code == 202, r.text
                jobs[f"exif{o}"] = r.json()["id"]
            r = c.post("/v1/restorations", **multipart(encoded(photo.convert("LA"), "PNG"), "la.png"))
            jobs["LA"] = r.json()["id"]
            done = {
                k: wait_for(
                    lambda j=j: (b := c.get(f"/v1/restorations/{j}").json())["status"] in TERMINAL and b,
                    120,
                    interval=0.2,
                    what=f"job {k}",
                )
                for k, j in jobs.items()
            }
            for k, job in done.items():
                assert job["status"] == "succeeded", (k, job)
            assert len(done["exif6"]["faces"]) == 1 and len(done["exif3"]["faces"]) == 1
            out = c.get(f"/v1/restorations/{jobs['LA']}/image")
            assert Image.open(io.BytesIO(out.content)).mode == "LA"
    finally:
        for w in workers:
            w.stop(signal.SIGKILL)


def test_chunked_upload_over_the_cap_is_413_on_a_real_server(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """A chunked body (no Content-Length at all) bigger than DYNFACE_MAX_UPLOAD_BYTES, sent to a
    real uvicorn process: refused with 413 too_large from the bytes counted, and the server keeps
    serving afterwards."""
    s = make_settings(max_upload_bytes=50_000)
    server = ApiServer(settings_env(s), tmp_path / "api.log")
    try:
        boundary = "chunkyboundary"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        sent = 0

        def body() -> Iterator[bytes]:
            nonlocal sent
            yield head
            for _ in range(40):  # 40 x 8 KiB = 320 KiB, six times the cap
                sent += 8192
                yield b"\0" * 8192
            yield f"\r\n--{boundary}--\r\n".encode()

        with httpx.Client(base_url=server.url, timeout=30) as http:
            ctype = f"multipart/form-data; boundary={boundary}"
            r = http.post("/v1/restorations", content=body(), headers={"content-type": ctype})
            assert r.status_code == 413 and error_code(r) == "too_large", r.text
            small = http.post(
                "/v1/restorations", files={"image": ("x.png", encoded(SMALL, "PNG"), "image/png")}
            )
            assert small.status_code == 202, small.text
    finally:
        server.stop()


# --- schemathesis over the OpenAPI document -----------------------------------------------------------


#: The fuzzed app lives in its own namespace (purged after the module); schemathesis needs the schema
#: at import time to generate one test per operation.
#: max_wait_seconds=0: no worker runs here, so a generated `Prefer: wait=30` must not hold the run.
FUZZ_SETTINGS = base_settings("fuzz-" + uuid.uuid4().hex[:8], max_wait_seconds=0)
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(FUZZ_SETTINGS))


@pytest.fixture(scope="module")
def fuzz_namespace(redis_conn: redis.Redis) -> Iterator[Settings]:
    yield FUZZ_SETTINGS
    purge(redis_conn, FUZZ_SETTINGS)


def test_each_fuzzed_operation_is_a_test_of_its_own() -> None:
    """One test id per operation (tests/conftest.py puts the operation into it): under pytest-xdist,
    which runs the suite, tests sharing an id ran once for all operations."""
    fuzz = "test_openapi_fuzz_no_5xx_and_responses_match_the_schema"
    labels = [result.ok().label for result in schema.get_all_operations()]
    collect = ["-p", "no:cacheprovider", "-n", "0", "--collect-only", "-q", f"{__file__}::{fuzz}"]
    listed = subprocess.run(
        [sys.executable, "-m", "pytest", *collect],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.splitlines()
    ids = sorted(line.split("::", 1)[1] for line in listed if "::" in line)
    assert len(labels) >= 10
    assert ids == sorted(f"{fuzz}[{label}]" for label in labels)


@schema.parametrize()
@hsettings(
    max_examples=12, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck)
)
def test_openapi_fuzz_no_5xx_and_responses_match_the_schema(case: Any, fuzz_namespace: Settings) -> None:
    """Property-based requests for every operation of /openapi.json (bounded, derandomised): never a
    5xx and every response matches its documented status, content type and schema. /readyz is the
    one documented 503 (no worker runs here), so only its body is checked there."""
    checks = [status_code_conformance, content_type_conformance, response_schema_conformance]
    if case.path != "/readyz":
        checks.append(not_a_server_error)
    response = case.call_and_validate(checks=checks)
    assert response.status_code < 500 or case.path == "/readyz"
