"""Auto fidelity (method.md §7): eta = clamp(std/10, 0, 1) from a robust noise estimate of the input."""

from __future__ import annotations

import dataclasses
import io
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from models.dsst import default_table
from models.faces import DetectedFace, Detections
from models.fidelity import BOX_MAX_SIDE, auto_eta, box_noise_std, robust_noise_std
from models.images import decode_image
from models.pipeline import RestorationPipeline, RestoreOptions
from models.profiles import PROFILES

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
ALIGNED = SHARED / "testdata" / "aligned"
PHOTOS = SHARED / "testdata" / "photos"
WEIGHTS = SHARED / "weights"
needs_faces = pytest.mark.skipif(not ALIGNED.is_dir(), reason=f"shared test faces not found at {ALIGNED}")
needs_detector = pytest.mark.skipif(
    not (PHOTOS.is_dir() and (WEIGHTS / "detection_mobilenet0.25_Final.pth").is_file()),
    reason=f"shared test photos or RetinaFace MobileNet weights not found under {SHARED}",
)


def _face(name: str) -> np.ndarray:
    """A real aligned face, uint8 (512, 512, 3)."""
    return np.array(Image.open(ALIGNED / name).convert("RGB"))


def _add_noise(face: np.ndarray, std_8bit: float, seed: int) -> np.ndarray:
    """Gaussian noise of `std_8bit`, rounded and clipped back to uint8 like a decoded noisy photo."""
    noise = np.random.default_rng(seed).standard_normal(face.shape) * std_8bit
    return np.clip(np.round(face + noise), 0, 255).astype(np.uint8)


def _to_model(face: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) → float64 (3, H, W) in [-1,1], the model convention."""
    return torch.from_numpy(face).permute(2, 0, 1).to(torch.float64) / 127.5 - 1.0


@pytest.mark.parametrize(
    ("std_8bit", "eta"),
    [(0.0, 0.0), (0.25, 0.025), (2.5, 0.25), (5.0, 0.5), (10.0, 1.0), (13.0, 1.0), (-1.0, 0.0)],
)
def test_auto_eta_is_std_over_ten_clamped_to_unit_interval(std_8bit: float, eta: float) -> None:
    assert auto_eta(std_8bit) == pytest.approx(eta, abs=1e-12)
    as_tensor = auto_eta(torch.tensor([std_8bit], dtype=torch.float64))
    assert isinstance(as_tensor, torch.Tensor)
    assert float(as_tensor[0]) == pytest.approx(eta, abs=1e-12)


@needs_faces
@pytest.mark.parametrize("name", ["0143.png", "0444.png"])
def test_robust_noise_std_recovers_noise_added_to_a_real_face(name: str) -> None:
    """Noise of known std on a real face is read back within 10 % (uint8, rounded and clipped) and
    3 % (float, the model convention); face edges and texture are not mistaken for noise."""
    face = _face(name)
    clean = float(robust_noise_std(torch.from_numpy(face))[0])
    assert clean < 1.0
    for k, std_8bit in enumerate((2.0, 5.0, 10.0, 20.0)):
        noisy_uint8 = _add_noise(face, std_8bit, seed=k)
        assert float(robust_noise_std(torch.from_numpy(noisy_uint8))[0]) == pytest.approx(std_8bit, rel=0.1)
        noise = torch.from_numpy(np.random.default_rng(100 + k).standard_normal(face.shape)).permute(2, 0, 1)
        noisy_float = _to_model(face) + noise * (std_8bit / 127.5)
        assert float(robust_noise_std(noisy_float)[0]) == pytest.approx(std_8bit, rel=0.03)


def test_robust_noise_std_is_near_zero_on_a_clean_smooth_image() -> None:
    """A plane plus a broad blob has (almost) no second-difference response: std ≈ 0, and only the
    8-bit rounding remains once it is quantised."""
    n = torch.arange(128, dtype=torch.float64)
    yy, xx = torch.meshgrid(n, n, indexing="ij")
    blob = torch.exp(-((yy - 60) ** 2 + (xx - 70) ** 2) / (2 * 30.0**2))
    smooth = (0.3 * (xx / 127) - 0.2 * (yy / 127) + 0.5 * blob - 0.1).expand(3, -1, -1)
    assert float(robust_noise_std(smooth)[0]) < 0.05
    quantised = torch.round((smooth + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
    assert float(robust_noise_std(quantised)[0]) < 0.5
    noisy = smooth + torch.randn(smooth.shape, generator=torch.Generator().manual_seed(0)) * (3 / 127.5)
    assert float(robust_noise_std(noisy)[0]) == pytest.approx(3.0, rel=0.05)


def test_robust_noise_std_resolves_noise_below_one_8bit_level() -> None:
    """On 8-bit input the high-pass responses are integers; the estimate still varies continuously
    with the noise (a median of them would step by 1.4826/6 ≈ 0.25 and never read below that).
    Rounding adds its own noise of std 1/√12, so the truth is √(s² + 1/12)."""
    n = torch.arange(128, dtype=torch.float64)
    yy, xx = torch.meshgrid(n, n, indexing="ij")
    # Irrational-looking slopes: rounding a plane with slope 1/2 would leave a regular pattern.
    smooth = (60 + 0.37 * xx + 0.23 * yy)[..., None].expand(-1, -1, 3)
    generator = torch.Generator().manual_seed(0)
    for s in (0.35, 0.5, 0.8, 1.2, 2.0):
        noisy = smooth + torch.randn(smooth.shape, generator=generator, dtype=torch.float64) * s
        quantised = torch.round(noisy).clamp(0, 255).to(torch.uint8)
        truth = (s**2 + 1 / 12) ** 0.5
        assert float(robust_noise_std(quantised)[0]) == pytest.approx(truth, rel=0.06), s


def test_box_noise_std_reads_whole_pixels_of_the_box() -> None:
    """The box is widened to whole pixels, kept inside the photo and grown to the 3×3 the mask needs."""
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[5:15, 10:20] = np.random.default_rng(0).integers(0, 256, (10, 10, 3), dtype=np.uint8)
    inside = float(robust_noise_std(torch.from_numpy(rgb[5:15, 10:20]))[0])
    assert box_noise_std(rgb, (10.4, 5.2, 19.6, 14.9)) == pytest.approx(inside)
    assert box_noise_std(rgb, (-5.0, -5.0, 8.0, 4.0)) == 0.0  # clipped to the flat corner
    assert box_noise_std(rgb, (29.5, 19.5, 30.0, 20.0)) == 0.0  # grown to 3×3 inside the photo
    assert box_noise_std(rgb[:2, :2], (0.0, 0.0, 2.0, 2.0)) == 0.0  # too small to measure: no error


def test_box_noise_std_measures_a_large_box_on_its_centre() -> None:
    """A close-up portrait's box can be 4000² px: only its central BOX_MAX_SIDE² pixels are read."""
    side = BOX_MAX_SIDE + 200
    rgb = np.zeros((side, side, 3), np.uint8)
    rgb[100:-100, 100:-100] = np.random.default_rng(0).integers(0, 256, (BOX_MAX_SIDE, BOX_MAX_SIDE, 3))
    centre = float(robust_noise_std(torch.from_numpy(rgb[100:-100, 100:-100]))[0])
    assert box_noise_std(rgb, (0.0, 0.0, float(side), float(side))) == pytest.approx(centre)


def _noisy(rgb: np.ndarray, std_8bit: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(rgb.shape) * std_8bit
    return np.clip(np.round(rgb + noise), 0, 255).astype(np.uint8)


@needs_faces
def test_an_enlarged_aligned_input_is_measured_at_its_own_size() -> None:
    """A 128 px aligned face is enlarged 4× to 512 before the networks; its noise is read on the
    128 px input (the enlarged crop has almost none left: interpolation smooths it away)."""
    pipe = RestorationPipeline.from_pretrained("tiny", weights_dir=WEIGHTS)
    small = np.asarray(Image.fromarray(_face("0143.png")).resize((128, 128), Image.Resampling.LANCZOS))
    for k, std_8bit in enumerate((0.0, 5.0, 15.0, 25.0)):
        noisy = _noisy(small, std_8bit, seed=k)
        options = RestoreOptions(aligned=True)
        crops, affines, found = pipe._detect_and_align(noisy, options, [])
        noise = pipe._face_noise(noisy, crops, affines, found, options)
        assert noise is not None
        if std_8bit == 0:
            assert noise[0] < 0.5
        else:
            assert noise[0] == pytest.approx(std_8bit, rel=0.05)
            assert float(robust_noise_std(torch.from_numpy(crops))[0]) < 0.1 * std_8bit


@needs_detector
def test_small_faces_of_a_photo_are_measured_on_their_own_pixels() -> None:
    """00.jpg's four faces are 32-43 px wide and enlarged about 12× by alignment. Noise added to the
    photo is read back on each face's box: within 10 % plus the face's own clean reading (the photo's
    JPEG artefacts and grain, under 3)."""
    pipe = RestorationPipeline.from_pretrained("tiny", weights_dir=WEIGHTS)
    photo = decode_image((PHOTOS / "00.jpg").read_bytes(), max_pixels=10_000_000).rgb

    def noise_of(rgb: np.ndarray) -> list[float]:
        crops, affines, found = pipe._detect_and_align(rgb, RestoreOptions(), [])
        noise = pipe._face_noise(rgb, crops, affines, found, RestoreOptions())
        assert noise is not None
        return noise

    clean = noise_of(photo)
    assert len(clean) == 4 and max(clean) < 3.0
    for k, std_8bit in enumerate((5.0, 15.0, 25.0)):
        noise = noise_of(_noisy(photo, std_8bit, seed=k))
        assert len(noise) == 4
        for measured, own in zip(noise, clean, strict=True):
            assert 0.9 * std_8bit <= measured <= 1.1 * std_8bit + own


@needs_detector
def test_restore_photo_auto_eta_follows_the_photos_noise() -> None:
    """End to end: noise of std 5 in a photo of small faces gives each face eta ≈ 0.5 (clamp(std/10));
    the same for a small aligned input; a user fidelity still overrides it."""
    tiny = RestorationPipeline.from_pretrained("tiny", weights_dir=WEIGHTS)
    table = dataclasses.replace(default_table(), start_indices=(1, 1, 1))
    pipe = RestorationPipeline(PROFILES["tiny"], tiny.unet, tiny.restorer, dsst=table, weights_dir=WEIGHTS)

    def etas(rgb: np.ndarray, **options: Any) -> list[float]:
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG")
        result = pipe.restore_photo(buf.getvalue(), RestoreOptions(seed=0, **options))
        return [r.facts.eta for r in result.face_reports]

    photo = decode_image((PHOTOS / "00.jpg").read_bytes(), max_pixels=10_000_000).rgb
    assert all(0.45 <= eta <= 0.8 for eta in etas(_noisy(photo, 5.0, seed=0)))
    small = np.asarray(Image.fromarray(_face("0143.png")).resize((128, 128), Image.Resampling.LANCZOS))
    assert etas(_noisy(small, 5.0, seed=0), aligned=True) == [pytest.approx(0.5, abs=0.03)]
    assert etas(small, aligned=True) == [pytest.approx(0.0, abs=0.05)]
    assert etas(_noisy(small, 5.0, seed=0), aligned=True, fidelity=0.2) == [0.2]


def test_face_noise_is_measured_only_where_auto_fidelity_uses_it() -> None:
    """A given fidelity or the baseline (which never reads it) skip the measurement."""
    pipe = RestorationPipeline.from_pretrained("tiny", weights_dir=WEIGHTS)
    rgb = np.zeros((64, 128, 3), np.uint8)  # a noisy face in a flat photo
    rgb[:, :64] = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    box = (0.0, 0.0, 64.0, 64.0)
    found = Detections([DetectedFace(box, 1.0, np.empty((0, 2), np.float32))])
    crops = np.zeros((1, 512, 512, 3), np.uint8)
    enlarged = np.array([[[8.0, 0.0, 3.5], [0.0, 8.0, 3.5]]])  # the 64 px box onto the 512 px crop
    noise = partial(pipe._face_noise, rgb, crops, enlarged, found)
    measured = noise(RestoreOptions())
    # Auto fidelity: an enlarged face measured on its source pixels, in its box.
    assert measured == [box_noise_std(rgb, box)]
    # Uniform noise over 0..255 (std ≈ 74): the box's pixels, not the whole photo's (half of it flat).
    assert measured[0] > 50 and measured[0] != pytest.approx(box_noise_std(rgb, (0.0, 0.0, 128.0, 64.0)))
    assert noise(RestoreOptions(fidelity=0.3)) is None
    assert noise(RestoreOptions(mode="difface")) is None


def test_robust_noise_std_layouts_and_batches_agree() -> None:
    """uint8 channels-last and float [-1,1] channels-first read the same image identically; a batch
    gives one value per image, in order."""
    generator = torch.Generator().manual_seed(1)
    smooth = torch.linspace(0, 255, 64, dtype=torch.float64).expand(64, 64)[..., None].expand(-1, -1, 3)
    images = [
        torch.round(smooth + torch.randn(64, 64, 3, generator=generator, dtype=torch.float64) * s)
        .clamp(0, 255)
        .to(torch.uint8)
        for s in (8.0, 0.0, 3.0)
    ]
    batch_uint8 = torch.stack(images)
    per_image = robust_noise_std(batch_uint8)
    assert per_image.shape == (3,) and per_image.dtype == torch.float64
    assert float(per_image[0]) > float(per_image[2]) > float(per_image[1])
    torch.testing.assert_close(robust_noise_std(images[2]), per_image[2:3])
    batch_float = batch_uint8.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
    torch.testing.assert_close(robust_noise_std(batch_float), per_image, rtol=0, atol=1e-3)
    torch.testing.assert_close(robust_noise_std(batch_float[0]), per_image[:1], rtol=0, atol=1e-3)


@needs_faces
def test_pipeline_auto_eta_follows_the_rule_and_a_user_value_overrides_it() -> None:
    """In the pipeline (fallback DGSA), auto fidelity gives each face clamp(std/10, 0, 1) of its own
    input's noise std; a user fidelity replaces it for every face. Starts of 1 step keep it fast."""
    tiny = RestorationPipeline.from_pretrained("tiny", weights_dir=WEIGHTS)
    table = dataclasses.replace(default_table(), start_indices=(1, 1, 1))
    pipe = RestorationPipeline(PROFILES["tiny"], tiny.unet, tiny.restorer, dsst=table, weights_dir=WEIGHTS)
    clean = _face("0143.png")
    faces = np.stack([clean, _add_noise(clean, 6.0, seed=0)])
    expected = [float(auto_eta(float(s))) for s in robust_noise_std(torch.from_numpy(faces))]
    assert expected[0] < 0.1 and 0.5 < expected[1] < 0.7

    auto = pipe.restore_faces(faces, seed=0)
    assert [f.dgsa for f in auto.facts] == ["fallback", "fallback"]
    assert [f.eta for f in auto.facts] == pytest.approx(expected, abs=1e-6)

    chosen = pipe.restore_faces(faces[1:], seed=0, fidelity=0.3)
    assert chosen.facts[0].eta == 0.3
    with pytest.raises(ValueError):
        pipe.restore_faces(faces[1:], fidelity=1.5)
