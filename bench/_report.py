"""Shared helpers: machine description and writing one section of a docs file (docs/benchmarks.md by
default) in place.

Each script owns the text between `<!-- bench:NAME:start -->` and `<!-- bench:NAME:end -->`; the rest of
the file (introduction, the list of what was not measured) is hand-written and left alone.

The one load figure a section gives is `cpu_busy`: the share of the machine's CPU time that was not
idle over the `BUSY_WINDOW` seconds before the run (from /proc/stat, all logical CPUs together),
measured once when the header is built, before any work; above `BUSY_WARN` the header says the
timings are not reliable. (The 1-minute load average lags by a minute: right after another benchmark
it still counts that one, and two readings a moment apart differ.)
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from models.cli import write_atomically

if TYPE_CHECKING:  # torch is imported where it is used: the HTTP benches' report needs none of it
    import torch
    from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
FIGURES = ROOT / "docs" / "benchmarks"
SHARED = ROOT.parent / "shared"
ALIGNED = SHARED / "testdata" / "aligned"
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
#: Seconds of /proc/stat sampling before a run (`cpu_busy`).
BUSY_WINDOW = 3.0
#: Above this share of the machine's CPU time busy before a run, its section carries a load warning.
BUSY_WARN = 0.25


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat's `cpu` line; None where there is none.
    Idle = idle + iowait; total = user … steal (guest time is already in user and nice)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 6:
        return None
    ticks = [int(v) for v in fields[1:9]]
    total = sum(ticks)
    return total - ticks[3] - ticks[4], total


@dataclass(frozen=True)
class Busy:
    """How busy the machine's CPUs were over `window` seconds (`cpu_busy`)."""

    fraction: float | None  # busy share of all CPUs' time, 0–1; None: no /proc/stat here
    window: float
    cpus: int

    @property
    def high(self) -> bool:
        return self.fraction is not None and self.fraction > BUSY_WARN

    def text(self) -> str:
        if self.fraction is None:
            return "CPU busy before the run: unknown (no /proc/stat)"
        return (
            f"CPU busy before the run: {self.fraction * 100:.0f} % of {self.cpus} logical CPU(s) over "
            f"{self.window:g} s (/proc/stat)"
        )

    def warning(self) -> str:
        """The load warning line of a section's header ('' when the machine was quiet enough)."""
        if not self.high:
            return ""
        assert self.fraction is not None
        return (
            f"- **Load warning:** the CPUs were {self.fraction * 100:.0f} % busy over the {self.window:g} s "
            f"before this run started (above {BUSY_WARN * 100:.0f} %): other work was using them, so this "
            "section's timings are not reliable; rerun on an idle machine.\n"
        )


def cpu_busy(window: float | None = None) -> Busy:
    """The share of the machine's CPU time that was not idle over the next `window` seconds
    (`BUSY_WINDOW` by default): sleeps that long, so call it before the run starts."""
    seconds = BUSY_WINDOW if window is None else window
    cpus = os.cpu_count() or 1
    before = _cpu_times()
    time.sleep(seconds)
    after = _cpu_times()
    if before is None or after is None or after[1] <= before[1]:
        return Busy(None, seconds, cpus)
    return Busy((after[0] - before[0]) / (after[1] - before[1]), seconds, cpus)


def machine(gpu: torch.device | None = None, busy: Busy | None = None) -> str:
    """uname -a, CPU model and count, how busy the CPUs were (`busy`, else measured now), Python/torch
    versions; with `gpu` (a CUDA device), also that GPU: name, memory, SMs, compute capability, driver,
    and the CUDA/cuDNN torch was built with."""
    uname = subprocess.run(["uname", "-a"], capture_output=True, text=True, check=False).stdout.strip()
    busy = busy or cpu_busy()
    try:
        import torch

        torch_v = (
            f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()} CPU kernels), "
            f"{torch.get_num_threads()} intra-op thread(s)"
        )
    except ImportError:
        torch_v = "torch not imported"
    gpu_text = f"; GPU: {gpu_model(gpu)}" if gpu is not None and gpu.type == "cuda" else ""
    return (
        f"`{uname}`; CPU: {cpu_model()} × {os.cpu_count()} logical ({busy.text()}); "
        f"Python {platform.python_version()}, {torch_v}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}{gpu_text}"
    )


def gpu_model(device: torch.device) -> str:
    """One CUDA device as a report names it (the driver from nvidia-smi, which torch does not expose)."""
    import torch

    props = torch.cuda.get_device_properties(device)
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        words = smi.stdout.split()
        if smi.returncode != 0:  # it prints its error on stdout too
            driver = f"unknown (nvidia-smi exited {smi.returncode})"
        else:
            driver = words[0] if words else "unknown (nvidia-smi printed nothing)"
    except (OSError, subprocess.TimeoutExpired):
        driver = "unknown (no nvidia-smi)"
    return (
        f"{props.name} ({device}), {props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs, "
        f"compute capability {props.major}.{props.minor}; driver {driver}; torch built with CUDA "
        f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    )


def command() -> str:
    """This run's command line as typed: the variables that change its numbers or imports, the
    interpreter (relative to the checkout when it lives there, as `.venv/bin/python` does), the module."""
    env = "".join(
        f"{k}={shlex.quote(os.environ[k])} " for k in ("OMP_NUM_THREADS", "PYTHONPATH") if k in os.environ
    )
    return env + f"{_interpreter()} -m " + " ".join(shlex.quote(a) for a in [_module(), *sys.argv[1:]])


def _interpreter() -> str:
    exe = Path(sys.executable)  # not resolved: a venv's python is a link to the base interpreter
    return str(exe.relative_to(ROOT)) if exe.is_relative_to(ROOT) else str(exe)


def _module() -> str:
    path = Path(sys.argv[0]).resolve()
    try:
        return ".".join(path.relative_to(ROOT).with_suffix("").parts)
    except ValueError:
        return str(path)


def header(title: str, gpu: torch.device | None = None, busy: Busy | None = None) -> str:
    """The section's title, exact command, date and machine (`gpu`: the CUDA device the run used), and
    the load warning when the CPUs were busy (`busy`, else measured now: build it before the run)."""
    busy = busy or cpu_busy()
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"## {title}\n\n- command: `{command()}`\n- date: {now}\n- machine: {machine(gpu, busy)}\n"
        + busy.warning()
    )


def write_section(name: str, body: str, doc: Path = DOC) -> None:
    """Replace (or append) this script's section of ``doc`` (docs/benchmarks.md unless told), so a
    rerun updates its own figures and leaves the hand-written text and other sections alone."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = doc.read_text(encoding="utf-8") if doc.exists() else f"# {doc.stem.capitalize()}\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    text = (
        pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    )
    # A run stopped mid-write (gpu_path rewrites its section after every row, and turns SIGTERM into
    # KeyboardInterrupt) leaves the doc whole, old or new.
    write_atomically(doc, text.encode("utf-8"))
    print(f"wrote section {name!r} of {shown(doc, ROOT)}")


def shown(path: Path, base: Path = ROOT.parent) -> str:
    """A path as a report names it: relative to `base` (the checkout's parent, so `shared/...` and
    `main/...`) where it lies under it, else as given."""
    resolved = path.resolve()
    return str(resolved.relative_to(base)) if resolved.is_relative_to(base) else str(path)


def figure_path(name: str, doc: Path = DOC) -> Path:
    """Where a section's figure goes: `benchmarks/NAME` beside the doc that links it (docs/benchmarks/
    for docs/benchmarks.md), so `figure_link` is the same whichever doc a run writes."""
    return doc.parent / FIGURES.name / name


def figure_link(alt: str, name: str) -> str:
    """The section's markdown line showing the figure `figure_path(name)`."""
    return f"![{alt}]({FIGURES.name}/{name})"


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend. Called before a run that will draw (as well
    as by the plot): a missing matplotlib then stops it at once, not after minutes of measuring."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, out: Path) -> None:
    """Write `fig` as a PNG to `out` (its folder made if needed) and close it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    pyplot().close(fig)
    print(f"wrote {shown(out, ROOT)}")


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def service_env(prefix: str, **settings: str) -> dict[str, str]:
    """Environment for a dynface process under test: this one's without any DYNFACE_* or REDIS_URL
    (so the bench never inherits a deployment's settings), on REDIS_URL in namespace and queue
    `prefix`, tiny profile, offline, no rate limit, plus `settings` (DYNFACE_* names)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNFACE_") and k != "REDIS_URL"}
    env.update(
        {
            "DYNFACE_REDIS_URL": REDIS_URL,
            "DYNFACE_KEY_PREFIX": prefix,
            "DYNFACE_QUEUE_NAME": prefix,
            "DYNFACE_PROFILE": "tiny",
            "DYNFACE_OFFLINE": "true",
            "DYNFACE_RATE_LIMIT_PER_MINUTE": "0",
            "PYTHONPATH": str(ROOT),
            **settings,
        }
    )
    return env


def wait_until_ok(url: str, procs: list[subprocess.Popen], timeout: float) -> None:
    """Poll `url` until it answers 200; give up when any of the service's processes exits or in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"a service process exited early (rc {p.returncode}); see its log")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} did not answer 200 within {timeout:.0f} s")
