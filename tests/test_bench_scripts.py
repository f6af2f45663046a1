"""Smoke checks of the benchmark scripts (bench/): they import and parse their arguments, run against
the current pipeline code (and, for the service benches, real API/worker processes on the test Redis
in namespaces of their own), reject arguments they cannot report on, record a failing row instead of
losing the others, count the UNet calls they report, and never write docs/ when told not to; and
checks of the arithmetic behind their figures (percentiles, the overhead hops, time behind other
jobs, batching's spread and noise marks, CPU busy, the FLOP count) on synthetic inputs. No timings
are asserted."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import io
import os
import pkgutil
import shutil
import signal
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import redis
import torch
from PIL import Image

import bench
from bench import _report, api_throughput, batching, gpu_path, overhead, png_encode, reliability, steps
from bench._pipeline import default_profile, networks
from bench._report import DOC, Busy, percentile
from models import pipeline as pipeline_module
from models.degradations import SEVERITY_LEVELS
from models.dsst import default_table
from models.profiles import PROFILES, REAL_UNET
from tests.conftest import REDIS_URL, TESTDATA, WEIGHTS

SCRIPTS = sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_"))


def _no_docs(*_: Any, **__: Any) -> None:
    raise AssertionError("--no-write run tried to write docs/")


@pytest.fixture(autouse=True)
def _short_busy_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every header measures how busy the CPUs are over BUSY_WINDOW (3 s): a blink is enough here."""
    monkeypatch.setattr(_report, "BUSY_WINDOW", 0.05)


@pytest.fixture
def bench_redis(redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> redis.Redis:
    """The service benches on the test Redis (each makes and purges a key prefix and queue of its own)."""
    for module in (_report, overhead, api_throughput, batching):
        monkeypatch.setattr(module, "REDIS_URL", REDIS_URL)
    return redis_conn


def _is_png(path: Path) -> bool:
    with Image.open(path) as im:
        return im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0


def _table(out: str, first: str, key: int) -> dict[str, list[str]]:
    """The rows of the (first) markdown table whose header line starts with `first`: its first `key`
    cells joined with " | " -> all its cells."""
    lines = out.splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith(first))
    rows: dict[str, list[str]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[" | ".join(cells[:key])] = cells
    return rows


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
    assert f"- set: 2 real aligned faces (`{tmp_path}`, sorted, first 2)" in out  # the folder it read
    assert (
        '`RestorationPipeline.from_pretrained("tiny")` on `cpu`, dtype fp32, the tiny profile\'s toy' in out
    )
    assert "| A: tiny pipeline ⚠ |" in out
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


def test_steps_real_profile_needs_the_real_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        steps.main(["--device", "cpu", "--profile", "real", "--weights-dir", str(tmp_path), "--no-write"])
    assert exit_.value.code == 2
    assert f"--profile real needs the real profile's released weights, which are not in {tmp_path}" in (
        capsys.readouterr().err
    )


def _steps_rows() -> list[steps.Row]:
    """Two levels of two faces, baseline 100; mixed-set means: B 62, C 24, D 50 (exactly the 0.5×
    target: met), A 62."""
    row = steps.Row  # level, known σ, baseline, B, C, σ̂ of input, A, A's σ, D, σ̂ of blur only
    return [
        row("mild", 0.5, 100, 24, 24, 0.0, 24, 1.0, 24, 0.1),
        row("mild", 0.8, 100, 24, 24, 0.2, 24, 1.0, 24, 0.3),
        row("moderate", 2.0, 100, 100, 24, 0.1, 100, 4.0, 76, 2.0),
        row("moderate", 3.0, 100, 100, 24, 0.3, 100, 4.0, 76, 2.4),
    ]


def _steps_report(column_a: steps.ColumnA | None) -> str:
    args = argparse.Namespace(per_image=1, seed=0)
    counted = {24: 24, 76: 76, 100: 100}
    return steps.report(
        "## head\n",
        _steps_rows(),
        ["mild", "moderate"],
        column_a,
        args,
        2,
        1.0,
        counted,
        default_table(),
        "p",
    )


def test_steps_report_means_ratios_and_verdicts() -> None:
    section = _steps_report(steps.ColumnA(False, "toy"))

    rows = _table(section, "| level |", key=1)
    b, c, d, a = 4, 5, 7, 9  # cells: mean NFE (ratio to the baseline)
    assert [rows["mild"][k] for k in (b, c, d, a)] == ["24.0 (0.24×)"] * 4
    assert [rows["moderate"][k] for k in (b, d, a)] == ["100.0 (1.00×)", "76.0 (0.76×)", "100.0 (1.00×)"]
    mixed = rows["**mixed set**"]
    assert mixed[1:4] == ["4", "0.50–3.00", "100"]
    assert [mixed[k] for k in (b, c, d, a)] == [
        "62.0 (0.62×)",
        "24.0 (0.24×)",
        "50.0 (0.50×)",
        "62.0 (0.62×)",
    ]
    assert mixed[6] == "0.15 (median)" and mixed[8] == "1.15 (median)"
    assert "the estimator read it exactly: 0.62× — **not met**." in section
    assert "without the noise and JPEG it would face: 0.50× — **met**." in section  # ≤ target
    assert "- C (σ̂ of the degraded input): 0.24× — **met**, but **not a valid proxy**" in section
    assert "- A (tiny pipeline): 0.62× — **not met**, but **not a real-model number**" in section
    assert "Valid proxies meeting it: D (of B, D). No column is the real model's" in section
    assert (
        "Starts chosen — B: start 24: 2, start 100: 2; C: start 24: 4; D: start 24: 2, start 76: 2."
        in section
    )


def test_steps_report_says_what_column_a_is() -> None:
    real = _steps_report(steps.ColumnA(True, "released weights (prior.pt, restorer.pth)"))
    assert "| A: real pipeline |" in real and "No column here is a real-model measurement" not in real
    assert (
        "- A (real pipeline, released weights (prior.pt, restorer.pth)): start 24: 2, start 100: 2;" in real
    )
    assert "Column A, the real model's `dynfacerestore` NFE: 0.62× — **not met**." in real
    skipped = _steps_report(None)
    columns = next(line for line in skipped.splitlines() if line.startswith("| level |"))
    assert "A: " not in columns and "⚠" not in skipped
    assert "- A (the pipeline's decision) skipped in this run (`--skip-pipeline`)." in skipped
    assert "No column here is a real-model measurement" in skipped


def test_steps_plot_writes_only_where_told(tmp_path: Path) -> None:
    levels = list(SEVERITY_LEVELS)
    rows = [steps.Row(lvl, 2.0, 100, 53, 24, 0.5, 24, 1.0, 53, 2.0) for lvl in levels]
    out = tmp_path / "nfe.png"
    figure = steps.FIGURE  # the committed figure, which a plot told to write elsewhere must leave alone
    before = (figure.read_bytes(), figure.stat().st_mtime_ns) if figure.exists() else None

    steps.plot(rows, levels, steps.ColumnA(False, "toy"), out=out)

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
    before = DOC.stat().st_mtime_ns, gpu_path.figure_path(gpu_path.FIGURE).exists()

    gpu_path.main(
        ["--device", "cpu", "--repeats", "1", "--warmups", "1", "--restorer-rounds", "1", "--doc", str(doc)]
    )

    section = doc.read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in section.splitlines() if line.startswith("| ")}
    expected = [r.name for r in gpu_path.unet_rows(cuda=False, groups=gpu_path.CPU_GROUPS)]
    expected += ["restorer fp32, NCHW", "restorer fp32, channels_last"]
    assert set(expected) <= set(rows)
    # On CPU no copy happens: no copy rows that would look measured, and the section says why.
    assert not any(name.startswith(("faces →", "guide →")) for name in rows)
    assert "hand the tensor back as it is, so no copy happens and there is nothing to measure" in section
    # The figure beside the doc written, and linked from the section.
    assert _is_png(tmp_path / "benchmarks" / gpu_path.FIGURE)
    assert f"![Speed-up per option](benchmarks/{gpu_path.FIGURE})" in section
    assert "**RuntimeError: injected failure**" in rows["bf16, NCHW"] and "second line" not in section
    for name in set(expected) - {"bf16, NCHW"}:
        assert "**" not in rows[name], rows[name]  # measured: no error in its place
    # The section is rewritten after every task (a killed run keeps what it measured), then once more.
    tasks = len(expected) - 1  # the two restorer rows are one task
    assert len(writes) == tasks + 1
    assert "**Partial: written mid-run" in writes[0] and "Partial" not in writes[-1]
    assert "Run took" in section and "GPU path: fast-path switches" in capsys.readouterr().out
    assert (DOC.stat().st_mtime_ns, gpu_path.figure_path(gpu_path.FIGURE).exists()) == before


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
    gpu_path.main(["--device", "cpu", "--rows", "sdpa", "--budget-s", "0", "--no-write"])
    out = capsys.readouterr().out
    assert out.count("**not run: the 0 s budget was spent**") == 1 + 1  # the reference and the SDPA row


def test_gpu_path_times_no_copy_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        gpu_path.main(["--device", "cpu", "--rows", "transfer", "--no-write"])
    assert exit_.value.code == 2
    assert "--rows transfer: on CPU `to_device` and `to_host` hand the tensor back" in capsys.readouterr().err


def test_gpu_path_plot(tmp_path: Path) -> None:
    """Made-up results, a failed row among them: the figure is drawn from the results alone."""
    rows = gpu_path.unet_rows(cuda=False, groups=gpu_path.CPU_GROUPS)
    tasks = [gpu_path.Task([r.name], r.group, list) for r in rows]
    tasks.append(gpu_path.Task(["restorer fp32, NCHW", "restorer fp32, channels_last"], "restorer", list))
    args = argparse.Namespace(batch=1)
    run = gpu_path.Run(
        "## head", args, torch.device("cpu"), None, networks(PROFILES["tiny"]), 5, rows, tasks, None, 0.0
    )
    for k, name in enumerate(n for task in tasks for n in task.names):
        run.results[name] = gpu_path.Result(name, "", [0.01 * (k + 1)])
    run.results["bf16, NCHW"].error = "RuntimeError: injected"
    out = tmp_path / "speedup.png"

    gpu_path.plot(run, out)

    assert sorted(tmp_path.iterdir()) == [out] and _is_png(out)


def test_batching_runs_on_a_device_and_profile_given(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(batching, "write_section", _no_docs)
    args = ["--device", "cpu", "--profile", "tiny", "--sizes", "2", "--steps", "2", "--repeats", "1"]
    batching.main([*args, "--skip-worker", "--no-write"])
    out = capsys.readouterr().out
    assert "| 2 | one call, max_batch=2 |" in out and "| 2 | 2 one-face call(s) |" in out
    assert "device `cpu`, profile `tiny`" in out and "Not run (`--skip-worker`)." in out


@pytest.mark.usefixtures("bench_redis")
def test_batching_worker_runs_the_dtype_asked_for(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(batching, "write_section", _no_docs)
    monkeypatch.setattr(batching, "plot", _no_docs)
    args = ["--device", "cpu", "--profile", "tiny", "--dtype", "bf16", "--sizes", "1", "--steps", "1"]
    args += ["--repeats", "1", "--worker-repeats", "1", "--jobs", "1", "--worker-sizes", "1"]
    batching.main([*args, "--no-write"])

    out = capsys.readouterr().out
    assert "pipeline dtype bf16" in out  # in-process
    assert "profile `tiny`, dtype bf16\n  (as the worker reported it)" in out  # what the worker loaded
    assert "| 1 | worker, batching off |" in out


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


# --- the arithmetic behind the figures ------------------------------------------------------------


def test_write_section_replaces_the_doc_whole_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("# Doc\n\nby hand\n\n<!-- bench:a:start -->\nold a\n<!-- bench:a:end -->\n")
    doc.chmod(0o640)

    _report.write_section("a", "new a", doc)
    _report.write_section("b", "new b", doc)

    written = doc.read_text()
    assert written == (
        "# Doc\n\nby hand\n\n<!-- bench:a:start -->\nnew a\n<!-- bench:a:end -->\n\n"
        "<!-- bench:b:start -->\nnew b\n<!-- bench:b:end -->\n"
    )
    assert doc.stat().st_mode & 0o777 == 0o640  # the doc's own mode, not the new file's
    real_write = Path.write_bytes

    def cut_short(self: Path, data: bytes) -> int:
        real_write(self, data[: len(data) // 2])
        raise KeyboardInterrupt("signal 15")  # gpu_path's SIGTERM, halfway through the write

    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(Path, "write_bytes", cut_short)
        _report.write_section("a", "newer a", doc)

    assert doc.read_text() == written and sorted(tmp_path.iterdir()) == [doc]  # no half file left either


def test_reliability_load_without_a_finished_job_gives_no_latency() -> None:
    section = reliability.load_section(
        reliability.LoadResult(jobs=3, clients=1, seconds=10.0),
        {"record_ttl_seconds": 150, "result_ttl_seconds": 30},
    )
    assert "| submit → terminal, p50 / p95 / max | — (no job finished) |" in section


def test_percentile_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 10, 101):
        values = rng.lognormal(size=n)
        for q in (0, 5, 25, 50, 90, 95, 99, 100):
            assert percentile(values.tolist(), q) == pytest.approx(np.percentile(values, q), rel=1e-12)


def test_cpu_busy_is_the_share_of_cpu_time_not_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    real = _report._cpu_times()
    if real is not None:  # Linux: (busy, total) jiffies
        assert 0 <= real[0] <= real[1]
    samples = iter([(1000, 4000), (1150, 4400)])  # 150 busy of 400 jiffies over the window
    monkeypatch.setattr(_report, "_cpu_times", lambda: next(samples))
    busy = _report.cpu_busy(0.0)
    assert busy.fraction == pytest.approx(0.375) and busy.high
    assert "38 % of" in busy.text()
    head = _report.header("Title", busy=busy)
    assert f"({busy.text()})" in head  # the one figure, in the machine line
    assert "- **Load warning:** the CPUs were 38 % busy over the 0 s before this run started" in head
    quiet = Busy(0.1, 3.0, 2)
    assert not quiet.high and quiet.warning() == "" and "Load warning" not in _report.header("T", busy=quiet)
    monkeypatch.setattr(_report, "_cpu_times", lambda: None)
    assert _report.cpu_busy(0.0) == Busy(None, 0.0, os.cpu_count() or 1)
    assert not Busy(None, 3.0, 2).high and "unknown" in Busy(None, 3.0, 2).text()


def _at(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.UTC)


@pytest.mark.parametrize("one_request", [False, True])
def test_overhead_hops_add_up_to_e2e_minus_direct(one_request: bool) -> None:
    sent = 1_700_000_000.0
    created, enqueued = sent + 0.0121, sent + 0.0129
    behind, dequeue = 0.0503, 0.0042
    rq_started = enqueued + behind + dequeue
    started = rq_started + 0.0004
    inference = 0.1304
    completed = started + inference + 0.0025
    answered = completed + 0.0061
    received = answered if one_request else answered + 0.0055
    record = {
        "created_at": _at(created).isoformat(),
        "started_at": _at(started).isoformat(),
        "completed_at": _at(completed).isoformat(),
        "timings": {"queue_wait_seconds": started - created, "inference_seconds": inference},
    }
    job = overhead.Job(received - sent, sent, answered, received, record, None, ramp_up=False)
    rq_job: Any = SimpleNamespace(enqueued_at=_at(enqueued), started_at=_at(rq_started))
    direct = 0.1237

    hops = job.hops(rq_job, direct, behind)

    assert list(hops) == list(overhead.HOPS)
    assert sum(hops.values()) == pytest.approx(job.e2e - direct, abs=1e-5)  # ISO times: µs
    assert hops["behind other jobs"] == behind
    assert hops["dequeue"] == pytest.approx(dequeue, abs=1e-5)
    assert hops["pipeline in worker − direct"] == pytest.approx(inference - direct, abs=1e-12)
    assert hops["GET result"] == (0.0 if one_request else pytest.approx(0.0055, abs=1e-6))
    # service overhead (e2e − behind − inference) = every hop but those two
    rest = sum(v for k, v in hops.items() if k not in ("behind other jobs", "pipeline in worker − direct"))
    assert job.e2e - behind - job.inference == pytest.approx(rest, abs=1e-5)


def test_overhead_job_without_its_record_says_so() -> None:
    job = overhead.Job(0.1, 0.0, 0.1, 0.1, None, "http://x/v1/restorations/abc", ramp_up=False)
    with pytest.raises(RuntimeError, match="never read"):
        _ = job.inference


def test_overhead_waits_behind_other_jobs() -> None:
    # One client: each job enqueued after the one before ended; the dequeue hop is not waiting.
    assert overhead.waits_behind([(0.0, 0.005, 0.100), (0.120, 0.125, 0.200), (0.220, 0.226, 0.3)]) == [
        0.0,
        0.0,
        0.0,
    ]
    # Three jobs enqueued at once (given out of order): the second waits until the first ended (not
    # until its own start: the worker's dequeue after that end is service cost), the third until the
    # second ended.
    spans = [(0.002, 0.205, 0.300), (0.000, 0.005, 0.100), (0.001, 0.105, 0.200)]
    assert overhead.waits_behind(spans) == pytest.approx([0.198, 0.0, 0.099])
    # Enqueued while the previous job was ending: only the overlap counts; no end recorded: nothing.
    assert overhead.waits_behind([(0.0, 0.01, 0.1), (0.095, 0.104, None), (0.1, 0.2, 0.3)]) == (
        pytest.approx([0.0, 0.005, 0.0])
    )


def test_gpu_path_counts_the_real_unet_flops() -> None:
    # Counted independently (by hand, layer by layer: convolutions, linears, attention matmuls).
    assert gpu_path.unet_flops(REAL_UNET, 512, 1) == 378_299_277_312


def test_api_throughput_upload_is_about_200_kb() -> None:
    jpeg = api_throughput.make_jpeg()
    assert abs(len(jpeg.data) - api_throughput.TARGET_BYTES) <= 10_000
    with Image.open(io.BytesIO(jpeg.data)) as im:
        assert (im.format, im.size) == ("JPEG", jpeg.size)
    body, ctype = api_throughput.multipart(jpeg.data)
    assert jpeg.data in body and ctype.startswith("multipart/form-data; boundary=")


def _api_runs() -> list[api_throughput.Run]:
    """Made-up runs of 1 and 2 workers: 90 of 100 timed submissions accepted in 2 s by 1 worker
    (6 refused, 4 transport errors), 2 warm-ups refused; memory 300 KiB per upload at C = 4, and an
    RSS that fell at C = 1 (whole-process noise, reported as measured)."""
    mib = 2**20
    tp = api_throughput.Throughput(
        100, 4, 2.0, [0.01] * 100, Counter({"202": 90, "503": 6, "error:ReadTimeout": 4})
    )
    memory = [
        api_throughput.Memory(
            1, idle=100 * mib, loaded=100 * mib - 1000 * 1024, statuses=Counter({"202": 1})
        ),
        api_throughput.Memory(
            4, idle=100 * mib, loaded=100 * mib + 4 * 300 * 1024, statuses=Counter({"202": 4})
        ),
    ]
    one = api_throughput.Run(1, tp, memory, warmups=Counter({"202": 70, "429": 2}))
    two = api_throughput.Run(
        2, api_throughput.Throughput(100, 4, 1.0, [0.01] * 100, Counter({"202": 100})), []
    )
    return [one, two]


def test_api_throughput_report_rates_accepted_submissions_and_counts_every_refusal() -> None:
    jpeg = api_throughput.Jpeg(b"x" * 10, api_throughput.PHOTOS / "00.jpg", (10, 10), 90)
    args = argparse.Namespace(clients=4, warmup=72)
    section = api_throughput.report("## head", args, jpeg, 200, _api_runs(), 5.0, "abc", Busy(0.1, 3.0, 2))

    throughput = _table(section, "| uvicorn workers | clients |", key=1)
    assert throughput["1"][3] == "45.0"  # 90 accepted ÷ 2 s: refusals and errors are no throughput
    assert throughput["1"][5] == "202: 90, 503: 6, error:ReadTimeout: 4"  # every status, kept
    assert throughput["2"][3] == "100.0"
    # The warm-ups' 2 refusals too: 6 + 4 + 2.
    assert "throughput and memory phases): **12** (2 of them in the warm-ups)" in section
    memory = _table(section, "| uvicorn workers | uploads in flight (C) |", key=2)
    assert memory["1 | 4"][4] == "300" and memory["1 | 1"][4] == "-1000"  # KiB per upload


def test_api_throughput_plot(tmp_path: Path) -> None:
    out = tmp_path / "api.png"
    api_throughput.plot(_api_runs(), out)  # the 2-worker run has no memory levels: a gap, not an error
    assert sorted(tmp_path.iterdir()) == [out] and _is_png(out)


def _overhead_run(name: str, flow: str, clients: int, ms: float) -> overhead.Run:
    series = [ms / 1000 * f for f in (0.9, 1.0, 1.3)]
    hops = {hop: series for hop in overhead.HOPS}
    return overhead.Run(name, flow, clients, 3, 1.0, series, series, series, series, series, series, hops)


def test_overhead_plot(tmp_path: Path) -> None:
    rows = [_overhead_run("PNG", flow, c, 20.0 * c) for flow in overhead.FLOWS for c in (1, 10, 50)]
    rows += [_overhead_run("JPEG", flow, 1, 15.0) for flow in overhead.FLOWS]  # one point per series
    rows.append(_overhead_run("JPEG", "one request", 1, -2.0))  # e2e − direct can dip below 0
    out = tmp_path / "overhead.png"
    overhead.plot(rows, out)
    assert sorted(tmp_path.iterdir()) == [out] and _is_png(out)


@pytest.mark.parametrize("worker_part", [True, False])
def test_batching_plot(tmp_path: Path, worker_part: bool) -> None:
    def runs(b: int, per_face: float) -> batching.Runs:
        return batching.Runs(
            [b * per_face, b * per_face * 1.1], [0.5], [0.5], [per_face * k for k in range(1, b + 1)]
        )

    results = {b: (runs(b, 1.0 / b**0.5), runs(b, 1.0), 1) for b in (1, 2, 4, 8)}
    across = {b: (runs(b, 0.8), 1, [float(b)]) for b in (1, 2, 4, 8)} if worker_part else None
    out = tmp_path / "batching.png"
    batching.plot(results, across, 8, out)
    assert sorted(tmp_path.iterdir()) == [out] and _is_png(out)


def test_batching_alternates_the_order_and_marks_noise(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Timings made up per call: B = 1's ratio spreads 0.91–1.11 (same work both ways), B = 2 is 2×
    faster batched, B = 4 1.02× (inside B = 1's spread, so within noise)."""
    made: list[batching.Counted] = []
    real_make = batching.make_pipeline

    def make(*args: Any) -> batching.Counted:
        made.append(real_make(*args))
        return made[-1]

    calls: list[tuple[str, int]] = []
    b1_factors = iter([1.0, 0.9, 1.1, 1.0, 1.05])  # the warm-up's, then one per repeat

    def fake(counted: batching.Counted, faces: np.ndarray, *_: Any) -> Any:
        single = counted is made[0]
        b = len(faces)
        calls.append(("one" if single else "batched", b))
        wall = 1.0 if single else next(b1_factors) if b == 1 else b * {2: 0.5, 4: 0.98}[b]
        return wall, wall / 2, wall / 2, faces

    monkeypatch.setattr(batching, "make_pipeline", make)
    monkeypatch.setattr(batching, "timed", fake)
    monkeypatch.setattr(batching, "write_section", _no_docs)
    args = ["--device", "cpu", "--profile", "tiny", "--sizes", "1,2,4", "--repeats", "4"]
    batching.main([*args, "--skip-worker", "--no-write"])

    b2 = calls[calls.index(("batched", 2)) :][:13]  # its warm-up, then 4 repeats of 1 batched + 2 single
    order = [way for way, _ in b2[1:]]
    batched_first, one_first = ["batched", "one", "one"], ["one", "one", "batched"]
    assert order == batched_first + one_first + batched_first + one_first
    rows = _table(capsys.readouterr().out, "| B | way |", key=2)
    assert rows["1 | one call, max_batch=1"][6] == "0.98× (0.91–1.11), noise reference"
    assert rows["2 | one call, max_batch=2"][6] == "2.00× (2.00–2.00)"
    assert rows["4 | one call, max_batch=4"][6] == "1.02× (1.02–1.02), within noise"
    assert rows["4 | one call, max_batch=4"][7] == "1.02× (1.02–1.02), within noise"  # the sampler's too


def test_batching_speed_up_cells() -> None:
    assert batching.speed_up([1.3], [0.9, 1.1], False) == "1.30×"  # one repeat: no spread
    assert batching.speed_up([1.0, 1.2, 1.1], None, False) == "1.10× (1.00–1.20)"
    assert batching.speed_up([1.0, 1.2, 1.1], [0.9, 1.15], False).endswith(", within noise")
    assert batching.speed_up([1.2, 1.3, 1.25], [0.9, 1.15], False) == "1.25× (1.20–1.30)"


# --- whole runs that write nothing ----------------------------------------------------------------


def test_steps_builds_its_header_before_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    real_header, real_decide = steps.header, steps.decide

    def header(*args: Any, **kwargs: Any) -> str:
        order.append("header")
        return real_header(*args, **kwargs)

    def decide(*args: Any, **kwargs: Any) -> Any:
        order.append("run")
        return real_decide(*args, **kwargs)

    def stop(*_: Any, **__: Any) -> None:
        raise KeyboardInterrupt  # the run itself is checked above; only the order matters here

    monkeypatch.setattr(steps, "header", header)
    monkeypatch.setattr(steps, "decide", decide)
    monkeypatch.setattr(steps, "severity_set", stop)
    with pytest.raises(KeyboardInterrupt):
        steps.main(["--images", "1", "--no-write"])
    assert order == ["header"]


@pytest.mark.usefixtures("bench_redis")
def test_overhead_runs_and_writes_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(overhead, "write_section", _no_docs)
    overhead.main(["--levels", "1,2", "--jobs", "2,3", "--direct", "2", "--warmup", "1", "--no-write"])

    out = capsys.readouterr().out
    rows = _table(out, "| upload | flow | clients |", key=3)
    assert set(rows) == {
        "PNG | two requests | 1",
        "PNG | one request | 1",
        "PNG | two requests | 2",
        "PNG | one request | 2",
        "JPEG | two requests | 1",
        "JPEG | one request | 1",
    }
    assert rows["PNG | one request | 2"][3] == "1 (+ 2)"  # each client's first job is ramp-up
    hops = _table(out, "| upload, flow, clients |", key=1)
    for key, cells in rows.items():
        name, flow, clients = key.split(" | ")
        if clients == "1":
            # At 1 client a job waits behind no other (at most behind the tail of the one before, when
            # its upload was quicker than that: rare, and a few ms) ...
            assert float(cells[7]) <= 10.0
            start = f"- {name} upload, {flow}: e2e − direct p50 "
            verdict = next(line for line in out.splitlines() if line.startswith(start))
            paired = float(verdict.split("own pipeline time p50 ")[1].split(" ms")[0])
            # ... so the service overhead is the paired reading (e2e − inference), less that
            assert 0.0 <= paired - float(cells[8].split(" / ")[0]) <= 10.0
        assert hops[f"{name}, {flow}, {clients}"][3] == cells[7]  # the hop is the column
    assert "PNG: 2 one after each job of its 1-client runs (the service idle meanwhile), 0 after" in out
    assert out.count("**met**") + out.count("**not met**") == 2 * 4 + 2


@pytest.mark.usefixtures("bench_redis")
def test_api_throughput_runs_warns_from_its_one_load_figure_and_writes_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(api_throughput, "write_section", _no_docs)
    monkeypatch.setattr(api_throughput, "cpu_busy", lambda: Busy(0.6, 3.0, 2))  # a busy machine
    args = ["--workers", "1", "--submissions", "12", "--warmup", "2", "--clients", "3", "--inflight", "1,2"]
    api_throughput.main([*args, "--no-write"])

    out = capsys.readouterr().out
    assert "(CPU busy before the run: 60 % of 2 logical CPU(s) over 3 s (/proc/stat))" in out
    assert "**Load warning:** the CPUs were 60 % busy over the 3 s before this run started" in out
    assert "With the load warning above, the 1- vs 2-worker comparison especially is not reliable." in out
    assert "load average" not in out
    throughput = _table(out, "| uvicorn workers | clients |", key=1)
    assert throughput["1"][1:3] == ["3", "12"] and throughput["1"][5] == "202: 12"
    memory = _table(out, "| uvicorn workers | uploads in flight (C) |", key=2)
    assert set(memory) == {"1 | 1", "1 | 2"} and memory["1 | 2"][5] == "202: 2"
    assert "0 left" in out and "throughput and memory phases): **0** (0 of them in the warm-ups)" in out


def test_png_encode_runs_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = sorted((TESTDATA / "photos").glob("*.jpg"))[0]
    shutil.copy(photo, tmp_path / photo.name)
    monkeypatch.setattr(png_encode, "PHOTOS", tmp_path)  # one photo: the run stays short
    monkeypatch.setattr(png_encode, "write_section", _no_docs)
    png_encode.main(["--levels", "1", "--faces", "1", "--repeats", "1", "--no-write"])

    out = capsys.readouterr().out
    rows = _table(out, "| level |", key=1)
    assert set(rows) == {"1", "6"}  # level 6 is always there, the reference
    assert rows["6"][3:5] == ["1.00×", "1.00×"]
    assert "Count (pixels) per group: photo 1 " in out and "face 1 " in out


def test_reliability_no_write_prints_its_sections(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(reliability, "write_section", _no_docs)
    monkeypatch.setattr(sys, "path", list(sys.path))  # inputs_section adds tests/reliability to it
    assert reliability.main(["--inputs", "--kills", "0", "--jobs", "0", "--no-write"]) == 0

    out = capsys.readouterr().out
    assert "## Reliability: generated bad inputs" in out and "5xx seen: **0**" in out
    assert "answered with another status/code than\n  expected: **0**" in out
    assert "## Reliability: kill -9 loop and bounded load" in out and "- scale: 0 kills; 0 jobs" in out
