"""The GPU fast-path switches (models/speed.py, `DYNFACE_*` in docs/configuration.md): time of one UNet
forward under each, and how far each one's output is from the plain fp32 path, on the device given.

Also the FLOP lower bound per face: FLOPs of one forward of the real 512 px UNet (counted with
`torch.utils.flop_counter.FlopCounterMode` on the meta device, batch 1: no weights, no memory) × NFE
÷ the GPU's peak FLOP/s. A bound, not an estimate: real kernels reach a fraction of the peak, and
GroupNorm/SiLU/softmax element-wise work is not counted. Each row also gets its speed-up vs the fp32
reference and its measured time ÷ that bound; the peak is `--peak-tflops`, else the datasheet BF16/FP16
dense peak looked up from the GPU's name (`GPU_PEAKS_TFLOPS`); on CPU there is none unless given.

On CPU this is only a smoke check of the script (the tiny profile; its timings are CPU timings and say
nothing about a GPU). On a GPU: `.venv/bin/python -m bench.gpu_path --device cuda --profile real
--batch 1` (the real profile needs only the UNet architecture here: random weights, since speed and
layout/precision agreement do not depend on the weight values).

Usage: OMP_NUM_THREADS=1 .venv/bin/python -m bench.gpu_path [--device cpu] [--profile tiny] [--compile]
       [--peak-tflops T] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bench._report import SHARED, header, write_section
from models.dsst import default_table
from models.pipeline import DTYPES, _tiny_networks
from models.profiles import PROFILES
from models.speed import SpeedOptions, apply_memory_format, compiled, memory_format
from models.unet import IDDPMUNet

CONFIG_512 = SHARED / "fixtures" / "difface_unet" / "config_512.json"


def nfes() -> dict[str, int]:
    """NFE per face: DifFace's fixed start and the shipped DSST table's starts."""
    table = default_table()
    starts = {f"DSST σ={s:g} px": i for s, i in zip(table.sigmas, table.start_indices, strict=True)}
    return {"difface baseline": PROFILES["real"].method.baseline_start_index, **starts}


#: Dense (no sparsity) tensor-core peaks from NVIDIA's datasheets, for the bound's example rows when
#: this run has no peak of its own.
PEAKS_TFLOPS = {"H100 SXM, BF16/FP16 dense": 989.0, "A100 SXM, BF16/FP16 dense": 312.0}

#: BF16/FP16 dense peaks (TFLOP/s, NVIDIA datasheets) by a substring of `torch.cuda.get_device_name`,
#: first match wins: the PCIe/NVL boards share the SXM part's name but have lower clocks and power.
GPU_PEAKS_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),  # SXM
    ("A100", 312.0),  # SXM and PCIe alike
)


def is_mig(gpu_name: str) -> bool:
    """A MIG slice ("NVIDIA H100 80GB HBM3 MIG 1g.10gb"): its name holds the whole chip's, but it has
    only a fraction of the chip's SMs, so the chip's datasheet peak does not apply."""
    return "MIG" in gpu_name


def peak_tflops(gpu_name: str | None, given: float | None) -> tuple[str, float] | None:
    """(what it is, TFLOP/s) of the peak the bound uses: the given one, else the datasheet one of a
    known GPU; None on CPU, a MIG slice or an unknown GPU (a CPU has no comparable tensor-core peak)."""
    if given:
        return "given with --peak-tflops", given
    if gpu_name and not is_mig(gpu_name):
        for part, tflops in GPU_PEAKS_TFLOPS:
            if part in gpu_name:
                return f"{part} BF16/FP16 dense, datasheet, matched from `{gpu_name}`", tflops
    return None


@dataclass(frozen=True)
class Variant:
    name: str
    dtype: str
    options: SpeedOptions
    #: TF32 off for fp32 convolutions and matmuls (CUDA only), for this row alone: PyTorch enables it for
    #: cuDNN convolutions by default, so an unqualified "fp32" on a GPU is mostly TF32. Other rows run
    #: with the process's flags, as the worker (which never sets them) does; fp32 ones say so in their
    #: name (`PROCESS_TF32`).
    tf32_off: bool = False


#: Suffix of the fp32 rows that run with the process's TF32 flags, unlike the reference.
PROCESS_TF32 = " (process's TF32 flags)"


def variants(with_compile: bool, cuda: bool) -> list[Variant]:
    """fp32 and both half precisions, each NCHW and channels_last: fp16 is the worker's default on CUDA,
    bf16 the alternative (its range cannot overflow); on CUDA also plain fp32 with the process's TF32
    flags; compile rows for fp32 and the default fp16. The first row is the reference."""

    def name(dtype: str, switches: str) -> str:
        return f"{dtype}{switches}{PROCESS_TF32 if dtype == 'fp32' else ''}"

    plain = SpeedOptions(channels_last=False, compile=False)
    out = []
    for dtype in ("fp32", "fp16", "bf16"):
        if dtype == "fp32":
            out.append(Variant("fp32 (reference, TF32 off)", dtype, plain, tf32_off=True))
            if cuda:
                out.append(Variant(name(dtype, ""), dtype, plain))
        else:
            out.append(Variant(dtype, dtype, plain))
        out.append(Variant(name(dtype, " + channels_last"), dtype, SpeedOptions(channels_last=True)))
    if with_compile:
        out += [
            Variant(name(d, " + channels_last + compile"), d, SpeedOptions(compile=True))
            for d in ("fp32", "fp16")
        ]
    return out


def unet_flops(config: dict, size: int, batch: int) -> float:
    """FLOPs of one UNet forward at `size` px and `batch` (meta device: shapes only)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = IDDPMUNet(**config).eval()
        x, t = torch.randn(batch, 3, size, size), torch.full((batch,), 500)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t)
    return float(counter.get_total_flops())


def unet_flops_512() -> float:
    """FLOPs of one forward of the real prior at 512 px, batch 1."""
    return unet_flops(json.loads(CONFIG_512.read_text())["unet"], 512, 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure(
    unet_config: dict, state: dict, variant: Variant, x: torch.Tensor, t: torch.Tensor, repeats: int
) -> tuple[torch.Tensor, list[float], float]:
    """Output (float32, CPU), seconds per forward after warm-up, and the warm-up (compile) seconds."""
    device = x.device
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if variant.tf32_off:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        model = IDDPMUNet(**unet_config)
        model.load_state_dict(state)
        model = model.to(device, DTYPES[variant.dtype]).eval()
        apply_memory_format(model, variant.options)
        call = compiled(model, variant.options)
        inp = x.to(DTYPES[variant.dtype], memory_format=memory_format(variant.options))
        t0 = time.perf_counter()
        out = call(inp, t)
        sync(device)
        warm = time.perf_counter() - t0
        call(inp, t)  # a second warm-up: cuDNN autotuning, reduce-overhead's graph capture
        times = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            call(inp, t)
            sync(device)
            times.append(time.perf_counter() - t0)
    finally:  # later rows run with the flags the process had, not this row's
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    return out.float().cpu(), times, warm


@torch.inference_mode()
def restorer_ab(
    profile_name: str, device: torch.device, rounds: int, repeats: int
) -> dict[bool, list[float]]:
    """Restorer (fp32, one 512 px face) NCHW vs channels_last, interleaved rounds so drifting load on a
    shared machine hits both alike: seconds per forward, the median of each round."""
    _, restorer = _tiny_networks(PROFILES[profile_name])
    restorer = restorer.to(device).eval()
    y = torch.rand(1, 3, 512, 512, device=device)
    out: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for channels_last in (False, True) if r % 2 else (True, False):
            apply_memory_format(restorer, SpeedOptions(channels_last=channels_last))
            restorer(y)
            sync(device)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                restorer(y)
                sync(device)
                times.append(time.perf_counter() - t0)
            out[channels_last].append(statistics.median(times))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", default="tiny", choices=sorted(PROFILES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes to compile)")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="peak TFLOP/s for the bound (default: by GPU name)"
    )
    parser.add_argument("--no-write", action="store_true", help="print, do not write docs/benchmarks.md")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device {args.device}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here; use --device cpu")
    head = header("GPU path: fast-path switches and the FLOP lower bound")

    profile = PROFILES[args.profile]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference_model = IDDPMUNet(**profile.unet)
        for p in reference_model.parameters():  # upstream zero-inits some outputs; keep them live
            if p.dim() > 1 and not p.any():
                torch.nn.init.normal_(p, std=1e-2)
        state = reference_model.state_dict()
        size = profile.image_size
        x = torch.randn(args.batch, 3, size, size).to(device)
        t = torch.full((args.batch,), 500, device=device)

    on_gpu = device.type == "cuda"
    gpu_name = torch.cuda.get_device_name(device) if on_gpu else None
    peak = peak_tflops(gpu_name, args.peak_tflops)
    # The FLOPs of the forward actually timed, so measured ÷ bound holds for any profile and batch.
    forward_flops = unet_flops(profile.unet, size, args.batch)
    tf32_flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    rows: list[tuple[str, float, float, float, float]] = []
    ref: torch.Tensor | None = None
    for variant in variants(args.compile, on_gpu):
        out, times, warm = measure(profile.unet, state, variant, x, t, args.repeats)
        ref = out if ref is None else ref
        diff = (out - ref).abs().max().item()
        rel = ((out - ref).norm() / ref.norm()).item()
        median = statistics.median(times) * 1000
        rows.append((variant.name, median, warm, diff, rel))
        print(
            f"{variant.name}: {median:.1f} ms/forward, warm-up {warm:.1f} s, "
            f"max |Δ| {diff:.2e}, rel {rel:.2e}"
        )

    ab = restorer_ab(args.profile, device, rounds=4, repeats=args.repeats)
    ab_text = ", ".join(
        f"{'channels_last' if k else 'NCHW'} " + " / ".join(f"{v * 1000:.0f}" for v in vals) + " ms"
        for k, vals in ab.items()
    )
    print("restorer:", ab_text)
    flops = unet_flops_512()
    peaks = {peak[0]: peak[1]} if peak else dict(PEAKS_TFLOPS)
    kind = (
        f"GPU timings ({gpu_name})"
        if on_gpu
        else "CPU smoke check: these timings are CPU timings, NOT GPU ones"
    )
    ref_ms = rows[0][1]
    bound_ms = forward_flops / (peak[1] * 1e12) * 1000 if peak else None
    table = [
        f"| variant | ms / UNet forward ({kind}) | speed-up vs fp32 | first call incl. compile (s) "
        "| max abs diff vs fp32 | rel. L2 diff | measured ÷ bound |",
        "|---|---|---|---|---|---|---|",
    ]
    table += [
        f"| {n} | {m:.1f} | {ref_ms / m:.2f}× | {w:.1f} | {d:.2e} | {r:.1e} "
        f"| {f'{m / bound_ms:.1f}' if bound_ms else '—'} |"
        for n, m, w, d, r in rows
    ]
    if peak:
        peak_text = (
            f"Peak used: **{peak[1]:g} TFLOP/s** ({peak[0]}), for every row: fp32 rows too, whose own "
            "peak is lower, so their ratio also shows what fp32 gives up."
        )
    elif gpu_name:  # on a GPU
        why = (
            "a MIG slice has only part of its chip's peak" if is_mig(gpu_name) else "no datasheet peak known"
        )
        peak_text = f"No peak for `{gpu_name}` ({why}; pass `--peak-tflops`), so the column is empty."
    else:
        peak_text = (
            "No peak on CPU (there is no tensor-core peak to compare with; pass `--peak-tflops` to set "
            "one), so the column is empty."
        )
    bound = ["| NFE per face | " + " | ".join(f"{name} ({v:g} TFLOP/s)" for name, v in peaks.items()) + " |"]
    bound.append("|---|" + "---|" * len(peaks))
    for label, nfe in nfes().items():
        cells = " | ".join(f"{flops * nfe / (value * 1e12) * 1000:.1f} ms" for value in peaks.values())
        bound.append(f"| {label}: {nfe} | {cells} |")
    body = f"""{head}
- device: `{device}`{f" ({gpu_name})" if gpu_name else ""}; profile `{args.profile}` UNet ({size} px, random
  weights, seed 0), batch {args.batch}, timestep 500; median of {args.repeats} forwards after 2 warm-ups.
- The reference is the plain path: fp32 with TF32 off, NCHW, eager; speed-up = reference ms ÷ the
  row's ms. Every other row runs with the TF32 flags the process started with (cuDNN convolutions
  {tf32_flags[0]}, matmuls {tf32_flags[1]}), as the worker does. SDPA attention is not a row: the UNet
  always uses `F.scaled_dot_product_attention` (tests/models/test_speed_options.py checks it against
  upstream's explicit softmax, ≤ 1e-5; the UNet fixtures hold the whole network to 1e-4 of upstream).
- measured ÷ bound = the row's ms ÷ the FLOP bound of the timed forward ({forward_flops / 1e9:.2f}
  GFLOP ÷ peak{f" = {bound_ms:.3f} ms" if bound_ms else ""}); both scale with NFE, so on the real
  profile it is also a face's measured UNet time ÷ its bound below. {peak_text}

{chr(10).join(table)}

Restorer (`{args.profile}` SwinIR, fp32, one 512 px face; {"GPU" if on_gpu else "CPU"}), NCHW vs
channels_last in 4 interleaved rounds, median of {args.repeats} forwards per round: {ab_text}.

FLOP lower bound per face, real prior (`{CONFIG_512.relative_to(SHARED.parent)}`): one forward at 512 px,
batch 1 = **{flops / 1e9:.1f} GFLOP** (`FlopCounterMode`, meta device; convolutions, matmuls and attention,
counted as 2 FLOPs per multiply-add). Bound = {flops / 1e9:.1f} GFLOP × NFE ÷ peak FLOP/s (UNet only; the
restorer, detector and codecs add to it). Peaks are datasheet dense tensor-core figures (or the one
given), not measured{"" if peak else "; with no peak for this device, two example GPUs"}:

{chr(10).join(bound)}
"""
    print(body)
    if not args.no_write:
        write_section("gpu_path", body)


if __name__ == "__main__":
    main()
