"""Face detection, FFHQ-512 alignment, paste-back, colour correction and upscaling.

Whole photos go through: detect (RetinaFace via facexlib) -> align every face to the 512x512
FFHQ template -> restore (elsewhere) -> paste each restored face back with a soft mask into the
(optionally upscaled) photo. The geometry follows facexlib's FaceRestoreHelper, which is what
DifFace uses, so crops look like the ones its models were trained and evaluated on. All images
are RGB uint8 numpy arrays; facexlib's BGR convention stays inside this module.

facexlib downloads missing weights at run time; every model here is loaded through
`_load_facexlib_model`, which refuses to start unless the file is already in the weights dir.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from PIL import Image

from models.weights import MissingWeightsError

DetectorName = Literal["retinaface_resnet50", "retinaface_mobile0.25"]

#: File each facexlib model is loaded from; facexlib looks for exactly these names.
FACEXLIB_FILES: dict[str, str] = {
    "retinaface_resnet50": "detection_Resnet50_Final.pth",
    "retinaface_mobile0.25": "detection_mobilenet0.25_Final.pth",
    "parsenet": "parsing_parsenet.pth",
}

#: The five landmarks (eyes, nose tip, mouth corners) of the FFHQ-512 template, as in facexlib's
#: FaceRestoreHelper for face_size 512.
FFHQ_TEMPLATE_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float64,
)

#: Fill for crop pixels that fall outside the photo (facexlib's grey, here in RGB order).
CROP_BORDER_RGB = (132, 133, 135)

#: DifFace detects with facexlib's `get_face_landmarks_5(resize=640, eye_dist_threshold=5)`: RetinaFace
#: runs on the photo Lanczos-resized to a 640 px shorter side, and faces whose eyes are under 5 px
#: apart in the photo (profiles, specks) are dropped. RetinaFace's smallest anchor is 16 px, so small
#: photos lose their faces without the enlargement. We enlarge only: facexlib also shrinks bigger
#: photos, which would lose the small faces of large group photos.
DETECT_SHORT_SIDE = 640
MIN_EYE_DISTANCE = 5.0
#: Bound on the enlarged detection image (an 8:1 panorama still reaches 640 px), so a long thin
#: upload cannot make it huge.
DETECT_MAX_PIXELS = 8 * DETECT_SHORT_SIDE**2
#: Photos over this many pixels are shrunk to it for detection. RetinaFace's memory and time grow with
#: the pixels (ResNet-50 on a 2-core CPU: +0.9 GB, 33 s at 4 MP; +2.7 GB, 229 s at 12 MP), while its
#: smallest anchor (16 px) still catches faces of 16·√(pixels / 4 MP) px in the photo: ≥ 28 px in a
#: 12 MP phone photo, ≥ 48 px at 36 MP, faces that restoring at 512 px would enlarge over 10× anyway.
#: Above DETECT_MAX_PIXELS, so an enlarged photo is never shrunk back.
DETECT_SHRINK_PIXELS = 4_000_000

#: A warp that shrinks by more than 2× (output px per source px below this) low-passes its source first
#: (`_warp`): `align` for large faces, `paste_faces` for small ones; milder shrinking is left to the
#: bilinear warp, as facexlib does.
ANTI_ALIAS_SCALE = 0.5

#: Face-parsing labels that count as face for the paste mask (facexlib's choice: everything
#: but background (0), neck (14), cloth (16), hair (17) and hat (18)).
_PARSE_FACE_LABELS = np.array([label not in (0, 14, 16, 17, 18) for label in range(19)])


def _load_facexlib_model(name: str, weights_dir: Path, device: torch.device) -> torch.nn.Module:
    """The one place facexlib models are built; refuses to run if facexlib would download.

    facexlib's loaders call `load_file_from_url`, which downloads into `model_rootpath` when the
    file is absent. Checking first turns a silent multi-megabyte download (or a hang on a
    machine without network) into an immediate error that says which file to fetch and how.
    """
    file_name = FACEXLIB_FILES[name]
    if not (weights_dir / file_name).is_file():
        raise MissingWeightsError([file_name], weights_dir)
    if name == "parsenet":
        from facexlib.parsing import init_parsing_model

        return init_parsing_model("parsenet", half=False, device=device, model_rootpath=str(weights_dir))
    from facexlib.detection import init_detection_model

    return init_detection_model(name, half=False, device=device, model_rootpath=str(weights_dir))


@dataclass(frozen=True)
class DetectedFace:
    """One face: box (x0, y0, x1, y1) in pixels clipped to the image, RetinaFace confidence,
    and landmarks (5, 2) as (x, y) for left eye, right eye, nose, left and right mouth corner
    (left/right as seen in the image). Landmarks are not clipped: alignment needs them as is.
    """

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray


@dataclass
class Detections:
    """Faces kept by `FaceDetector.detect`, plus how many were found but not kept.

    `dropped` counts faces beyond `max_faces` (the smallest ones); they are reported, never
    silently lost, because a user asking why a face was not restored deserves an answer.
    """

    faces: list[DetectedFace]
    dropped: int = 0
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.faces)


class FaceDetector:
    """RetinaFace (facexlib) on RGB images; thresholds follow facexlib's restoration helper."""

    def __init__(
        self,
        weights_dir: str | Path,
        name: DetectorName = "retinaface_resnet50",
        device: str | torch.device = "cpu",
        *,
        threshold: float = 0.97,
        nms_threshold: float = 0.4,
    ) -> None:
        if name not in ("retinaface_resnet50", "retinaface_mobile0.25"):
            raise ValueError(f"Unknown face detector {name!r}.")
        self.name = name
        self.device = torch.device(device)
        self.threshold = threshold
        self.nms_threshold = nms_threshold
        self._net = _load_facexlib_model(name, Path(weights_dir), self.device)
        # facexlib's RetinaFace stores per-call state (resize, scale) on the module itself.
        self._lock = threading.Lock()

    def detect(
        self,
        rgb: np.ndarray,
        *,
        only_center_face: bool = False,
        min_face_size: float = 0.0,
        max_faces: int | None = None,
    ) -> Detections:
        """Detect faces, ordered left to right (then top to bottom) for stable face indices.

        A photo with a shorter side under `DETECT_SHORT_SIDE` is enlarged for detection (as DifFace
        does), one over `DETECT_SHRINK_PIXELS` shrunk to it; boxes and landmarks are always in the
        photo's own pixels. Faces whose eyes are less than `MIN_EYE_DISTANCE` px apart are ignored.
        `min_face_size` is the shorter box side in pixels; smaller faces are ignored (they are too
        small to restore meaningfully).
        `only_center_face` keeps the face whose box centre is nearest the image centre. `max_faces`
        keeps the largest faces and reports the rest in `Detections.dropped` and a warning.
        """
        _check_rgb(rgb)
        h, w = rgb.shape[:2]
        if h * w > DETECT_SHRINK_PIXELS:
            factor = float(np.sqrt(DETECT_SHRINK_PIXELS / (h * w)))
        else:
            factor = max(1.0, min(DETECT_SHORT_SIDE / min(h, w), np.sqrt(DETECT_MAX_PIXELS / (h * w))))
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        if size != (w, h):
            # INTER_AREA to shrink: cv2's Lanczos does not low-pass when downscaling and would alias.
            interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LANCZOS4
            bgr = cv2.resize(bgr, size, interpolation=interpolation)
        with self._lock, torch.inference_mode():
            raw = self._net.detect_faces(bgr, self.threshold, self.nms_threshold)
        raw = np.asarray(raw, dtype=np.float64).reshape(-1, 15)
        # Back to photo pixels: x and y columns (box corners, then landmark pairs) by their own ratio.
        raw[:, [0, 2, 5, 7, 9, 11, 13]] *= w / size[0]
        raw[:, [1, 3, 6, 8, 10, 12, 14]] *= h / size[1]
        faces = []
        for row in raw:
            x0, y0 = float(np.clip(row[0], 0, w)), float(np.clip(row[1], 0, h))
            x1, y1 = float(np.clip(row[2], 0, w)), float(np.clip(row[3], 0, h))
            if min(x1 - x0, y1 - y0) < max(min_face_size, 1e-6):
                continue
            landmarks = row[5:15].reshape(5, 2)
            if np.hypot(*(landmarks[0] - landmarks[1])) < MIN_EYE_DISTANCE:
                continue
            faces.append(
                DetectedFace(
                    box=(x0, y0, x1, y1), score=float(row[4]), landmarks=landmarks.astype(np.float32)
                )
            )
        if only_center_face and faces:
            faces = [min(faces, key=lambda f: _center_distance(f.box, w, h))]
        result = Detections(faces=faces)
        if max_faces is not None and len(faces) > max_faces:
            by_area = sorted(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
            result.faces = by_area[len(faces) - max_faces :]
            result.dropped = len(faces) - max_faces
            result.warnings.append(
                f"{len(faces)} faces were found; only the {max_faces} largest were restored."
            )
        result.faces.sort(key=lambda f: (f.box[0], f.box[1]))
        return result


def _center_distance(box: tuple[float, float, float, float], w: int, h: int) -> float:
    return float(np.hypot((box[0] + box[2]) / 2 - w / 2, (box[1] + box[3]) / 2 - h / 2))


def _check_rgb(rgb: np.ndarray) -> None:
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 HxWx3, got {rgb.dtype} {rgb.shape}")


def _similarity_lstsq(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity src -> dst; the fallback when LMEDS finds no consensus."""
    n = len(src)
    a = np.zeros((2 * n, 4))
    a[0::2] = np.column_stack([src[:, 0], -src[:, 1], np.ones(n), np.zeros(n)])
    a[1::2] = np.column_stack([src[:, 1], src[:, 0], np.zeros(n), np.ones(n)])
    (p, q, tx, ty), *_ = np.linalg.lstsq(a, dst.reshape(-1), rcond=None)
    return np.array([[p, -q, tx], [q, p, ty]])


def face_affine(landmarks: np.ndarray, face_size: int = 512) -> np.ndarray:
    """The 2x3 similarity mapping photo coordinates to the aligned crop (facexlib's method).

    LMEDS, as facexlib uses, for equivalence with skimage's SimilarityTransform on clean points
    while tolerating one bad landmark.
    """
    template = FFHQ_TEMPLATE_512 * (face_size / 512.0)
    src = np.asarray(landmarks, dtype=np.float64)
    affine, _ = cv2.estimateAffinePartial2D(src, template, method=cv2.LMEDS)
    return _similarity_lstsq(src, template) if affine is None else affine


def align(rgb: np.ndarray, faces: list[DetectedFace], face_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Warp each face to the FFHQ template: crops uint8 (N, S, S, 3) and affines (N, 2, 3).

    The affines map photo pixel coordinates to crop coordinates; `paste_faces` inverts them.
    """
    _check_rgb(rgb)
    crops = np.empty((len(faces), face_size, face_size, 3), np.uint8)
    affines = np.empty((len(faces), 2, 3), np.float64)
    for i, face in enumerate(faces):
        affines[i] = face_affine(face.landmarks, face_size)
        crops[i] = _warp(rgb, affines[i], (face_size, face_size), CROP_BORDER_RGB)
    return crops, affines


def _warp(
    src: np.ndarray,
    affine: np.ndarray,
    size: tuple[int, int],
    border_value: tuple[int, int, int] = (0, 0, 0),
) -> np.ndarray:
    """Bilinear warp of `src` by `affine` (src -> output pixels) into a `size` = (w, h) image, low-passed
    first when it shrinks more than 1 / `ANTI_ALIAS_SCALE` times: a bilinear sample reads only 2×2 source
    pixels, so fine detail (hair, fabric, halftone, a restored face's texture) above the output's Nyquist
    rate would fold into false patterns. Used both ways: photo -> crop (`align`) and crop -> photo
    (`paste_faces`, small faces)."""
    warp = partial(
        cv2.warpAffine,
        dsize=size,
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=border_value,
    )
    scale = float(np.sqrt(abs(np.linalg.det(affine[:, :2]))))
    if scale >= ANTI_ALIAS_SCALE:
        return warp(src, affine)
    sigma = (1 / scale - 1) / 2  # scikit-image's anti-aliasing sigma for a 1/scale reduction
    # Blur only the part of `src` the output reads (plus the kernel's reach), not all of a large photo.
    h, w = src.shape[:2]
    pad = int(np.ceil(4 * sigma)) + 2
    ow, oh = size
    corners = np.array([[0, 0, 1], [ow, 0, 1], [0, oh, 1], [ow, oh, 1]]) @ cv2.invertAffineTransform(affine).T
    x0 = int(np.clip(np.floor(corners[:, 0].min()) - pad, 0, w))
    y0 = int(np.clip(np.floor(corners[:, 1].min()) - pad, 0, h))
    x1 = int(np.clip(np.ceil(corners[:, 0].max()) + pad, 0, w))
    y1 = int(np.clip(np.ceil(corners[:, 1].max()) + pad, 0, h))
    if x1 <= x0 or y1 <= y0:
        return warp(src, affine)  # the output lies entirely outside `src`: all border fill
    region = cv2.GaussianBlur(src[y0:y1, x0:x1], (0, 0), sigma)
    shifted = affine.copy()
    shifted[:, 2] += affine[:, :2] @ (x0, y0)
    return warp(region, shifted)


class FaceParser:
    """facexlib's ParseNet, used for paste masks that follow the face outline (not hair/neck).

    Optional: `FaceParser.if_available` returns None when `parsing_parsenet.pth` is not in the
    weights dir, and paste-back then falls back to a feathered crop-shaped mask.
    """

    def __init__(self, weights_dir: str | Path, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self._net = _load_facexlib_model("parsenet", Path(weights_dir), self.device)

    @classmethod
    def if_available(cls, weights_dir: str | Path, device: str | torch.device = "cpu") -> FaceParser | None:
        if not (Path(weights_dir) / FACEXLIB_FILES["parsenet"]).is_file():
            return None
        return cls(weights_dir, device)

    def face_mask(self, face_rgb: np.ndarray) -> np.ndarray:
        """Soft face mask (S, S) float32 in [0, 1] for one aligned face (facexlib's recipe)."""
        size = face_rgb.shape[0]
        x = cv2.resize(face_rgb, (512, 512), interpolation=cv2.INTER_LINEAR)
        t = torch.from_numpy(x).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)
        with torch.inference_mode():
            labels = self._net(t.to(self.device))[0].argmax(dim=1)[0].cpu().numpy()
        mask = _PARSE_FACE_LABELS[labels].astype(np.float32)
        mask = cv2.GaussianBlur(mask, (101, 101), 11)
        mask = cv2.GaussianBlur(mask, (101, 101), 11)
        border = 10  # keep the crop edge (grey fill outside the photo) out of the blend
        mask[:border], mask[-border:], mask[:, :border], mask[:, -border:] = 0, 0, 0, 0
        return cv2.resize(mask, (size, size), interpolation=cv2.INTER_LINEAR)


def upscale_image(img: np.ndarray, factor: float) -> np.ndarray:
    """Resize an RGB (HxWx3) or single-channel (HxW) uint8 image by `factor` with Lanczos.

    The default background upscaler (everything outside the faces); a learned one
    (models/background.py) replaces it when a background model is configured.
    """
    if factor == 1:
        return img.copy()
    h, w = img.shape[:2]
    return resize_to(img, (max(1, round(w * factor)), max(1, round(h * factor))))


def resize_to(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Lanczos-resize an RGB (HxWx3) or single-channel (HxW) uint8 image to `size` = (w, h)."""
    if (img.shape[1], img.shape[0]) == tuple(size):
        return img.copy()
    # np.array, not asarray: a writable copy (torch.from_numpy warns on read-only arrays).
    return np.array(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS))


def upscale_premultiplied(
    rgb: np.ndarray,
    alpha: np.ndarray,
    factor: float,
    upscale: Callable[[np.ndarray, float], np.ndarray] = upscale_image,
) -> np.ndarray:
    """`upscale` (an RGB upscaler such as `upscale_image`) run on colours premultiplied by `alpha`,
    divided after by the alpha resized as `resize_to` does (the alpha the result is written with).

    Resizing straight colours mixes the (often black) colour of invisible pixels into the visible
    edge, a dark halo; premultiplied, invisible pixels weigh nothing. Pillow's RGBa conversions do
    the 8-bit arithmetic, as its own RGBA resize does: colours come back clipped to 255 and coarse
    where the alpha is low, and where the resized alpha is 0 (invisible) the upscaled premultiplied
    value is kept as it is, undivided.
    """
    premultiplied = np.asarray(Image.fromarray(np.dstack([rgb, alpha])).convert("RGBa"))[:, :, :3]
    up = upscale(np.ascontiguousarray(premultiplied), factor)
    size = (up.shape[1], up.shape[0])
    merged = Image.frombuffer("RGBa", size, np.dstack([up, resize_to(alpha, size)]), "raw", "RGBa", 0, 1)
    return np.array(merged.convert("RGB"))


def _inverse_affine(affine: np.ndarray, upscale: float) -> np.ndarray:
    """Crop -> upscaled-photo mapping. With pixel centres at +0.5 (as Pillow's resize uses),
    x_up = s * x + (s - 1) / 2; facexlib adds s / 2 instead, half a pixel off."""
    inv = cv2.invertAffineTransform(affine) * upscale
    inv[:, 2] += 0.5 * (upscale - 1)
    return inv


def _face_roi(inv: np.ndarray, face_size: int, width: int, height: int) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1) of the warped crop in the output, clipped to it.

    Warping and blending only there keeps paste-back cheap on big upscaled group photos
    (29 faces x a full-frame warp each would otherwise dominate the run time).
    """
    s = float(face_size)
    corners = np.array([[0, 0, 1], [s, 0, 1], [0, s, 1], [s, s, 1]]) @ inv.T
    x0 = int(np.clip(np.floor(corners[:, 0].min()) - 2, 0, width))
    y0 = int(np.clip(np.floor(corners[:, 1].min()) - 2, 0, height))
    x1 = int(np.clip(np.ceil(corners[:, 0].max()) + 2, 0, width))
    y1 = int(np.clip(np.ceil(corners[:, 1].max()) + 2, 0, height))
    return x0, y0, x1, y1


def _face_mask(
    inv: np.ndarray, roi: tuple[int, int, int, int], face_size: int, upscale: float, parsed: np.ndarray | None
) -> np.ndarray:
    """Soft blend mask over `roi` for one face; zero outside the (slightly eroded) warped crop.

    With a parsed mask it follows the face outline; otherwise the warped crop square is eroded
    and Gaussian-feathered by ~1/20 of its side (facexlib's recipe), which hides the seam
    without letting the crop's grey border show.
    """
    x0, y0, x1, y1 = roi
    shifted = inv.copy()
    shifted[:, 2] -= (x0, y0)
    size = (x1 - x0, y1 - y0)
    ones = np.ones((face_size, face_size), np.float32)
    valid = cv2.warpAffine(ones, shifted, size, flags=cv2.INTER_LINEAR)
    k = max(1, int(2 * upscale))
    valid = cv2.erode(valid, np.ones((k, k), np.uint8))
    if parsed is not None:
        # No low-pass needed (unlike the face, `_warp`): two σ=11 blurs (`FaceParser.face_mask`) exceed
        # the anti-aliasing σ of any shrink under 32×, and eyes ≥ MIN_EYE_DISTANCE apart shrink ≤ 26×.
        warped = cv2.warpAffine(parsed, shifted, size, flags=cv2.INTER_CUBIC)
        return np.clip(warped, 0, 1) * valid
    edge = int(np.sqrt(valid.sum())) // 20
    if edge == 0:
        return valid
    center = cv2.erode(valid, np.ones((2 * edge, 2 * edge), np.uint8))
    return cv2.GaussianBlur(center, (2 * edge + 1, 2 * edge + 1), 0) * valid


def paste_mask(
    out_size: tuple[int, int],
    affines: np.ndarray,
    upscale: float = 1,
    *,
    face_size: int = 512,
    restored_faces: np.ndarray | None = None,
    parser: FaceParser | None = None,
) -> np.ndarray:
    """The blend weight (H, W) float32 in [0, 1] that `paste_faces` gives the faces, as the
    maximum over faces: pixels where it is 0 keep the (upscaled) background exactly."""
    w_up, h_up = out_size
    union = np.zeros((h_up, w_up), np.float32)
    for i, affine in enumerate(affines):
        inv = _inverse_affine(affine, upscale)
        x0, y0, x1, y1 = roi = _face_roi(inv, face_size, w_up, h_up)
        parsed = None
        if parser is not None and restored_faces is not None:
            parsed = parser.face_mask(restored_faces[i])
        mask = _face_mask(inv, roi, face_size, upscale, parsed)
        np.maximum(union[y0:y1, x0:x1], mask, out=union[y0:y1, x0:x1])
    return union


def paste_faces(
    background_rgb: np.ndarray,
    restored_faces: np.ndarray,
    affines: np.ndarray,
    upscale: float = 1,
    *,
    parser: FaceParser | None = None,
    upscale_background: Callable[[np.ndarray, float], np.ndarray] = upscale_image,
) -> np.ndarray:
    """Blend restored aligned faces (N, S, S, 3) back into the photo, upscaled by `upscale`.

    `background_rgb` is the original-resolution photo (upscaled here with `upscale_background`,
    which must return exactly `upscale` times its size: the face warps assume it);
    `affines` are the ones `align` returned. With a `parser` the masks follow each restored
    face's outline. Faces are blended in order, so where two masks overlap the later face
    wins, as in facexlib. Pixels outside every mask are exactly the upscaled background.
    """
    _check_rgb(background_rgb)
    if len(restored_faces) != len(affines):
        raise ValueError(f"{len(restored_faces)} faces but {len(affines)} affines")
    out = upscale_background(background_rgb, upscale)
    if not out.flags.writeable or np.shares_memory(out, background_rgb):
        out = out.copy()  # blended into in place below; never into the caller's photo
    h_up, w_up = out.shape[:2]
    inverses = [_inverse_affine(affine, upscale) for affine in affines]
    rois = [
        _face_roi(inv, face.shape[0], w_up, h_up) for inv, face in zip(inverses, restored_faces, strict=True)
    ]
    # Blending is in float32 only over each group of overlapping faces, rounded once per group: the
    # same arithmetic, pixel for pixel, as one float32 copy of the whole output (~40 B per output
    # pixel at peak, 1.8 GB for a 12 MP photo upscaled 4×) rounded at the end.
    for group in _overlapping_groups(rois):
        gx0, gy0 = min(rois[i][0] for i in group), min(rois[i][1] for i in group)
        gx1, gy1 = max(rois[i][2] for i in group), max(rois[i][3] for i in group)
        blend = out[gy0:gy1, gx0:gx1].astype(np.float32)
        for i in group:
            face, inv = restored_faces[i], inverses[i]
            x0, y0, x1, y1 = roi = rois[i]
            parsed = parser.face_mask(face) if parser is not None else None
            mask = _face_mask(inv, roi, face.shape[0], upscale, parsed)[:, :, None]
            shifted = inv.copy()
            shifted[:, 2] -= (x0, y0)
            warped = _warp(face, shifted, (x1 - x0, y1 - y0))  # low-passed where it shrinks the face
            region = blend[y0 - gy0 : y1 - gy0, x0 - gx0 : x1 - gx0]
            region[...] = mask * warped.astype(np.float32) + (1 - mask) * region
        out[gy0:gy1, gx0:gx1] = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    return out


def _overlapping_groups(rois: list[tuple[int, int, int, int]]) -> list[list[int]]:
    """Indices of the non-empty `rois` grouped into connected sets of overlapping boxes, each in
    ascending order (faces are blended in order: where two overlap the later one wins). Empty boxes
    (faces entirely outside the photo) are left out."""
    parent = list(range(len(rois)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    kept = [i for i, (x0, y0, x1, y1) in enumerate(rois) if x1 > x0 and y1 > y0]
    for n, i in enumerate(kept):
        for j in kept[:n]:
            a, b = rois[i], rois[j]
            if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in kept:
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def _wavelet_blur(x: np.ndarray, radius: int) -> np.ndarray:
    """3x3 binomial blur with taps `radius` apart, edge-replicated (separable)."""
    for axis in (0, 1):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        p = np.pad(x, pad, mode="edge")
        n = x.shape[axis]
        a = np.take(p, range(0, n), axis=axis)
        b = np.take(p, range(radius, radius + n), axis=axis)
        c = np.take(p, range(2 * radius, 2 * radius + n), axis=axis)
        x = 0.25 * a + 0.5 * b + 0.25 * c
    return x


def _wavelet_split(x: np.ndarray, levels: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(high-frequency detail, low-frequency residual) of a dilated-wavelet decomposition."""
    high = np.zeros_like(x)
    for i in range(levels):
        low = _wavelet_blur(x, 2**i)
        high += x - low
        x = low
    return high, x


def color_correct(
    restored: np.ndarray,
    reference: np.ndarray,
    method: Literal["wavelet", "adain"] = "wavelet",
) -> np.ndarray:
    """Pull a restored face's colours toward its input crop (DiffBIR/StableSR's correction).

    Diffusion priors drift in global colour; the input crop, however degraded, has the right
    colours at low frequencies. "wavelet" keeps the restored image's 5-level wavelet detail and
    takes the low-frequency residual from the reference; "adain" matches per-channel mean and
    standard deviation. Works on one face (H, W, 3) or a batch (N, H, W, 3), uint8 in and out.
    """
    if restored.shape != reference.shape:
        raise ValueError(f"shapes differ: {restored.shape} vs {reference.shape}")
    if restored.ndim == 4:
        return np.stack([color_correct(r, f, method) for r, f in zip(restored, reference, strict=True)])
    x, ref = restored.astype(np.float32), reference.astype(np.float32)
    if method == "wavelet":
        out = _wavelet_split(x)[0] + _wavelet_split(ref)[1]
    elif method == "adain":
        mu_x, sd_x = x.mean(axis=(0, 1)), x.std(axis=(0, 1)) + 1e-5
        mu_r, sd_r = ref.mean(axis=(0, 1)), ref.std(axis=(0, 1))
        out = (x - mu_x) / sd_x * sd_r + mu_r
    else:
        raise ValueError(f"Unknown colour correction {method!r} (wavelet or adain).")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def comparison_image(input_rgb: np.ndarray, output_rgb: np.ndarray) -> np.ndarray:
    """Input and output side by side at the output's height (input Lanczos-resized to match)."""
    _check_rgb(input_rgb)
    _check_rgb(output_rgb)
    h = output_rgb.shape[0]
    if input_rgb.shape[0] != h:
        w = max(1, round(input_rgb.shape[1] * h / input_rgb.shape[0]))
        input_rgb = np.asarray(Image.fromarray(input_rgb).resize((w, h), Image.Resampling.LANCZOS))
    return np.concatenate([input_rgb, output_rgb], axis=1)
