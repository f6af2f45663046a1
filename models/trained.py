"""Trained DBLM / DGSA weights on disk: `<name>.safetensors` (tensors) + `<name>.json` (how to build the net).

Written by `models.train` (the EMA weights), read by `RestorationPipeline.from_pretrained(dblm_weights=...,
dgsa_weights=...)`. The JSON beside the tensors carries the architecture, so a file can be loaded without
knowing the training config, and `dynface train` records there the profile whose sizes the net has and the
face size it was trained at (`profile`, `train_size`), which `load` checks against where the net will run;
`manifest_entry` describes a file in the weights-manifest format (`models.weights.WeightFile`: size +
sha256) so a published copy can be pinned.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from safetensors.torch import load_file, save_file
from torch import nn

from models.dblm import DBLMConfig, DBLMNet
from models.dgsa import DGSANet
from models.weights import WeightFile

FORMAT = "dynface-trained/1"
Kind = Literal["dblm", "dgsa"]


def config_path(weights: str | Path) -> Path:
    """The JSON that describes `weights` (same stem, `.json`)."""
    return Path(weights).with_suffix(".json")


def build_net(kind: Kind, arch: dict[str, Any]) -> nn.Module:
    """An untrained network of `kind` with the architecture recorded in a weights JSON."""
    if kind == "dblm":
        return DBLMNet(DBLMConfig(backbone=arch["backbone"], sigmas=tuple(arch["sigmas"])))
    if kind == "dgsa":
        return DGSANet(base_channels=int(arch["base_channels"]), channel_mult=tuple(arch["channel_mult"]))
    raise ValueError(f"unknown network kind {kind!r}")


def save(net: nn.Module, kind: Kind, arch: dict[str, Any], path: str | Path, **info: Any) -> Path:
    """Write `net`'s weights to `path` (.safetensors) and its architecture + `info` to the JSON beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage: give it plain CPU copies.
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(path))
    meta = {"format": FORMAT, "kind": kind, "arch": arch, **info}
    config_path(path).write_text(json.dumps(meta, indent=1, default=str) + "\n", encoding="utf-8")
    return path


def load(path: str | Path, kind: Kind, *, profile: str | None = None, size: int | None = None) -> nn.Module:
    """Build the net from the JSON beside `path` and load its weights strictly (eval mode, CPU).

    `profile` / `size`: the profile the net will run in and the face size (px) it will see; a file
    recorded for another (`profile`, `train_size` in its JSON) is refused, as its blur levels and
    errors were learned at other sizes. None checks nothing. A file without these fields (not written
    by `dynface train`, which always records both) is not checked for them; the architecture still
    is, by the strict load.
    Raises FileNotFoundError when either file is absent and ValueError when the file is of another
    kind or format or does not fit, so a wrong path fails at load time, never mid-restoration.
    """
    path = Path(path)
    meta_file = config_path(path)
    for f in (path, meta_file):
        if not f.is_file():
            raise FileNotFoundError(f"trained {kind} weights: {f} not found")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT or meta.get("kind") != kind:
        raise ValueError(
            f"{meta_file} is not a {FORMAT} {kind} file "
            f"(format={meta.get('format')!r}, kind={meta.get('kind')!r})"
        )
    wanted = {"profile": profile, "train_size": size}
    wrong = {k: v for k, v in wanted.items() if None not in (v, meta.get(k)) and meta[k] != v}
    if wrong:
        raise ValueError(
            f"{meta_file}: this {kind} was trained with {' and '.join(f'{k} {meta[k]!r}' for k in wrong)}; "
            f"here it needs {' and '.join(f'{k} {v!r}' for k, v in wrong.items())} (TrainConfig's profile "
            "and data.size): its blur levels and errors were learned for other nets or at another size"
        )
    net = build_net(kind, meta["arch"])
    net.load_state_dict(load_file(str(path)), strict=True)
    return net.eval()


def dblm_arch(config: DBLMConfig) -> dict[str, Any]:
    return {"backbone": dict(config.backbone), "sigmas": list(config.sigmas)}


def dgsa_arch(base_channels: int, channel_mult: tuple[int, ...]) -> dict[str, Any]:
    return {"base_channels": base_channels, "channel_mult": list(channel_mult)}


def manifest_entry(path: str | Path, name: str, description: str) -> WeightFile:
    """A `models.weights.WeightFile` for a local file: size and sha256 measured, no URL yet (unpublished)."""
    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return WeightFile(
        name=name,
        path=path.name,
        url="",  # filled in when the file is published
        size=path.stat().st_size,
        sha256=digest.hexdigest(),
        description=description,
    )


def manifest_json(entry: WeightFile) -> str:
    return json.dumps(asdict(entry), indent=1)
