"""Smoke checks of the benchmark scripts (bench/): they run against the current pipeline code, reject
arguments they cannot report on, and never write docs/ when told not to. No timings are asserted."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from bench import gpu_path, overhead, steps
from models.degradations import SEVERITY_LEVELS
from models.profiles import PROFILES
from tests.conftest import TESTDATA


def _no_docs(*_: Any, **__: Any) -> None:
    raise AssertionError("--no-write run tried to write docs/")


def test_steps_runs_the_pipeline_decision_and_reports_the_faces_it_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two faces where the run asks for five: the report must give the number actually used.
    for name in ("0143.png", "0240.png"):
        shutil.copy(TESTDATA / "aligned" / name, tmp_path / name)
    monkeypatch.setattr(steps, "ALIGNED", tmp_path)
    monkeypatch.setattr(steps, "write_section", _no_docs)
    monkeypatch.setattr(steps, "plot", _no_docs)

    steps.main(["--images", "5", "--no-write"])

    out = capsys.readouterr().out
    assert "- set: 2 real aligned faces" in out
    assert f"| **mixed set** | {2 * len(SEVERITY_LEVELS)} |" in out
    baseline = PROFILES["tiny"].method.baseline_start_index
    assert f'`RestorationPipeline._guide(mode="difface")`: {baseline}.' in out
    assert "- A (tiny profile, random restorer — **not** a real-model number): start " in out


def test_steps_plot_writes_only_where_told(tmp_path: Path) -> None:
    levels = list(SEVERITY_LEVELS)
    rows = [steps.Row(lvl, 2.0, 100, 53, 24, 0.5, 24, 1.0, 53, 2.0) for lvl in levels]
    out = tmp_path / "nfe.png"
    figure = steps.FIGURE  # the committed figure, which a plot told to write elsewhere must leave alone
    before = (figure.read_bytes(), figure.stat().st_mtime_ns) if figure.exists() else None

    steps.plot(rows, levels, tiny=True, out=out)

    assert sorted(tmp_path.iterdir()) == [out]
    with Image.open(out) as im:
        assert (im.format, im.size) == ("PNG", (990, 528))  # figsize 9 × 4.8 in at 110 dpi
    after = (figure.read_bytes(), figure.stat().st_mtime_ns) if figure.exists() else None
    assert after == before


@pytest.mark.parametrize(
    ("name", "given", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", None, 989.0),
        ("NVIDIA H100 PCIe", None, 756.0),
        ("NVIDIA H200", None, 989.0),
        ("NVIDIA H200 NVL", None, 835.0),
        ("NVIDIA A100-SXM4-80GB", None, 312.0),
        ("NVIDIA H100 80GB HBM3", 500.0, 500.0),
        (None, 2.0, 2.0),
        (None, None, None),  # CPU: no peak unless given
        ("NVIDIA GeForce RTX 4090", None, None),
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None, None),  # a slice: not the whole chip's peak
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", 100.0, 100.0),
    ],
)
def test_gpu_path_peak(name: str | None, given: float | None, expected: float | None) -> None:
    peak = gpu_path.peak_tflops(name, given)
    assert (peak[1] if peak else None) == expected


def test_gpu_path_cuda_without_a_gpu_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_path, "write_section", _no_docs)
    with pytest.raises(SystemExit) as exit_:
        gpu_path.main(["--device", "cuda", "--no-write"])
    assert exit_.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.fixture
def tf32_on() -> Iterator[None]:
    """Both TF32 flags on (not PyTorch's defaults, so a reset to defaults would show), restored after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.usefixtures("tf32_on")
def test_gpu_path_reference_row_leaves_the_tf32_flags_as_it_found_them() -> None:
    profile = PROFILES["tiny"]
    state = gpu_path.IDDPMUNet(**profile.unet).state_dict()
    reference = gpu_path.variants(with_compile=False, cuda=False)[0]
    assert reference.tf32_off
    x = torch.randn(1, 3, profile.image_size, profile.image_size)

    gpu_path.measure(profile.unet, state, reference, x, torch.tensor([500]), repeats=1)

    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    # Only the reference turns TF32 off: every other row runs as the worker does, and its fp32 rows say so.
    rows = gpu_path.variants(with_compile=True, cuda=True)
    assert [v.tf32_off for v in rows].count(True) == 1
    fp32 = [v.name for v in rows[1:] if v.dtype == "fp32"]
    assert fp32 == [
        "fp32 (process's TF32 flags)",
        "fp32 + channels_last (process's TF32 flags)",
        "fp32 + channels_last + compile (process's TF32 flags)",
    ]


@pytest.mark.parametrize(("levels", "jobs"), [("1,4", "3,4"), ("8", "2"), ("1", "0")])
def test_overhead_rejects_levels_with_no_counted_job(
    levels: str, jobs: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        overhead.main(["--levels", levels, "--jobs", jobs, "--no-write"])
    assert exit_.value.code == 2
    assert "job(s): need at least 1 client" in capsys.readouterr().err
