"""Trained DBLM / DGSA weights on disk: `<name>.safetensors` (tensors) + `<name>.json` (how to build the net).

Written by `models.train` (the EMA weights), read by `RestorationPipeline.from_pretrained(dblm_weights=...,
dgsa_weights=...)`. The JSON beside the tensors carries the architecture, so a file can be loaded without
knowing the training config, and `dynface train` records there the profile whose sizes the net has and the
face size it was trained at (`profile`, `train_size`), which `load` checks against where the net will run;
a DGSA's JSON also records the sha256 of the DBLM file whose errors it learned (`dblm_sha256`), which
`check_dgsa_pairing` holds the DBLM it is loaded with to. `manifest_entry` describes a file in the
weights-manifest format (`models.weights.WeightFile`: size + sha256) so a published copy can be pinned.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from models.dblm import DBLMConfig, DBLMNet
from models.dgsa import DGSANet
from models.weights import WeightFile, file_sha256

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
    """Write `net`'s weights to `path` (.safetensors) and its architecture + `info` to the JSON beside it.

    Both are written to temp files and synced first, then renamed over the old pair one after the
    other (as `models.train._save_checkpoint` does): a failed or interrupted write (full disk, Ctrl-C)
    leaves the old files as they were and no temp file, never a torn file under the name a worker loads.
    """
    path = Path(path)
    meta_file = config_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "kind": kind, "arch": arch, **info}
    tmp_weights, tmp_meta = (f.with_name(f".{f.name}.tmp") for f in (path, meta_file))
    try:
        # safetensors refuses shared or non-contiguous storage: give it plain CPU copies.
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp_weights))
        tmp_meta.write_text(json.dumps(meta, indent=1, default=str) + "\n", encoding="utf-8")
        for tmp in (tmp_weights, tmp_meta):
            with tmp.open("rb") as f:
                os.fsync(f.fileno())  # the data reaches the disk before the rename does
        os.replace(tmp_weights, path)
        os.replace(tmp_meta, meta_file)
    except BaseException:
        tmp_weights.unlink(missing_ok=True)
        tmp_meta.unlink(missing_ok=True)
        raise
    return path


def load(path: str | Path, kind: Kind, *, profile: str | None = None, size: int | None = None) -> nn.Module:
    """Build the net from the JSON beside `path` and load its weights strictly (eval mode, CPU).

    `profile` / `size`: the profile the net will run in and the face size (px) it will see; a file
    recorded for another (`profile`, `train_size` in its JSON) is refused, as its blur levels and
    errors were learned at other sizes. None checks nothing. A file without these fields (not written
    by `dynface train`, which always records both) is not checked for them; the architecture still
    is, by the strict load.
    Raises FileNotFoundError when either file is absent and ValueError when the file is of another
    kind or format, does not fit, or is damaged (cut short, not safetensors, tensors of another
    architecture than its JSON's), so a wrong path fails at load time, never mid-restoration.
    """
    path = Path(path)
    meta_file = config_path(path)
    for f in (path, meta_file):
        if not f.is_file():
            raise FileNotFoundError(f"trained {kind} weights: {f} not found")
    meta = _read_meta(meta_file)
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
    # Every failure below is the files' fault, and torch's and safetensors' own errors name neither
    # file: a ValueError naming them is what `dynface restore` prints as an error, not a traceback.
    try:
        net = build_net(kind, meta["arch"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{meta_file}: its architecture ('arch') does not build a {kind} net: {e!r}") from e
    try:
        state = load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file (cut short or damaged?): {e}") from e
    problem = _state_problem(net.state_dict(), state)
    if problem:
        raise ValueError(f"{path} does not hold the {kind} net that {meta_file.name} describes: {problem}")
    net.load_state_dict(state, strict=True)
    return net.eval()


def _read_meta(meta_file: Path) -> dict[str, Any]:
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{meta_file} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_file} is not a {FORMAT} file (not a JSON object)")
    return meta


def _state_problem(expected: dict[str, Tensor], found: dict[str, Tensor]) -> str | None:
    """What keeps `found` from loading strictly where `expected` is (None if nothing), in a line: torch's
    own error lists every key, hundreds for a SwinIR."""

    def some(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    shapes = sorted(
        k for k in expected.keys() & found.keys() if tuple(expected[k].shape) != tuple(found[k].shape)
    )
    parts = [f"missing {some(missing)}"] if missing else []
    parts += [f"unexpected {some(unexpected)}"] if unexpected else []
    if shapes:
        k = shapes[0]
        first = f"{k} is {tuple(found[k].shape)}, not {tuple(expected[k].shape)}"
        parts.append(f"other shapes: {first}" + (f" and {len(shapes) - 1} more" if len(shapes) > 1 else ""))
    return "; ".join(parts) or None


def check_dgsa_pairing(dgsa: str | Path, dblm: str | Path) -> None:
    """Refuse a trained DGSA beside a DBLM file other than the one it was trained with: DGSA predicts
    the errors of that one DBLM (`dblm_sha256` in its JSON, written by `dynface train dgsa`). A DGSA
    JSON without the field is refused too: `dynface train dgsa` always writes it."""
    meta_file = config_path(dgsa)
    meta = _read_meta(meta_file)
    recorded = meta.get("dblm_sha256")
    run = meta.get("config")
    trained_with = run.get("dblm_weights") if isinstance(run, dict) else None  # where it was, for the message
    if recorded is None:
        raise ValueError(
            f"{meta_file} does not record which DBLM the DGSA was trained with (dblm_sha256): it cannot "
            "be checked against the DBLM it would run with; retrain it with `dynface train dgsa`"
        )
    if file_sha256(dblm) != recorded:
        raise ValueError(
            f"{dgsa} was trained on the errors of another DBLM than {dblm} (sha256 {recorded}"
            + (f", from {trained_with}" if trained_with else "")
            + "): give the DBLM file it was trained with, or train a DGSA for this one"
        )


def dblm_arch(config: DBLMConfig) -> dict[str, Any]:
    return {"backbone": dict(config.backbone), "sigmas": list(config.sigmas)}


def dgsa_arch(base_channels: int, channel_mult: tuple[int, ...]) -> dict[str, Any]:
    return {"base_channels": base_channels, "channel_mult": list(channel_mult)}


def manifest_entry(path: str | Path, name: str, description: str) -> WeightFile:
    """A `models.weights.WeightFile` for a local file: size and sha256 measured, no URL yet (unpublished)."""
    path = Path(path)
    return WeightFile(
        name=name,
        path=path.name,
        url="",  # filled in when the file is published
        size=path.stat().st_size,
        sha256=file_sha256(path),
        description=description,
    )


def manifest_json(entry: WeightFile) -> str:
    return json.dumps(asdict(entry), indent=1)
