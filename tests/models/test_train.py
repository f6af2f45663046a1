"""`dynface train` (DBLM/DGSA, tiny sizes, real faces): TensorBoard scalars, resume, the optional LPIPS
term, export → pipeline; `dynface dsst build` (analytic; the sweep is in test_dsst_sweep.py)."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import load_file
from stand_in_weights import stand_in_alexnet_hub
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from models import images, trained, weights
from models.dblm import DBLMConfig, DBLMNet, blur_levels
from models.degradations import random_degrade
from models.dgsa import DGSANet
from models.dsst import DSSTable, default_table
from models.dsst_build import load_face
from models.pipeline import RestorationPipeline
from models.profiles import PROFILES
from models.train import (
    FaceFolder,
    RunExistsError,
    TrainConfig,
    _set_rng_state,
    check_resume_config,
    checkpoint_path,
    data_key,
    flip_drawn,
    load_config,
    lpips_network,
    lpips_term,
    train,
)
from tests.conftest import EXIF_STORED_AS, TESTDATA, WEIGHTS
from worker.cli import main

ALIGNED = TESTDATA / "aligned"
pytestmark = pytest.mark.skipif(not ALIGNED.is_dir(), reason=f"shared test data not found at {ALIGNED}")

FACES = ("0143.png", "0240.png")
#: Sampler starts of a few steps: these tests check which nets are used, not sampling quality.
FAST_STARTS = (2, 3, 4)


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real aligned faces in an FFHQ-like nested layout."""
    root = tmp_path_factory.mktemp("ffhq")
    for i, name in enumerate(FACES):
        (root / f"{i:05d}").mkdir()
        shutil.copy(ALIGNED / name, root / f"{i:05d}" / name)
    return root


def tiny_config(out_dir: Path, faces: Path, **changes: Any) -> TrainConfig:
    """Tiny profile nets at 64 px, CPU fp32, one process: seconds per run."""
    data = {"root": faces, "size": 64, "num_workers": 0, **changes.pop("data", {})}
    values: dict[str, Any] = {
        "kind": "dblm",
        "out_dir": out_dir,
        "profile": "tiny",
        "data": data,
        "batch_size": 2,
        "max_steps": 8,
        "lr": 1e-3,
        "ema_decay": 0.5,
        "log_every": 1,
        **changes,
    }
    return TrainConfig.model_validate(values)


@pytest.fixture(scope="module")
def dblm_run(faces: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """DBLM trained for 8 steps on one repeated batch (deterministic: fixed seeds, same inputs)."""
    config = tiny_config(tmp_path_factory.mktemp("dblm"), faces, data={"overfit_batch": True})
    return train(config, progress=False)


@pytest.fixture(scope="module")
def dgsa_run(dblm_run: Any, faces: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """DGSA trained for 3 steps on `dblm_run`'s errors."""
    config = tiny_config(
        tmp_path_factory.mktemp("dgsa"),
        faces,
        kind="dgsa",
        dblm_weights=dblm_run.weights,
        dgsa_base_channels=8,
        max_steps=3,
        data={"overfit_batch": True},
    )
    return train(config, progress=False)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a run's TensorBoard logs, read back by TensorBoard's own reader."""
    events = EventAccumulator(str(run_dir / "logs"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_dblm_loss_goes_down_on_a_repeated_batch(dblm_run: Any) -> None:
    losses = dblm_run.losses
    assert len(losses) == 8 and dblm_run.steps == 8
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3


def test_tensorboard_event_file_holds_the_runs_scalars(dblm_run: Any) -> None:
    out_dir = dblm_run.weights.parent
    assert list((out_dir / "logs").glob("events.out.tfevents.*"))
    logged = scalars(out_dir)
    assert set(logged) == {"loss/total", "loss/l1_nll", "optim/lr", "optim/grad_norm", "speed/steps_per_s"}
    steps, totals = zip(*logged["loss/total"], strict=True)
    assert steps == tuple(range(1, 9))  # log_every=1
    assert totals == pytest.approx(dblm_run.losses, rel=1e-6)  # event files hold float32
    assert sum(totals[-3:]) / 3 < 0.5 * sum(totals[:3]) / 3  # the loss goes down, as read back
    assert [v for _, v in logged["loss/l1_nll"]] == list(totals)  # no LPIPS term: the only term
    assert [v for _, v in logged["optim/lr"]] == pytest.approx([1e-3] * 8)
    assert all(0 < v < float("inf") for _, v in logged["optim/grad_norm"])


def test_export_writes_safetensors_config_and_manifest_entry(dblm_run: Any) -> None:
    path = dblm_run.weights
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["kind"] == "dblm" and meta["steps"] == 8 and meta["arch"]["sigmas"] == [1.0, 2.0, 4.0]
    entry = dblm_run.manifest
    assert entry.size == path.stat().st_size
    assert entry.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert json.loads(path.with_suffix(".manifest.json").read_text())["sha256"] == entry.sha256
    # The exported tensors are the EMA's, which differ from the raw weights after training.
    ckpt = torch.load(path.parent / "checkpoints" / "last.pt", weights_only=False)
    exported = load_file(str(path))
    key = "backbone.conv_last.weight"
    assert torch.equal(exported[key], ckpt["ema"][f"module.{key}"])
    assert not torch.equal(exported[key], ckpt["model"][key])


def test_resume_continues_exactly_where_the_run_stopped(faces: Path, tmp_path: Path) -> None:
    # Batch 1 over 2 faces: step 1 stops mid-epoch, so the resume must also restore the data position.
    straight = train(tiny_config(tmp_path / "a", faces, batch_size=1, max_steps=3), progress=False)
    train(tiny_config(tmp_path / "b", faces, batch_size=1, max_steps=1), progress=False)
    resumed = train(
        tiny_config(tmp_path / "b", faces, batch_size=1, max_steps=3), resume=True, progress=False
    )
    assert resumed.losses == straight.losses[1:]
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 3
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)
    # Resuming a finished run trains no further step and exports the same weights again.
    again = train(tiny_config(tmp_path / "b", faces, batch_size=1, max_steps=3), resume=True, progress=False)
    assert (again.steps, again.losses) == (3, [])
    assert again.manifest is not None and again.manifest.sha256 == resumed.manifest.sha256
    # The interrupted and resumed run's TensorBoard series is the straight run's, each step once (the
    # no-op resume of the finished run purged nothing).
    assert scalars(tmp_path / "b")["loss/total"] == scalars(tmp_path / "a")["loss/total"]
    assert [s for s, _ in scalars(tmp_path / "b")["loss/total"]] == [1, 2, 3]


def _true_buffers() -> dict[str, torch.Tensor]:
    """A tiny DBLM's buffers (SwinIR's int64 relative-position indices, its shifted-window masks): fixed
    by the architecture, never trained."""
    buffers = dict(DBLMNet(DBLMConfig(backbone=PROFILES["tiny"].swinir)).named_buffers())
    assert any(b.dtype == torch.int64 for b in buffers.values())
    return buffers


def test_exported_ema_weights_keep_the_nets_buffers(faces: Path, tmp_path: Path) -> None:
    """An EMA of the int64 indices, computed in float and truncated back, would shift some of them by
    one (at decay 0.9999, hundreds after 3 steps): the EMA copies the buffers instead."""
    config = tiny_config(tmp_path, faces, max_steps=3, ema_decay=0.9999, data={"overfit_batch": True})
    exported = load_file(str(train(config, progress=False).weights))
    assert all(torch.equal(exported[k], b) for k, b in _true_buffers().items())


def test_resuming_a_checkpoint_with_averaged_buffers_exports_the_true_ones(
    faces: Path, tmp_path: Path
) -> None:
    """A checkpoint whose EMA buffers were averaged (corrupted) is repaired on resume, even when the run
    is finished and no step (which would copy them) follows before the export."""
    config = tiny_config(tmp_path, faces, max_steps=1)
    train(config, progress=False)
    ckpt = checkpoint_path(config)
    state = torch.load(ckpt, weights_only=False)
    for key in state["ema"]:
        if key.endswith("relative_position_index"):
            state["ema"][key] = state["ema"][key] // 2
    torch.save(state, ckpt)
    exported = load_file(str(train(config, resume=True, progress=False).weights))
    assert all(torch.equal(exported[k], b) for k, b in _true_buffers().items())


def test_a_failed_checkpoint_write_keeps_the_last_one_and_leaves_no_temp_file(
    faces: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train(tiny_config(tmp_path, faces, max_steps=1), progress=False)
    ckpt = checkpoint_path(tiny_config(tmp_path, faces))
    before = ckpt.read_bytes()
    real_save = torch.save

    def disk_full(obj: object, f: Any) -> None:
        real_save({"half": "written"}, f)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train(tiny_config(tmp_path, faces, max_steps=2), resume=True, progress=False)
    assert ckpt.read_bytes() == before
    assert [p.name for p in ckpt.parent.iterdir()] == ["last.pt"]


def test_trained_nets_load_into_the_pipeline_and_are_reported(
    dblm_run: Any, dgsa_run: Any, tmp_path: Path
) -> None:
    dgsa = dgsa_run
    assert dgsa.losses[-1] < dgsa.losses[0]
    table = tmp_path / "fast.json"
    table.write_text(dataclasses.replace(default_table(), start_indices=FAST_STARTS).to_json())
    pipe = RestorationPipeline.from_pretrained(
        "tiny",
        weights_dir=WEIGHTS,
        dsst_table=table,
        dblm_weights=dblm_run.weights,
        dgsa_weights=dgsa.weights,
    )
    assert (pipe.info["dblm"], pipe.info["dgsa"]) == ("trained", "trained")
    exported = load_file(str(dblm_run.weights))
    assert all(torch.equal(v, exported[k]) for k, v in pipe.dblm.state_dict().items())
    face = np.array(Image.open(ALIGNED / FACES[0]).convert("RGB"))[None]
    fact = pipe.restore_faces(face, seed=0).facts[0]
    assert (fact.dblm, fact.dgsa) == ("trained", "trained")
    assert fact.start_step in FAST_STARTS


def test_trained_files_for_another_profile_or_size_are_refused(
    dblm_run: Any, faces: Path, tmp_path: Path
) -> None:
    """The JSON beside the weights records the profile and training size: the real pipeline (nets at 512)
    refuses a tiny-profile file or one trained at another size, naming both. The tiny pipeline (toy nets,
    no restoration) takes its own smoke-test files at any size (above), but no real-profile file."""
    with pytest.raises(
        ValueError,
        match=r"trained with profile 'tiny' and train_size 64; here it needs "
        r"profile 'real' and train_size 512",
    ) as err:
        RestorationPipeline.from_pretrained("real", weights_dir=tmp_path, dblm_weights=dblm_run.weights)
    assert str(dblm_run.weights.with_suffix(".json")) in str(err.value)

    net = DBLMNet(DBLMConfig(backbone=PROFILES["tiny"].swinir))

    def dblm_file(name: str, profile: str, size: int) -> Path:
        arch = trained.dblm_arch(net.config)
        return trained.save(net, "dblm", arch, tmp_path / name, profile=profile, train_size=size)

    at_256 = dblm_file("real256.safetensors", "real", 256)
    with pytest.raises(ValueError, match=r"train_size 256; here it needs train_size 512"):
        RestorationPipeline.from_pretrained("real", weights_dir=tmp_path, dblm_weights=at_256)
    with pytest.raises(ValueError, match=r"profile 'real'; here it needs profile 'tiny'"):
        RestorationPipeline.from_pretrained("tiny", weights_dir=WEIGHTS, dblm_weights=at_256)
    arch = trained.dgsa_arch(8, (1, 2, 4))
    dgsa = trained.save(
        DGSANet(8), "dgsa", arch, tmp_path / "dgsa.safetensors", profile="tiny", train_size=64
    )
    with pytest.raises(ValueError, match=r"this dgsa was trained with profile 'tiny' and train_size 64"):
        RestorationPipeline.from_pretrained("real", weights_dir=tmp_path, dgsa_weights=dgsa)

    # DGSA learns a DBLM's errors on its own run's inputs: a DBLM trained at another size is refused.
    at_128 = dblm_file("tiny128.safetensors", "tiny", 128)
    with pytest.raises(ValueError, match=r"train_size 128; here it needs train_size 64"):
        train(tiny_config(tmp_path / "run", faces, kind="dgsa", dblm_weights=at_128), progress=False)


def test_a_trained_dgsa_loads_only_with_the_dblm_it_was_trained_with(
    dblm_run: Any,
    dgsa_run: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DGSA predicts the errors of the trained DBLM it was trained on. Given alone (no --dblm-weights) it
    used to load beside the fallback DBLM and be reported "trained", its map meaningless there. Its
    JSON now records that DBLM file's sha256, and loading refuses it alone (a usage error in the CLI,
    not a traceback), beside another DBLM, or when its JSON does not say which DBLM it learned."""
    meta = json.loads(dgsa_run.weights.with_suffix(".json").read_text())
    assert meta["dblm_sha256"] == hashlib.sha256(dblm_run.weights.read_bytes()).hexdigest()
    alone = "a trained DGSA needs the trained DBLM it was trained with"
    with pytest.raises(ValueError, match=alone) as err:
        RestorationPipeline.from_pretrained("tiny", weights_dir=WEIGHTS, dgsa_weights=dgsa_run.weights)
    assert str(dgsa_run.weights) in str(err.value)
    for name in ("DYNFACE_DSST_TABLE", "DYNFACE_DBLM_WEIGHTS", "DYNFACE_DGSA_WEIGHTS"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "restored"
    face = str(ALIGNED / FACES[0])
    cli = ["restore-faces", face, "-o", str(out), "--profile", "tiny", "--weights-dir", str(WEIGHTS)]
    assert main([*cli, "--dgsa-weights", str(dgsa_run.weights)]) == 1
    printed = capsys.readouterr().err
    assert alone in printed and "Traceback" not in printed and not out.exists()

    net = DBLMNet(DBLMConfig(backbone=PROFILES["tiny"].swinir))
    other = trained.save(
        net,
        "dblm",
        trained.dblm_arch(net.config),
        tmp_path / "other.safetensors",
        profile="tiny",
        train_size=64,
    )
    with pytest.raises(
        ValueError, match=rf"trained on the errors of another DBLM than {re.escape(str(other))}"
    ):
        RestorationPipeline.from_pretrained(
            "tiny", weights_dir=WEIGHTS, dblm_weights=other, dgsa_weights=dgsa_run.weights
        )
    unrecorded = tmp_path / "unrecorded.safetensors"
    shutil.copy(dgsa_run.weights, unrecorded)
    del meta["dblm_sha256"]
    unrecorded.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not record which DBLM the DGSA was trained with"):
        RestorationPipeline.from_pretrained(
            "tiny", weights_dir=WEIGHTS, dblm_weights=dblm_run.weights, dgsa_weights=unrecorded
        )


@pytest.mark.parametrize("damage", ["cut short", "not safetensors", "other architecture", "bad JSON"])
def test_a_damaged_trained_file_is_a_value_error_naming_it(
    damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`trained.load` promises a ValueError for a file that does not fit, which the CLI prints as an
    error. A cut-short or foreign file raised safetensors' SafetensorError, tensors of another
    architecture than the JSON's torch's RuntimeError (listing every key), and a malformed JSON
    named no file: `dynface restore-faces --dblm-weights` showed a traceback."""
    net = DBLMNet(DBLMConfig(backbone=PROFILES["tiny"].swinir))
    arch = trained.dblm_arch(net.config)
    path = trained.save(net, "dblm", arch, tmp_path / "dblm.safetensors", profile="tiny", train_size=64)
    meta_file = path.with_suffix(".json")
    named, problem = path, "is not a readable safetensors file"
    if damage == "cut short":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "not safetensors":
        path.write_bytes(bytes(range(7, 250)) * 20)
    elif damage == "other architecture":
        meta = json.loads(meta_file.read_text())
        meta["arch"]["backbone"]["embed_dim"] = 32  # the tensors are of embed_dim 24
        meta_file.write_text(json.dumps(meta))
        problem = r"does not hold the dblm net that dblm\.json describes: other shapes: backbone\..* is \("
    else:
        meta_file.write_text('{"format": ')
        named, problem = meta_file, "is not valid JSON"
    with pytest.raises(ValueError, match=problem) as err:
        trained.load(path, "dblm")
    assert str(named) in str(err.value)
    for name in ("DYNFACE_DSST_TABLE", "DYNFACE_DBLM_WEIGHTS", "DYNFACE_DGSA_WEIGHTS"):
        monkeypatch.delenv(name, raising=False)
    face = str(ALIGNED / FACES[0])
    cli = [
        "restore-faces",
        face,
        "-o",
        str(tmp_path / "out"),
        "--profile",
        "tiny",
        "--weights-dir",
        str(WEIGHTS),
    ]
    assert main([*cli, "--dblm-weights", str(path)]) == 1
    printed = capsys.readouterr().err
    assert printed.startswith(f"error: {named}") and "Traceback" not in printed


def test_resume_refuses_a_config_that_changes_the_run(
    faces: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An edited lr would be overwritten by the checkpoint's optimizer state and an edited batch size or
    data root would move the data position: the resume stops and names them. Steps, logging and
    checkpoint intervals may change (extending a run is what --resume is for)."""
    out = tmp_path / "out"
    train(tiny_config(out, faces, batch_size=1, max_steps=1), progress=False)
    ckpt = out / "checkpoints" / "last.pt"

    def resume_cli(**changes: Any) -> int:
        config = tiny_config(out, faces, **{"batch_size": 1, **changes}).model_dump(mode="json")
        del config["kind"]
        (tmp_path / "dblm.yaml").write_text(yaml.safe_dump(config))
        return main(["train", "dblm", str(tmp_path / "dblm.yaml"), "--resume", "--no-progress"])

    other_faces = shutil.copytree(faces, tmp_path / "other_faces")
    assert resume_cli(max_steps=2, lr=2e-3, batch_size=2, data={"root": other_faces}) == 1
    err = capsys.readouterr().err
    assert f"cannot resume from {ckpt}" in err and "Traceback" not in err
    assert "lr (checkpoint 0.001, config 0.002)" in err and "batch_size (checkpoint 1, config 2)" in err
    assert f"data.root (checkpoint {str(faces)!r}, config {str(other_faces)!r})" in err
    assert "max_steps (" not in err  # an allowed change is not listed
    assert torch.load(ckpt, weights_only=False)["step"] == 1  # nothing trained
    assert resume_cli(max_steps=2, log_every=2, ckpt_every=5) == 0
    assert torch.load(ckpt, weights_only=False)["step"] == 2


def test_resume_refuses_another_number_of_processes_or_other_faces(
    faces: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The checkpoint recorded neither the number of processes nor the faces: resumed with another
    --nproc_per_node, or after faces were added, removed or renamed, the run silently went on with
    other epochs and batches than it began with. Refused now, naming what moved, with nothing trained."""
    root = shutil.copytree(faces, tmp_path / "faces")
    out = tmp_path / "out"
    config = tiny_config(out, root, max_steps=1)
    train(config, progress=False)
    ckpt = checkpoint_path(config)

    def resume_cli() -> int:
        data = tiny_config(out, root, max_steps=2).model_dump(mode="json")
        del data["kind"]
        (tmp_path / "dblm.yaml").write_text(yaml.safe_dump(data))
        return main(["train", "dblm", str(tmp_path / "dblm.yaml"), "--resume", "--no-progress"])

    state = torch.load(ckpt, weights_only=False)
    recorded = state["data_position"]
    assert (recorded["processes"], recorded["faces"]) == (1, 2)
    state["data_position"] = {**recorded, "processes": 2}  # as if run by torchrun --nproc_per_node=2
    torch.save(state, ckpt)
    assert resume_cli() == 1
    err = capsys.readouterr().err
    assert f"cannot resume from {ckpt}: its data position would move" in err and "Traceback" not in err
    assert "processes (torchrun --nproc_per_node) (checkpoint 2, now 1)" in err
    assert "Resume with 2 process(es)" in err and "faces used" not in err
    state["data_position"] = recorded
    torch.save(state, ckpt)

    shutil.copy(ALIGNED / FACES[0], root / "added.png")
    assert resume_cli() == 1
    err = capsys.readouterr().err
    assert "faces used from data.root (checkpoint 2, now 3)" in err and "processes" not in err
    # As many faces, but one renamed: another file at some index of the shuffled order.
    (root / "added.png").unlink()
    first = next(root.rglob(FACES[0]))
    first.rename(first.with_name("renamed.png"))
    assert resume_cli() == 1
    err = capsys.readouterr().err
    assert "sha256 of the face files' paths in order" in err and "faces used" not in err
    assert torch.load(ckpt, weights_only=False)["step"] == 1  # nothing trained
    first.with_name("renamed.png").rename(first)
    assert resume_cli() == 0
    assert torch.load(ckpt, weights_only=False)["step"] == 2


def test_a_checkpoint_holding_more_cuda_rng_states_than_gpus_resumes(
    faces: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints held the CUDA RNG state of every visible GPU, restored with set_rng_state_all: on a
    machine with fewer GPUs the resume ended in an IndexError. Training draws nothing on a GPU, so no
    CUDA state is saved any more, and one an older checkpoint holds is not restored. The GPUs are
    simulated: torch on a machine with one GPU, restoring the states of eight."""
    config = tiny_config(tmp_path, faces, max_steps=1)
    train(config, progress=False)
    ckpt = checkpoint_path(config)
    state = torch.load(ckpt, weights_only=False)
    assert set(state["rng"]) == {"torch", "numpy", "python"}
    state["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 8
    torch.save(state, ckpt)

    def set_rng_state_all(states: list[torch.Tensor]) -> None:
        if len(states) > 1:  # torch.cuda.default_generators[index] on a one-GPU machine
            raise IndexError("tuple index out of range")

    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "device_count", lambda: 1)
        m.setattr(torch.cuda, "set_rng_state_all", set_rng_state_all)
        _set_rng_state(state["rng"])
    assert train(tiny_config(tmp_path, faces, max_steps=2), resume=True, progress=False).steps == 2


def test_a_checkpoint_from_before_the_flip_resumes_without_flips(tmp_path: Path, faces: Path) -> None:
    """`data.hflip` is newer than some checkpoints: their saved config lacks it, and every value was
    refused ("checkpoint '(absent)'"), stranding the run. Absent reads as the behaviour they were
    trained with, no flip: `hflip: false` resumes, `true` is named as a change."""
    config = tiny_config(tmp_path, faces, data={"hflip": False})
    saved = config.model_dump(mode="json")
    del saved["data"]["hflip"]
    check_resume_config(config, saved, tmp_path / "last.pt")
    with pytest.raises(ValueError, match=r"data.hflip \(checkpoint False, config True\)"):
        check_resume_config(tiny_config(tmp_path, faces), saved, tmp_path / "last.pt")


def test_a_run_without_resume_refuses_an_out_dir_holding_a_run(
    faces: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --resume, a second run into the same out_dir silently started again at step 0: it replaced
    checkpoints/last.pt and the export and added a second TensorBoard event file over the same steps.
    It is refused now, before anything is built or written (the CLI's exit code 2: a usage error), and
    --resume continues the run."""
    out = tmp_path / "out"
    config = tiny_config(out, faces, max_steps=2)
    train(config, progress=False)
    ckpt = checkpoint_path(config)
    kept = {p: p.read_bytes() for p in (ckpt, out / "dblm.safetensors")}
    events = sorted((out / "logs").iterdir())
    with pytest.raises(RunExistsError, match="pass --resume to continue it, or set another out_dir"):
        train(tiny_config(out, faces, max_steps=1), progress=False)
    data = tiny_config(out, faces, max_steps=3).model_dump(mode="json")
    del data["kind"]
    (tmp_path / "dblm.yaml").write_text(yaml.safe_dump(data))
    assert main(["train", "dblm", str(tmp_path / "dblm.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} already holds a run (checkpoints/last.pt, dblm.safetensors, logs/")
    assert "--resume" in err and "Traceback" not in err
    assert all(p.read_bytes() == b for p, b in kept.items()) and sorted((out / "logs").iterdir()) == events
    assert main(["train", "dblm", str(tmp_path / "dblm.yaml"), "--resume", "--no-progress"]) == 0
    assert torch.load(ckpt, weights_only=False)["step"] == 3


def test_a_checkpoint_of_a_disabled_grad_scaler_resumes_where_it_is_enabled(
    faces: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose GradScaler is disabled (bf16, or amp_dtype fp16 on the CPU, where autocast is bf16)
    saves `scaler: {}`; resumed where it is enabled (fp16 on CUDA), GradScaler.load_state_dict raised
    on that empty state. It now starts a fresh scaler. Simulated on the CPU by enabling every scaler
    the resumed run makes."""
    train(tiny_config(tmp_path, faces, max_steps=1, amp_dtype="fp16"), progress=False)
    ckpt = checkpoint_path(tiny_config(tmp_path, faces))
    assert torch.load(ckpt, weights_only=False)["scaler"] == {}
    grad_scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: grad_scaler(device, enabled=True))
    config = tiny_config(tmp_path, faces, max_steps=2, amp_dtype="fp16")
    assert train(config, resume=True, progress=False).steps == 2
    assert torch.load(ckpt, weights_only=False)["scaler"]["scale"] > 0  # the fresh scaler's state


def test_a_restorer_file_that_does_not_load_is_an_error_naming_it(
    faces: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """DBLM starts from R's weights: a damaged R file showed torch's unpickling traceback, with its advice
    to load the file with weights_only=False. It is now an error naming the file and the pull that
    replaces it (`loading_weights`, as the pipeline reports it)."""
    (entry,) = weights.select(["difface_swinir"])
    restorer = tmp_path / "weights" / entry.path
    restorer.parent.mkdir()
    restorer.write_bytes(bytes(range(7, 250)) * 20)  # neither a torch pickle nor a zip archive
    data = tiny_config(tmp_path / "out", faces, profile="real", weights_dir=restorer.parent).model_dump(
        mode="json"
    )
    del data["kind"]
    (tmp_path / "dblm.yaml").write_text(yaml.safe_dump(data))
    assert main(["train", "dblm", str(tmp_path / "dblm.yaml"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert str(restorer) in err and "dynface weights pull --force --only difface_swinir" in err
    assert "Traceback" not in err and "weights_only" not in err


def test_a_dgsa_config_without_a_dblm_is_refused(faces: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dblm_weights"):
        train(tiny_config(tmp_path, faces, kind="dgsa"), progress=False)


def test_a_dgsa_config_with_a_dblm_for_other_levels_is_refused(faces: Path, tmp_path: Path) -> None:
    """DGSA learns the DBLM's error at the profile's levels: a DBLM made for others (same count) is
    refused before training, naming both."""
    config = DBLMConfig(backbone=PROFILES["tiny"].swinir, sigmas=(1.0, 2.0, 3.0))
    path = trained.save(DBLMNet(config), "dblm", trained.dblm_arch(config), tmp_path / "dblm.safetensors")
    with pytest.raises(ValueError, match=r"blur levels \(1\.0, 2\.0, 3\.0\) are not the profile's"):
        train(tiny_config(tmp_path / "run", faces, kind="dgsa", dblm_weights=path), progress=False)


def test_config_files_are_validated(tmp_path: Path) -> None:
    good = {"out_dir": str(tmp_path / "out"), "data": {"root": str(tmp_path)}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(good))
    config = load_config(tmp_path / "c.yaml", "dblm")
    assert (config.kind, config.profile, config.data.size) == ("dblm", "real", 512)
    (tmp_path / "c.json").write_text(json.dumps({**good, "lr": -1}))
    with pytest.raises(ValidationError, match="lr"):
        load_config(tmp_path / "c.json", "dblm")
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({**good, "learning_rate": 1e-4}))
    with pytest.raises(ValidationError, match="learning_rate"):
        load_config(tmp_path / "typo.yaml", "dblm")
    (tmp_path / "k.yaml").write_text(yaml.safe_dump({**good, "kind": "dgsa"}))
    with pytest.raises(ValueError, match="not 'dblm'"):
        load_config(tmp_path / "k.yaml", "dblm")
    assert (config.lpips_weight, config.lpips_net) == (0.0, "vgg")  # optional term: off unless asked
    (tmp_path / "lp.yaml").write_text(yaml.safe_dump({**good, "lpips_weight": 0.1}))
    with pytest.raises(ValidationError, match="lpips_weight is a term of the DBLM loss"):
        load_config(tmp_path / "lp.yaml", "dgsa")


@pytest.mark.parametrize(("name", "text"), [("bad.yaml", "data: {root: [unclosed\n"), ("bad.json", "{")])
def test_malformed_config_files_are_a_usage_error_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str
) -> None:
    """Not a traceback (YAML's error was not caught before) nor a JSON error naming no file."""
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / name))} is not valid (YAML|JSON)"):
        load_config(tmp_path / name, "dblm")
    assert main(["train", "dblm", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / name} is not valid") and "Traceback" not in err


def test_lpips_term_plumbing_with_stand_in_alexnet_weights(
    faces: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plumbing only: a random AlexNet at torchvision's cache path stands in for the ImageNet one.
    The term is found, loaded, zero on exact targets, positive and differentiable off them, and enters
    the training loss (logged as its own series)."""
    stand_in_alexnet_hub(tmp_path / "torch", monkeypatch)
    network = lpips_network("alex")
    assert not any(p.requires_grad for p in network.parameters())  # frozen: only the DBLM learns
    sigmas = (1.0, 2.0, 4.0)
    clean = torch.from_numpy(np.array(Image.open(ALIGNED / FACES[0]).convert("RGB").resize((64, 64))))
    clean = clean.permute(2, 0, 1)[None].float() / 255.0
    exact = blur_levels(clean, sigmas)
    assert float(lpips_term(network, exact, clean, sigmas)) == pytest.approx(0.0, abs=1e-6)
    pred = exact + 0.05 * torch.randn(exact.shape, generator=torch.Generator().manual_seed(0))
    pred.requires_grad_(True)
    term = lpips_term(network, pred, clean, sigmas)
    assert float(term.detach()) > 1e-4
    term.backward()
    assert pred.grad is not None and bool(torch.isfinite(pred.grad).all())
    assert float(pred.grad.abs().sum()) > 0

    config = tiny_config(tmp_path / "run", faces, max_steps=2, lpips_weight=0.5, lpips_net="alex")
    run = train(config, progress=False)
    logged = scalars(tmp_path / "run")
    for (_, total), (_, l1_nll), (_, lpips) in zip(
        logged["loss/total"], logged["loss/l1_nll"], logged["loss/lpips"], strict=True
    ):
        assert lpips > 0 and total == pytest.approx(l1_nll + lpips, rel=1e-5)
    assert [v for _, v in logged["loss/total"]] == pytest.approx(run.losses, rel=1e-6)


def test_lpips_without_backbone_weights_fails_before_training_naming_the_file(
    faces: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    config = tiny_config(tmp_path / "out", faces, lpips_weight=0.1).model_dump(mode="json")
    del config["kind"]
    (tmp_path / "dblm.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "dblm", str(tmp_path / "dblm.yaml"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "vgg16-397923af.pth" in err and str(tmp_path / "empty-torch-home") in err
    assert "lpips_weight: 0" in err
    assert not (tmp_path / "out").exists()  # failed before any step, log or checkpoint


def test_train_cli_runs_a_config(faces: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tiny_config(tmp_path / "out", faces, max_steps=1).model_dump(mode="json")
    del config["kind"]
    (tmp_path / "dblm.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "dblm", str(tmp_path / "dblm.yaml"), "--no-progress"]) == 0
    assert (tmp_path / "out" / "dblm.safetensors").is_file()
    assert '"sha256"' in capsys.readouterr().out


def test_dsst_build_cli_writes_a_table_the_pipeline_uses(faces: Path, tmp_path: Path) -> None:
    out = tmp_path / "dsst.json"
    args = [
        "dsst",
        "build",
        "--prior",
        "tiny",
        "--faces",
        str(faces),
        "--out",
        str(out),
        "--heaviest-start",
        "4",
    ]
    assert main(args) == 0
    table = DSSTable.from_json(out.read_text())
    assert table.sigmas == (1.0, 2.0, 4.0) and table.start_indices[-1] == 4
    assert "2 aligned 512px faces" in table.provenance
    # Another P_face than the shipped one's (different faces): the table is really rebuilt.
    assert not torch.equal(table.face_power_spectrum.power, default_table().face_power_spectrum.power)
    pipe = RestorationPipeline.from_pretrained("tiny", weights_dir=WEIGHTS, dsst_table=out)
    assert pipe.dsst.start_indices == table.start_indices
    assert torch.equal(pipe.dsst.face_power_spectrum.power, table.face_power_spectrum.power)
    assert pipe.info["dsst"]["start_indices"] == list(table.start_indices)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sigmas", "4", "2", "1"], "--sigmas: blur levels must be strictly increasing"),
        (["--sigmas", "0", "1"], "--sigmas: blur levels must be positive"),
        (["--max-faces", "-19"], "--max-faces must be ≥ 1, got -19"),
        (["--max-faces", "0"], "--max-faces must be ≥ 1, got 0"),
        (["--heaviest-start", "250"], "--heaviest-start must be a start index in 1..249, got 250"),
    ],
)
def test_dsst_build_cli_refuses_bad_numbers_without_a_traceback(
    faces: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    out = tmp_path / "t.json"
    assert main(["dsst", "build", "--faces", str(faces), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prior", "bogus"], "--prior must be real, tiny or an existing weights directory, got 'bogus'"),
        (
            ["--method", "sweep", "--max-faces", "1", "--device", "cuda"],
            "--device cuda: CUDA is not available here",
        ),
        (
            ["--method", "sweep", "--max-faces", "1", "--device", "gpu"],
            "--device 'gpu' is not a device (cpu, cuda, cuda:N)",
        ),
        (["--out", "{dir}"], "--out {dir} is a directory; give a file name, e.g. {dir}/dsst.json"),
        (
            ["--out", "{file}/t.json"],
            "--out {file}/t.json cannot be written: {file} is not a writable directory",
        ),
    ],
)
def test_dsst_build_cli_refuses_a_bad_prior_out_or_device_before_any_work(
    faces: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    message: str,
) -> None:
    """`--prior bogus` used to build a table for the real profile silently; an --out that is a directory
    raised IsADirectoryError after all the work; `--device cuda` without a GPU gave torch's
    RuntimeError traceback. All are usage errors now, found before any face is read."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("")
    names = {"dir": tmp_path / "dir", "file": tmp_path / "file"}
    args, message = [a.format(**names) for a in args], message.format(**names)
    out = ["--out", str(tmp_path / "t.json")] if "--out" not in args else []
    assert main(["dsst", "build", "--prior", "tiny", "--faces", str(faces), *out, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and "Traceback" not in err
    assert not (tmp_path / "t.json").exists() and not any((tmp_path / "dir").iterdir())


def test_dsst_build_cli_rejects_an_empty_folder(tmp_path: Path) -> None:
    assert main(["dsst", "build", "--faces", str(tmp_path), "--out", str(tmp_path / "t.json")]) == 2
    assert not (tmp_path / "t.json").exists()


def test_a_grey_training_input_has_a_grey_target(faces: Path, tmp_path: Path) -> None:
    """DifFace's gt_gray: a pair whose input was turned grey (gray_prob) gets a grey target, since the
    colour of a grey input cannot be inferred; other pairs keep their colour target."""
    folder = FaceFolder(tiny_config(tmp_path, faces).data)
    colour_clean, _ = folder[0]
    folder.ranges = dataclasses.replace(folder.ranges, gray_prob=1.0)
    clean, degraded = folder[0]
    for image in (clean, degraded):
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert not torch.equal(colour_clean[0], colour_clean[1])


def test_training_faces_are_mirrored_at_random_before_they_are_degraded(faces: Path, tmp_path: Path) -> None:
    """DifFace trains its restorer with use_hflip; training here had no flip. Now (by default) half the
    draws mirror the clean face before it is degraded, drawn from the seed of its degradation (seed,
    epoch, path), so a resumed run sees the same faces; the degradation itself is the same draw whether
    flips are on or off (`hflip: false`)."""
    assert tiny_config(tmp_path, faces).data.hflip  # on unless turned off, as upstream
    on = FaceFolder(tiny_config(tmp_path, faces, data={"size": 512}).data)
    off = FaceFolder(tiny_config(tmp_path, faces, data={"size": 512, "hflip": False}).data)
    rgb = images.load_rgb(on.paths[0], max_pixels=images.FACE_FILE_MAX_PIXELS)
    seen = set()
    for epoch in range(4):  # face 0 is mirrored in epochs 0 and 1, not in 2 and 3
        on.epoch = off.epoch = epoch
        seed = (on.seed, epoch, on.keys[0])
        flipped = flip_drawn(seed)
        seen.add(flipped)
        (clean, degraded), (clean_off, degraded_off) = on[0], off[0]
        if not flipped:
            assert torch.equal(clean, clean_off) and torch.equal(degraded, degraded_off)
            continue
        assert torch.equal(clean, clean_off.flip(-1))
        mirrored, _ = random_degrade(np.ascontiguousarray(rgb[:, ::-1]), seed, on.ranges)
        assert torch.equal(degraded, torch.from_numpy(mirrored).permute(2, 0, 1).float() / 255.0)
    assert seen == {True, False}


def test_a_faces_degradation_does_not_depend_on_the_other_files(faces: Path, tmp_path: Path) -> None:
    """Each face's degradation is seeded by its path under the root, not its position in the sorted
    listing: a file added before it (here one that sorts between the two faces) changes nothing."""
    before = FaceFolder(tiny_config(tmp_path, faces).data)
    grown = tmp_path / "grown"
    shutil.copytree(faces, grown)
    (grown / "00000a").mkdir()
    shutil.copy(ALIGNED / FACES[0], grown / "00000a" / "extra.png")
    after = FaceFolder(tiny_config(tmp_path, grown).data)
    assert [p.relative_to(grown).as_posix() for p in after.paths] == [
        f"00000/{FACES[0]}",
        "00000a/extra.png",
        f"00001/{FACES[1]}",
    ]
    for epoch in (0, 1):
        before.epoch = after.epoch = epoch
        for old, new in ((0, 0), (1, 2)):
            assert all(torch.equal(a, b) for a, b in zip(before[old], after[new], strict=True))
    # The added copy of face 0 sits at another path, so it gets its own degradation.
    assert not torch.equal(after[1][1], after[0][1])


def _face_twins(tmp_path: Path, variant: str) -> tuple[Path, Path]:
    """Two files of one real face at the same path under two roots (so FaceFolder seeds both alike): an
    upright 8-bit 512² PNG, and the same face as `variant` — a 16-bit grey PNG (the 8-bit one grey
    too), a PNG stored on its side with EXIF Orientation 6, or a 256² PNG (the first then holds its
    Lanczos resize to 512², as training always made it). Returns (8-bit file, variant file)."""
    plain, twin = tmp_path / "plain" / "00000", tmp_path / "twin" / "00000"
    plain.mkdir(parents=True)
    twin.mkdir(parents=True)
    face = Image.open(ALIGNED / FACES[0]).convert("RGB")
    if variant == "16-bit":
        grey = np.asarray(face.convert("L"))
        Image.fromarray(grey).save(plain / "face.png")
        Image.fromarray(grey.astype(np.uint16) * 257).save(twin / "face.png")  # 255 -> 65535
        assert Image.open(twin / "face.png").mode == "I;16"
    elif variant == "exif-rotated":
        face.save(plain / "face.png")
        exif = Image.Exif()
        exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
        stored = EXIF_STORED_AS[6]
        assert stored is not None
        face.transpose(stored).save(twin / "face.png", exif=exif)
    else:
        small = face.resize((256, 256), Image.Resampling.LANCZOS)
        small.resize((512, 512), Image.Resampling.LANCZOS).save(plain / "face.png")
        small.save(twin / "face.png")
    return plain / "face.png", twin / "face.png"


@pytest.mark.parametrize("variant", ["16-bit", "exif-rotated", "256px"])
def test_a_training_face_is_read_as_the_service_decodes_it(variant: str, tmp_path: Path) -> None:
    """Training reads a face as the pipeline decodes an upload (`images.load_rgb`): a 16-bit face is
    scaled to 8 bits (Pillow's convert clipped it to white), an EXIF-rotated one is upright, and a
    face of another size is still Lanczos-resized to 512 before it is degraded. ×257 maps back to the
    8-bit levels exactly, so the pairs are equal, not just close."""
    plain, twin = _face_twins(tmp_path, variant)
    want = FaceFolder(tiny_config(tmp_path, plain.parents[1]).data)[0]
    got = FaceFolder(tiny_config(tmp_path, twin.parents[1]).data)[0]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("variant", ["16-bit", "exif-rotated"])
def test_dsst_build_reads_a_face_as_the_service_decodes_it(variant: str, tmp_path: Path) -> None:
    """P_face is measured on the pixels the pipeline restores: a 16-bit face scaled, not clipped to
    white; an EXIF-rotated face upright."""
    plain, twin = _face_twins(tmp_path, variant)
    assert torch.equal(load_face(twin, 512), load_face(plain, 512))


def test_dsst_build_names_a_face_of_another_size(tmp_path: Path) -> None:
    _, small = _face_twins(tmp_path, "256px")
    message = f"{small} is 256×256, expected aligned 512² faces"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        load_face(small, 512)


def test_a_files_data_key_is_the_same_on_every_machine() -> None:
    """The key reads the path as posix text in NFC: a name macOS hands out in NFD is the same file,
    and a Linux name that is not UTF-8 still gets a key (it raised UnicodeEncodeError)."""
    composed, decomposed = "caf\u00e9/x.png", "cafe\u0301/x.png"
    assert data_key(Path(composed)) == data_key(Path(decomposed))
    assert data_key(Path("a/b.png")) != data_key(Path("a/c.png"))
    undecodable = Path(os.fsdecode(b"faces/x\xff.png"))
    assert data_key(undecodable) != data_key(Path(os.fsdecode(b"faces/x\xfe.png")))


def test_resume_refuses_a_checkpoint_seeded_by_index(faces: Path, tmp_path: Path) -> None:
    """A checkpoint from before faces were seeded by their path would resume on other inputs than the
    interrupted run saw: refused, naming the way out, with nothing trained."""
    config = tiny_config(tmp_path, faces, max_steps=1)
    train(config, progress=False)
    ckpt = checkpoint_path(config)
    state = torch.load(ckpt, weights_only=False)
    del state["data_seeding"]
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match="seeded each face's degradation by its index"):
        train(tiny_config(tmp_path, faces, max_steps=2), resume=True, progress=False)
    assert torch.load(ckpt, weights_only=False)["step"] == 1


def test_a_dgsa_run_resumes_only_with_the_dblm_it_began_with(
    dblm_run: Any, faces: Path, tmp_path: Path
) -> None:
    """A resumed DGSA run re-hashed whatever its DBLM path held then: overwritten with another DBLM,
    the run went on learning that one's errors, and its export named only the new file though its
    first steps learned the old one's. The checkpoint records the sha256 it began with."""
    dblm = tmp_path / "dblm.safetensors"
    for suffix in (".safetensors", ".json"):
        shutil.copy(dblm_run.weights.with_suffix(suffix), dblm.with_suffix(suffix))
    began = hashlib.sha256(dblm.read_bytes()).hexdigest()

    def config(steps: int) -> TrainConfig:
        return tiny_config(
            tmp_path / "run",
            faces,
            kind="dgsa",
            dblm_weights=dblm,
            dgsa_base_channels=8,
            max_steps=steps,
            data={"overfit_batch": True},
        )

    train(config(1), progress=False)
    assert torch.load(checkpoint_path(config(1)), weights_only=False)["export_info"] == {"dblm_sha256": began}
    net = DBLMNet(DBLMConfig(backbone=PROFILES["tiny"].swinir))
    trained.save(net, "dblm", trained.dblm_arch(net.config), dblm, profile="tiny", train_size=64)
    with pytest.raises(ValueError, match=r"cannot resume from .*changed: \['dblm_sha256'\]"):
        train(config(2), resume=True, progress=False)
    assert torch.load(checkpoint_path(config(2)), weights_only=False)["step"] == 1
    for suffix in (".safetensors", ".json"):  # the file it began with, back: the run goes on
        shutil.copy(dblm_run.weights.with_suffix(suffix), dblm.with_suffix(suffix))
    assert train(config(2), resume=True, progress=False).steps == 2
