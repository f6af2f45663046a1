"""RestorationPipeline end to end on real faces and photos, with the tiny profile (random toy weights).

These check the plumbing and the method's decisions (levels, start steps, NFE, eta, seeds, stages,
photo handling); restoration quality needs the real weights and is not asserted here.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from models import faces as face_ops
from models import pipeline as pipeline_mod
from models import trained
from models.dblm import DBLMConfig, DBLMNet
from models.dgsa import DGSANet
from models.dsst import default_table
from models.errors import Cancelled, InvalidImageError, NoFaceError, OutputTooLargeError, PipelineError
from models.fidelity import auto_eta, box_noise_std
from models.pipeline import STAGES, RestorationPipeline, RestoreOptions
from models.profiles import PROFILES
from models.weights import MissingWeightsError
from tests.conftest import assert_same_up_to_rounding

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
ALIGNED = SHARED / "testdata" / "aligned"
PHOTOS = SHARED / "testdata" / "photos"
WEIGHTS = SHARED / "weights"

pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared test data not found at {SHARED}")


def _faces(*names: str) -> np.ndarray:
    return np.stack([np.asarray(Image.open(ALIGNED / n).convert("RGB")) for n in names])


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


needs_detector = pytest.mark.skipif(
    not (WEIGHTS / "detection_mobilenet0.25_Final.pth").is_file(), reason="detector weights absent"
)


@pytest.fixture(scope="module")
def pipe() -> RestorationPipeline:
    return RestorationPipeline.from_pretrained("tiny", weights_dir=WEIGHTS, max_batch=4)


#: A DSST table with the default's levels but starts of a few steps: photo-level tests check
#: detection, paste-back and encoding, which do not depend on how long the sampler runs.
FAST_STARTS = (2, 3, 4)


@pytest.fixture(scope="module")
def fast(pipe: RestorationPipeline) -> RestorationPipeline:
    """The tiny networks with FAST_STARTS (shared with `pipe`, so nothing is built twice)."""
    return _fast_pipeline(pipe)


def _fast_pipeline(pipe: RestorationPipeline, **kwargs: object) -> RestorationPipeline:
    table = dataclasses.replace(default_table(), start_indices=FAST_STARTS)
    kwargs.setdefault("weights_dir", WEIGHTS)
    return RestorationPipeline(PROFILES["tiny"], pipe.unet, pipe.restorer, dsst=table, max_batch=8, **kwargs)


def _decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_tiny_profile_is_flagged_not_real(pipe: RestorationPipeline) -> None:
    assert pipe.info["real"] is False
    assert pipe.info["profile"] == "tiny"
    assert pipe.info["dblm"] == "fallback" and pipe.info["dgsa"] == "fallback"


def test_restore_faces_shapes_facts_and_nfe(fast: RestorationPipeline) -> None:
    pipe = fast
    faces = _faces("0143.png", "0240.png", "0342.png")
    result = pipe.restore_faces(faces, seed=3)
    assert result.faces.shape == faces.shape and result.faces.dtype == np.uint8
    assert len(result.facts) == 3
    for fact in result.facts:
        assert fact.blur_sigma in pipe.dsst.sigmas
        # DSST: the start step follows from the chosen level; one UNet call per respaced step.
        assert fact.start_step == pipe.dsst.start_index_for(fact.blur_sigma)
        assert fact.nfe == fact.start_step
        assert fact.start_step <= PROFILES["tiny"].method.baseline_start_index
        assert 0.0 <= fact.eta <= 1.0
        assert (fact.dblm, fact.dgsa) == ("fallback", "fallback")
    assert {"dblm", "sample"} <= set(result.timings)
    # The output is not the input: the sampler ran.
    assert np.abs(result.faces.astype(int) - faces.astype(int)).mean() > 1


def test_seed_makes_runs_repeatable(fast: RestorationPipeline) -> None:
    faces = _faces("0345.png")
    a = fast.restore_faces(faces, seed=7, fidelity=1.0)
    b = fast.restore_faces(faces, seed=7, fidelity=1.0)
    c = fast.restore_faces(faces, seed=8, fidelity=1.0)
    assert np.array_equal(a.faces, b.faces)
    assert not np.array_equal(a.faces, c.faces)
    assert a.seed == 7


def test_faces_of_a_batch_do_not_depend_on_each_other(pipe: RestorationPipeline) -> None:
    """Face k of a call seeded s is what restoring it alone with seed s + k gives, although the faces
    start at different steps with their own auto eta and run as one batched sampler loop."""
    # An identity restorer keeps each input's blur, so the blur levels (and starts) differ.
    table = dataclasses.replace(default_table(), start_indices=FAST_STARTS)
    sharp_r = RestorationPipeline(
        PROFILES["tiny"], pipe.unet, torch.nn.Identity(), dsst=table, max_batch=8, weights_dir=WEIGHTS
    )
    face = Image.open(ALIGNED / "0478.png").convert("RGB")
    faces = np.stack([np.asarray(face.filter(ImageFilter.GaussianBlur(r))) for r in (0, 8, 2)])
    together = sharp_r.restore_faces(faces, seed=11)
    assert len({f.start_step for f in together.facts}) > 1, together.facts
    for k in range(len(faces)):
        alone = sharp_r.restore_faces(faces[k : k + 1], seed=11 + k)
        assert (alone.facts[0].start_step, alone.facts[0].eta) == (
            together.facts[k].start_step,
            together.facts[k].eta,
        )
        assert_same_up_to_rounding(alone.faces[0], together.faces[k])  # batched vs single kernels


def test_baseline_mode_uses_difface_fixed_start(pipe: RestorationPipeline) -> None:
    faces = _faces("0368.png")  # one face: 100 steps each call is the slowest thing in this file
    default = pipe.restore_faces(faces, mode="difface", seed=1)
    assert [f.start_step for f in default.facts] == [100]
    assert [f.nfe for f in default.facts] == [100]
    assert [f.eta for f in default.facts] == [0.5]  # DifFace's default eta for "auto"
    assert {f.dblm for f in default.facts} == {"none"}
    assert [f.blur_sigma for f in default.facts] == [0.0]  # the baseline picks no blur level
    chosen = pipe.restore_faces(faces[:1], mode="difface", fidelity=0.2, seed=1)
    assert chosen.facts[0].eta == 0.2


def test_user_fidelity_overrides_auto_eta(fast: RestorationPipeline) -> None:
    result = fast.restore_faces(_faces("0444.png"), fidelity=0.3, seed=0)
    assert result.facts[0].eta == 0.3


def test_progress_reports_every_step_and_cancel_stops(fast: RestorationPipeline) -> None:
    faces = _faces("0478.png", "0500.png")
    seen: list[tuple[str, int, int]] = []
    result = fast.restore_faces(faces, seed=0, progress=lambda *a: seen.append(a))
    steps = [s[1:] for s in seen if s[0] == "sample"]
    # All faces run as one batched loop as long as the latest start: one report per loop step.
    longest = max(f.nfe for f in result.facts)
    assert [step for step, _ in steps] == list(range(1, longest + 1))
    assert {total for _, total in steps} == {longest}

    calls = {"n": 0}

    def cancel_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(Cancelled):
        fast.restore_faces(faces, seed=0, should_cancel=cancel_after_two)


def test_a_face_blurrier_than_every_level_is_guided_with_its_own_blur(
    fast: RestorationPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fallback DBLM, σ̂ of R(y) above the heaviest level σ_K: R(y) ≈ G_σ̂ * x is the estimate, and the
    guidance used G_σK, pulling G_σK * x towards a face blurred by σ̂ (over-smoothing). It uses G_σ̂,
    from the heaviest level's start, and reports σ̂; a face within the levels keeps its level."""
    heaviest = max(fast.dsst.sigmas)
    monkeypatch.setattr(
        pipeline_mod, "estimate_blur_sigma", lambda images, spectrum: torch.tensor([heaviest + 1.5, 0.5])
    )
    kernels: list[list[float]] = []
    real_guidance = pipeline_mod.GaussianGuidance

    def recording(estimate: torch.Tensor, sigma: torch.Tensor, *args: object, **kwargs: object) -> object:
        kernels.append(sigma.tolist())
        return real_guidance(estimate, sigma, *args, **kwargs)

    monkeypatch.setattr(pipeline_mod, "GaussianGuidance", recording)
    result = fast.restore_faces(_faces("0143.png", "0240.png"), seed=0)
    blurry, sharp = result.facts
    assert blurry.blur_sigma == pytest.approx(heaviest + 1.5) and sharp.blur_sigma == min(fast.dsst.sigmas)
    assert blurry.start_step == fast.dsst.start_indices[-1] == blurry.nfe
    scale = fast.profile.image_size / 512
    assert kernels == [pytest.approx([(heaviest + 1.5) * scale, min(fast.dsst.sigmas) * scale])]


def test_trained_networks_path_is_reported(pipe: RestorationPipeline) -> None:
    profile = PROFILES["tiny"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dblm = DBLMNet(DBLMConfig(backbone=profile.swinir, sigmas=profile.method.sigmas))
        dgsa = DGSANet(base_channels=8)
    table = dataclasses.replace(default_table(), start_indices=FAST_STARTS)
    trained = RestorationPipeline(
        profile, pipe.unet, pipe.restorer, dsst=table, dblm=dblm, dgsa=dgsa, weights_dir=WEIGHTS
    )
    result = trained.restore_faces(_faces("0599.png"), seed=0)
    fact = result.facts[0]
    assert (fact.dblm, fact.dgsa) == ("trained", "trained")
    assert fact.blur_sigma in profile.method.sigmas and fact.nfe == fact.start_step
    assert trained.info["dblm"] == "trained"


def test_restore_faces_of_no_faces_is_an_empty_result(fast: RestorationPipeline) -> None:
    result = fast.restore_faces(np.zeros((0, 512, 512, 3), np.uint8), seed=4)
    assert result.faces.shape == (0, 512, 512, 3) and result.faces.dtype == np.uint8
    assert result.facts == [] and result.seed == 4


class _Counting(torch.nn.Module):
    """A module that counts its calls (of the restorer R here)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


def test_the_restorer_runs_only_where_its_output_is_read(pipe: RestorationPipeline) -> None:
    """R(y) (~181 GFLOP a face) is read by the fallback DBLM and by a trained DGSA, not by a trained DBLM
    with the fallback DGSA: there it never runs, and what it would give changes nothing."""
    profile = PROFILES["tiny"]
    dblm = _tiny_dblm(profile.method.sigmas)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dgsa = DGSANet(base_channels=8)
    table = dataclasses.replace(default_table(), start_indices=FAST_STARTS)
    faces = _faces("0599.png", "0143.png")

    def run(restorer: torch.nn.Module, **parts: torch.nn.Module) -> np.ndarray:
        restoring = RestorationPipeline(
            profile, pipe.unet, restorer, dsst=table, max_batch=1, weights_dir=WEIGHTS, **parts
        )
        return restoring.restore_faces(faces, seed=0).faces

    counting = _Counting(pipe.restorer)
    unread = run(counting, dblm=dblm)
    assert counting.calls == 0
    np.testing.assert_array_equal(unread, run(torch.nn.Identity(), dblm=dblm))
    for parts in ({}, {"dgsa": dgsa}, {"dblm": dblm, "dgsa": dgsa}):
        counting.calls = 0
        run(counting, **parts)
        assert counting.calls == len(faces), parts  # once per chunk of max_batch 1, however often read


def test_cancel_is_checked_between_dblm_chunks(
    pipe: RestorationPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job canceled while its first chunk goes through DBLM stops there, not after every chunk."""
    table = dataclasses.replace(default_table(), start_indices=FAST_STARTS)
    chunked = RestorationPipeline(
        PROFILES["tiny"], pipe.unet, pipe.restorer, dsst=table, max_batch=1, weights_dir=WEIGHTS
    )
    guided: list[int] = []
    guide = chunked._guide
    monkeypatch.setattr(chunked, "_guide", lambda y, *args: guided.append(len(y)) or guide(y, *args))
    with pytest.raises(Cancelled, match="before sampling"):
        chunked.restore_faces(_faces("0143.png", "0240.png", "0342.png"), seed=0, should_cancel=lambda: True)
    assert guided == [1]


@pytest.mark.parametrize("during", ["decode", "detect", "dblm", "sample", "paste"])
def test_a_cancel_stops_the_photo_at_the_end_of_the_stage_it_came_in(
    fast: RestorationPipeline, monkeypatch: pytest.MonkeyPatch, during: str
) -> None:
    """Cancellation is looked at between stages as well as between diffusion steps: a photo whose
    cancel comes in while it is decoded, detected or pasted back goes no further (no UNet call when it
    came before sampling). It used to be looked at only in DBLM and the sampler, so a cancel during
    decoding or detection still ran DBLM's first chunk, and one during paste-back was not seen."""
    stages: list[str] = []
    unet_calls: list[int] = []
    eps = fast._eps
    monkeypatch.setattr(fast, "_eps", lambda x_t, t: unet_calls.append(len(x_t)) or eps(x_t, t))
    with pytest.raises(Cancelled):
        fast.restore_photo(
            (ALIGNED / "0143.png").read_bytes(),
            RestoreOptions(aligned=True, seed=0),
            progress=lambda stage, step, total: stages.append(stage),
            should_cancel=lambda: during in stages,
        )
    assert list(dict.fromkeys(stages)) == list(STAGES[: STAGES.index(during) + 1])
    assert bool(unet_calls) == (STAGES.index(during) > STAGES.index("dblm"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="parking guides on the host matters on a GPU")
def test_guides_wait_on_the_host_so_max_batch_bounds_device_memory(
    pipe: RestorationPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every chunk's guide is built before sampling (for the progress total); those not being sampled wait
    in pinned host memory, and results go back to the host, so the device holds as much when each of 4
    chunks samples as when 1 does (a guide is ~4 MB a face at 512: estimate and scale map; a result 3 MB)."""
    table = dataclasses.replace(default_table(), start_indices=FAST_STARTS)
    unet, restorer = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.restorer)  # moved to the GPU in place
    gpu = RestorationPipeline(
        PROFILES["tiny"], unet, restorer, dsst=table, max_batch=1, device="cuda", weights_dir=WEIGHTS
    )
    seen: list[tuple[str, bool, int]] = []
    sample = gpu._sample

    def spy(guide: pipeline_mod._Guide, *args: object) -> torch.Tensor:
        seen.append((guide.estimate.device.type, guide.estimate.is_pinned(), torch.cuda.memory_allocated()))
        return sample(guide, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(gpu, "_sample", spy)
    faces = _faces("0143.png", "0240.png", "0342.png", "0345.png")
    for _ in range(2):  # the second after any one-off allocation of the first (cuBLAS workspaces)
        seen.clear()
        gpu.restore_faces(faces[:1], seed=0)
    alone = seen[0][2]
    seen.clear()
    gpu.restore_faces(faces, seed=0)
    assert [(device, pinned) for device, pinned, _ in seen] == [("cpu", True)] * 4
    assert all(allocated - alone < 1_000_000 for *_, allocated in seen)


def _tiny_dblm(sigmas: tuple[float, ...]) -> DBLMNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return DBLMNet(DBLMConfig(backbone=PROFILES["tiny"].swinir, sigmas=sigmas))


def test_a_dblm_must_have_the_dsst_tables_blur_levels(pipe: RestorationPipeline, tmp_path: Path) -> None:
    """DBLM output k is used as the table's level k: the same count of other levels is refused, in the
    constructor and when loading files; levels equal up to float rounding are accepted."""
    tiny = PROFILES["tiny"]
    other = _tiny_dblm((1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match=r"blur levels \(1.0, 2.0, 3.0\) are not the DSST table's"):
        RestorationPipeline(tiny, pipe.unet, pipe.restorer, dblm=other, weights_dir=WEIGHTS)
    path = trained.save(other, "dblm", trained.dblm_arch(other.config), tmp_path / "dblm.safetensors")
    with pytest.raises(ValueError, match=rf"{path}: the DBLM's blur levels"):
        RestorationPipeline.from_pretrained("tiny", weights_dir=WEIGHTS, dblm_weights=path)

    rounded = _tiny_dblm((1.0, 2.0, 4.0 + 1e-9))
    loaded = RestorationPipeline(tiny, pipe.unet, pipe.restorer, dblm=rounded, weights_dir=WEIGHTS)
    assert loaded.info["dblm"] == "trained"


@pytest.mark.parametrize(
    ("change", "what"),
    [
        ({"schedule_spec": "ddim100", "start_indices": (24, 53, 99)}, "ddim100"),
        ({"num_timesteps": 2000}, "2000"),
        ({"image_size": 256}, "256"),
    ],
)
def test_a_dsst_table_for_another_schedule_or_size_is_refused(
    pipe: RestorationPipeline, tmp_path: Path, change: dict[str, object], what: str
) -> None:
    """The table's start indices index its own schedule and its σ are px at its image size: one made
    for another schedule or size is refused, built directly or loaded from a file."""
    table = dataclasses.replace(default_table(), **change)
    with pytest.raises(ValueError, match=f"DSST table is for .*{what}"):
        RestorationPipeline(PROFILES["tiny"], pipe.unet, pipe.restorer, dsst=table, weights_dir=WEIGHTS)
    path = tmp_path / "table.json"
    path.write_text(table.to_json())
    with pytest.raises(ValueError, match=f"{path}: the DSST table is for .*{what}"):
        RestorationPipeline.from_pretrained("tiny", weights_dir=WEIGHTS, dsst_table=path)


def test_start_indices_outside_the_schedule_are_refused_at_load(
    pipe: RestorationPipeline, tmp_path: Path
) -> None:
    """A table file with a start past the 250 respaced steps (or 0) is refused when the pipeline loads,
    naming the file; before, it loaded and the first face at that level raised IndexError in q_sample,
    which failed its whole batch as `internal`. A profile's baseline start is held to the same range."""
    for starts in ([24, 53, 300], [0, 53, 100]):
        data = json.loads(default_table().to_json())
        data["start_indices"] = starts
        path = tmp_path / "table.json"
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: DSST table .*1\.\.249"):
            RestorationPipeline.from_pretrained("tiny", weights_dir=WEIGHTS, dsst_table=path)
    tiny = PROFILES["tiny"]
    for baseline in (0, 250):
        profile = dataclasses.replace(
            tiny, method=dataclasses.replace(tiny.method, baseline_start_index=baseline)
        )
        with pytest.raises(ValueError, match=rf"baseline start indices must be in 1\.\.249 .*\[{baseline}\]"):
            RestorationPipeline(profile, pipe.unet, pipe.restorer, weights_dir=WEIGHTS)


def test_the_shipped_dsst_table_fits_both_profiles() -> None:
    table = default_table()
    for profile in PROFILES.values():
        pipeline_mod._check_parts(profile, table, None)


def test_restore_photo_aligned_input(fast: RestorationPipeline) -> None:
    data = (ALIGNED / "0717.png").read_bytes()
    result = fast.restore_photo(
        data, RestoreOptions(aligned=True, seed=1, outputs=("image", "faces", "comparison"))
    )
    out = Image.open(io.BytesIO(result.image))
    assert out.size == (512, 512) and result.media_type == "image/png"
    assert len(result.faces) == 1 and result.comparison is not None
    assert Image.open(io.BytesIO(result.comparison)).size == (1024, 512)
    assert set(result.timings) == set(STAGES)
    assert any("NOT a face restoration" in w for w in result.warnings)
    assert len(result.face_reports) == 1 and result.face_reports[0].facts.nfe > 0


def test_png_compress_level_changes_bytes_not_pixels(
    pipe: RestorationPipeline, fast: RestorationPipeline
) -> None:
    data = (ALIGNED / "0717.png").read_bytes()
    options = RestoreOptions(aligned=True, seed=1, outputs=("image", "comparison"))
    stored = _fast_pipeline(pipe, png_compress_level=0).restore_photo(data, options)
    default = fast.restore_photo(data, options)
    for name in ("image", "comparison"):
        a, b = getattr(stored, name), getattr(default, name)
        np.testing.assert_array_equal(_decoded(a), _decoded(b))
        assert len(a) > len(b), name
    with pytest.raises(ValueError, match="png_compress_level"):
        _fast_pipeline(pipe, png_compress_level=10)


@needs_detector
def test_restore_photo_whole_photo_restores_every_face(fast: RestorationPipeline) -> None:
    data = (PHOTOS / "00.jpg").read_bytes()
    everything = ("image", "faces", "crops", "comparison")
    result = fast.restore_photo(data, RestoreOptions(seed=0, upscale=2, outputs=everything, format="png"))
    out = _decoded(result.image)
    assert out.shape == (310 * 2, 491 * 2, 3)
    # 00.jpg has 4 faces (weights/SOURCES.md); each is aligned, restored and reported.
    assert len(result.face_reports) == len(result.faces) == len(result.crops) == 4
    assert result.faces_dropped == 0

    rgb = _decoded(data)
    found = face_ops.FaceDetector(WEIGHTS, "retinaface_mobile0.25").detect(rgb)
    crops, affines = face_ops.align(rgb, found.faces)
    for k, (report, face) in enumerate(zip(result.face_reports, found.faces, strict=True)):
        assert report.box == face.box and report.score == face.score >= 0.97
        assert report.facts.start_step in FAST_STARTS and report.facts.nfe == report.facts.start_step
        assert 0.0 <= report.facts.eta <= 1.0
        assert set(report.to_dict()) >= {"box", "score", "start_step", "eta", "blur_sigma", "nfe"}
        # "crops" are the aligned input faces; "faces" what the sampler made of them.
        np.testing.assert_array_equal(_decoded(result.crops[k]), crops[k])
        assert _decoded(result.faces[k]).shape == (512, 512, 3)
        assert not np.array_equal(_decoded(result.faces[k]), crops[k])

    # Paste-back: outside the face masks the output is exactly the upscaled input; inside, it is not.
    weight = face_ops.paste_mask((out.shape[1], out.shape[0]), affines, 2)
    background = face_ops.upscale_image(rgb, 2)
    np.testing.assert_array_equal(out[weight == 0], background[weight == 0])
    assert np.abs(out[weight > 0.99].astype(int) - background[weight > 0.99]).mean() > 2
    comparison = _decoded(result.comparison or b"")
    np.testing.assert_array_equal(comparison, np.concatenate([background, out], axis=1))
    assert set(result.timings) == set(STAGES)


@needs_detector
def test_max_faces_restores_the_largest_and_reports_the_rest(pipe: RestorationPipeline) -> None:
    data = (PHOTOS / "00.jpg").read_bytes()
    capped = _fast_pipeline(pipe, max_faces=1)  # the service's cap; a request may only lower it
    result = capped.restore_photo(data, RestoreOptions(seed=0, max_faces=3))
    assert len(result.face_reports) == 1 and result.faces_dropped == 3
    assert any("4 faces were found; only the 1 largest" in w for w in result.warnings)

    def area(box: tuple[float, float, float, float]) -> float:
        return (box[2] - box[0]) * (box[3] - box[1])

    everyone = face_ops.FaceDetector(WEIGHTS, "retinaface_mobile0.25").detect(_decoded(data))
    assert area(result.face_reports[0].box) == max(area(f.box) for f in everyone.faces)
    with pytest.raises(ValueError):
        capped.restore_photo(data, RestoreOptions(max_faces=0))


@needs_detector
def test_min_face_size_only_center_face_and_format(fast: RestorationPipeline) -> None:
    data = (PHOTOS / "00.jpg").read_bytes()
    with pytest.raises(NoFaceError):
        fast.restore_photo(data, RestoreOptions(min_face_size=400))
    center = fast.restore_photo(data, RestoreOptions(seed=0, only_center_face=True, format="webp"))
    assert len(center.face_reports) == 1 and center.faces_dropped == 0
    assert center.media_type == "image/webp" and Image.open(io.BytesIO(center.image)).format == "WEBP"
    with pytest.raises(ValueError, match="unknown outputs"):
        fast.restore_photo(data, RestoreOptions(outputs=("image", "mask")))


@needs_detector
def test_color_correction_is_applied_to_each_restored_face(fast: RestorationPipeline) -> None:
    data = (PHOTOS / "04.jpg").read_bytes()
    outputs = ("faces", "crops")
    plain = fast.restore_photo(data, RestoreOptions(seed=0, outputs=outputs, format="png"))
    fixed = fast.restore_photo(
        data, RestoreOptions(seed=0, outputs=outputs, format="png", color_correction="adain")
    )
    crop, before, after = (_decoded(x[0]) for x in (fixed.crops, plain.faces, fixed.faces))
    # Same seed, same restored face: the corrected one is exactly that face pulled to the input.
    # (±1: the pipeline's batch is channels-last strided, so float sums may round differently)
    diff = np.abs(after.astype(int) - face_ops.color_correct(before, crop, "adain"))
    assert diff.max() <= 1 and diff.mean() < 0.05
    drift = np.abs(before.mean(axis=(0, 1)) - crop.mean(axis=(0, 1))).max()
    assert np.abs(after.mean(axis=(0, 1)) - crop.mean(axis=(0, 1))).max() < drift / 5


@needs_detector
def test_alpha_and_grayscale_survive(fast: RestorationPipeline) -> None:
    rgba = fast.restore_photo(
        (PHOTOS / "02.png").read_bytes(), RestoreOptions(seed=0, format="png", only_center_face=True)
    )
    out = Image.open(io.BytesIO(rgba.image))
    assert out.mode == "RGBA" and out.size == (1204, 645)
    src_alpha = np.asarray(Image.open(PHOTOS / "02.png").getchannel("A"))
    assert np.array_equal(np.asarray(out.getchannel("A")), src_alpha)

    gray = Image.open(PHOTOS / "04.jpg").convert("L")
    result = fast.restore_photo(_png(gray), RestoreOptions(seed=0, outputs=("image", "faces", "crops")))
    assert Image.open(io.BytesIO(result.image)).mode == "L"
    assert len(result.face_reports) == 1
    assert [Image.open(io.BytesIO(f)).mode for f in result.faces + result.crops] == ["L", "L"]


def test_aligned_face_with_alpha_and_another_size(fast: RestorationPipeline) -> None:
    """A 256×256 RGBA aligned face: the face is worked on at 512, the alpha follows it there."""
    face = Image.open(ALIGNED / "0717.png").convert("RGB").resize((256, 256))
    alpha = np.zeros((256, 256), np.uint8)
    alpha[32:224, 32:224] = 255
    rgba = face.copy()
    rgba.putalpha(Image.fromarray(alpha))
    result = fast.restore_photo(_png(rgba), RestoreOptions(aligned=True, seed=0, upscale=2))
    out = Image.open(io.BytesIO(result.image))
    assert out.mode == "RGBA" and out.size == (1024, 1024)
    out_alpha = np.asarray(out.getchannel("A"))
    assert out_alpha[512, 512] == 255 and out_alpha[20, 20] == 0
    assert any("resized to 512" in w for w in result.warnings)


@pytest.mark.parametrize("size", [512, 256])
def test_an_aligned_face_with_transparent_edges_is_upscaled_premultiplied(
    fast: RestorationPipeline, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """An aligned RGBA face, opaque white inside transparent black, comes back as it went in (a stand-in
    for the sampler) and is upscaled 2×: its colours are resized premultiplied by the alpha, as a whole
    photo's are (`test_transparent_edges_keep_their_colour_when_upscaled`), with the alpha at 512 when
    the upload was resized to 512. At 512 every visible pixel stays white: no dark fringe."""
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[size // 4 : -size // 4, size // 4 : -size // 4] = 255
    facts = pipeline_mod.FaceFacts(1.0, 1, 0.0, 1, "fallback", "fallback")
    monkeypatch.setattr(fast, "_restore_faces", lambda faces, *args, **kwargs: (faces, [facts] * len(faces)))
    options = RestoreOptions(aligned=True, seed=0, upscale=2, outputs=("image", "faces"))
    result = fast.restore_photo(_png(Image.fromarray(rgba)), options)
    out, restored = _decoded(result.image), _decoded(result.faces[0])
    alpha = face_ops.resize_to(rgba[:, :, 3], (512, 512))
    np.testing.assert_array_equal(out[:, :, 3], face_ops.resize_to(alpha, (1024, 1024)))
    np.testing.assert_array_equal(out[:, :, :3], face_ops.upscale_premultiplied(restored, alpha, 2))
    if size == 512:
        visible = out[:, :, 3] > 0
        assert ((out[:, :, 3] > 0) & (out[:, :, 3] < 255)).any()  # the resized edge is soft
        assert out[:, :, :3][visible].min() >= 250
        assert face_ops.upscale_image(restored, 2)[visible].min() < 200  # what a straight resize gave


def test_auto_fidelity_of_an_aligned_face_shrunk_to_512_is_what_its_crop_measures(
    fast: RestorationPipeline,
) -> None:
    """A noisy aligned face uploaded at 1536 px: resizing it to 512 averages most of its noise away, so
    its auto eta (std/10) is what the crop it is restored from measures, well under its source's."""
    face = Image.open(ALIGNED / "0717.png").convert("RGB").resize((1536, 1536), Image.Resampling.BICUBIC)
    noise = np.random.default_rng(0).normal(0, 6, (1536, 1536, 3))
    noisy = np.clip(np.rint(np.asarray(face) + noise), 0, 255).astype(np.uint8)
    result = fast.restore_photo(
        _png(Image.fromarray(noisy)), RestoreOptions(aligned=True, seed=0, outputs=("crops",))
    )
    crop = np.array(_decoded(result.crops[0]))  # writable, for torch
    (report,) = result.face_reports
    assert report.facts.eta == pytest.approx(auto_eta(box_noise_std(crop, (0.0, 0.0, 512.0, 512.0))))
    assert report.facts.eta < auto_eta(box_noise_std(noisy, (0.0, 0.0, 1536.0, 1536.0))) / 2


class _FixedDetector:
    """Stands in for RetinaFace: always finds `faces`."""

    def __init__(self, faces: list[face_ops.DetectedFace]) -> None:
        self.faces = faces

    def detect(self, rgb: np.ndarray, **options: object) -> face_ops.Detections:
        return face_ops.Detections(list(self.faces))


def test_auto_fidelity_measures_enlarged_faces_at_the_source_and_shrunk_ones_on_their_crops(
    fast: RestorationPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a photo of even noise (std 8), a small face enlarged ~4× into its crop reads the source's noise;
    a large one shrunk 4× reads its crop's (the anti-aliased shrink leaves ~1/6 of it, less than
    dividing by the shrink factor would say)."""
    noisy = np.clip(np.rint(128 + np.random.default_rng(0).normal(0, 8, (1400, 1400, 3))), 0, 255)
    noisy = noisy.astype(np.uint8)
    eyes = float(face_ops.FFHQ_TEMPLATE_512[1, 0] - face_ops.FFHQ_TEMPLATE_512[0, 0])

    def face(center: float, scale: float, half: float) -> face_ops.DetectedFace:
        landmarks = (face_ops.FFHQ_TEMPLATE_512 - 256) * scale + center
        box = (center - half, center - half, center + half, center + half)
        return face_ops.DetectedFace(box, 0.99, landmarks.astype(np.float32))

    small, large = face(200.0, 30 / eyes, 20.0), face(800.0, 4.0, 400.0)
    monkeypatch.setitem(fast._detectors, fast.profile.detector, _FixedDetector([small, large]))
    result = fast.restore_photo(_png(Image.fromarray(noisy)), RestoreOptions(seed=0, outputs=("crops",)))
    enlarged, shrunk = (r.facts.eta for r in result.face_reports)
    source = box_noise_std(noisy, small.box)
    assert enlarged == pytest.approx(auto_eta(source))
    # The large face's box, 800 ± 400 px, is 256 ± 100 px in its crop.
    on_crop = box_noise_std(np.array(_decoded(result.crops[1])), (156.0, 156.0, 356.0, 356.0))
    assert shrunk == pytest.approx(auto_eta(on_crop), rel=0.02)
    assert shrunk < auto_eta(box_noise_std(noisy, large.box)) / 4 / 1.2


def test_auto_fidelity_measures_mildly_shrunk_and_half_covered_faces_at_the_source(
    fast: RestorationPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only an anti-aliased shrink averages the noise away: a face shrunk 1.2× by the plain bilinear
    warp (which reads low on the crop only because it correlates the noise) and a tilted face shrunk 4×
    near the photo's edge (its crop region holds border fill, which reads as no noise) are measured on
    their source pixels."""
    noisy = np.clip(np.rint(128 + np.random.default_rng(1).normal(0, 8, (1400, 1400, 3))), 0, 255)
    noisy = noisy.astype(np.uint8)
    turn = np.radians(30.0)
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])

    def face(center: float, scale: float, half: float, rotate: bool) -> face_ops.DetectedFace:
        offsets = (face_ops.FFHQ_TEMPLATE_512 - 256) * scale
        landmarks = (offsets @ rotation.T if rotate else offsets) + center
        box = (center - half, center - half, center + half, center + half)
        return face_ops.DetectedFace(box, 0.99, landmarks.astype(np.float32))

    mild, edge = face(1150.0, 1.2, 120.0, rotate=False), face(420.0, 4.0, 400.0, rotate=True)
    monkeypatch.setitem(fast._detectors, fast.profile.detector, _FixedDetector([mild, edge]))
    result = fast.restore_photo(_png(Image.fromarray(noisy)), RestoreOptions(seed=0))
    etas = {tuple(np.round(r.box)): r.facts.eta for r in result.face_reports}
    for f in (mild, edge):
        assert etas[tuple(np.round(f.box))] == pytest.approx(auto_eta(box_noise_std(noisy, f.box))), f.box


@needs_detector
def test_exif_rotated_jpeg_same_faces_upright_output_no_metadata(fast: RestorationPipeline) -> None:
    """A phone JPEG stored sideways (Orientation 6) with camera metadata comes back upright, with
    the faces of the upright photo, and with no metadata at all (all 8 orientations: test_faces)."""
    upright = Image.open(PHOTOS / "04.jpg").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    exif[0x010F] = "PhoneMaker"  # Make
    buf = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=98, exif=exif.tobytes())
    result = fast.restore_photo(buf.getvalue(), RestoreOptions(seed=0, format="same"))
    assert result.media_type == "image/jpeg"
    out = Image.open(io.BytesIO(result.image))
    assert out.size == upright.size
    assert not out.getexif() and "exif" not in out.info and "icc_profile" not in out.info
    (reference,) = face_ops.FaceDetector(WEIGHTS, "retinaface_mobile0.25").detect(np.asarray(upright)).faces
    (report,) = result.face_reports
    np.testing.assert_allclose(report.box, reference.box, atol=2.0)


def test_detector_without_weights_fails_the_job_clearly(pipe: RestorationPipeline, tmp_path: Path) -> None:
    bare = _fast_pipeline(pipe, weights_dir=tmp_path)
    data = (PHOTOS / "04.jpg").read_bytes()
    with pytest.raises(PipelineError, match=r"detection_Resnet50_Final\.pth") as err:
        bare.restore_photo(data, RestoreOptions(detector="retinaface_resnet50"))
    assert "dynface weights pull --only detection_Resnet50_Final.pth" in err.value.message
    assert list(tmp_path.iterdir()) == []  # facexlib did not download anything there


@needs_detector
def test_no_face_fails_or_passes_through(fast: RestorationPipeline) -> None:
    flat = _png(Image.new("RGB", (300, 200), (120, 130, 140)))
    with pytest.raises(NoFaceError) as err:
        fast.restore_photo(flat, RestoreOptions())
    assert err.value.code == "no_face"
    passed = fast.restore_photo(flat, RestoreOptions(on_no_face="passthrough"))
    assert np.array_equal(
        np.asarray(Image.open(io.BytesIO(passed.image))), np.full((200, 300, 3), (120, 130, 140))
    )
    assert any("No face" in w for w in passed.warnings) and passed.face_reports == []


@pytest.mark.parametrize(
    ("source", "size", "options", "message"),
    [
        ("WEBP", (4100, 64), {"upscale": 4, "format": "same"}, r"image would be 16400×256 pixels.*WEBP"),
        (
            "WEBP",
            (4100, 64),
            {"upscale": 2, "format": "webp", "outputs": ("image", "comparison")},
            "comparison",
        ),
        ("PNG", (33000, 10), {"format": "jpeg", "outputs": ("comparison",)}, r"66000×10 pixels.*JPEG.*65500"),
    ],
)
def test_results_too_large_for_their_format_are_refused_before_any_work(
    fast: RestorationPipeline, source: str, size: tuple[int, int], options: dict, message: str
) -> None:
    """WebP holds at most 16383 px a side, JPEG 65500: a result over that is a client error
    (output_too_large, the API's code for it at submission) raised right after decoding, not
    Pillow's ValueError (an internal error) after the whole restoration."""
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 90, 90)).save(buf, source)
    stages: list[str] = []
    with pytest.raises(OutputTooLargeError, match=message) as err:
        fast.restore_photo(
            buf.getvalue(),
            RestoreOptions(seed=0, on_no_face="passthrough", **options),
            progress=lambda stage, step, total: stages.append(stage),
        )
    assert err.value.code == "output_too_large"
    assert stages == ["decode"]


@pytest.mark.parametrize(
    ("size", "options"),
    [((4000, 250), {"upscale": 4, "format": "webp", "outputs": ("comparison",)}), ((250, 4000), {})],
)
def test_an_aligned_input_that_is_not_square_is_refused_before_any_work(
    fast: RestorationPipeline, size: tuple[int, int], options: dict
) -> None:
    """The API's reason (`images.output_sizes`), right after decoding: not output_too_large for a
    comparison sized from the input's aspect, nor invalid_image only once detection has begun."""
    stages: list[str] = []
    with pytest.raises(InvalidImageError, match=f"square face crop, got {size[0]}×{size[1]}"):
        fast.restore_photo(
            _png(Image.new("RGB", size, (90, 90, 90))),
            RestoreOptions(aligned=True, seed=0, **options),
            progress=lambda stage, step, total: stages.append(stage),
        )
    assert stages == ["decode"]


@needs_detector
def test_transparent_edges_keep_their_colour_when_upscaled(fast: RestorationPipeline) -> None:
    """Opaque white beside transparent black, upscaled 2×: the soft edge stays white (colours are
    resized premultiplied by alpha), instead of a grey halo on every background it is shown on."""
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[:, :32] = 255
    data = _png(Image.fromarray(rgba))
    result = fast.restore_photo(data, RestoreOptions(seed=0, upscale=2, on_no_face="passthrough"))
    out = _decoded(result.image)
    alpha = out[:, :, 3]
    assert ((alpha > 0) & (alpha < 255)).any()  # the resized edge is soft
    assert out[:, :, :3][alpha > 0].min() >= 250
    over_white = _decoded(
        fast.restore_photo(
            data, RestoreOptions(seed=0, upscale=2, on_no_face="passthrough", format="jpeg")
        ).image
    )
    assert over_white.min() >= 245  # white over white: no halo at all


@pytest.mark.slow  # bf16 convolutions take minutes at 512 px on CPUs without bf16 units
def test_bf16_runs_on_cpu(pipe: RestorationPipeline) -> None:
    unet, restorer = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.restorer)
    half = RestorationPipeline(PROFILES["tiny"], unet, restorer, weights_dir=WEIGHTS, dtype="bf16")
    # upstream's half-precision rule: the blocks' convolutions in bf16, embedding and head float32
    assert half.unet.input_blocks[0][0].weight.dtype == torch.bfloat16
    assert half.unet.time_embed[0].weight.dtype == half.unet.out[-1].weight.dtype == torch.float32
    # Prove restorer -> DBLM -> guided steps run in bf16; stop after three diffusion steps.
    steps: list[int] = []
    with pytest.raises(Cancelled):
        half.restore_faces(
            _faces("0720.png"),
            mode="difface",
            seed=0,
            progress=lambda stage, step, total: steps.append(step) if stage == "sample" else None,
            should_cancel=lambda: len(steps) >= 3,
        )
    assert steps[:3] == [1, 2, 3]


def test_real_profile_without_weights_names_missing_files(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError) as err:
        RestorationPipeline.from_pretrained("real", weights_dir=tmp_path)
    assert "difface_prior" in str(err.value) and "dynface weights pull" in str(err.value)


def test_real_profile_download_respects_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYNFACE_OFFLINE", "1")
    with pytest.raises(MissingWeightsError) as err:
        RestorationPipeline.from_pretrained("real", weights_dir=tmp_path, download=True)
    assert set(err.value.names) == {"difface_prior", "difface_swinir", "retinaface_resnet50"}
    assert list(tmp_path.iterdir()) == []  # nothing half-downloaded left behind


def test_download_pulls_required_then_optional_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fetch_nothing(names: list[str], wdir: Path) -> list[object]:
        calls.append(list(names))
        return []

    monkeypatch.setattr(pipeline_mod.weights, "pull", fetch_nothing)
    with pytest.raises(MissingWeightsError):  # the fake pull fetched nothing
        RestorationPipeline.from_pretrained("real", weights_dir=tmp_path, download=True)
    real = PROFILES["real"]
    assert calls == [list(real.required_weights), *([n] for n in real.optional_weights)]
    assert "parsenet" in real.optional_weights


def test_tiny_download_offline_still_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Optional files that cannot be fetched are logged, not fatal; nothing is written."""
    monkeypatch.setenv("DYNFACE_OFFLINE", "1")
    with caplog.at_level(logging.WARNING, logger="models.pipeline"):
        tiny = RestorationPipeline.from_pretrained("tiny", weights_dir=tmp_path, download=True)
    assert tiny.info["real"] is False and tiny.weights_dir == tmp_path
    assert "retinaface_mobile0.25" in caplog.text and "dynface weights pull" in caplog.text
    assert list(tmp_path.iterdir()) == []
