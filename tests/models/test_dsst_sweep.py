"""`dynface dsst build --method sweep`: the empirical DSST on the pipeline's own sampler (tiny profile, CPU),
on real aligned faces, written in the table format the pipeline loads."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from stand_in_weights import stand_in_alexnet_hub

from models.blur import gaussian_blur
from models.dsst import DSSTable, psnr
from models.dsst_build import load_face
from models.evaluate import lpips_metric
from models.pipeline import DIFFACE_DEFAULT_ETA, RestorationPipeline
from tests.conftest import TESTDATA, WEIGHTS
from worker.cli import main

ALIGNED = TESTDATA / "aligned"
pytestmark = pytest.mark.skipif(not ALIGNED.is_dir(), reason=f"shared test data not found at {ALIGNED}")

FACES = ("0143.png", "0240.png")
#: A few short starts: the tiny prior's sampler, a handful of steps per candidate.
CANDIDATES = (1, 2, 3)


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faces")
    for name in FACES:
        shutil.copy(ALIGNED / name, root / name)
    return root


def sweep_args(faces: Path, out: Path, *extra: str) -> list[str]:
    candidates = [str(c) for c in CANDIDATES]
    return [
        "dsst", "build", "--method", "sweep", "--prior", "tiny", "--faces", str(faces), "--out", str(out),
        "--candidates", *candidates, "--device", "cpu", *extra,
    ]  # fmt: skip


def reported_scores(table: DSSTable) -> dict[float, dict[int, float]]:
    """The per-level, per-candidate scores the sweep wrote into the table's provenance."""
    scores = {}
    for sigma, rest in re.findall(r"^sigma=([\d.]+): (.*)$", table.provenance, flags=re.MULTILINE):
        pairs = (item.split(":") for item in rest.split(", "))
        scores[float(sigma)] = {int(i): float(s) for i, s in pairs}
    return scores


def assert_starts_follow_the_scores(table: DSSTable) -> dict[float, dict[int, float]]:
    """Each level's start is the best-scoring candidate (ties: fewer steps), lifted to keep the table
    non-decreasing — the criterion applied to the scores the sweep measured. Returns those scores."""
    scores = reported_scores(table)
    assert list(scores) == list(table.sigmas) and all(list(s) == list(CANDIDATES) for s in scores.values())
    lifted = 0
    for sigma, start in zip(table.sigmas, table.start_indices, strict=True):
        best = max(CANDIDATES, key=lambda c, s=scores[sigma]: (s[c], -c))
        lifted = max(lifted, best)
        assert start == lifted, (sigma, scores[sigma])
    return scores


def test_sweep_builds_the_table_from_the_sampler_and_the_pipeline_loads_it(
    faces: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Default criterion PSNR − 20·LPIPS; LPIPS runs on a stand-in AlexNet (plumbing: its values mean
    nothing, but they are computed by the code path real weights take). Each (level, candidate) run is
    announced on stderr as it begins, once although --max-batch 1 samples it in two batches."""
    stand_in_alexnet_hub(tmp_path / "torch", monkeypatch)
    out = tmp_path / "sweep.json"
    load = RestorationPipeline.from_pretrained
    with monkeypatch.context() as m:
        m.setattr(RestorationPipeline, "from_pretrained", lambda *a, **kw: load(*a, **kw, max_batch=1))
        assert main(sweep_args(faces, out, "--max-faces", "2")) == 0
    runs = [(sigma, start) for sigma in ("1", "2", "4") for start in CANDIDATES]
    expected = [f"sweep {k}/9: sigma {sigma}, start {start}" for k, (sigma, start) in enumerate(runs, 1)]
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("sweep ")] == expected
    table = DSSTable.from_json(out.read_text())
    assert (table.method, table.tau, table.sigmas) == ("empirical", None, (1.0, 2.0, 4.0))
    assert (table.schedule_spec, table.image_size) == ("ddim250", 512)
    assert "2 validation faces, score PSNR - 20*perceptual" in table.provenance
    assert "--method sweep" in table.provenance and f"DDIM eta {DIFFACE_DEFAULT_ETA:g}" in table.provenance

    scores = assert_starts_follow_the_scores(table)

    # A reported score is the real sampler's: re-run level σ=2 from start 3 and score it by hand.
    pipe = RestorationPipeline.from_pretrained("tiny", weights_dir=WEIGHTS)
    x = torch.cat([load_face(faces / name, 512).float() for name in FACES])
    restored = pipe.sample_at_level(gaussian_blur(x, 2.0), 2.0, 3, eta=DIFFACE_DEFAULT_ETA, seed=0).clamp(
        -1, 1
    )
    lpips = lpips_metric(torch.device("cpu"))((restored + 1) / 2, (x + 1) / 2)
    assert float(psnr(restored, x).mean()) - 20 * lpips == pytest.approx(scores[2.0][3], abs=2e-3)

    # Round trip: the pipeline loads the table and starts a face at one of its entries.
    loaded = RestorationPipeline.from_pretrained("tiny", weights_dir=WEIGHTS, dsst_table=out)
    assert (loaded.dsst.method, loaded.dsst.start_indices) == ("empirical", table.start_indices)
    assert loaded.info["dsst"]["start_indices"] == list(table.start_indices)
    face = np.array(Image.open(faces / FACES[0]).convert("RGB"))[None]
    fact = loaded.restore_faces(face, seed=0).facts[0]
    assert fact.start_step in table.start_indices and fact.nfe == fact.start_step


def test_sweep_scored_on_psnr_alone_needs_no_lpips_weights(
    faces: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    out = tmp_path / "psnr.json"
    assert main(sweep_args(faces, out, "--lpips-weight", "0", "--max-faces", "1")) == 0
    table = DSSTable.from_json(out.read_text())
    assert "(1 validation faces, score PSNR)" in table.provenance
    scores = assert_starts_follow_the_scores(table)
    # The score is PSNR alone, of the first face by name: re-run σ=2 from start 3 and score it by hand.
    pipe = RestorationPipeline.from_pretrained("tiny", weights_dir=WEIGHTS)
    x = load_face(faces / sorted(FACES)[0], 512).float()
    restored = pipe.sample_at_level(gaussian_blur(x, 2.0), 2.0, 3, eta=DIFFACE_DEFAULT_ETA, seed=0).clamp(
        -1, 1
    )
    assert float(psnr(restored, x).mean()) == pytest.approx(scores[2.0][3], abs=2e-3)


def test_sweep_without_alexnet_weights_names_the_file_and_writes_nothing(
    faces: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    out = tmp_path / "t.json"
    assert main(sweep_args(faces, out, "--max-faces", "2")) == 1
    err = capsys.readouterr().err
    assert "alexnet-owt-7be5be79.pth" in err and "--lpips-weight 0" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--method", "analytic", "--candidates", "10", "20"],  # a sweep option with the analytic builder
        ["--method", "analytic", "--device", "cpu"],
        ["--method", "sweep", "--heaviest-start", "50"],  # an analytic option with the sweep
        ["--method", "sweep", "--candidates", "0", "3", "--lpips-weight", "0", "--device", "cpu"],  # 0 steps
        ["--method", "sweep", "--lpips-weight", "-1", "--device", "cpu"],
        ["--method", "sweep", "--eta", "1.5"],
        ["--method", "analytic", "--heaviest-start", "0"],
    ],
)
def test_build_refuses_options_of_the_other_method_and_bad_values(
    faces: Path, tmp_path: Path, args: list[str]
) -> None:
    out = tmp_path / "t.json"
    common = [
        "dsst",
        "build",
        "--prior",
        "tiny",
        "--faces",
        str(faces),
        "--out",
        str(out),
        "--max-faces",
        "1",
    ]
    assert main([*common, *args]) == 2
    assert not out.exists()


def test_sweep_without_max_faces_is_refused_before_any_work(
    faces: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The sweep holds every face in memory and scores all of them at once: without --max-faces it took
    the whole folder (FFHQ: 70 000 faces)."""
    out = tmp_path / "t.json"
    assert main(sweep_args(faces, out, "--lpips-weight", "0")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --method sweep needs --max-faces N") and "Traceback" not in err
    assert not out.exists()
