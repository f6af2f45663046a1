"""SwinIR restorer: equivalence with upstream DifFace (fixtures), the released layout, strict loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.swinir import SwinIR, shifted_window_mask, swinir_from_checkpoint

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
FIX = SHARED / "fixtures" / "difface_swinir"
pytestmark = pytest.mark.skipif(not FIX.is_dir(), reason=f"shared fixtures not found at {FIX}")


@pytest.fixture(scope="module")
def tiny_config() -> dict:
    return json.loads((FIX / "tiny_config.json").read_text())


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(FIX / "tiny_swinir.safetensors"))


def test_tiny_matches_upstream_outputs(tiny_config: dict) -> None:
    from safetensors.torch import load_file

    model = swinir_from_checkpoint(FIX / "tiny_swinir.safetensors", tiny_config)
    io = load_file(str(FIX / "tiny_swinir_io.safetensors"))
    with torch.no_grad():
        out = model(io["x"])
    assert out.shape == io["out"].shape
    assert (out - io["out"]).abs().max().item() <= 1e-4


def test_saved_attn_masks_equal_recomputed(tiny_config: dict, tiny_state: dict) -> None:
    """At the nominal size (512 in → 64 features) the saved masks are used; they must equal ours."""
    masks = {k: v for k, v in tiny_state.items() if k.endswith("attn_mask")}
    assert masks
    res, ws = tiny_config["img_size"], tiny_config["window_size"]
    for v in masks.values():
        assert torch.equal(v, shifted_window_mask(res, res, ws, ws // 2))


def test_wrapped_pickle_checkpoint_loads(tiny_config: dict, tiny_state: dict, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({"params_ema": {f"module.{k}": v for k, v in tiny_state.items()}, "params": {}}, path)
    model = swinir_from_checkpoint(path, tiny_config)
    assert all(torch.equal(v, tiny_state[k]) for k, v in model.state_dict().items())


def test_strict_loading_names_bad_keys(tiny_config: dict, tiny_state: dict) -> None:
    missing = dict(tiny_state)
    del missing["conv_up3.weight"]
    with pytest.raises(KeyError, match=r"conv_up3\.weight"):
        swinir_from_checkpoint(missing, tiny_config)
    extra = {**tiny_state, "conv_up4.weight": torch.zeros(1)}
    with pytest.raises(KeyError, match=r"conv_up4\.weight"):
        swinir_from_checkpoint(extra, tiny_config)
    wrong = {**tiny_state, "conv_last.bias": torch.zeros(4)}
    with pytest.raises(ValueError, match=r"conv_last\.bias"):
        swinir_from_checkpoint(wrong, tiny_config)


def test_real_config_has_released_layout() -> None:
    config = json.loads((SHARED / "fixtures" / "difface_unet" / "config_512.json").read_text())[
        "restorer_swinir"
    ]
    expected = json.loads((FIX / "keys_512.json").read_text())
    with torch.device("meta"):
        model = SwinIR(**config)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == expected["state_dict_shapes"]
    # keys_512.json counts learnable parameters only (the index/mask buffers add 6.5 M more entries).
    assert sum(p.numel() for p in model.parameters()) == expected["num_parameters"] == 15_792_587


def test_unsupported_layout_is_rejected(tiny_config: dict) -> None:
    with pytest.raises(ValueError, match="upsampler"):
        SwinIR(**{**tiny_config, "upsampler": "pixelshuffle"})


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_precision_close_to_fp32(tiny_config: dict, device: str, dtype: torch.dtype, tol: float) -> None:
    model = swinir_from_checkpoint(FIX / "tiny_swinir.safetensors", tiny_config).to(device)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        ref = model(x)
        out = model.to(dtype)(x.to(dtype))
    assert out.dtype == dtype and out.shape == x.shape
    assert (out.float() - ref).abs().max().item() <= tol


@pytest.mark.parametrize("size", [(64, 64), (128, 192), (100, 72)])
def test_any_size_keeps_shape(tiny_config: dict, size: tuple[int, int]) -> None:
    """Multiples of 64 run as upstream; other sizes are reflect-padded and cropped back."""
    torch.manual_seed(0)
    model = SwinIR(**tiny_config).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, *size))
    assert out.shape == (1, 3, *size)
    assert torch.isfinite(out).all()
