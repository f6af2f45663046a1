"""IDDPMUNet against upstream DifFace fixtures, and its loaders (upstream .pth, HF fork, diffusers)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models import weights
from models.pipeline import HF_PRIOR, _load_prior, prior_weights, real_networks
from models.profiles import PROFILES
from models.unet import IDDPMUNet
from models.unet_convert import (
    hf_to_upstream_state_dict,
    unet_from_hf_difface,
    unet_from_upstream_checkpoint,
    upstream_to_hf_state_dict,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
FIX = SHARED / "fixtures" / "difface_unet"
pytestmark = pytest.mark.skipif(not FIX.is_dir(), reason=f"shared fixtures not found at {FIX}")

RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


@pytest.fixture(scope="module")
def tiny_config() -> dict:
    return json.loads((FIX / "tiny_config.json").read_text())


@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, torch.Tensor]:
    return load_file(FIX / "tiny_unet.safetensors")


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(FIX / "tiny_unet_io.safetensors")


@pytest.fixture(scope="module")
def tiny_model(tiny_sd: dict, tiny_config: dict) -> IDDPMUNet:
    return unet_from_upstream_checkpoint(tiny_sd, tiny_config)


def run(model: IDDPMUNet, io: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(io["x"], io["t"])


def max_err_first_sample(model: IDDPMUNet, io: dict) -> float:
    """Loader checks run one sample of the fixture: CPU time is shared, one sample proves the weights."""
    return (run(model, {"x": io["x"][:1], "t": io["t"][:1]}) - io["out"][:1]).abs().max().item()


def test_tiny_matches_upstream_output(tiny_model: IDDPMUNet, io: dict) -> None:
    out = run(tiny_model, io)
    assert out.shape == (2, 6, 64, 64)
    assert (out - io["out"]).abs().max().item() <= 1e-4


def test_pth_file_with_module_prefix_loads(
    tmp_path: Path, tiny_sd: dict, tiny_config: dict, io: dict
) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({f"module.{k}": v for k, v in tiny_sd.items()}, path)
    model = unet_from_upstream_checkpoint(path, tiny_config)
    assert max_err_first_sample(model, io) <= 1e-4


def test_real_512_config_names_shapes_and_count() -> None:
    config = json.loads((FIX / "config_512.json").read_text())["unet"]
    expected = json.loads((FIX / "keys_512.json").read_text())
    with torch.device("meta"):
        model = IDDPMUNet(**config)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == expected["state_dict_shapes"]
    assert sum(p.numel() for p in model.parameters()) == expected["num_parameters"] == 159_788_454


@pytest.mark.parametrize(
    "variant",
    [
        {"resblock_updown": True, "conv_resample": False},
        {"num_heads": 2, "num_head_channels": -1, "use_new_attention_order": True},
        {"use_scale_shift_norm": False, "num_res_blocks": 2},
    ],
)
def test_other_upstream_options_build_and_run(variant: dict) -> None:
    """Options the released prior does not use (no fixture): they must at least build and run."""
    config = {
        "image_size": 16,
        "in_channels": 3,
        "model_channels": 32,
        "out_channels": 6,
        "num_res_blocks": [1, 1],
        "attention_resolutions": [8],
        "channel_mult": [1, 2],
        "num_head_channels": 16,
        "use_scale_shift_norm": True,
    }
    model = IDDPMUNet(**{**config, **variant}).eval()
    out = run(model, {"x": torch.randn(1, 3, 16, 16), "t": torch.tensor([3])})
    assert out.shape == (1, 6, 16, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_strict_load_names_bad_key(change: str, tiny_sd: dict, tiny_config: dict) -> None:
    sd = dict(tiny_sd)
    if change == "missing":
        key = "middle_block.1.qkv.weight"
        del sd[key]
    else:
        key = "input_blocks.99.0.op.weight"
        sd[key] = torch.zeros(1)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        unet_from_upstream_checkpoint(sd, tiny_config)


def hf_fork_layout(sd: dict, layers: list[int], attn_levels: set[int], head_ch: int) -> dict:
    """Independent re-statement of the fork's ConvertDifFace walk (upstream -> HF names + qkv split)."""
    out: dict[str, torch.Tensor] = {}

    def resnet(dst: str, src: str) -> None:
        for a, b in RESNET.items():
            for leaf in ("weight", "bias"):
                if f"{src}.{a}.{leaf}" in sd:
                    out[f"{dst}.{b}.{leaf}"] = sd[f"{src}.{a}.{leaf}"]

    def attention(dst: str, src: str) -> None:
        for leaf in ("weight", "bias"):
            out[f"{dst}.group_norm.{leaf}"] = sd[f"{src}.norm.{leaf}"]
            out[f"{dst}.proj_attn.{leaf}"] = sd[f"{src}.proj_out.{leaf}"].squeeze(-1)
            qkv = sd[f"{src}.qkv.{leaf}"].squeeze(-1)
            c = qkv.shape[0] // 3
            per_head = qkv.reshape(c // head_ch, 3, head_ch, *qkv.shape[1:])  # heads × [q, k, v]
            for n, name in enumerate(("query", "key", "value")):
                out[f"{dst}.{name}.{leaf}"] = per_head[:, n].reshape(c, *qkv.shape[1:])

    def conv(dst: str, src: str) -> None:
        for leaf in ("weight", "bias"):
            out[f"{dst}.{leaf}"] = sd[f"{src}.{leaf}"]

    conv("time_embedding.linear_1", "time_embed.0")
    conv("time_embedding.linear_2", "time_embed.2")
    conv("conv_in", "input_blocks.0.0")
    conv("conv_norm_out", "out.0")
    conv("conv_out", "out.2")
    src, last = 1, len(layers) - 1
    for i, n in enumerate(layers):
        for j in range(n):
            resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{src}.0")
            if i in attn_levels:
                attention(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{src}.1")
            src += 1
        if i < last:
            conv(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{src}.0.op")
            src += 1
    resnet("mid_block.resnets.0", "middle_block.0")
    attention("mid_block.attentions.0", "middle_block.1")
    resnet("mid_block.resnets.1", "middle_block.2")
    src = 0
    for i, n in enumerate(reversed(layers)):
        level = last - i
        for j in range(n + 1):
            resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{src}.0")
            if level in attn_levels:
                attention(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{src}.1")
            if j == n and i < last:
                up = 2 if level in attn_levels else 1
                conv(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{src}.{up}.conv")
            src += 1
    return out


def tiny_hf_config(cfg: dict) -> dict:
    levels = len(cfg["channel_mult"])
    attn = [cfg["image_size"] // 2**i in cfg["attention_resolutions"] for i in range(levels)]
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": "0.13.0.dev0",
        "sample_size": cfg["image_size"],
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_channels"],
        "block_out_channels": [m * cfg["model_channels"] for m in cfg["channel_mult"]],
        "layers_per_block": cfg["num_res_blocks"],
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "attention_head_dim": cfg["num_head_channels"],
        "resnet_time_scale_shift": "scale_shift",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
    }


@pytest.fixture(scope="module")
def tiny_hf_sd(tiny_sd: dict, tiny_config: dict) -> dict:
    levels = len(tiny_config["channel_mult"])
    attn = {
        i for i in range(levels) if tiny_config["image_size"] // 2**i in tiny_config["attention_resolutions"]
    }
    return hf_fork_layout(tiny_sd, tiny_config["num_res_blocks"], attn, tiny_config["num_head_channels"])


def test_hf_key_map_matches_independent_walk(tiny_hf_sd: dict, tiny_sd: dict, tiny_config: dict) -> None:
    ours = upstream_to_hf_state_dict(tiny_sd, tiny_config)
    assert ours.keys() == tiny_hf_sd.keys()
    assert all(torch.equal(ours[k], tiny_hf_sd[k]) for k in ours)
    assert tiny_hf_sd["mid_block.attentions.0.query.weight"].shape == (64, 64)


def test_real_512_hf_map_covers_every_key() -> None:
    config = json.loads((FIX / "config_512.json").read_text())["unet"]
    with torch.device("meta"):
        sd = IDDPMUNet(**config).state_dict()
    hf = upstream_to_hf_state_dict(sd, config)
    back = hf_to_upstream_state_dict(hf, config)
    assert back.keys() == sd.keys() and all(back[k].shape == sd[k].shape for k in sd)
    attention_blocks = {k.split(".attentions")[0] for k in hf if ".attentions." in k}
    assert attention_blocks == {f"down_blocks.{i}" for i in (4, 5, 6)} | {
        "mid_block",
        *(f"up_blocks.{i}" for i in (0, 1, 2)),
    }
    assert hf["mid_block.attentions.0.query.weight"].shape == (512, 512)


def test_hf_difface_round_trip(tmp_path: Path, tiny_hf_sd: dict, tiny_config: dict, io: dict) -> None:
    torch.save(tiny_hf_sd, tmp_path / "diffusion_pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config(tiny_config)))
    model = unet_from_hf_difface(tmp_path)
    assert dict(model.config)["num_res_blocks"] == tiny_config["num_res_blocks"]
    assert max_err_first_sample(model, io) <= 1e-4


def write_hub_prior(directory: Path, hf_sd: dict, config: dict) -> None:
    """The OAOA/DifFace files where `weights pull` puts them; config.json padded with trailing
    whitespace (still JSON) to the byte size the manifest pins for the Hub's file."""
    (entry,) = weights.select(["hf_difface_config"])
    folder = (directory / entry.path).parent
    folder.mkdir(parents=True)
    torch.save(hf_sd, folder / "diffusion_pytorch_model.bin")
    text = json.dumps(tiny_hf_config(config))
    assert entry.size is not None and len(text) <= entry.size
    (folder / "config.json").write_text(text.ljust(entry.size))


def test_the_pipeline_loads_the_prior_from_either_published_format(
    tmp_path: Path, tiny_sd: dict, tiny_hf_sd: dict, tiny_config: dict, io: dict
) -> None:
    """Upstream's checkpoint is what `weights pull` fetches; where only the Hub copy is present, the
    pipeline loads that instead of asking for the other 640 MB."""
    assert prior_weights(tmp_path) == ("difface_prior",)  # nothing there: upstream's is the one to fetch
    write_hub_prior(tmp_path, tiny_hf_sd, tiny_config)
    assert prior_weights(tmp_path) == HF_PRIOR
    unet, source = _load_prior(tmp_path, HF_PRIOR, tiny_config)
    assert source == "OAOA-DifFace/diffusion_pytorch_model.bin"
    assert max_err_first_sample(unet, io) <= 1e-4
    other = {**tiny_config, "num_head_channels": tiny_config["num_head_channels"] * 2}
    with pytest.raises(ValueError, match="not this profile's UNet"):
        _load_prior(tmp_path, HF_PRIOR, other)
    torch.save(tiny_sd, tmp_path / "iddpm_ffhq512_ema500000.pth")
    assert prior_weights(tmp_path) == ("difface_prior",)  # both there: upstream's is preferred
    unet, source = _load_prior(tmp_path, ("difface_prior",), tiny_config)
    assert source == "iddpm_ffhq512_ema500000.pth" and max_err_first_sample(unet, io) <= 1e-4


def test_real_networks_load_the_released_files_and_name_them(
    tmp_path: Path, tiny_sd: dict, tiny_config: dict, io: dict
) -> None:
    """What `from_pretrained("real")` and the benches load: upstream's prior and restorer checkpoints
    where `weights pull` puts them (here at the upstream fixtures' tiny sizes), and which files they were."""
    swinir_fixtures = SHARED / "fixtures" / "difface_swinir"
    swinir_config = json.loads((swinir_fixtures / "tiny_config.json").read_text())
    torch.save(tiny_sd, tmp_path / weights.select(["difface_prior"])[0].path)
    (restorer_entry,) = weights.select(["difface_swinir"])
    restorer_state = load_file(swinir_fixtures / "tiny_swinir.safetensors")
    torch.save({"params_ema": restorer_state}, tmp_path / restorer_entry.path)
    profile = dataclasses.replace(PROFILES["real"], unet=tiny_config, swinir=swinir_config)
    unet, restorer, files = real_networks(profile, tmp_path)
    assert files == {"prior": "iddpm_ffhq512_ema500000.pth", "restorer": "swinir_restoration512_L1.pth"}
    assert max_err_first_sample(unet, io) <= 1e-4
    assert all(torch.equal(v, restorer_state[k]) for k, v in restorer.state_dict().items())


def test_hf_difface_rejects_missing_key(tmp_path: Path, tiny_hf_sd: dict, tiny_config: dict) -> None:
    sd = {k: v for k, v in tiny_hf_sd.items() if k != "up_blocks.0.attentions.1.key.bias"}
    torch.save(sd, tmp_path / "diffusion_pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config(tiny_config)))
    with pytest.raises(ValueError, match=r"up_blocks\.0\.attentions\.1\.key\.bias"):
        unet_from_hf_difface(tmp_path)


def test_save_pretrained_round_trip(tmp_path: Path, tiny_model: IDDPMUNet, io: dict) -> None:
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = IDDPMUNet.from_pretrained(tmp_path).eval()
    public = [{k: v for k, v in m.config.items() if not k.startswith("_")} for m in (loaded, tiny_model)]
    assert public[0] == public[1]
    saved, original = loaded.state_dict(), tiny_model.state_dict()
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
    # Bitwise-equal weights; CPU conv kernels may still pick differently rounding paths per
    # allocation (seen: ~4e-6), hence a float-rounding bound rather than torch.equal.
    one = {"x": io["x"][:1], "t": io["t"][:1]}
    assert (run(loaded, one) - run(tiny_model, one)).abs().max().item() <= 1e-5


def test_bf16_forward_close_to_fp32(tiny_sd: dict, tiny_config: dict, io: dict) -> None:
    model = unet_from_upstream_checkpoint(tiny_sd, tiny_config).to_precision(torch.bfloat16)
    out = run(model, {"x": io["x"][1:], "t": io["t"][1:]})  # one sample: bf16 is slow on CPU
    ref = io["out"][1:]
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 0.05


def test_fp16_forward_close_to_fp32(tiny_sd: dict, tiny_config: dict, io: dict) -> None:
    """fp16 is the worker's default precision on CUDA: held to upstream's fp32 output at 1 % relative
    L2 (10 mantissa bits; bf16, with 7, gets 5 %). A plain dtype cast logs no diffusers float32 warning."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(handler)
    try:
        cast = unet_from_upstream_checkpoint(tiny_sd, tiny_config).to(torch.float16)
    finally:
        diffusers_logger.removeHandler(handler)
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []
    assert {p.dtype for p in cast.parameters()} == {torch.float16}  # `.to` casts all, as nn.Module's
    model = unet_from_upstream_checkpoint(tiny_sd, tiny_config).to_precision(torch.float16)
    out = run(model, {"x": io["x"][1:], "t": io["t"][1:]})
    ref = io["out"][1:]
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 0.01


def _upstream_convert_to_fp16(model: IDDPMUNet, dtype: torch.dtype) -> None:
    """The oracle: guided-diffusion's UNetModel.convert_to_fp16 (DifFace's use_fp16), i.e.
    convert_module_to_f16 applied to input_blocks, middle_block and output_blocks, with `dtype`."""

    def convert_module_to_f16(layer: torch.nn.Module) -> None:
        if isinstance(layer, torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Conv3d):
            layer.weight.data = layer.weight.data.to(dtype)
            if layer.bias is not None:
                layer.bias.data = layer.bias.data.to(dtype)

    model.input_blocks.apply(convert_module_to_f16)
    model.middle_block.apply(convert_module_to_f16)
    model.output_blocks.apply(convert_module_to_f16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_to_precision_follows_upstreams_fp16_rule(
    tiny_sd: dict, tiny_config: dict, dtype: torch.dtype
) -> None:
    """Half precision converts the blocks' convolutions only (attention's Conv1d qkv/proj_out too); the
    timestep MLP, the ResBlocks' embedding Linear, the GroupNorms and the out head stay float32."""
    model = unet_from_upstream_checkpoint(tiny_sd, tiny_config).to_precision(dtype)
    oracle = unet_from_upstream_checkpoint(tiny_sd, tiny_config)
    _upstream_convert_to_fp16(oracle, dtype)
    got = {name: p.dtype for name, p in model.named_parameters()}
    assert got == {name: p.dtype for name, p in oracle.named_parameters()}
    half = {name for name, d in got.items() if d == dtype}
    assert half and set(got.values()) == {dtype, torch.float32}
    for name in (
        "input_blocks.0.0.weight",  # the stem conv
        "input_blocks.1.0.in_layers.2.weight",
        "input_blocks.1.0.out_layers.3.bias",
        "middle_block.1.qkv.weight",  # Conv1d
        "middle_block.1.proj_out.bias",
        "output_blocks.0.0.skip_connection.weight",
    ):
        assert name in half, name
    for name in (
        "time_embed.0.weight",
        "time_embed.2.bias",
        "input_blocks.1.0.emb_layers.1.weight",
        "input_blocks.1.0.in_layers.0.weight",  # GroupNorm
        "middle_block.1.norm.bias",
        "out.0.weight",
        "out.2.weight",
        "out.2.bias",
    ):
        assert got[name] == torch.float32, name
    assert {p.dtype for p in model.to_precision(torch.float32).parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="precision"):
        model.to_precision(torch.float64)


def test_fp16_keeps_the_embedding_and_eps_in_float32(tiny_sd: dict, tiny_config: dict, io: dict) -> None:
    """As upstream's fp16 mode: the timestep embedding is computed in float32 (bitwise the fp32 model's)
    and eps comes from the float32 head, not rounded to fp16; the output has x's dtype; and the result
    is no further from upstream's fp32 output than casting the whole model to fp16 was."""
    fp32 = unet_from_upstream_checkpoint(tiny_sd, tiny_config)
    rule = unet_from_upstream_checkpoint(tiny_sd, tiny_config).to_precision(torch.float16)
    everything = unet_from_upstream_checkpoint(tiny_sd, tiny_config).to(torch.float16)
    embeddings: list[torch.Tensor] = []
    hooks = [m.time_embed.register_forward_hook(lambda _m, _i, o: embeddings.append(o)) for m in (fp32, rule)]
    out = run(rule, io)
    run(fp32, io)
    for hook in hooks:
        hook.remove()
    assert embeddings[0].dtype == torch.float32 and torch.equal(embeddings[0], embeddings[1])
    assert out.dtype == torch.float32
    assert (out != out.half().float()).float().mean().item() > 0.5  # not fp16-quantised
    with torch.no_grad():
        assert rule(io["x"][:1].half(), io["t"][:1]).dtype == torch.float16

    def error(y: torch.Tensor) -> float:
        return ((y - io["out"]).norm() / io["out"].norm()).item()

    assert error(out) < 0.01
    assert error(out) <= error(run(everything, io))
