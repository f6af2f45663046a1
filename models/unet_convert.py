"""Load DifFace's UNet prior from its two published formats into :class:`~models.unet.IDDPMUNet`.

1. **Upstream release** ``iddpm_ffhq512_ema500000.pth`` (github.com/zsyOAOA/DifFace, release V1.0):
   a guided-diffusion ``UNetModel`` state dict. IDDPMUNet uses the same parameter names, so loading is
   a strict ``load_state_dict`` after the unwrapping upstream itself does in ``sampler.py``
   (``ckpt["state_dict"]`` if present, ``module.`` prefix stripped as in ``util_net.reload_model``).

2. **Hugging Face** ``OAOA/DifFace`` (``config.json`` + ``diffusion_pytorch_model.bin``), written by a
   fork of diffusers 0.13 whose ``UNet2DModel`` takes a per-level ``layers_per_block`` list.

Evidence for the HF key map (format 2):

* The fork's own conversion script (class ``ConvertDifFace``, ``split_qkv_weight``; it imports
  ``DifFacePipeline`` and ``ImprovedDDPMScheduler`` from the fork's ``src/diffusers``), and the fork's
  ``DifFacePipeline`` (SwinIR restorer + ``unet(image, t).sample``), both read in a public code-search
  index that did not name their repository or path. The script maps ``time_embed.0/2`` ->
  ``time_embedding.linear_1/2``, ``input_blocks.0.0`` -> ``conv_in``, ``out.0/2`` ->
  ``conv_norm_out``/``conv_out``; per level ``i`` and block ``j`` (counts from
  ``config["layers_per_block"][i]``) ``input_blocks.K.0`` ->
  ``down_blocks.i.resnets.j``, ``input_blocks.K.1`` -> ``down_blocks.i.attentions.j``,
  ``input_blocks.K.0.op`` -> ``down_blocks.i.downsamplers.0.conv`` (all but the last level);
  ``middle_block.0/1/2`` -> ``mid_block.resnets.0`` / ``mid_block.attentions.0`` / ``mid_block.resnets.1``;
  up block ``i`` (levels reversed, ``layers_per_block + 1`` resnets) ``output_blocks.K.0/1`` ->
  ``up_blocks.i.resnets.j`` / ``attentions.j`` and ``output_blocks.K.{1|2}.conv`` ->
  ``up_blocks.i.upsamplers.0.conv`` (all but the last up block). ResBlock: ``in_layers.0`` -> ``norm1``,
  ``in_layers.2`` -> ``conv1``, ``emb_layers.1`` -> ``time_emb_proj``, ``out_layers.0`` -> ``norm2``,
  ``out_layers.3`` -> ``conv2``, ``skip_connection`` -> ``conv_shortcut``. Attention: ``norm`` ->
  ``group_norm``, ``proj_out`` -> ``proj_attn`` (``view`` to the Linear shape), and ``qkv`` split by
  ``split_qkv_weight``: ``num_heads = C // config["attention_head_dim"]``, the (3C, C, 1) weight is
  reshaped to (heads, 3·C/heads, C), split into q, k, v blocks of C/heads rows and each reshaped to
  (C, C) (biases alike). That is guided-diffusion's legacy per-head [q, k, v] order.
* diffusers 0.13 ``AttentionBlock``: ``group_norm``, ``query``/``key``/``value``/``proj_attn`` are
  ``nn.Linear(C, C)``; ``num_heads = channels // num_head_channels`` with heads as contiguous channel
  blocks, ``attention_head_dim`` of ``UNet2DModel`` being passed as ``num_head_channels``;
  ``ResnetBlock2D`` has ``conv_shortcut`` only when in != out channels (the same condition as
  upstream's ``skip_connection``); ``Timesteps(flip_sin_to_cos=True, freq_shift=0)`` equals upstream's
  [cos, sin] embedding.

Not verifiable here (no network, the 639 MB file is not available offline): the exact field set of the
real ``config.json``. The architecture is derived from the fields the conversion script and diffusers
0.13 use (``sample_size``, ``in_channels``, ``out_channels``, ``block_out_channels``,
``layers_per_block``, ``down_block_types``/``up_block_types`` (``Attn*`` marks attention levels),
``attention_head_dim``), scale-shift conditioning from the ``time_emb_proj`` weight shape, and fields
that would change the numerics (``resnet_time_scale_shift``, ``flip_sin_to_cos``, ``freq_shift``,
``norm_num_groups``, ``norm_eps``, ``downsample_padding``, ``mid_block_scale_factor``,
``center_input_sample``) are checked against upstream when present. The conversion round trip is
tested on the tiny fixture only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.unet import AttentionBlock, IDDPMUNet

RESBLOCK_RENAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
ATTENTION_RENAMES = {"norm": "group_norm", "proj_out": "proj_attn"}
QKV = ("query", "key", "value")

# Config fields of the HF layout that must hold these values for the upstream numerics to apply.
HF_REQUIRED_VALUES = {
    "resnet_time_scale_shift": "scale_shift",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
    "time_embedding_type": "positional",
}


@dataclass
class HFKeyMap:
    """Upstream -> HF-fork module prefixes, by module kind (one entry per upstream module)."""

    plain: dict[str, str] = field(default_factory=dict)  # same tensors, new name
    resblocks: dict[str, str] = field(default_factory=dict)  # sub-names per RESBLOCK_RENAMES
    attentions: dict[str, str] = field(default_factory=dict)  # ATTENTION_RENAMES + qkv split


def hf_key_map(config: Mapping[str, Any]) -> HFKeyMap:
    """Module-prefix map from upstream names to the diffusers-0.13-fork names, from an upstream config.

    Walks the levels in the order upstream's ``UNetModel.__init__`` appends blocks.
    """
    mult = list(config["channel_mult"])
    levels = len(mult)
    blocks = config["num_res_blocks"]
    blocks = [blocks] * levels if isinstance(blocks, int) else list(blocks)
    attention_at = set(config["attention_resolutions"])
    sizes = [config["image_size"] // 2**level for level in range(levels)]
    m = HFKeyMap(
        plain={
            "time_embed.0": "time_embedding.linear_1",
            "time_embed.2": "time_embedding.linear_2",
            "input_blocks.0.0": "conv_in",
            "out.0": "conv_norm_out",
            "out.2": "conv_out",
        }
    )
    k = 1
    for level in range(levels):
        for j in range(blocks[level]):
            m.resblocks[f"input_blocks.{k}.0"] = f"down_blocks.{level}.resnets.{j}"
            if sizes[level] in attention_at:
                m.attentions[f"input_blocks.{k}.1"] = f"down_blocks.{level}.attentions.{j}"
            k += 1
        if level != levels - 1:
            m.plain[f"input_blocks.{k}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            k += 1
    m.resblocks["middle_block.0"] = "mid_block.resnets.0"
    m.attentions["middle_block.1"] = "mid_block.attentions.0"
    m.resblocks["middle_block.2"] = "mid_block.resnets.1"
    k = 0
    for i, level in enumerate(reversed(range(levels))):
        attn = sizes[level] in attention_at
        for j in range(blocks[level] + 1):
            m.resblocks[f"output_blocks.{k}.0"] = f"up_blocks.{i}.resnets.{j}"
            if attn:
                m.attentions[f"output_blocks.{k}.1"] = f"up_blocks.{i}.attentions.{j}"
            if level and j == blocks[level]:
                m.plain[f"output_blocks.{k}.{2 if attn else 1}.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
            k += 1
    return m


def _tensor_key_map(km: HFKeyMap, upstream_keys: set[str]) -> dict[str, str]:
    """Upstream tensor name -> HF tensor name for every non-qkv tensor of ``upstream_keys``."""
    modules = [(p, h, {"": ""}) for p, h in km.plain.items()]
    modules += [
        (p, h, {f".{a}": f".{b}" for a, b in RESBLOCK_RENAMES.items()}) for p, h in km.resblocks.items()
    ]
    modules += [
        (p, h, {f".{a}": f".{b}" for a, b in ATTENTION_RENAMES.items()}) for p, h in km.attentions.items()
    ]
    out = {}
    for prefix, hf_prefix, renames in modules:
        for sub, hf_sub in renames.items():
            for leaf in ("weight", "bias"):
                key = f"{prefix}{sub}.{leaf}"
                if key in upstream_keys:
                    out[key] = f"{hf_prefix}{hf_sub}.{leaf}"
    return out


def _split_qkv(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
    """Legacy interleaved (3C[, C, 1]) qkv -> query, key, value as Linear tensors (C[, C])."""
    c = qkv.shape[0] // 3
    per_head = qkv.reshape(heads, 3 * c // heads, *qkv.shape[1:2])
    return tuple(t.reshape(c, *qkv.shape[1:2]) for t in per_head.split(c // heads, dim=1))


def _merge_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of :func:`_split_qkv`, giving upstream's (3C, C, 1) weight or (3C,) bias."""
    c = query.shape[0]
    per_head = torch.cat([t.reshape(heads, c // heads, *t.shape[1:]) for t in (query, key, value)], dim=1)
    merged = per_head.reshape(3 * c, *query.shape[1:])
    return merged[..., None] if query.dim() == 2 else merged


def _meta_model(config: Mapping[str, Any]) -> tuple[dict[str, torch.Size], dict[str, int]]:
    """Tensor shapes and per-attention head counts of the model ``config`` builds (no memory used).

    Heads are read off the modules because upstream gives decoder attention 1 head when
    ``num_head_channels == -1``.
    """
    with torch.device("meta"):
        model = IDDPMUNet(**config)
    heads = {name: m.num_heads for name, m in model.named_modules() if isinstance(m, AttentionBlock)}
    return {k: v.shape for k, v in model.state_dict().items()}, heads


def upstream_to_hf_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Upstream state dict -> HF-fork layout (what the fork's conversion script writes)."""
    km = hf_key_map(config)
    heads = _meta_model(config)[1]
    out = {hf: _as_hf_shape(state_dict[up], hf) for up, hf in _tensor_key_map(km, set(state_dict)).items()}
    for prefix, hf_prefix in km.attentions.items():
        for leaf in ("weight", "bias"):
            qkv = _split_qkv(state_dict[f"{prefix}.qkv.{leaf}"], heads[prefix])
            for name, t in zip(QKV, qkv, strict=True):
                out[f"{hf_prefix}.{name}.{leaf}"] = t
    return out


def _as_hf_shape(t: torch.Tensor, hf_key: str) -> torch.Tensor:
    """Attention projections are 1-D convs upstream and Linear layers in the HF layout."""
    return t[..., 0] if hf_key.endswith("proj_attn.weight") else t


def hf_to_upstream_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """HF-fork state dict -> upstream names and shapes for an IDDPMUNet built from ``config``."""
    target, heads = _meta_model(config)
    km = hf_key_map(config)
    tensor_map = _tensor_key_map(km, set(target))
    _check_keys(set(state_dict), _expected_hf_keys(tensor_map, km), "HF-format")
    out = {up: state_dict[hf].reshape(target[up]) for up, hf in tensor_map.items()}
    for prefix, hf_prefix in km.attentions.items():
        for leaf in ("weight", "bias"):
            qkv = (state_dict[f"{hf_prefix}.{n}.{leaf}"] for n in QKV)
            out[f"{prefix}.qkv.{leaf}"] = _merge_qkv(*qkv, heads[prefix])
    return out


def _expected_hf_keys(tensor_map: dict[str, str], km: HFKeyMap) -> set[str]:
    qkv = {f"{h}.{n}.{leaf}" for h in km.attentions.values() for n in QKV for leaf in ("weight", "bias")}
    return set(tensor_map.values()) | qkv


def _check_keys(got: set[str], expected: set[str], what: str) -> None:
    """Refuse partial or foreign checkpoints, naming the offending keys."""
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        raise ValueError(
            f"{what} state dict does not match the UNet config: "
            f"missing keys {missing}, unexpected keys {unexpected}"
        )


def load_upstream_state_dict(
    path_or_state_dict: str | Path | Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Read an upstream checkpoint, unwrapped as upstream's sampler does."""
    sd = (
        torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
        if isinstance(path_or_state_dict, (str, Path))
        else path_or_state_dict
    )
    if "state_dict" in sd:
        sd = sd["state_dict"]
    return {k.removeprefix("module."): v for k, v in sd.items()}


def unet_from_upstream_checkpoint(
    path_or_state_dict: str | Path | Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> IDDPMUNet:
    """Build IDDPMUNet from upstream hyper-parameters (``config`` or ``config["unet"]``) and load strictly."""
    config = dict(config.get("unet", config))
    sd = load_upstream_state_dict(path_or_state_dict)
    with torch.device("meta"):
        model = IDDPMUNet(**config)
    _check_keys(set(sd), set(model.state_dict()), "upstream")
    # Built on meta and allocated uninitialised: random init of 160 M parameters would be wasted work.
    model.to_empty(device="cpu").load_state_dict(sd, strict=True)
    return model.eval()


def upstream_config_from_hf(
    hf_config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """Upstream hyper-parameters for an HF-fork ``config.json`` (+ its weights for scale-shift)."""
    for name, value in HF_REQUIRED_VALUES.items():
        if name in hf_config and hf_config[name] != value:
            raise ValueError(f"HF config {name}={hf_config[name]!r} is not upstream's {value!r}")
    channels = list(hf_config["block_out_channels"])
    size = hf_config["sample_size"]
    attn_down = [t.startswith("Attn") for t in hf_config["down_block_types"]]
    attn_up = [t.startswith("Attn") for t in hf_config["up_block_types"]]
    if attn_up != attn_down[::-1]:
        raise ValueError(f"up_block_types {hf_config['up_block_types']} do not mirror down_block_types")
    emb = state_dict["down_blocks.0.resnets.0.time_emb_proj.weight"]
    blocks = hf_config["layers_per_block"]
    return {
        "image_size": size,
        "in_channels": hf_config["in_channels"],
        "model_channels": channels[0],
        "out_channels": hf_config["out_channels"],
        "num_res_blocks": [blocks] * len(channels) if isinstance(blocks, int) else list(blocks),
        "attention_resolutions": [size // 2**i for i, a in enumerate(attn_down) if a],
        "channel_mult": [c // channels[0] for c in channels],
        "num_head_channels": hf_config["attention_head_dim"],
        "use_scale_shift_norm": emb.shape[0] == 2 * channels[0],
    }


def unet_from_hf_difface(directory: str | Path) -> IDDPMUNet:
    """Load the ``OAOA/DifFace`` UNet folder (``config.json`` + ``diffusion_pytorch_model.bin``)."""
    directory = Path(directory)
    hf_config = json.loads((directory / "config.json").read_text())
    sd = torch.load(directory / "diffusion_pytorch_model.bin", map_location="cpu", weights_only=True)
    config = upstream_config_from_hf(hf_config, sd)
    return unet_from_upstream_checkpoint(hf_to_upstream_state_dict(sd, config), config)
