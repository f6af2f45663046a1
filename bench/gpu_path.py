"""The GPU fast-path switches (models/speed.py `SpeedOptions`, the pipeline's `dtype`; `DYNFACE_*` in
docs/configuration.md): time of one UNet call under each, and how far each one's output is from the
plain fp32 path, on the device given; plus the pinned-memory copies (CUDA only: on CPU `to_device` and
`to_host` hand the tensor back as it is, so no copy happens and there is nothing to time), SDPA's
default backend vs its math one, the restorer's layout, and the FLOP lower bound per face.

What is timed is the service's own code, not a re-implementation: each row builds a
`RestorationPipeline` as the worker does (`dtype=`, `speed=SpeedOptions(...)`, outside inference
mode) and times `RestorationPipeline._eps`, the sampler's per-step UNet call (in the pipeline's
layout, the UNet or its `torch.compile` wrapper, first 3 channels back as float32), under
`torch.inference_mode()` as `_restore_faces` runs it. Precision is the pipeline's `dtype`, applied as
upstream's fp16 mode (`IDDPMUNet.to_precision`: the blocks' convolutions in half, the time embedding,
norms and output head float32), which is all the service does (it has no `torch.autocast` mode, so
none is timed). Copies use the service's `models.speed.to_device` / `to_host`; the restorer, `_restore`.

FLOP lower bound per face: FLOPs of one UNet forward per face (`torch.utils.flop_counter.FlopCounterMode`
on the meta device: no weights, no memory) × NFE ÷ the GPU's peak FLOP/s. A bound, not an estimate:
real kernels reach a fraction of the peak, and GroupNorm/SiLU/softmax element-wise work is not
counted. The peak is `--peak-tflops`, else the datasheet BF16/FP16 dense peak of the GPU's model
(`GPU_PEAKS_TFLOPS`); on CPU there is none unless given.

Robust by construction, since GPU time is scarce: every row runs on its own, a failing one (an
inductor/Triton error, out of memory) is recorded in the table with its error and the others go on;
the section is rewritten after every row, so a run killed midway still leaves what it measured; rows
not started once `--budget-s` has passed are listed as skipped. Progress goes to stdout.

Defaults by device: on CUDA the real profile's 512 px networks (the released weights where
`--weights-dir` holds them, else the architecture with random weights, said in the report) and every
row; on CPU the tiny profile and no compile or copy rows (a smoke check of the script: CPU timings that
say nothing about a GPU).

Figure (docs/benchmarks/gpu_path_speedup.png beside `--doc`, redrawn with every write of the section):
each UNet row's speed-up over the reference and the restorer's channels_last over NCHW.

Usage: .venv/bin/python -m bench.gpu_path [--device cuda[:N]|cpu] [--profile real|tiny]
       [--rows precision,sdpa,transfer,restorer,compile,cudagraphs] [--repeats N] [--budget-s S]
       [--peak-tflops T] [--doc PATH | --no-write]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import re
import signal
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench._pipeline import Networks, default_profile, networks, parse_device
from bench._report import DOC, ROOT, figure_link, figure_path, header, pyplot, save_figure, write_section
from models.dsst import default_table
from models.pipeline import RestorationPipeline, auto_dtype
from models.profiles import PROFILES
from models.speed import SpeedOptions, to_device, to_host
from models.unet import IDDPMUNet

#: Row groups (`--rows`). The reference row always runs: every other row is compared with it.
GROUPS = ("precision", "sdpa", "transfer", "restorer", "compile", "cudagraphs")
#: On CPU: no compile rows by default (a cold compile of even the tiny UNet took minutes on this
#: project's 2-core machine), and no CUDA graphs or copies: neither exists there.
CPU_GROUPS = ("precision", "sdpa", "restorer")
TIMESTEP = 500
FIGURE = "gpu_path_speedup.png"


def nfes() -> dict[str, int]:
    """NFE per face: DifFace's fixed start and the shipped DSST table's starts."""
    table = default_table()
    starts = {f"DSST σ={s:g} px": i for s, i in zip(table.sigmas, table.start_indices, strict=True)}
    return {"difface baseline": PROFILES["real"].method.baseline_start_index, **starts}


#: Dense (no sparsity) tensor-core peaks from NVIDIA's datasheets, for the bound's example rows when
#: this run has no peak of its own.
PEAKS_TFLOPS = {"H100 SXM, BF16/FP16 dense": 989.0, "A100 SXM, BF16/FP16 dense": 312.0}

#: BF16/FP16 dense peaks (TFLOP/s, NVIDIA datasheets) by the words of `torch.cuda.get_device_name`
#: that name the part, first match wins: the PCIe/NVL boards share the SXM part's name but have lower
#: clocks and power. Whole words, so "RTX A1000" is not an A100 nor "GH200" an H200.
GPU_PEAKS_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "PCIE"), 756.0),
    (("H100", "NVL"), 835.0),
    (("H200", "NVL"), 835.0),
    (("H100",), 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    (("H200",), 989.0),  # SXM ("NVIDIA H200")
    (("A100",), 312.0),  # SXM and PCIe alike ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe")
)


def is_mig(gpu_name: str) -> bool:
    """A MIG slice ("NVIDIA H100 80GB HBM3 MIG 1g.10gb"): its name holds the whole chip's, but it has
    only a fraction of the chip's SMs, so the chip's datasheet peak does not apply."""
    return "MIG" in gpu_name.upper().split()


def peak_tflops(gpu_name: str | None, given: float | None) -> tuple[str, float] | None:
    """(what it is, TFLOP/s) of the peak the bound uses: the given one, else the datasheet one of a
    known GPU; None on CPU, a MIG slice or an unknown GPU (a CPU has no comparable tensor-core peak)."""
    if given:
        return "given with --peak-tflops", given
    if gpu_name and not is_mig(gpu_name):
        words = set(re.split(r"[\s\-_]+", gpu_name.upper()))
        for part, tflops in GPU_PEAKS_TFLOPS:
            if words.issuperset(part):
                return f"{' '.join(part)} BF16/FP16 dense, datasheet, matched from `{gpu_name}`", tflops
    return None


@dataclass(frozen=True)
class UNetRow:
    name: str
    group: str
    dtype: str  # the pipeline's dtype (DYNFACE_DTYPE)
    speed: SpeedOptions
    base: str | None = None  # the row this one differs from by one switch ("× vs base")
    #: TF32 off for this row alone (CUDA): PyTorch enables it for cuDNN convolutions by default, so an
    #: unqualified "fp32" on a GPU is mostly TF32. Other rows run with the process's flags, as the
    #: worker (which never sets them) does.
    tf32_off: bool = False
    sdpa_math: bool = False  # SDPA forced to its math backend (no setting: the UNet always uses SDPA)

    @property
    def settings(self) -> str:
        """The worker settings (DYNFACE_ prefix left out) that select this row's path."""
        s = f"DTYPE={self.dtype} CHANNELS_LAST={str(self.speed.channels_last).lower()}"
        if self.speed.compile:
            s += f" COMPILE=true COMPILE_MODE={self.speed.compile_mode}"
        return s + (" + SDPA math backend (no setting)" if self.sdpa_math else "")


REFERENCE = "fp32, NCHW (reference: TF32 off)"


def unet_rows(cuda: bool, groups: Sequence[str]) -> list[UNetRow]:
    """The UNet rows of `groups`, in run order: the reference first, compiled rows last (their
    compile is the slow and fragile part). The service default is fp16 + channels_last on CUDA
    (`auto_dtype`, SpeedOptions' default), fp32 + channels_last on CPU."""
    nchw, cl = SpeedOptions(channels_last=False), SpeedOptions()
    default = "fp16" if cuda else "fp32"
    fp32_nchw = "fp32, NCHW" if cuda else REFERENCE
    rows = [UNetRow(REFERENCE, "precision", "fp32", nchw, tf32_off=True)]
    if "precision" in groups:
        if cuda:
            rows.append(UNetRow("fp32, NCHW", "precision", "fp32", nchw, REFERENCE))
        rows.append(UNetRow("fp32, channels_last", "precision", "fp32", cl, fp32_nchw))
        for dtype in ("fp16", "bf16"):
            rows.append(UNetRow(f"{dtype}, NCHW", "precision", dtype, nchw, fp32_nchw))
            rows.append(UNetRow(f"{dtype}, channels_last", "precision", dtype, cl, f"{dtype}, NCHW"))
    base = f"{default}, channels_last"
    if "sdpa" in groups:
        rows.append(UNetRow(f"{base}, SDPA math backend", "sdpa", default, cl, base, sdpa_math=True))
    if "compile" in groups:
        rows.append(UNetRow(f"{base}, compile", "compile", default, SpeedOptions(compile=True), base))
    if "cudagraphs" in groups and cuda:
        graphs = SpeedOptions(compile=True, compile_mode="reduce-overhead")
        rows.append(
            UNetRow(f"{base}, compile reduce-overhead (CUDA graphs)", "cudagraphs", default, graphs, base)
        )
    if "compile" in groups and default != "fp32":
        rows.append(
            UNetRow(
                "fp32, channels_last, compile",
                "compile",
                "fp32",
                SpeedOptions(compile=True),
                "fp32, channels_last",
            )
        )
    return rows


@dataclass
class Result:
    """One row's outcome; `error` is set instead of the numbers when it failed or did not run."""

    name: str
    group: str
    times: list[float] = field(default_factory=list)  # seconds per call after the warm-ups
    first: float | None = None  # seconds of the first call (compilation included)
    diff: float | None = None  # max abs difference from what it is compared with
    rel: float | None = None  # relative L2 difference, likewise
    detail: str = ""
    error: str | None = None

    @property
    def ms(self) -> float | None:
        return statistics.median(self.times) * 1000 if self.times and self.error is None else None


def error_text(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(e).__name__}: {first[:200]}".replace("|", "\\|")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def tf32_off(off: bool) -> Iterator[None]:
    """TF32 off for convolutions and matmuls while inside (when `off`); the flags as found after."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if off:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def sdpa_math(on: bool) -> AbstractContextManager[None]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH) if on else nullcontext()


def pipeline(nets: Networks, device: torch.device, dtype: str, speed: SpeedOptions) -> RestorationPipeline:
    """A pipeline as the worker builds one, on copies of the networks (the constructor casts and
    re-lays-out the modules it is given in place, and each row needs them as loaded)."""
    return RestorationPipeline(
        nets.profile,
        copy.deepcopy(nets.unet),
        copy.deepcopy(nets.restorer),
        device=device,
        dtype=dtype,
        speed=speed,
        weights_dir=ROOT / "nonexistent",  # no face parser: nothing here pastes
    )


def timed_calls(
    call: Callable[[], torch.Tensor], device: torch.device, warmups: int, repeats: int
) -> tuple[torch.Tensor, float, list[float]]:
    """The first call's output (copied to the host at once: a CUDA graph's next replay reuses its
    memory) and seconds, then `warmups` − 1 more untimed calls (cuDNN's algorithm choice, CUDA graph
    recording), then `repeats` timed ones, each synchronised."""
    sync(device)
    t0 = time.perf_counter()
    out = call()
    sync(device)
    first = time.perf_counter() - t0
    host = out.to("cpu", copy=True)
    for _ in range(warmups - 1):
        call()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        call()
        sync(device)
        times.append(time.perf_counter() - t0)
    return host, first, times


def time_unet(
    nets: Networks, row: UNetRow, x: torch.Tensor, t: torch.Tensor, warmups: int, repeats: int
) -> tuple[torch.Tensor, Result]:
    """`RestorationPipeline._eps(x, t)` on this row's pipeline: eps (host, float32) and the row's
    timings. Compiled rows start from empty compile caches, as a worker's first job does, and say
    whether dynamo broke the graph or inductor skipped the CUDA graphs: both fall back silently (to
    slower code, never wrong results), so a row could otherwise time less than its name says."""
    from torch._dynamo.utils import counters  # private, but where those two silent fallbacks are counted

    if row.speed.compile:
        torch.compiler.reset()
    before = sum(counters["graph_break"].values()), counters["inductor"]["cudagraph_skips"]
    try:
        pipe = pipeline(nets, x.device, row.dtype, row.speed)  # outside inference mode, as the worker
        with tf32_off(row.tf32_off), sdpa_math(row.sdpa_math), torch.inference_mode():
            eps, first, times = timed_calls(lambda: pipe._eps(x, t), x.device, warmups, repeats)
        breaks = sum(counters["graph_break"].values()) - before[0]
        skips = counters["inductor"]["cudagraph_skips"] - before[1]
    finally:
        if row.speed.compile:
            torch.compiler.reset()  # its graphs and CUDA graph pools are not the next row's
    notes = [f"{breaks} graph break(s)"] if breaks else []
    if skips and row.speed.compile_mode == "reduce-overhead":
        notes.append(f"CUDA graphs skipped {skips}× (see the log): this row ran without them")
    return eps, Result(row.name, row.group, times, first, detail="; ".join(notes))


@dataclass(frozen=True)
class Task:
    """What runs as one unit: its rows' names (all failed together), their group, the work."""

    names: list[str]
    group: str
    run: Callable[[], list[Result]]


def copy_tasks(device: torch.device, batch: int, warmups: int, repeats: int) -> list[Task]:
    """Host ↔ device copies as the pipeline makes them, pageable vs pinned (`SpeedOptions.pin_memory`):
    a face batch in (uint8, as `_to_tensor` sends it), and a chunk's guide parked on the host and
    brought back (float32, `_to_host` then `_sample`)."""
    faces = torch.randint(0, 256, (batch, 512, 512, 3), dtype=torch.uint8)
    guide = torch.rand(batch, 3, 512, 512)

    def task(name: str, pinned: bool, round_trip: bool) -> Task:
        options = SpeedOptions(pin_memory=pinned)

        def run() -> list[Result]:
            src = guide.to(device) if round_trip else faces

            def call() -> torch.Tensor:
                return to_device(to_host(src, options) if round_trip else src, device, options)

            out, first, times = timed_calls(call, device, warmups, repeats)
            diff = (out.float() - src.cpu().float()).abs().max().item()
            # MB moved: a round trip moves the guide twice
            moved = src.nbytes * (2 if round_trip else 1) / 1e6
            return [Result(name, "transfer", times, first, diff, detail=f"{moved:.1f}")]

        return Task([name], "transfer", run)

    in_shape, guide_shape = f"{batch}×512×512×3 uint8", f"{batch}×3×512×512 fp32"
    return [
        task(f"faces → device ({in_shape}), {kind}", kind == "pinned", False)
        for kind in ("pageable", "pinned")
    ] + [
        task(f"guide → host → device ({guide_shape}), {kind}", kind == "pinned", True)
        for kind in ("pageable", "pinned")
    ]


def time_restorer(nets: Networks, device: torch.device, rounds: int, repeats: int) -> list[Result]:
    """The restorer R(y) (`RestorationPipeline._restore`, one 512 px face) at the service's default
    dtype, NCHW vs channels_last, in interleaved rounds so that drifting load on a shared machine hits
    both alike: per layout, the median of each round's `repeats` calls; the channels_last output's
    difference from the NCHW one."""
    dtype = auto_dtype(device)
    pipes = {cl: pipeline(nets, device, dtype, SpeedOptions(channels_last=cl)) for cl in (False, True)}
    y = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    medians: dict[bool, list[float]] = {False: [], True: []}
    outs: dict[bool, torch.Tensor] = {}
    with torch.inference_mode():
        for r in range(rounds):
            for cl in (False, True) if r % 2 else (True, False):
                out, _, times = timed_calls(lambda cl=cl: pipes[cl]._restore(y), device, 1, repeats)
                outs.setdefault(cl, out)
                medians[cl].append(statistics.median(times))
    delta = outs[True] - outs[False]
    diff, rel = delta.abs().max().item(), (delta.norm() / outs[False].norm()).item()
    return [
        Result(
            restorer_name(dtype, cl),
            "restorer",
            medians[cl],
            diff=diff if cl else 0.0,
            rel=rel if cl else 0.0,
            detail=" / ".join(f"{v * 1000:.1f}" for v in medians[cl]),
        )
        for cl in (False, True)
    ]


def restorer_name(dtype: str, channels_last: bool) -> str:
    return f"restorer {dtype}, {'channels_last' if channels_last else 'NCHW'}"


def unet_flops(config: dict, size: int, batch: int) -> float:
    """FLOPs of one UNet forward at `size` px and `batch` (meta device: shapes only)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = IDDPMUNet(**config).eval()
        x, t = torch.randn(batch, 3, size, size), torch.full((batch,), TIMESTEP)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t)
    return float(counter.get_total_flops())


@dataclass
class Run:
    """What the report is written from: the run's setup and the results so far."""

    head: str
    args: argparse.Namespace
    device: torch.device
    gpu_name: str | None
    nets: Networks
    repeats: int
    rows: list[UNetRow]
    tasks: list[Task]
    peak: tuple[str, float] | None
    started: float
    results: dict[str, Result] = field(default_factory=dict)
    flops_face: float | None = None  # one forward per face of the profile timed
    flops_real: float | None = None  # the same for the real 512 px prior
    flops_error: str | None = None

    def result(self, name: str) -> Result:
        return self.results.get(name) or Result(name, "", error="not run yet (this write is mid-run)")

    def names(self, group: str) -> list[str]:
        return [n for task in self.tasks if task.group == group for n in task.names]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", choices=sorted(PROFILES), help="default: real on CUDA, tiny on CPU")
    parser.add_argument(
        "--weights-dir", type=Path, help="where real weights are looked for (default: the store's)"
    )
    parser.add_argument("--batch", type=int, default=1, help="faces per UNet call")
    parser.add_argument("--repeats", type=int, help="timed calls per row (default: 20 on CUDA, 5 on CPU)")
    parser.add_argument(
        "--warmups", type=int, default=3, help="untimed calls first (the first is timed apart)"
    )
    parser.add_argument(
        "--rows", help=f"row groups, comma-separated: {','.join(GROUPS)} (default: all on CUDA)"
    )
    parser.add_argument(
        "--transfer-batch", type=int, default=8, help="faces per copy (the default max_batch)"
    )
    parser.add_argument("--restorer-rounds", type=int, default=4)
    parser.add_argument("--budget-s", type=float, default=240.0, help="start no row after this many seconds")
    parser.add_argument("--peak-tflops", type=float, help="peak TFLOP/s for the bound (default: by GPU name)")
    parser.add_argument("--doc", type=Path, default=DOC, help="file whose gpu_path section is (re)written")
    parser.add_argument("--no-write", action="store_true", help="print only, write no file")
    args = parser.parse_args(argv)
    device = parse_device(parser, args.device)
    cuda = device.type == "cuda"
    groups = args.rows.split(",") if args.rows else list(GROUPS if cuda else CPU_GROUPS)
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        parser.error(f"--rows: unknown group(s) {unknown}; choose from {','.join(GROUPS)}")
    if "cudagraphs" in groups and not cuda:
        parser.error("--rows cudagraphs: CUDA graphs need a CUDA device")
    if "transfer" in groups and not cuda:
        parser.error(
            "--rows transfer: on CPU `to_device` and `to_host` hand the tensor back as it is, so no copy "
            "happens and there is nothing to time; use --device cuda"
        )
    if min(args.batch, args.warmups, args.transfer_batch, args.restorer_rounds) < 1:
        parser.error("--batch, --warmups, --transfer-batch and --restorer-rounds must be ≥ 1")
    repeats = args.repeats or (20 if cuda else 5)
    profile = PROFILES[args.profile or default_profile(device)]
    if cuda:
        torch.cuda.set_device(device)  # pinned copies and the current stream on the device measured
    if not args.no_write:
        pyplot()
    started = time.perf_counter()
    head = header("GPU path: fast-path switches and the FLOP lower bound", device)

    def progress(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {text}", flush=True)

    progress(f"building the {profile.name} profile's networks")
    nets = networks(profile, args.weights_dir)
    # On the device once, in fp32, outside inference mode (as the worker loads them); rows copy them.
    nets = dataclasses.replace(nets, unet=nets.unet.to(device), restorer=nets.restorer.to(device))
    size = profile.image_size
    x = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    t = torch.full((args.batch,), TIMESTEP, dtype=torch.int64, device=device)  # as the sampler makes t
    gpu_name = torch.cuda.get_device_name(device) if cuda else None

    rows = unet_rows(cuda, groups)
    ref: list[torch.Tensor] = []  # the reference's eps, once it has run

    def unet_task(row: UNetRow) -> Task:
        def run() -> list[Result]:
            eps, result = time_unet(nets, row, x, t, args.warmups, repeats)
            if row.name == REFERENCE:
                ref.append(eps)
            if ref:
                result.diff = (eps - ref[0]).abs().max().item()
                result.rel = ((eps - ref[0]).norm() / ref[0].norm()).item()
            return [result]

        return Task([row.name], row.group, run)

    tasks = [unet_task(r) for r in rows if not r.speed.compile]
    if "transfer" in groups:
        tasks += copy_tasks(device, args.transfer_batch, args.warmups, repeats)
    if "restorer" in groups:
        dtype = auto_dtype(device)
        tasks.append(
            Task(
                [restorer_name(dtype, False), restorer_name(dtype, True)],
                "restorer",
                lambda: time_restorer(nets, device, args.restorer_rounds, repeats),
            )
        )
    tasks += [unet_task(r) for r in rows if r.speed.compile]  # last: the slow, fragile compiles
    run = Run(
        head,
        args,
        device,
        gpu_name,
        nets,
        repeats,
        rows,
        tasks,
        peak_tflops(gpu_name, args.peak_tflops),
        started,
    )
    try:
        run.flops_face = unet_flops(profile.unet, size, 1)  # per face: FLOPs are linear in the batch
        real = PROFILES["real"]
        run.flops_real = run.flops_face if profile is real else unet_flops(real.unet, real.image_size, 1)
    except Exception as e:  # the timings must not be lost to it
        run.flops_error = error_text(e)
        progress(f"FLOP count failed: {run.flops_error}")

    def emit(final: bool) -> None:
        if final:  # rows an exception (Ctrl-C, a broken CUDA context) kept from starting
            for task in tasks:
                for n in task.names:
                    run.results.setdefault(n, Result(n, task.group, error="not run: the run stopped first"))
        body = report(run, final)
        if final:
            print(body)
        if not args.no_write:
            plot(run, figure_path(FIGURE, args.doc))
            write_section("gpu_path", body, args.doc)

    # `timeout` ends a run with SIGTERM, which would skip the final write: ended as Ctrl-C instead.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        for k, task in enumerate(tasks, 1):
            label = f"{k}/{len(tasks)} {', '.join(task.names)}"
            if time.perf_counter() - started > args.budget_s:
                for n in task.names:
                    run.results[n] = Result(
                        n, task.group, error=f"not run: the {args.budget_s:g} s budget was spent"
                    )
                progress(f"{label}: skipped (budget)")
                continue
            progress(f"{label} …")
            try:
                for result in task.run():
                    run.results[result.name] = result
                    progress(f"    {result.name}: {summary(result)}")
            except Exception as e:  # one row's failure must not cost the others
                for n in task.names:
                    run.results[n] = Result(n, task.group, error=error_text(e))
                progress(f"    FAILED: {error_text(e)}")
            release(cuda)
            emit(final=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
        emit(final=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def release(cuda: bool) -> None:
    """Memory of the row just done back (a failed row's traceback held its pipeline until now); a
    failure here, as after a CUDA error, is reported and left to the next row to meet."""
    try:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    except Exception as e:
        print(f"releasing memory failed: {error_text(e)}", flush=True)


def summary(r: Result) -> str:
    if r.ms is None:
        return r.error or "no timing"
    # Everything the tables show, so that the log alone holds the numbers whatever happens later.
    first = f", first call {r.first:.2f} s" if r.first is not None else ""
    diff = f", max |Δ| {r.diff:.2e}" if r.diff is not None else ""
    rel = f", rel. L2 {r.rel:.1e}" if r.rel is not None else ""
    detail = f" [{r.detail}]" if r.detail else ""
    return f"{r.ms:.3f} ms median{first}{diff}{rel}{detail}"


def plot(run: Run, out: Path) -> None:
    """Each UNet row's speed-up over the reference and each restorer row's over NCHW, as bars from 1×
    (log scale: fp16 on a CPU is ~50× slower); a row without a timing shows its error instead."""
    plt = pyplot()
    restorer = run.names("restorer")
    ref_ms, nchw_ms = run.result(REFERENCE).ms, run.result(restorer[0]).ms if restorer else None
    bars = [(row.name, ref_ms, "#1f77b4") for row in run.rows]
    bars += [(name, nchw_ms, "#ff7f0e") for name in restorer]
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(bars) + 1.8), dpi=110)
    for k, (name, base, color) in enumerate(bars):
        r = run.result(name)
        if r.ms is None or base is None:
            ax.text(1, k, f" {r.error or 'no timing'}"[:80], va="center", fontsize=7, color="#d62728")
            continue
        speed_up = base / r.ms
        ax.barh(k, speed_up - 1, left=1, color=color)
        ax.text(speed_up, k, f" {speed_up:.2f}×", va="center", fontsize=7)
    ax.set_xscale("log")
    ax.set_yticks(range(len(bars)), [name for name, _, _ in bars], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1, color="black", linewidth=1)
    ax.set_xlabel("speed-up (log): reference ms ÷ row ms (UNet, blue); NCHW ms ÷ row ms (restorer, orange)")
    kind = run.gpu_name or "CPU smoke check: CPU timings, NOT GPU ones"
    ax.set_title(
        f"{kind}; profile {run.nets.profile.name}, batch {run.args.batch}, median of {run.repeats} calls",
        fontsize=9,
    )
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    save_figure(fig, out)


def ratio(num: float | None, den: float | None) -> str:
    return f"{num / den:.2f}×" if num and den else "—"


def report(run: Run, final: bool) -> str:
    """The section, from whatever rows have results so far (`final` False: a write mid-run)."""
    args, device, gpu_name = run.args, run.device, run.gpu_name
    cuda, batch = device.type == "cuda", args.batch
    ref_ms = run.result(REFERENCE).ms
    bound_ms = run.flops_face / (run.peak[1] * 1e12) * 1000 if run.peak and run.flops_face else None
    kind = "GPU" if cuda else "CPU smoke check: CPU timings, NOT GPU ones"
    kind += ", random weights" if run.nets.random else ", real weights"
    table = [
        f"| row | settings (DYNFACE_…) | ms / call, batch {batch} ({kind}) | ms / face | × vs reference "
        "| × vs base row | first call incl. compile (s) | max abs diff vs reference | rel. L2 diff "
        "| measured ÷ bound, per face per NFE |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in run.rows:
        r = run.result(row.name)
        if r.ms is None:
            table.append(f"| {row.name} | {row.settings} | **{r.error}** | — | — | — | — | — | — | — |")
            continue
        per_face = r.ms / batch
        base = f"{ratio(run.result(row.base).ms, r.ms)} ({row.base})" if row.base else "—"
        diff = f"{r.diff:.2e} | {r.rel:.1e}" if r.diff is not None and r.rel is not None else "— | —"
        name = f"{row.name} ⚠ {r.detail}" if r.detail else row.name
        table.append(
            f"| {name} | {row.settings} | {r.ms:.2f} | {per_face:.2f} | {ratio(ref_ms, r.ms)} | {base} "
            f"| {r.first or 0:.1f} | {diff} | {f'{per_face / bound_ms:.1f}' if bound_ms else '—'} |"
        )

    copies = [
        "| copy (`models.speed.to_device` / `to_host`) | MB moved | ms | GB/s | × vs pageable "
        "| max abs diff vs source |",
        "|---|---|---|---|---|---|",
    ]
    for name in run.names("transfer"):
        r = run.result(name)
        if r.ms is None or r.diff is None:
            copies.append(f"| {name} | — | **{r.error}** | — | — | — |")
            continue
        pageable = run.result(name.replace("pinned", "pageable")).ms if name.endswith("pinned") else None
        copies.append(
            f"| {name} | {r.detail} | {r.ms:.3f} | {float(r.detail) / r.ms:.1f} | {ratio(pageable, r.ms)} "
            f"| {r.diff:.1e} |"
        )

    if not cuda:
        copies_text = (
            "Copies, pageable vs pinned (`DYNFACE_PIN_MEMORY`): not timed: on CPU `models.speed.to_device` / "
            "`to_host`\nhand the tensor back as it is, so no copy happens and there is nothing to measure "
            "(`--device cuda` times them)."
        )
    elif run.names("transfer"):
        copies_text = f"""Copies, pageable vs pinned (`DYNFACE_PIN_MEMORY`), median of {run.repeats}
synchronised calls; the pinned face copy includes its staging copy into pinned memory, as the service
makes it:

{chr(10).join(copies)}"""
    else:
        copies_text = "Copies, pageable vs pinned (`DYNFACE_PIN_MEMORY`): not run (`transfer` not in --rows)."

    restorer = run.names("restorer")
    rest = [
        "| restorer (`_restore`, one 512 px face) | ms per round (median of each) | median ms | × vs NCHW "
        "| max abs diff vs NCHW | rel. L2 diff |",
        "|---|---|---|---|---|---|",
    ]
    for name in restorer:
        r = run.result(name)
        if r.ms is None or r.diff is None or r.rel is None:
            rest.append(f"| {name} | **{r.error}** | — | — | — | — |")
            continue
        rest.append(
            f"| {name} | {r.detail} | {r.ms:.1f} | {ratio(run.result(restorer[0]).ms, r.ms)} | {r.diff:.2e} "
            f"| {r.rel:.1e} |"
        )

    if run.peak:
        peak_text = (
            f"Peak used: **{run.peak[1]:g} TFLOP/s** ({run.peak[0]}), for every row: fp32 rows too, whose "
            "own peak is lower, so their ratio also shows what fp32 gives up."
        )
    elif gpu_name:
        why = (
            "a MIG slice has only part of its chip's peak" if is_mig(gpu_name) else "no datasheet peak known"
        )
        peak_text = f"No peak for `{gpu_name}` ({why}; pass `--peak-tflops`), so the column is empty."
    else:
        peak_text = (
            "No peak on CPU (there is no tensor-core peak to compare with; pass `--peak-tflops` to set "
            "one), so the column is empty."
        )
    if run.flops_face is None or run.flops_real is None:
        per_nfe = ""
        bound_text = f"The FLOP count failed in this run ({run.flops_error}), so there is no bound."
    else:
        bound_eq = f" = {bound_ms:.3f} ms" if bound_ms else ""
        per_nfe = (
            "measured ÷ bound = ms / face ÷ the bound of one forward for one face "
            f"({run.flops_face / 1e9:.2f} GFLOP ÷ peak{bound_eq}): per face and per NFE (the sampler makes "
            "one such call per step), so it is also a face's measured UNet time ÷ its bound below when the "
            "profile is the real one. "
        )
        peaks = {run.peak[0]: run.peak[1]} if run.peak else dict(PEAKS_TFLOPS)
        bound = [
            "| NFE per face | " + " | ".join(f"{name} ({v:g} TFLOP/s)" for name, v in peaks.items()) + " |"
        ]
        bound.append("|---|" + "---|" * len(peaks))
        for label, nfe in nfes().items():
            cells = " | ".join(f"{run.flops_real * nfe / (v * 1e12) * 1000:.1f} ms" for v in peaks.values())
            bound.append(f"| {label}: {nfe} | {cells} |")
        example = "" if run.peak else "; with no peak for this device, two example GPUs"
        bound_text = f"""FLOP lower bound per face, real prior (the real profile's UNet, upstream's 512 px
config): one forward for one face = **{run.flops_real / 1e9:.1f} GFLOP** (`FlopCounterMode`, meta device;
convolutions, matmuls and attention, 2 FLOPs per multiply-add). Bound = {run.flops_real / 1e9:.1f} GFLOP ×
NFE ÷ peak FLOP/s (UNet only; the restorer, detector and codecs add to it). Peaks are datasheet dense
tensor-core figures (or the one given), not measured{example}:

{chr(10).join(bound)}"""

    seconds = time.perf_counter() - run.started
    status = (
        f"Run took {seconds:.0f} s (rows start only within the first {args.budget_s:g} s)."
        if final
        else f"**Partial: written mid-run after {seconds:.0f} s; rows marked 'not run yet' had not run.**"
    )
    return f"""{run.head}
- device: `{device}`{f" ({gpu_name})" if gpu_name else ""}; profile `{run.nets.profile.name}`
  ({run.nets.profile.image_size} px), {run.nets.weights}; batch {batch}, timestep {TIMESTEP}; per row
  {args.warmups} warm-up call(s), the first timed apart ("first call"), then the median of
  {run.repeats} synchronised calls. {status}
- Timed: the service's own code. Each row builds `RestorationPipeline(..., dtype=,
  speed=SpeedOptions(...))` as the worker does from the settings shown and calls
  `RestorationPipeline._eps` (the sampler's per-step UNet call) under `torch.inference_mode()`. Precision
  is the pipeline's `dtype` as upstream's fp16 mode (`IDDPMUNet.to_precision`: block convolutions in half,
  time embedding, norms and output head float32), the service's only half-precision path;
  **`torch.autocast` is not timed** (the service has no autocast mode).
- The reference is fp32, NCHW, eager with TF32 off; "× vs reference" = its ms ÷ the row's ms, "× vs base
  row" = the named row's ms ÷ this row's (the effect of the one switch they differ in; for the SDPA math
  row, below 1× means the default SDPA backend is faster). Every other row runs with the process's TF32
  flags, as the worker does. The UNet always calls `F.scaled_dot_product_attention`; the math row forces
  `sdpa_kernel(SDPBackend.MATH)`, the unfused softmax(q·kᵀ/√d)·v. Compile rows start from empty in-memory
  compile caches (`torch.compiler.reset()`), so their first call compiles; inductor's on-disk caches stay,
  so on a fresh machine the first compile row is cold and later ones may reuse its kernels.
  reduce-overhead is torch.compile's CUDA graphs (CUDA only). A row that failed shows its error instead
  of numbers; a ⚠ after a compiled row's name says it fell back (graph breaks, CUDA graphs skipped).
- {per_nfe}{peak_text}
- Diffs are of eps (the 3 channels the sampler uses), on the host in float32.

{chr(10).join(table)}

{copies_text}

Restorer, NCHW vs channels_last (`DYNFACE_CHANNELS_LAST`), at the service's default dtype
({auto_dtype(device)}), {args.restorer_rounds} interleaved round(s) of {run.repeats} calls:

{chr(10).join(rest) if restorer else "(not run: `restorer` not in --rows)"}

{bound_text}

{figure_link("Speed-up per option", FIGURE)}
"""


if __name__ == "__main__":
    main()
