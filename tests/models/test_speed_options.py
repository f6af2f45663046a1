"""The GPU fast-path switches (models/speed.py) on CPU: each one is applied, and none changes the output.

Reference = the plain path: fp32, NCHW weights, eager UNet. Tolerances, stated per check:
- float outputs of the networks (UNet eps, restorer R(y)): max abs diff ≤ 1e-4 (layout and compile
  only reorder float32 sums; the UNet's fixtures hold it to 1e-4 of upstream as well);
- whole `restore_faces` output (uint8): max abs diff ≤ 1 level (a float diff can cross a rounding edge).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from app.settings import Settings
from models import speed
from models.dsst import default_table
from models.pipeline import RestorationPipeline, auto_dtype, tiny_networks
from models.profiles import PROFILES
from models.speed import SpeedOptions
from models.unet import AttentionBlock
from worker.main import _speed_options

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
ALIGNED = SHARED / "testdata" / "aligned"
FLOAT_TOL = 1e-4
PLAIN = SpeedOptions(channels_last=False, compile=False)

pytestmark = pytest.mark.skipif(not ALIGNED.is_dir(), reason=f"shared test data not found at {ALIGNED}")


def _pipe(options: SpeedOptions, dtype: str = "fp32") -> RestorationPipeline:
    """Fresh tiny networks per pipeline (the switches convert modules in place), few sampler steps."""
    unet, restorer = tiny_networks(PROFILES["tiny"])
    table = dataclasses.replace(default_table(), start_indices=(2, 3, 4))
    return RestorationPipeline(PROFILES["tiny"], unet, restorer, dsst=table, dtype=dtype, speed=options)


@pytest.fixture(scope="module")
def face() -> np.ndarray:
    first = sorted(ALIGNED.glob("*.png"))[0]
    return np.asarray(Image.open(first).convert("RGB"))[None]


@pytest.fixture(scope="module")
def reference(face: np.ndarray) -> dict[str, torch.Tensor | np.ndarray]:
    return _outputs(_pipe(PLAIN), face)


def _outputs(pipe: RestorationPipeline, face: np.ndarray) -> dict[str, torch.Tensor | np.ndarray]:
    torch.manual_seed(1)
    x_t = torch.randn(2, 3, 64, 64)
    t = torch.tensor([10, 600])
    with torch.inference_mode():
        y = pipe._to_tensor(face)
        return {
            "eps": pipe._eps(x_t, t),
            "restored": pipe._restore(y),
            "faces": pipe.restore_faces(face, seed=3).faces,
        }


def _assert_close(out: dict, ref: dict, float_tol: float = FLOAT_TOL, uint8_tol: int = 1) -> None:
    for key in ("eps", "restored"):
        diff = (out[key].float() - ref[key]).abs().max().item()
        assert diff <= float_tol, f"{key}: max abs diff {diff:.2e} > {float_tol}"
    diff8 = np.abs(out["faces"].astype(int) - ref["faces"].astype(int)).max()
    assert diff8 <= uint8_tol, f"restore_faces: max abs diff {diff8} > {uint8_tol}"


def test_defaults_channels_last_on_compile_off() -> None:
    """The documented defaults (docs/configuration.md) of the dataclass and of the settings agree."""
    assert SpeedOptions() == SpeedOptions(channels_last=True, compile=False, compile_mode="default")
    assert _speed_options(Settings()) == SpeedOptions()


def test_settings_reach_the_options() -> None:
    s = Settings(channels_last=False, compile=True, compile_mode="reduce-overhead", pin_memory=False)
    assert _speed_options(s) == SpeedOptions(False, True, "reduce-overhead", False)
    with pytest.raises(ValidationError):
        Settings(compile_mode="fastest")
    with pytest.raises(ValueError, match="compile_mode"):
        SpeedOptions(compile_mode="fastest")  # type: ignore[arg-type]


def test_auto_precision_is_fp16_on_cuda_only_and_settings_reject_other_names() -> None:
    """dtype "auto" (the worker's and the CLI's default) is resolved by the pipeline itself."""
    assert auto_dtype(torch.device("cuda", 1)) == "fp16" and auto_dtype(torch.device("cpu")) == "fp32"
    pipe = _pipe(PLAIN, dtype="auto")
    assert pipe.dtype == torch.float32 and pipe.info["dtype"] == "fp32"
    with pytest.raises(ValueError, match="dtype must be one of"):
        _pipe(PLAIN, dtype="fp64")
    assert Settings(dtype="bf16").dtype == "bf16"
    with pytest.raises(ValidationError):
        Settings(dtype="fp64")


def test_channels_last_is_applied_and_equivalent(face: np.ndarray, reference: dict) -> None:
    pipe = _pipe(SpeedOptions(channels_last=True))
    conv = pipe.unet.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    restorer_convs = [m.weight for m in pipe.restorer.modules() if isinstance(m, torch.nn.Conv2d)]
    assert restorer_convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in restorer_convs)
    assert pipe.info["speed"]["channels_last"] is True
    _assert_close(_outputs(pipe, face), reference)


def test_channels_last_off_restores_nchw() -> None:
    """A module converted by an earlier pipeline is converted back when the switch is off."""
    first = _pipe(SpeedOptions(channels_last=True))
    second = RestorationPipeline(PROFILES["tiny"], first.unet, first.restorer, speed=PLAIN)
    assert second.unet.input_blocks[0][0].weight.is_contiguous()


def test_sdpa_attention_matches_hand_written_softmax() -> None:
    """The UNet's SDPA attention = upstream's QKVAttentionLegacy (explicit softmax(q·k/√d)·v)."""
    torch.manual_seed(0)
    block = AttentionBlock(64, num_heads=1, num_head_channels=16, new_order=False).eval()
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        b, c, *spatial = x.shape
        qkv = block.qkv(block.norm(x.reshape(b, c, -1)))
        heads, ch = block.num_heads, c // block.num_heads
        q, k, v = qkv.reshape(b * heads, 3 * ch, -1).split(ch, dim=1)
        scale = 1 / ch**0.25  # upstream scales q and k by d^-1/4 each, before the product
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
        a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
        expected = (x.reshape(b, c, -1) + block.proj_out(a)).reshape(b, c, *spatial)
        assert (block(x) - expected).abs().max().item() <= 1e-5


def test_pin_memory_is_cuda_only() -> None:
    """On a CPU device the copy is the plain one (pinning needs a CUDA driver)."""
    x = torch.zeros(1, 4, 4, 3, dtype=torch.uint8)
    out = speed.to_device(x, torch.device("cpu"), SpeedOptions(pin_memory=True))
    assert out.device.type == "cpu" and torch.equal(out, x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pin_memory_on_cuda() -> None:
    x = torch.arange(48, dtype=torch.uint8).reshape(1, 4, 4, 3)
    out = speed.to_device(x, torch.device("cuda"), SpeedOptions(pin_memory=True))
    assert out.is_cuda and torch.equal(out.cpu(), x)


def test_bf16_with_channels_last_stays_close(face: np.ndarray, reference: dict) -> None:
    """dtype is the precision switch (fp32/fp16/bf16); bf16 has 8 mantissa bits, so the bound is
    relative (5 %, as tests/models/test_unet.py holds bf16 to the upstream fixture), UNet only."""
    pipe = _pipe(SpeedOptions(channels_last=True), dtype="bf16")
    torch.manual_seed(1)
    with torch.inference_mode():
        eps = pipe._eps(torch.randn(2, 3, 64, 64), torch.tensor([10, 600]))
    ref = reference["eps"]
    assert eps.dtype == torch.float32
    assert ((eps - ref).norm() / ref.norm()).item() < 0.05


@pytest.mark.parametrize("channels_last", [False, True])
def test_fp16_pipeline_runs_the_unet_in_upstreams_half_precision(
    channels_last: bool, reference: dict
) -> None:
    """dtype fp16 gives the UNet upstream's fp16 mode (IDDPMUNet.to_precision), in either layout: block
    convolutions in fp16, time embedding and out head in float32, so `_eps` returns eps from the float32
    head, not rounded to fp16 (the whole-model cast it replaced made every eps an fp16 number)."""
    pipe = _pipe(SpeedOptions(channels_last=channels_last), dtype="fp16")
    unet = pipe.unet
    assert unet.input_blocks[0][0].weight.dtype == torch.float16
    assert unet.middle_block[1].qkv.weight.dtype == torch.float16
    assert unet.time_embed[0].weight.dtype == torch.float32 and unet.out[-1].weight.dtype == torch.float32
    assert unet.input_blocks[0][0].weight.is_contiguous(memory_format=pipe._memory_format)
    torch.manual_seed(1)
    with torch.inference_mode():
        eps = pipe._eps(torch.randn(2, 3, 64, 64), torch.tensor([10, 600]))
    ref = reference["eps"]
    assert eps.dtype == torch.float32
    assert (eps != eps.half().float()).float().mean().item() > 0.5
    assert ((eps - ref).norm() / ref.norm()).item() < 0.01
    # a later fp32 pipeline on the same modules turns them back to float32 throughout
    fp32 = RestorationPipeline(PROFILES["tiny"], unet, pipe.restorer, dsst=pipe.dsst, speed=PLAIN)
    assert {p.dtype for p in fp32.unet.parameters()} == {torch.float32}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_compile_is_applied_and_equivalent(face: np.ndarray) -> None:
    """torch.compile (inductor, CPU C++ backend here): marked slow, because compiling the tiny UNet
    took more than 5 minutes on this shared 2-core CPU. Batch 1 only, so it compiles one graph."""
    plain, fast = _pipe(PLAIN), _pipe(SpeedOptions(channels_last=True, compile=True))
    assert isinstance(fast._unet_call, torch._dynamo.eval_frame.OptimizedModule)
    assert fast._unet_call._orig_mod is fast.unet  # shares the weights, nothing copied
    torch.manual_seed(1)
    x_t, t = torch.randn(1, 3, 64, 64), torch.tensor([600])
    t0 = time.perf_counter()
    with torch.inference_mode():
        eps = fast._eps(x_t, t)
        print(f"compile + first call: {time.perf_counter() - t0:.1f} s")
        faces = fast.restore_faces(face, seed=3).faces
        ref_eps, ref_faces = plain._eps(x_t, t), plain.restore_faces(face, seed=3).faces
    eps_diff, faces_diff = (eps - ref_eps).abs().max().item(), np.abs(faces.astype(int) - ref_faces).max()
    print(f"compile: eps max abs diff {eps_diff:.2e}, restore_faces max abs diff {faces_diff} (uint8)")
    assert eps_diff <= FLOAT_TOL and faces_diff <= 1
