"""Smoke checks of the benchmark scripts (bench/): they import and parse their arguments, run against
the current pipeline code, reject arguments they cannot report on, record a failing row instead of
losing the others, count the UNet calls they report, and never write docs/ when told not to. No
timings are asserted."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import bench
from bench import batching, gpu_path, overhead, steps
from bench._pipeline import default_profile, networks
from bench._report import DOC
from models import pipeline as pipeline_module
from models.degradations import SEVERITY_LEVELS
from models.profiles import PROFILES
from tests.conftest import TESTDATA, WEIGHTS

SCRIPTS = sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_"))


def _no_docs(*_: Any, **__: Any) -> None:
    raise AssertionError("--no-write run tried to write docs/")


def _skip_one_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline's sampler made to start one step late: every face still reports the table's start
    as its NFE, so only a count of the UNet calls can see it."""
    real = pipeline_module.ddim_sample

    def late(eps: Any, x: Any, schedule: Any, start: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return real(eps, x, schedule, start - 1, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "ddim_sample", late)


def test_every_script_is_checked_here() -> None:
    assert SCRIPTS == [
        "api_throughput",
        "batching",
        "gpu_path",
        "overhead",
        "png_encode",
        "reliability",
        "steps",
    ]


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports_and_parses_its_arguments(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    module = importlib.import_module(f"bench.{name}")
    monkeypatch.setattr(sys, "argv", [f"bench/{name}.py", "--help"])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


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
    assert f"start {baseline} → {baseline} UNet calls" in out  # counted, not read back from the facts
    verdicts = [
        line
        for line in out.splitlines()
        if line.startswith(("- B (", "- C (", "- D (", "- A (tiny pipeline)"))
    ]
    assert len(verdicts) == 4 and all("**met**" in v or "**not met**" in v for v in verdicts)
    assert "Valid proxies meeting it: " in out


def test_steps_nfe_count_sees_a_sampler_that_skips_a_step(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = pipeline_module.RestorationPipeline.from_pretrained("tiny", weights_dir=WEIGHTS)
    assert steps.count_nfe(pipe, [3, 5]) == {3: 3, 5: 5}
    _skip_one_step(monkeypatch)
    with pytest.raises(RuntimeError, match="differ from the start index"):
        steps.count_nfe(pipe, [3])


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
        ("NVIDIA H100 NVL", None, 835.0),
        ("NVIDIA H200", None, 989.0),
        ("NVIDIA H200 NVL", None, 835.0),
        ("NVIDIA A100-SXM4-80GB", None, 312.0),
        ("NVIDIA A100 80GB PCIe", None, 312.0),
        ("NVIDIA H100 80GB HBM3", 500.0, 500.0),
        (None, 2.0, 2.0),
        (None, None, None),  # CPU: no peak unless given
        ("NVIDIA GeForce RTX 4090", None, None),
        ("NVIDIA RTX A1000", None, None),  # holds "A100" as a substring, not as a word
        ("NVIDIA GH200 480GB", None, None),  # likewise "H200"
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


@pytest.mark.parametrize(
    ("device", "message"),
    [("cuda:2", "torch sees 2 CUDA device(s), cuda:0 to cuda:1"), ("mps", "only cpu and cuda")],
)
def test_gpu_path_refuses_a_device_it_cannot_measure(
    device: str, message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SystemExit) as exit_:
        gpu_path.main(["--device", device, "--no-write"])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_gpu_path_defaults_to_the_real_networks_on_cuda_only() -> None:
    assert default_profile(torch.device("cuda", 0)) == "real"
    assert default_profile(torch.device("cpu")) == "tiny"


def test_gpu_path_rows() -> None:
    cuda = gpu_path.unet_rows(cuda=True, groups=gpu_path.GROUPS)
    names = [r.name for r in cuda]
    assert names[0] == gpu_path.REFERENCE and [r.tf32_off for r in cuda].count(True) == 1
    assert names == [
        gpu_path.REFERENCE,
        "fp32, NCHW",
        "fp32, channels_last",
        "fp16, NCHW",
        "fp16, channels_last",
        "bf16, NCHW",
        "bf16, channels_last",
        "fp16, channels_last, SDPA math backend",
        "fp16, channels_last, compile",
        "fp16, channels_last, compile reduce-overhead (CUDA graphs)",
        "fp32, channels_last, compile",
    ]
    graphs = cuda[names.index("fp16, channels_last, compile reduce-overhead (CUDA graphs)")]
    assert graphs.speed.compile_mode == "reduce-overhead" and graphs.base == "fp16, channels_last"
    assert all(r.base in names for r in cuda if r.base)
    # CPU: the service default is fp32, there are no CUDA graphs, and a group not asked for is left out.
    cpu = [r.name for r in gpu_path.unet_rows(cuda=False, groups=("sdpa", "compile", "cudagraphs"))]
    assert cpu == [
        gpu_path.REFERENCE,
        "fp32, channels_last, SDPA math backend",
        "fp32, channels_last, compile",
    ]


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
    reference = gpu_path.unet_rows(cuda=False, groups=())[0]
    assert reference.tf32_off
    x = torch.randn(1, 3, profile.image_size, profile.image_size)

    eps, result = gpu_path.time_unet(networks(profile), reference, x, torch.tensor([500]), 1, 1)

    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    assert eps.shape == x.shape and len(result.times) == 1  # eps: the sampler's 3 of the UNet's 6 channels


def test_gpu_path_records_a_failing_row_and_keeps_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = gpu_path.time_unet

    def failing(nets: Any, row: gpu_path.UNetRow, *args: Any) -> Any:
        if row.name == "bf16, NCHW":
            raise RuntimeError("injected failure\nsecond line of it")
        return real(nets, row, *args)

    monkeypatch.setattr(gpu_path, "time_unet", failing)
    writes: list[str] = []
    write = gpu_path.write_section

    def recorded(name: str, body: str, doc: Path) -> None:
        writes.append(body)
        write(name, body, doc)

    monkeypatch.setattr(gpu_path, "write_section", recorded)
    doc = tmp_path / "doc.md"
    before = DOC.stat().st_mtime_ns

    gpu_path.main(
        ["--device", "cpu", "--repeats", "1", "--warmups", "1", "--restorer-rounds", "1", "--doc", str(doc)]
    )

    section = doc.read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in section.splitlines() if line.startswith("| ")}
    expected = [r.name for r in gpu_path.unet_rows(cuda=False, groups=gpu_path.CPU_GROUPS)]
    expected += [t.names[0] for t in gpu_path.copy_tasks(torch.device("cpu"), 8, 1, 1)]
    expected += ["restorer fp32, NCHW", "restorer fp32, channels_last"]
    assert set(expected) <= set(rows)
    assert "**RuntimeError: injected failure**" in rows["bf16, NCHW"] and "second line" not in section
    for name in set(expected) - {"bf16, NCHW"}:
        assert "**" not in rows[name], rows[name]  # measured: no error in its place
    # The section is rewritten after every task (a killed run keeps what it measured), then once more.
    tasks = len(expected) - 1  # the two restorer rows are one task
    assert len(writes) == tasks + 1
    assert "**Partial: written mid-run" in writes[0] and "Partial" not in writes[-1]
    assert "Run took" in section and "GPU path: fast-path switches" in capsys.readouterr().out
    assert DOC.stat().st_mtime_ns == before


def test_gpu_path_interrupted_still_writes_what_it_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = gpu_path.time_unet

    def interrupted(nets: Any, row: gpu_path.UNetRow, *args: Any) -> Any:
        if row.name == "fp16, NCHW":
            raise KeyboardInterrupt
        return real(nets, row, *args)

    monkeypatch.setattr(gpu_path, "time_unet", interrupted)
    doc = tmp_path / "doc.md"
    with pytest.raises(KeyboardInterrupt):
        gpu_path.main(
            ["--device", "cpu", "--rows", "precision", "--repeats", "1", "--warmups", "1", "--doc", str(doc)]
        )

    rows = {
        line.split(" | ")[0].lstrip("| "): line
        for line in doc.read_text().splitlines()
        if line.startswith("| ")
    }
    assert "**" not in rows[gpu_path.REFERENCE] and "**" not in rows["fp32, channels_last"]
    for name in ("fp16, NCHW", "fp16, channels_last", "bf16, NCHW", "bf16, channels_last"):
        assert "**not run: the run stopped first**" in rows[name]
    assert "Partial" not in doc.read_text()


def test_gpu_path_ended_by_sigterm_still_writes_its_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`timeout` (the device tool's limit) ends a run with SIGTERM: the section is finished as after
    Ctrl-C, and the process's own SIGTERM handling is given back."""
    real = gpu_path.time_unet

    def terminated(nets: Any, row: gpu_path.UNetRow, *args: Any) -> Any:
        if row.name == "fp16, NCHW":
            os.kill(os.getpid(), signal.SIGTERM)
        return real(nets, row, *args)

    monkeypatch.setattr(gpu_path, "time_unet", terminated)
    before = signal.getsignal(signal.SIGTERM)
    doc = tmp_path / "doc.md"
    with pytest.raises(KeyboardInterrupt):
        gpu_path.main(
            ["--device", "cpu", "--rows", "precision", "--repeats", "1", "--warmups", "1", "--doc", str(doc)]
        )
    assert signal.getsignal(signal.SIGTERM) == before
    text = doc.read_text()
    assert "Partial" not in text and "**not run: the run stopped first**" in text


def test_gpu_path_report_of_a_gpu_run() -> None:
    """The parts of the section only a CUDA run writes (no GPU here): rows from their results alone."""
    device = torch.device("cuda", 0)
    rows = gpu_path.unet_rows(cuda=True, groups=gpu_path.GROUPS)
    tasks = [gpu_path.Task([r.name], r.group, list) for r in rows]
    tasks += gpu_path.copy_tasks(device, 8, 1, 1)
    tasks.append(gpu_path.Task(["restorer fp16, NCHW", "restorer fp16, channels_last"], "restorer", list))
    args = argparse.Namespace(batch=2, warmups=3, budget_s=240.0, restorer_rounds=4)
    gpu = "NVIDIA H100 80GB HBM3"
    nets = networks(PROFILES["tiny"])
    run = gpu_path.Run(
        "## head", args, device, gpu, nets, 20, rows, tasks, gpu_path.peak_tflops(gpu, None), 0.0
    )
    run.flops_face = run.flops_real = 378.3e9
    for task in tasks:
        for name in task.names:
            mb = "8.4" if task.group == "transfer" else ""  # a copy's detail is its MB
            run.results[name] = gpu_path.Result(name, task.group, [0.05], 1.0, 1e-3, 1e-4, detail=mb)
    graphs = "fp16, channels_last, compile reduce-overhead (CUDA graphs)"
    run.results[graphs].detail = "CUDA graphs skipped 1× (see the log): this row ran without them"
    run.results["fp32, channels_last, compile"].error = "BackendCompilerFailed: triton"
    copy = "faces → device (8×512×512×3 uint8), "
    run.results[copy + "pageable"].times, run.results[copy + "pinned"].times = [0.03], [0.02]

    section = gpu_path.report(run, final=True)

    cells = {
        line.split(" | ")[0].lstrip("| "): line.split(" | ")
        for line in section.splitlines()
        if line.startswith("| ")
    }
    bound_ms = 378.3e9 / 989e12 * 1000
    assert cells["fp16, channels_last"][2:4] == ["50.00", "25.00"]  # per call of the batch of 2, per face
    assert (
        cells["fp16, channels_last"][-1] == f"{25.0 / bound_ms:.1f} |"
    )  # per face per NFE ÷ one face's bound
    assert f"| {graphs} ⚠ CUDA graphs skipped" in section
    assert cells["fp32, channels_last, compile"][2] == "**BackendCompilerFailed: triton**"
    assert (
        "Peak used: **989 TFLOP/s** (H100 BF16/FP16 dense" in section and "(GPU, random weights)" in section
    )
    assert cells[copy + "pinned"][3:5] == ["0.4", "1.50×"]  # GB/s; pageable 30 ms ÷ pinned 20 ms


def test_gpu_path_starts_no_row_after_its_budget(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(gpu_path, "write_section", _no_docs)
    gpu_path.main(["--device", "cpu", "--rows", "transfer", "--budget-s", "0", "--no-write"])
    out = capsys.readouterr().out
    assert out.count("**not run: the 0 s budget was spent**") == 1 + 4  # the reference and the 4 copies


def test_batching_runs_on_a_device_and_profile_given(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(batching, "write_section", _no_docs)
    args = ["--device", "cpu", "--profile", "tiny", "--sizes", "2", "--steps", "2", "--repeats", "1"]
    batching.main([*args, "--skip-worker", "--no-write"])
    out = capsys.readouterr().out
    assert "| 2 | one call, max_batch=2 |" in out and "| 2 | 2 one-face call(s) |" in out
    assert "device `cpu`, profile `tiny`" in out and "Not run (`--skip-worker`)." in out


def test_batching_counts_the_unet_calls_it_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    faces = batching.load_faces(TESTDATA / "aligned", 2)
    counted = batching.make_pipeline(networks(PROFILES["tiny"]), 3, 2, "cpu", "fp32")
    batching.timed(counted, faces, 0, 0.5, 3)
    assert (counted.unet.calls, counted.unet.faces) == (3, 6)
    _skip_one_step(monkeypatch)
    with pytest.raises(RuntimeError, match="expected 3 UNet calls over all 2 face"):
        batching.timed(counted, faces, 0, 0.5, 3)


def test_batching_real_profile_worker_needs_the_real_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        batching.main(["--device", "cpu", "--profile", "real", "--weights-dir", str(tmp_path), "--no-write"])
    assert exit_.value.code == 2
    assert "--skip-worker" in capsys.readouterr().err


@pytest.mark.parametrize(("levels", "jobs"), [("1,4", "3,4"), ("8", "2"), ("1", "0")])
def test_overhead_rejects_levels_with_no_counted_job(
    levels: str, jobs: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        overhead.main(["--levels", levels, "--jobs", jobs, "--no-write"])
    assert exit_.value.code == 2
    assert "job(s): need at least 1 client" in capsys.readouterr().err
