"""RestorationPipeline end to end on real faces and photos, with the tiny profile (random toy weights).

These check the plumbing and the method's decisions (levels, start steps, NFE, eta, seeds, stages,
photo handling); restoration quality needs the real weights and is not asserted here.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.dblm import DBLMConfig, DBLMNet
from models.dgsa import DGSANet
from models.errors import Cancelled, NoFaceError
from models.pipeline import STAGES, RestorationPipeline, RestoreOptions
from models.profiles import PROFILES
from models.weights import MissingWeightsError

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


@pytest.fixture(scope="module")
def pipe() -> RestorationPipeline:
    return RestorationPipeline.from_pretrained("tiny", weights_dir=WEIGHTS, max_batch=4)


def test_tiny_profile_is_flagged_not_real(pipe: RestorationPipeline) -> None:
    assert pipe.info["real"] is False
    assert pipe.info["profile"] == "tiny"
    assert pipe.info["dblm"] == "fallback" and pipe.info["dgsa"] == "fallback"


def test_restore_faces_shapes_facts_and_nfe(pipe: RestorationPipeline) -> None:
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


def test_seed_makes_runs_repeatable(pipe: RestorationPipeline) -> None:
    faces = _faces("0345.png")
    a = pipe.restore_faces(faces, seed=7, fidelity=1.0)
    b = pipe.restore_faces(faces, seed=7, fidelity=1.0)
    c = pipe.restore_faces(faces, seed=8, fidelity=1.0)
    assert np.array_equal(a.faces, b.faces)
    assert not np.array_equal(a.faces, c.faces)
    assert a.seed == 7


def test_baseline_mode_uses_difface_fixed_start(pipe: RestorationPipeline) -> None:
    faces = _faces("0368.png", "0412.png")
    default = pipe.restore_faces(faces, mode="difface", seed=1)
    assert [f.start_step for f in default.facts] == [100, 100]
    assert [f.nfe for f in default.facts] == [100, 100]
    assert [f.eta for f in default.facts] == [0.5, 0.5]  # DifFace's default eta for "auto"
    assert {f.dblm for f in default.facts} == {"none"}
    chosen = pipe.restore_faces(faces[:1], mode="difface", fidelity=0.2, seed=1)
    assert chosen.facts[0].eta == 0.2


def test_user_fidelity_overrides_auto_eta(pipe: RestorationPipeline) -> None:
    result = pipe.restore_faces(_faces("0444.png"), fidelity=0.3, seed=0)
    assert result.facts[0].eta == 0.3


def test_progress_reports_every_step_and_cancel_stops(pipe: RestorationPipeline) -> None:
    faces = _faces("0478.png", "0500.png")
    seen: list[tuple[str, int, int]] = []
    result = pipe.restore_faces(faces, seed=0, progress=lambda *a: seen.append(a))
    steps = [s[1:] for s in seen if s[0] == "sample"]
    # Faces sharing (start step, eta) run as one batch: one report per sampler step of each group.
    groups = {(f.start_step, f.eta): f.nfe for f in result.facts}
    assert [step for step, _ in steps] == list(range(1, sum(groups.values()) + 1))
    assert {total for _, total in steps} == {sum(groups.values())}

    calls = {"n": 0}

    def cancel_after_five() -> bool:
        calls["n"] += 1
        return calls["n"] > 5

    with pytest.raises(Cancelled):
        pipe.restore_faces(faces, seed=0, should_cancel=cancel_after_five)


def test_trained_networks_path_is_reported(pipe: RestorationPipeline) -> None:
    profile = PROFILES["tiny"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dblm = DBLMNet(DBLMConfig(backbone=profile.swinir, sigmas=profile.method.sigmas))
        dgsa = DGSANet(base_channels=8)
    trained = RestorationPipeline(
        profile, pipe.unet, pipe.restorer, dblm=dblm, dgsa=dgsa, weights_dir=WEIGHTS
    )
    result = trained.restore_faces(_faces("0599.png"), seed=0)
    fact = result.facts[0]
    assert (fact.dblm, fact.dgsa) == ("trained", "trained")
    assert fact.blur_sigma in profile.method.sigmas and fact.nfe == fact.start_step
    assert trained.info["dblm"] == "trained"


def test_restore_photo_aligned_input(pipe: RestorationPipeline) -> None:
    data = (ALIGNED / "0717.png").read_bytes()
    result = pipe.restore_photo(
        data, RestoreOptions(aligned=True, seed=1, outputs=("image", "faces", "comparison"))
    )
    out = Image.open(io.BytesIO(result.image))
    assert out.size == (512, 512) and result.media_type == "image/png"
    assert len(result.faces) == 1 and result.comparison is not None
    assert Image.open(io.BytesIO(result.comparison)).size == (1024, 512)
    assert set(result.timings) == set(STAGES)
    assert any("NOT a face restoration" in w for w in result.warnings)
    assert len(result.face_reports) == 1 and result.face_reports[0].facts.nfe > 0


@pytest.mark.skipif(
    not (WEIGHTS / "detection_mobilenet0.25_Final.pth").is_file(), reason="detector weights absent"
)
def test_restore_photo_whole_photo_restores_every_face(pipe: RestorationPipeline) -> None:
    data = (PHOTOS / "00.jpg").read_bytes()
    result = pipe.restore_photo(data, RestoreOptions(seed=0, upscale=2, outputs=("image", "faces")))
    out = Image.open(io.BytesIO(result.image))
    assert out.size == (491 * 2, 310 * 2)
    assert len(result.face_reports) == 4 == len(result.faces)  # 00.jpg has 4 faces (weights/SOURCES.md)
    for report in result.face_reports:
        x0, y0, x1, y1 = report.box
        assert 0 <= x0 < x1 <= 491 and 0 <= y0 < y1 <= 310
        assert report.score >= 0.97
    assert set(result.timings) == set(STAGES)


@pytest.mark.skipif(
    not (WEIGHTS / "detection_mobilenet0.25_Final.pth").is_file(), reason="detector weights absent"
)
def test_alpha_and_grayscale_survive(pipe: RestorationPipeline) -> None:
    rgba = pipe.restore_photo((PHOTOS / "02.png").read_bytes(), RestoreOptions(seed=0, format="png"))
    out = Image.open(io.BytesIO(rgba.image))
    assert out.mode == "RGBA" and out.size == (1204, 645)
    src_alpha = np.asarray(Image.open(PHOTOS / "02.png").getchannel("A"))
    assert np.array_equal(np.asarray(out.getchannel("A")), src_alpha)

    gray = Image.open(PHOTOS / "04.jpg").convert("L")
    result = pipe.restore_photo(_png(gray), RestoreOptions(seed=0))
    assert Image.open(io.BytesIO(result.image)).mode == "L"
    assert len(result.face_reports) == 1


@pytest.mark.skipif(
    not (WEIGHTS / "detection_mobilenet0.25_Final.pth").is_file(), reason="detector weights absent"
)
def test_no_face_fails_or_passes_through(pipe: RestorationPipeline) -> None:
    flat = _png(Image.new("RGB", (300, 200), (120, 130, 140)))
    with pytest.raises(NoFaceError) as err:
        pipe.restore_photo(flat, RestoreOptions())
    assert err.value.code == "no_face"
    passed = pipe.restore_photo(flat, RestoreOptions(on_no_face="passthrough"))
    assert np.array_equal(
        np.asarray(Image.open(io.BytesIO(passed.image))), np.full((200, 300, 3), (120, 130, 140))
    )
    assert any("No face" in w for w in passed.warnings) and passed.face_reports == []


@pytest.mark.slow  # bf16 convolutions take minutes at 512 px on CPUs without bf16 units
def test_bf16_runs_on_cpu(pipe: RestorationPipeline) -> None:
    unet, restorer = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.restorer)
    half = RestorationPipeline(PROFILES["tiny"], unet, restorer, weights_dir=WEIGHTS, dtype="bf16")
    assert next(half.unet.parameters()).dtype == torch.bfloat16
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
