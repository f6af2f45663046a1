"""models.degradations: seeded and reproducible, parameters within their ranges, heavier = worse."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from models import degradations as d
from models.blur import gaussian_blur
from tests.conftest import TESTDATA

ALIGNED = TESTDATA / "aligned"


@pytest.fixture(scope="module")
def face() -> np.ndarray:
    if not ALIGNED.is_dir():
        pytest.skip(f"test photos not found at {ALIGNED}")
    return np.asarray(Image.open(ALIGNED / "0143.png").convert("RGB"))


@pytest.fixture(scope="module")
def small_face(face: np.ndarray) -> np.ndarray:
    """A 128 px copy keeps the many-draw tests fast; the degradation is size-agnostic."""
    return np.asarray(Image.fromarray(face).resize((128, 128), Image.Resampling.BICUBIC))


def test_same_seed_same_output_different_seed_different(small_face: np.ndarray) -> None:
    a, pa = d.random_degrade(small_face, 7)
    b, pb = d.random_degrade(small_face, 7)
    c, pc = d.random_degrade(small_face, 8)
    assert pa == pb and np.array_equal(a, b)
    assert pc != pa and not np.array_equal(a, c)


def test_noise_is_seeded_separately_from_params(small_face: np.ndarray) -> None:
    params = d.DegradationParams("iso", 1.0, 1.0, 0.0, 1.0, 10.0, 95)
    assert np.array_equal(d.degrade(small_face, params, 1), d.degrade(small_face, params, 1))
    assert not np.array_equal(d.degrade(small_face, params, 1), d.degrade(small_face, params, 2))


def test_output_shape_and_dtype(face: np.ndarray) -> None:
    out, _ = d.random_degrade(face, 0)
    assert out.shape == face.shape and out.dtype == np.uint8
    rect = np.zeros((40, 64, 3), np.uint8)
    params = d.DegradationParams("aniso", 2.0, 0.5, 0.3, 32.0, 20.0, 30)  # down to 1×2 px and back
    assert d.degrade(rect, params, 0).shape == rect.shape


def test_rejects_non_uint8_rgb() -> None:
    params = d.DegradationParams("iso", 1.0, 1.0, 0.0, 1.0, 0.0, 90)
    with pytest.raises(ValueError):
        d.degrade(np.zeros((8, 8, 3), np.float32), params, 0)
    with pytest.raises(ValueError):
        d.degrade(np.zeros((8, 8), np.uint8), params, 0)


@pytest.mark.parametrize("ranges", [d.DIFFACE_RANGES, *d.SEVERITY_LEVELS.values()])
def test_params_within_ranges(ranges: d.DegradationRanges) -> None:
    rng = np.random.default_rng(0)
    draws = [d.sample_params(rng, ranges) for _ in range(2000)]
    for p in draws:
        assert ranges.blur_sigma[0] <= p.sigma_x <= ranges.blur_sigma[1]
        assert ranges.blur_sigma[0] <= p.sigma_y <= ranges.blur_sigma[1]
        assert ranges.blur_sigma[0] <= p.blur_sigma <= ranges.blur_sigma[1]
        assert ranges.downsample[0] <= p.downsample <= ranges.downsample[1]
        assert ranges.noise[0] <= p.noise <= ranges.noise[1]
        assert ranges.jpeg_quality[0] <= p.jpeg_quality <= ranges.jpeg_quality[1]
        assert isinstance(p.jpeg_quality, int)
        assert -math.pi <= p.theta <= math.pi
        assert p.kernel_type in ranges.kernel_types
        if p.kernel_type == "iso":
            assert p.sigma_x == p.sigma_y
    kinds = {p.kernel_type for p in draws}
    assert kinds == set(ranges.kernel_types)  # both kernel types occur (p = ½ each)


def test_difface_ranges_are_difface_training_settings() -> None:
    r = d.DIFFACE_RANGES
    assert (r.blur_sigma, r.downsample, r.noise, r.jpeg_quality) == (
        (0.1, 15.0),
        (0.8, 32.0),
        (0.0, 20.0),
        (30, 100),
    )
    assert (r.kernel_size, r.kernel_types, r.kernel_probs, r.gray_prob) == (
        41,
        ("iso", "aniso"),
        (0.5, 0.5),
        0.01,
    )


def test_severity_levels_are_slices_of_the_full_ranges() -> None:
    full = d.DIFFACE_RANGES
    levels = list(d.SEVERITY_LEVELS.values())
    for r in levels:
        for name in ("blur_sigma", "downsample", "noise", "jpeg_quality"):
            lo, hi = getattr(r, name)
            assert getattr(full, name)[0] <= lo <= hi <= getattr(full, name)[1]
    for a, b in itertools.pairwise(levels):  # each level is heavier in every factor
        assert a.blur_sigma[1] <= b.blur_sigma[0] and a.downsample[1] <= b.downsample[0]
        assert a.noise[1] <= b.noise[0] and a.jpeg_quality[0] >= b.jpeg_quality[1]


def test_invalid_ranges_rejected() -> None:
    with pytest.raises(ValueError):
        d.DegradationRanges(blur_sigma=(2.0, 1.0))
    with pytest.raises(ValueError):
        d.DegradationRanges(jpeg_quality=(0, 100))
    with pytest.raises(ValueError):
        d.DegradationRanges(kernel_size=40)


def test_kernel_is_normalised_and_rotates() -> None:
    k = d.gaussian_kernel(3.0, 1.0, 0.0, 41)
    assert k.shape == (41, 41) and math.isclose(k.sum(), 1.0)
    assert np.allclose(d.gaussian_kernel(3.0, 1.0, math.pi / 2, 41), k.T)
    assert np.allclose(d.gaussian_kernel(2.0, 2.0, 0.0, 41), d.gaussian_kernel(2.0, 2.0, 1.0, 41))


@pytest.mark.parametrize(
    "factor, values",
    [
        ("sigma", [0.5, 2.0, 5.0, 12.0]),
        ("downsample", [1.0, 2.0, 4.0, 16.0]),
        ("noise", [0.0, 5.0, 10.0, 20.0]),
        ("jpeg_quality", [100, 70, 45, 30]),
    ],
)
def test_each_factor_heavier_degrades_more(face: np.ndarray, factor: str, values: list[float]) -> None:
    base = d.DegradationParams("iso", 0.1, 0.1, 0.0, 1.0, 0.0, 100)
    scores = []
    for v in values:
        if factor == "sigma":
            p = d.with_params(base, sigma_x=v, sigma_y=v)
        else:
            p = d.with_params(base, **{factor: v})
        scores.append(d.psnr(d.degrade(face, p, 0), face))
    assert all(a > b for a, b in itertools.pairwise(scores)), scores


def test_severity_set_psnr_decreases_mild_to_extreme(face: np.ndarray) -> None:
    faces = d.severity_set([face], seed=3, per_image=2)
    assert [f.level for f in faces] == [lvl for lvl in d.SEVERITY_LEVELS for _ in range(2)]
    mean = {
        lvl: np.mean([d.psnr(f.image, face) for f in faces if f.level == lvl]) for lvl in d.SEVERITY_LEVELS
    }
    values = list(mean.values())
    assert all(a > b for a, b in itertools.pairwise(values)), mean


def test_severity_set_is_reproducible_and_order_independent(small_face: np.ndarray) -> None:
    other = small_face[::-1].copy()
    a = d.severity_set([small_face, other], seed=1)
    b = d.severity_set([small_face, other], seed=1)
    assert all(x.params == y.params and np.array_equal(x.image, y.image) for x, y in zip(a, b, strict=True))
    # Face 0's draw does not depend on which other images are in the set.
    alone = d.severity_set([small_face], seed=1)
    first = [f for f in a if f.source == 0]
    assert [f.params for f in alone] == [f.params for f in first]


def test_severity_set_face_does_not_depend_on_the_other_levels(small_face: np.ndarray) -> None:
    """A level's draws are seeded by its name, not its position: dropping or reordering the other levels
    leaves them as they were."""
    full = d.severity_set([small_face], seed=1)
    severe = next(f for f in full if f.level == "severe")
    alone = d.severity_set([small_face], seed=1, levels={"severe": d.SEVERITY_LEVELS["severe"]})
    assert [(f.level, f.params) for f in alone] == [("severe", severe.params)]
    assert np.array_equal(alone[0].image, severe.image)
    reversed_levels = d.severity_set([small_face], seed=1, levels=dict(reversed(d.SEVERITY_LEVELS.items())))
    assert [f.params for f in reversed_levels] == [f.params for f in reversed(full)]


def test_severity_set_face_does_not_depend_on_earlier_images(small_face: np.ndarray) -> None:
    """An image's draws are seeded by its pixels, not its position: dropping an image before it (not
    only the last one) or reordering the images leaves them as they were."""
    second, third = small_face[::-1].copy(), small_face[:, ::-1].copy()
    full = d.severity_set([small_face, second, third], seed=1)
    third_faces = [f for f in full if f.source == 2]
    without_second = d.severity_set([small_face, third], seed=1)
    assert [f.params for f in without_second if f.source == 1] == [f.params for f in third_faces]
    assert all(
        np.array_equal(f.image, g.image)
        for f, g in zip([f for f in without_second if f.source == 1], third_faces, strict=True)
    )
    swapped = d.severity_set([third, small_face], seed=1)
    assert [f.params for f in swapped if f.source == 0] == [f.params for f in third_faces]
    # Different images and levels still get different draws.
    assert len({f.params for f in full}) == len(full)


def test_blur_refuses_an_image_its_kernel_reaches_past_with_a_clear_error() -> None:
    """Reflect padding mirrors the image once: a 41 px kernel needs 21 px a side (torch would raise an
    opaque RuntimeError on the 16 px image)."""
    params = d.DegradationParams("iso", 2.0, 2.0, 0.0, 1.0, 0.0, 90)
    for shape in ((16, 16, 3), (20, 64, 3)):
        with pytest.raises(ValueError, match="the 41×41 blur kernel needs at least 21 px a side"):
            d.blur_only(np.zeros(shape, np.uint8), params)
        with pytest.raises(ValueError, match="needs at least 21 px a side"):
            d.degrade(np.zeros(shape, np.uint8), params, 0)
    assert d.blur_only(np.full((21, 21, 3), 7, np.uint8), params).tolist() == np.full((21, 21, 3), 7).tolist()


def test_gray_output_has_equal_channels(small_face: np.ndarray) -> None:
    p = d.DegradationParams("iso", 1.0, 1.0, 0.0, 1.0, 0.0, 90, gray=True)
    out = d.degrade(small_face, p, 0)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_blur_only_is_the_kernel_step_without_jpeg(face: np.ndarray) -> None:
    """blur_only is degrade's first step alone: the Gaussian blur (models.blur's FFT blur agrees away
    from the borders, where the two paddings differ), and no JPEG, which degrade adds even at quality
    100 with nothing else (and whose block error the blur estimator reads as detail)."""
    params = d.DegradationParams("iso", 3.0, 3.0, 0.0, 1.0, 0.0, 100)
    out = d.blur_only(face, params)
    assert out.dtype == np.uint8 and out.shape == face.shape
    x = torch.from_numpy(face.copy()).permute(2, 0, 1)[None].double()
    ref = gaussian_blur(x, 3.0)[0].permute(1, 2, 0).round().clamp(0, 255).numpy()
    inner = np.s_[24:-24, 24:-24]
    assert np.abs(out[inner].astype(float) - ref[inner]).max() <= 1
    assert not np.array_equal(out, d.degrade(face, params, 0))
    with pytest.raises(ValueError, match="uint8"):
        d.blur_only(face.astype(np.float32), params)


def test_psnr_identical_is_inf(small_face: np.ndarray) -> None:
    assert d.psnr(small_face, small_face) == math.inf


def test_stable_key_tells_apart_parts_split_differently() -> None:
    """Parts are length-prefixed: ("ab", "c") and ("a", "bc") are different names."""
    assert d.stable_key(b"ab", b"c") != d.stable_key(b"a", b"bc")
    assert d.stable_key(b"ab", b"c") == d.stable_key(b"ab", b"c")
