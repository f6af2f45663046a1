"""Face detection / alignment / paste-back with the real RetinaFace MobileNet-0.25 weights."""

from __future__ import annotations

import io
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from models import faces as faces_mod
from models.faces import (
    FFHQ_TEMPLATE_512,
    FaceDetector,
    FaceParser,
    align,
    color_correct,
    comparison_image,
    paste_faces,
    paste_mask,
    upscale_image,
)
from models.images import decode_image
from models.weights import MissingWeightsError
from tests.conftest import EXIF_STORED_AS

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
WEIGHTS = SHARED / "weights"
PHOTOS = SHARED / "testdata" / "photos"
ALIGNED = SHARED / "testdata" / "aligned"
pytestmark = pytest.mark.skipif(
    not (WEIGHTS / "detection_mobilenet0.25_Final.pth").is_file(),
    reason=f"shared RetinaFace MobileNet weights not found under {WEIGHTS}",
)

# Face counts at threshold 0.97, from ../shared/weights/SOURCES.md.
EXPECTED_COUNTS = {
    "00.jpg": 4,
    "01.jpg": 4,
    "02.png": 4,
    "03.png": 2,
    "04.jpg": 1,
    "05.jpg": 1,
    "Solvay_conference_1927.png": 29,
}


def load(path: Path) -> np.ndarray:
    return decode_image(path.read_bytes(), max_pixels=50_000_000).rgb


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector(WEIGHTS, "retinaface_mobile0.25", device="cpu", threshold=0.97)


@pytest.fixture(scope="module")
def detections(detector: FaceDetector) -> dict[str, tuple[np.ndarray, faces_mod.Detections]]:
    """Every photo detected once; the tests below share the results to stay fast on CPU."""
    out = {}
    for name in EXPECTED_COUNTS:
        rgb = load(PHOTOS / name)
        out[name] = (rgb, detector.detect(rgb))
    return out


@pytest.mark.parametrize("name", list(EXPECTED_COUNTS))
def test_face_counts_match_sources(name: str, detections: dict) -> None:
    _, found = detections[name]
    assert len(found) == EXPECTED_COUNTS[name]
    assert found.dropped == 0 and found.warnings == []


@pytest.mark.parametrize("name", list(EXPECTED_COUNTS))
def test_boxes_inside_image_and_landmarks_in_boxes(name: str, detections: dict) -> None:
    rgb, found = detections[name]
    h, w = rgb.shape[:2]
    for face in found.faces:
        x0, y0, x1, y1 = face.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert 0.97 < face.score <= 1.0
        assert face.landmarks.shape == (5, 2)
        # eyes, nose and mouth lie in (a slightly grown) box; left eye left of right eye
        cx, cy = face.landmarks[:, 0], face.landmarks[:, 1]
        pad = 0.1 * (x1 - x0)
        assert (cx > x0 - pad).all() and (cx < x1 + pad).all()
        assert (cy > y0 - pad).all() and (cy < y1 + pad).all()
        assert face.landmarks[0, 0] < face.landmarks[1, 0]
    xs = [f.box[0] for f in found.faces]
    assert xs == sorted(xs)


def test_aligned_crop_redetects_one_face_near_template(detector: FaceDetector) -> None:
    rgb = load(ALIGNED / "0143.png")
    found = detector.detect(rgb)
    assert len(found) == 1
    crops, affines = align(rgb, found.faces)
    assert crops.shape == (1, 512, 512, 3) and crops.dtype == np.uint8
    assert affines.shape == (1, 2, 3)
    again = detector.detect(crops[0])
    assert len(again) == 1
    # Re-detected landmarks land on the FFHQ template (RetinaFace landmark noise: a few px).
    assert np.abs(again.faces[0].landmarks - FFHQ_TEMPLATE_512).max() < 12


def test_align_empty() -> None:
    crops, affines = align(np.zeros((10, 10, 3), np.uint8), [])
    assert crops.shape == (0, 512, 512, 3) and affines.shape == (0, 2, 3)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_oriented_jpeg_gives_same_faces(
    orientation: int, detector: FaceDetector, detections: dict
) -> None:
    """A phone JPEG stored rotated/mirrored with an Orientation tag is decoded upright and gives
    the faces of the upright photo (re-encoding as JPEG moves boxes by a pixel or so)."""
    upright, reference = detections["00.jpg"]
    transform = EXIF_STORED_AS[orientation]
    stored = Image.fromarray(upright)
    if transform is not None:
        stored = stored.transpose(transform)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=98, exif=exif.tobytes())
    decoded = decode_image(buf.getvalue(), max_pixels=50_000_000)
    assert decoded.rgb.shape == upright.shape
    assert np.abs(decoded.rgb.astype(int) - upright).mean() < 2  # upright, not rotated or mirrored
    found = detector.detect(decoded.rgb)
    assert len(found) == len(reference) == 4
    for a, b in zip(found.faces, reference.faces, strict=True):
        np.testing.assert_allclose(a.box, b.box, atol=3.0)
        np.testing.assert_allclose(a.landmarks, b.landmarks, atol=3.0)


def test_max_faces_keeps_largest_and_reports_the_rest(detector: FaceDetector, detections: dict) -> None:
    rgb, everyone = detections["Solvay_conference_1927.png"]
    found = detector.detect(rgb, max_faces=5)
    assert len(found) == 5 and found.dropped == 24
    assert "29 faces" in found.warnings[0]

    def area(f: faces_mod.DetectedFace) -> float:
        return (f.box[2] - f.box[0]) * (f.box[3] - f.box[1])

    smallest_kept = min(area(f) for f in found.faces)
    assert sorted((area(f) for f in everyone.faces), reverse=True)[4] == pytest.approx(smallest_kept)


def test_only_center_face_and_min_face_size(detector: FaceDetector, detections: dict) -> None:
    rgb, everyone = detections["00.jpg"]
    h, w = rgb.shape[:2]
    center = detector.detect(rgb, only_center_face=True)
    assert len(center) == 1

    def dist(f: faces_mod.DetectedFace) -> float:
        return float(np.hypot((f.box[0] + f.box[2]) / 2 - w / 2, (f.box[1] + f.box[3]) / 2 - h / 2))

    assert center.faces[0].box == min(everyone.faces, key=dist).box
    assert len(detector.detect(rgb, min_face_size=max(h, w))) == 0


def _matching(face: faces_mod.DetectedFace, reference: list[faces_mod.DetectedFace], scale: float) -> None:
    """`face` is one of the `reference` faces of the full photo, scaled by `scale` (to ±1.5 px)."""
    nearest = min(reference, key=lambda r: abs(r.box[0] * scale - face.box[0]))
    np.testing.assert_allclose(face.box, np.array(nearest.box) * scale, atol=1.5)
    np.testing.assert_allclose(face.landmarks, nearest.landmarks * scale, atol=1.5)


@pytest.mark.parametrize("width", [160, 245])
def test_small_photos_are_enlarged_for_detection(
    width: int, detector: FaceDetector, detections: dict
) -> None:
    """As DifFace (facexlib, resize=640), RetinaFace runs on the photo enlarged to a 640 px shorter
    side: small copies of 00.jpg keep their faces (at their own size RetinaFace finds 0 at 160 px
    wide, 2 at 245), reported in the small photo's pixels. At 160 px one face has its eyes under 5 px
    apart and is dropped, as facexlib's eye_dist_threshold=5 does."""
    rgb, reference = detections["00.jpg"]
    h, w = rgb.shape[:2]
    small = np.asarray(Image.fromarray(rgb).resize((width, round(h * width / w)), Image.Resampling.LANCZOS))
    found = detector.detect(small)
    assert len(found) >= (3 if width == 160 else 4)
    for face in found.faces:
        _matching(face, reference.faces, width / w)
        assert np.hypot(*(face.landmarks[0] - face.landmarks[1])) >= faces_mod.MIN_EYE_DISTANCE


class _FixedNet:
    """Stands in for RetinaFace: records the image it is given, answers fixed rows in its pixels
    (box, score, then eyes, nose and mouth corners as x, y pairs)."""

    def __init__(self, rows: list[list[float]]) -> None:
        self.rows = np.array(rows, dtype=np.float32).reshape(-1, 15)
        self.shapes: list[tuple[int, ...]] = []

    def detect_faces(self, bgr: np.ndarray, threshold: float, nms_threshold: float) -> np.ndarray:
        self.shapes.append(bgr.shape)
        return self.rows.copy()


def _row(box: tuple[float, float, float, float], eye_gap: float) -> list[float]:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    eyes = [cx - eye_gap / 2, cy, cx + eye_gap / 2, cy]
    return [*box, 0.99, *eyes, cx, cy + 5, cx - 5, cy + 10, cx + 5, cy + 10]


def test_detection_scale_mapping_and_eye_distance(
    detector: FaceDetector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 100×50 photo is detected at 1280×640 (×12.8); boxes and landmarks come back divided by 12.8;
    a face with eyes 4.7 px apart in the photo is dropped, one with 6.25 px kept."""
    net = _FixedNet([_row((128, 128, 512, 512), 60), _row((640, 128, 1152, 512), 80)])
    monkeypatch.setattr(detector, "_net", net)
    found = detector.detect(np.zeros((50, 100, 3), np.uint8))
    assert net.shapes == [(640, 1280, 3)]
    assert len(found) == 1
    np.testing.assert_allclose(found.faces[0].box, (50, 10, 90, 40))
    np.testing.assert_allclose(found.faces[0].landmarks[:2], [[66.875, 25], [73.125, 25]], rtol=1e-6)


@pytest.mark.parametrize(
    ("shape", "seen"),
    [((700, 800, 3), (700, 800, 3)), ((640, 640, 3), (640, 640, 3)), ((20, 2000, 3), (181, 18102, 3))],
)
def test_large_photos_are_not_resized_and_thin_ones_are_bounded(
    shape: tuple[int, int, int],
    seen: tuple[int, int, int],
    detector: FaceDetector,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Photos with a 640 px shorter side or more are detected as they are up to DETECT_SHRINK_PIXELS
    (shrinking would lose small faces); a long thin one is enlarged only up to DETECT_MAX_PIXELS."""
    net = _FixedNet([])
    monkeypatch.setattr(detector, "_net", net)
    assert len(detector.detect(np.zeros(shape, np.uint8))) == 0
    assert net.shapes == [seen]
    assert seen[0] * seen[1] <= max(shape[0] * shape[1], faces_mod.DETECT_MAX_PIXELS)


@pytest.mark.parametrize("upscale", [1, 2])
def test_paste_of_unmodified_crops_is_local_and_near_identity(upscale: int, detections: dict) -> None:
    rgb, found = detections["00.jpg"]
    crops, affines = align(rgb, found.faces)
    out = paste_faces(rgb, crops, affines, upscale)
    background = upscale_image(rgb, upscale)
    assert out.shape == background.shape
    union = paste_mask((out.shape[1], out.shape[0]), affines, upscale)
    outside = union == 0
    assert outside.mean() > 0.5
    np.testing.assert_array_equal(out[outside], background[outside])
    # Inside: warp there and back again only blurs a little.
    inside = union > 0.5
    diff = np.abs(out.astype(float) - background.astype(float))[inside]
    assert diff.mean() < 4


def test_paste_changes_the_face_region(detections: dict) -> None:
    rgb, found = detections["04.jpg"]
    crops, affines = align(rgb, found.faces)
    out = paste_faces(rgb, np.zeros_like(crops), affines)
    mask = paste_mask((rgb.shape[1], rgb.shape[0]), affines)
    assert out[mask > 0.99].max() <= 3  # (almost) fully masked pixels come from the face
    np.testing.assert_array_equal(out[mask == 0], rgb[mask == 0])


def test_paste_with_no_faces_is_the_upscaled_background() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = paste_faces(rgb, np.zeros((0, 512, 512, 3), np.uint8), np.zeros((0, 2, 3)), 2)
    assert out.shape == (40, 60, 3)
    np.testing.assert_array_equal(out, upscale_image(rgb, 2))


def test_paste_of_a_face_outside_the_photo_is_a_no_op() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    far = np.array([[[1.0, 0.0, 5000.0], [0.0, 1.0, 5000.0]]])  # photo -> crop: crop is far away
    out = paste_faces(rgb, np.zeros((1, 512, 512, 3), np.uint8), far)
    np.testing.assert_array_equal(out, rgb)


def test_parser_masks_follow_the_parsed_face(tmp_path: Path, detections: dict) -> None:
    """ParseNet loads through facexlib from the weights dir (random weights here: the real file
    is not in ../shared); its forward is replaced by fixed labels, since a real 512x512 ParseNet
    pass takes tens of seconds on a shared CPU."""
    import torch
    from facexlib.parsing.parsenet import ParseNet

    torch.manual_seed(0)
    net = ParseNet(in_size=512, out_size=512, parsing_ch=19)
    torch.save(net.state_dict(), tmp_path / "parsing_parsenet.pth")
    parser = FaceParser.if_available(tmp_path)
    assert parser is not None

    yy, xx = np.mgrid[:512, :512]
    disk = torch.from_numpy(((yy - 290) ** 2 + (xx - 256) ** 2 < 150**2).astype(np.int64))
    hair = 17
    labels = torch.where(disk.bool(), torch.tensor(1), torch.tensor(hair))
    logits = torch.nn.functional.one_hot(labels, 19).permute(2, 0, 1)[None].float()
    parser._net = lambda x: (logits, None)  # type: ignore[assignment]

    mask = parser.face_mask(np.zeros((512, 512, 3), np.uint8))
    assert mask.shape == (512, 512) and mask.dtype == np.float32
    assert mask[290, 256] > 0.99 and mask[20, 20] == 0 and mask[:10].max() == 0

    rgb, found = detections["04.jpg"]
    crops, affines = align(rgb, found.faces)
    zeros = np.zeros_like(crops)
    out = paste_faces(rgb, zeros, affines, parser=parser)
    weight = paste_mask((rgb.shape[1], rgb.shape[0]), affines, restored_faces=zeros, parser=parser)
    np.testing.assert_array_equal(out[weight == 0], rgb[weight == 0])
    assert out[weight > 0.99].max() <= 3
    # The parsed mask is smaller than the feathered square one: hair and border stay.
    assert (weight > 0).sum() < (paste_mask((rgb.shape[1], rgb.shape[0]), affines) > 0).sum()


def test_missing_weights_is_a_clear_error_and_never_downloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import facexlib.detection
    import facexlib.parsing
    import facexlib.utils.misc

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("facexlib tried to download weights")

    for module in (facexlib.detection, facexlib.parsing, facexlib.utils.misc):
        monkeypatch.setattr(module, "load_file_from_url", no_download)
    monkeypatch.setattr(facexlib.utils.misc, "download_url_to_file", no_download)

    with pytest.raises(MissingWeightsError) as err:
        FaceDetector(tmp_path, "retinaface_resnet50")
    assert "detection_Resnet50_Final.pth" in str(err.value)
    assert "dynface weights pull --only detection_Resnet50_Final.pth" in str(err.value)
    with pytest.raises(MissingWeightsError, match=r"parsing_parsenet\.pth"):
        FaceParser(tmp_path)
    assert FaceParser.if_available(tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_unknown_detector_name() -> None:
    with pytest.raises(ValueError):
        FaceDetector(WEIGHTS, "yolo")  # type: ignore[arg-type]


# ---------------------------------------------------------------- colour, upscale, comparison


def _face() -> np.ndarray:
    return np.asarray(Image.open(ALIGNED / "0143.png").convert("RGB").resize((128, 128)))


def test_wavelet_correction_removes_a_colour_cast_but_keeps_detail() -> None:
    ref = _face()
    cast = np.clip(ref.astype(int) + np.array([40, -20, 10]), 0, 255).astype(np.uint8)
    fixed = color_correct(cast, ref, "wavelet")
    assert np.abs(fixed.astype(int) - ref).mean() < 3
    assert np.abs(cast.astype(int) - ref).mean() > 15
    np.testing.assert_array_equal(color_correct(ref, ref, "wavelet"), ref)


def test_adain_matches_channel_statistics() -> None:
    ref = _face()
    cast = (ref.astype(float) * 0.6 + 50).astype(np.uint8)
    fixed = color_correct(cast[None], ref[None], "adain")[0]
    np.testing.assert_allclose(fixed.mean(axis=(0, 1)), ref.mean(axis=(0, 1)), atol=1)
    np.testing.assert_allclose(fixed.std(axis=(0, 1)), ref.std(axis=(0, 1)), atol=1.5)
    with pytest.raises(ValueError):
        color_correct(ref, ref, "histogram")  # type: ignore[arg-type]


def test_upscale_and_comparison_shapes() -> None:
    small = np.random.default_rng(1).integers(0, 256, (10, 16, 3), dtype=np.uint8)
    big = upscale_image(small, 3)
    assert big.shape == (30, 48, 3)
    assert upscale_image(small[:, :, 0], 2).shape == (20, 32)
    side = comparison_image(small, big)
    assert side.shape == (30, 96, 3)
    np.testing.assert_array_equal(side[:, 48:], big)


# ---------------------------------------------------------------- large photos, paste memory, aliasing


class _SpyNet:
    """The real RetinaFace, recording the shape of each image it is given."""

    def __init__(self, net: object) -> None:
        self.net = net
        self.shapes: list[tuple[int, ...]] = []

    def detect_faces(self, bgr: np.ndarray, threshold: float, nms_threshold: float) -> np.ndarray:
        self.shapes.append(bgr.shape)
        return self.net.detect_faces(bgr, threshold, nms_threshold)  # type: ignore[attr-defined]


def test_large_photos_are_shrunk_for_detection_and_keep_their_faces(
    detector: FaceDetector, detections: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group photo enlarged 4× (12 MP) is detected at DETECT_SHRINK_PIXELS, not at full size, and
    still gives all 29 faces, at the 4×-scaled positions of the photo's own detections (RetinaFace's
    landmarks move by up to ~20 % of the eye distance between detection scales, full size included)."""
    rgb, reference = detections["Solvay_conference_1927.png"]
    h, w = rgb.shape[:2]
    big = np.asarray(Image.fromarray(rgb).resize((4 * w, 4 * h), Image.Resampling.LANCZOS))
    spy = _SpyNet(detector._net)
    monkeypatch.setattr(detector, "_net", spy)
    found = detector.detect(big)
    ((seen_h, seen_w, _),) = spy.shapes
    assert seen_h * seen_w <= faces_mod.DETECT_SHRINK_PIXELS * 1.001 and seen_w / seen_h == pytest.approx(
        w / h, 1e-3
    )
    assert len(found) == len(reference) == 29
    for face, ref in zip(found.faces, reference.faces, strict=True):
        eyes = np.hypot(*(ref.landmarks[0] - ref.landmarks[1]))
        assert np.abs(face.landmarks / 4 - ref.landmarks).max() < 0.3 * eyes


def test_detection_of_a_shrunk_photo_maps_back_to_its_pixels(
    detector: FaceDetector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 4000×3000 photo is detected at 2309×1732 (4 MP); the answers are scaled back by its ratios."""
    net = _FixedNet([_row((1000, 500, 1200, 700), 50)])
    monkeypatch.setattr(detector, "_net", net)
    (face,) = detector.detect(np.zeros((3000, 4000, 3), np.uint8)).faces
    assert net.shapes == [(1732, 2309, 3)]
    np.testing.assert_allclose(
        face.box, (1000 * 4000 / 2309, 500 * 3000 / 1732, 1200 * 4000 / 2309, 700 * 3000 / 1732)
    )


def _bare_warp(face: np.ndarray, affine: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """What paste-back warped with before it low-passed faces it shrinks more than 2×."""
    return cv2.warpAffine(face, affine, size, flags=cv2.INTER_LINEAR)


def _old_paste_faces(
    background: np.ndarray,
    restored: np.ndarray,
    affines: np.ndarray,
    upscale: float,
    warp: Callable[[np.ndarray, np.ndarray, tuple[int, int]], np.ndarray] = faces_mod._warp,
) -> np.ndarray:
    """paste_faces as it was, blending into one float32 copy of the whole output: the reference."""
    out = upscale_image(background, upscale).astype(np.float32)
    h_up, w_up = out.shape[:2]
    for face, affine in zip(restored, affines, strict=True):
        inv = faces_mod._inverse_affine(affine, upscale)
        x0, y0, x1, y1 = roi = faces_mod._face_roi(inv, face.shape[0], w_up, h_up)
        if x1 <= x0 or y1 <= y0:
            continue
        mask = faces_mod._face_mask(inv, roi, face.shape[0], upscale, None)[:, :, None]
        shifted = inv.copy()
        shifted[:, 2] -= (x0, y0)
        warped = warp(face, shifted, (x1 - x0, y1 - y0))
        out[y0:y1, x0:x1] = mask * warped.astype(np.float32) + (1 - mask) * out[y0:y1, x0:x1]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _synthetic_face(center: tuple[float, float], eye_distance: float) -> faces_mod.DetectedFace:
    scale = eye_distance / float(FFHQ_TEMPLATE_512[1, 0] - FFHQ_TEMPLATE_512[0, 0])
    landmarks = (FFHQ_TEMPLATE_512 - 256) * scale + center
    return faces_mod.DetectedFace((0.0, 0.0, 1.0, 1.0), 0.99, landmarks.astype(np.float32))


@pytest.mark.parametrize("upscale", [1, 2])
def test_paste_blends_exactly_as_one_float_image(upscale: int) -> None:
    """Two overlapping faces (the later one wins where both are masked), one apart, one partly and one
    wholly off the photo: blending per group of overlapping faces gives the bytes of the whole-image
    float blend."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (150, 260, 3), dtype=np.uint8)
    faces = [
        _synthetic_face(c, e)
        for c, e in [((60, 70), 20), ((85, 80), 24), ((210, 50), 18), ((250, 170), 30), ((900, 900), 20)]
    ]
    crops, affines = align(rgb, faces)
    restored = rng.integers(0, 256, crops.shape, dtype=np.uint8)
    rois = [
        faces_mod._face_roi(faces_mod._inverse_affine(a, upscale), 512, 260 * upscale, 150 * upscale)
        for a in affines
    ]
    assert faces_mod._overlapping_groups(rois) == [[0, 1], [2], [3]]
    out = paste_faces(rgb, restored, affines, upscale)
    np.testing.assert_array_equal(out, _old_paste_faces(rgb, restored, affines, upscale))


@pytest.mark.parametrize(("eye_distance", "upscale"), [(70, 1), (40, 2), (20, 4)])
def test_faces_shrunk_at_most_2x_are_pasted_with_the_bare_bilinear_warp(
    eye_distance: float, upscale: int
) -> None:
    """Only faces the paste shrinks more than 2× are low-passed: the others keep their exact bytes."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)
    crops, affines = align(rgb, [_synthetic_face((100, 75), eye_distance)])
    restored = rng.integers(0, 256, crops.shape, dtype=np.uint8)
    np.testing.assert_array_equal(
        paste_faces(rgb, restored, affines, upscale),
        _old_paste_faces(rgb, restored, affines, upscale, _bare_warp),
    )


def test_small_faces_are_low_passed_when_pasted_not_aliased() -> None:
    """A restored face of fine noise pasted back 16 px between the eyes (shrunk ~7.8×): the bare bilinear
    warp reads 2×2 crop pixels per photo pixel and keeps the noise at full strength (aliased); low-passed
    first (as `align` does, `_warp`) it is as smooth as an area-resampled shrink, and smooth content
    lands where the bare warp puts it."""
    rgb = np.full((200, 200, 3), 128, np.uint8)
    crops, affines = align(rgb, [_synthetic_face((100, 100), 16)])
    rng = np.random.default_rng(0)
    noise = np.clip(128 + rng.normal(0, 30, crops.shape), 0, 255).astype(np.uint8)
    scale = float(np.sqrt(abs(np.linalg.det(affines[0][:, :2]))))
    area = cv2.resize(noise[0], (round(512 / scale),) * 2, interpolation=cv2.INTER_AREA)[5:-5, 5:-5]
    centre = (slice(95, 105), slice(95, 105))
    bare = _old_paste_faces(rgb, noise, affines, 1, _bare_warp)[centre]
    pasted = paste_faces(rgb, noise, affines)[centre]
    assert bare.std() > 3 * area.std()
    assert pasted.std() < 1.5 * area.std() and abs(float(pasted.mean()) - 128) < 2

    yy, xx = np.mgrid[:512, :512]
    smooth = np.repeat((128 + 100 * np.sin(xx / 90.0) * np.cos(yy / 70.0))[None, :, :, None], 3, axis=3)
    smooth = smooth.astype(np.uint8)
    diff = np.abs(
        paste_faces(rgb, smooth, affines).astype(int) - _old_paste_faces(rgb, smooth, affines, 1, _bare_warp)
    )
    assert np.median(diff) <= 1 and diff.max() <= 6


def test_paste_needs_no_float_copy_of_the_whole_output() -> None:
    """Peak memory of pasting one small face into a 4× upscale (1200×1600): the uint8 output and the
    face's own region, not a float32 copy of the whole output (≥ 24 B a pixel with its rounding)."""
    rgb = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    crops, affines = align(rgb, [_synthetic_face((200, 150), 20)])
    tracemalloc.start()
    try:
        out = paste_faces(rgb, crops, affines, 4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (1200, 1600, 3)
    assert peak < 10 * 1200 * 1600


def test_paste_never_writes_into_the_callers_photo() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8)
    before = rgb.copy()
    crops, affines = align(rgb, [_synthetic_face((100, 75), 20)])
    out = paste_faces(rgb, np.zeros_like(crops), affines, 1, upscale_background=lambda x, f: x)
    np.testing.assert_array_equal(rgb, before)
    assert (out != rgb).any()


def test_upscale_premultiplied_keeps_the_visible_colour_at_transparent_edges() -> None:
    """Opaque white beside transparent black: resized straight, the edge turns grey (a dark halo);
    premultiplied by alpha, every pixel that is not fully transparent stays white."""
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, :8] = 255
    alpha = np.zeros((16, 16), np.uint8)
    alpha[:, :8] = 255
    out = faces_mod.upscale_premultiplied(rgb, alpha, 2)
    up_alpha = faces_mod.resize_to(alpha, (32, 32))
    assert ((up_alpha > 0) & (up_alpha < 255)).any()  # a soft edge
    assert out[up_alpha > 0].min() >= 250
    assert (out[up_alpha == 0] == 0).all()
    assert upscale_image(rgb, 2)[up_alpha > 0].min() < 200  # what straight resizing gave


def test_faces_shrunk_more_than_2x_are_low_passed_not_aliased() -> None:
    """A face 4× larger than the crop over 1-px stripes (3 px period, above the crop's Nyquist rate):
    a bare bilinear warp folds them into strong false stripes, the low-passed warp into flat grey."""
    x = np.arange(2200)
    stripes = np.where(x % 3 == 0, 255, 0).astype(np.uint8)
    rgb = np.repeat(np.broadcast_to(stripes, (2200, 2200))[:, :, None], 3, axis=2)
    face = _synthetic_face((1100, 1100), 4 * float(FFHQ_TEMPLATE_512[1, 0] - FFHQ_TEMPLATE_512[0, 0]))
    crops, affines = align(rgb, [face])
    bare = cv2.warpAffine(rgb, affines[0], (512, 512), flags=cv2.INTER_LINEAR)
    assert bare.std() > 40
    assert crops[0].std() < 3 and abs(float(crops[0].mean()) - 85) < 2


def test_anti_aliasing_keeps_geometry_and_smooth_content() -> None:
    """Low-frequency content (and so where the face lands in the crop) is what the bare warp gives,
    including where the crop runs off the photo into the grey border."""
    yy, xx = np.mgrid[:1200, :1600]
    smooth = 128 + 100 * np.sin(xx / 60.0) * np.cos(yy / 45.0)
    rgb = np.repeat(smooth[:, :, None], 3, axis=2).astype(np.uint8)
    face = _synthetic_face((700, 500), 3 * float(FFHQ_TEMPLATE_512[1, 0] - FFHQ_TEMPLATE_512[0, 0]))
    crops, affines = align(rgb, [face])
    bare = cv2.warpAffine(
        rgb, affines[0], (512, 512), flags=cv2.INTER_LINEAR, borderValue=faces_mod.CROP_BORDER_RGB
    )
    assert (bare == faces_mod.CROP_BORDER_RGB).all(axis=2).any()  # the crop does leave the photo
    diff = np.abs(crops[0].astype(int) - bare)
    assert np.median(diff) <= 1 and np.percentile(diff, 99) <= 6
