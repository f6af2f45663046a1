"""`dynface restore-faces` and `dynface restore` (model commands) with the tiny profile."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import cli as cli_mod
from models import pipeline as pipeline_mod
from models.cli import register_commands
from models.dsst import default_table
from tests.conftest import assert_same_up_to_rounding

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
PHOTOS = SHARED / "testdata" / "photos"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared test data not found at {SHARED}")


@pytest.fixture(autouse=True)
def _short_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start steps of 2-4 instead of up to 100: these tests are about files in and out."""
    table = dataclasses.replace(default_table(), start_indices=(2, 3, 4))
    monkeypatch.setattr(pipeline_mod, "default_table", lambda: table)


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="dynface")
    register_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_restore_faces_writes_one_png_per_face_and_skips_bad_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("0143.png", "0240.png"):
        shutil.copy(SHARED / "testdata" / "aligned" / name, inputs / name)
    (inputs / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    code = run("restore-faces", str(inputs), "-o", str(out), "--profile", "tiny", "--seed", "0")
    assert code == 1  # one input was unreadable: reported, not fatal for the others
    assert sorted(p.name for p in out.iterdir()) == ["0143.png", "0240.png"]
    assert Image.open(out / "0143.png").size == (512, 512)
    captured = capsys.readouterr()
    assert "skipped" in captured.out + captured.err and "broken.png" in captured.out + captured.err
    assert "3/3" in captured.err  # the progress bar counted every input, skipped ones included


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_restore_faces_seeds_each_input_by_its_place_not_its_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each batch's faces drew from seed + 0, 1, …: with --seed 0 and --max-batch 8, faces 0, 8,
    16, … had the same noise, and a face's result depended on --max-batch. Input i now draws from
    seed + i, whatever the batch size and whichever inputs could not be read."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    face = SHARED / "testdata" / "aligned" / "0143.png"
    for name in ("a.png", "c.png", "d.png"):
        shutil.copy(face, inputs / name)
    (inputs / "b.png").write_bytes(b"not an image")  # input 1: c and d stay inputs 2 and 3
    common = ("--profile", "tiny", "--fidelity", "0.5")
    assert run("restore-faces", str(inputs), "-o", str(tmp_path / "batched"), *common, "--seed", "7") == 1
    assert "seed 7 (input i draws from seed + i)" in capsys.readouterr().err
    one_by_one = ("--max-batch", "1", "--seed", "7")
    assert run("restore-faces", str(inputs), "-o", str(tmp_path / "single"), *common, *one_by_one) == 1
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(face, alone / "d.png")
    assert run("restore-faces", str(alone), "-o", str(tmp_path / "d-alone"), *common, "--seed", "10") == 0
    batched = {n: _pixels(tmp_path / "batched" / n) for n in ("a.png", "c.png", "d.png")}
    for name, pixels in batched.items():
        assert_same_up_to_rounding(pixels, _pixels(tmp_path / "single" / name))
    assert_same_up_to_rounding(batched["d.png"], _pixels(tmp_path / "d-alone" / "d.png"))
    # The same face from other seeds: other noise, other pixels.
    assert np.abs(batched["a.png"].astype(int) - batched["c.png"].astype(int)).mean() > 1


def test_restore_photo_with_faces_crops_comparison_and_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = run(
        "restore",
        str(PHOTOS / "04.jpg"),
        "-o",
        str(out),
        "--profile",
        "tiny",
        "--weights-dir",
        str(SHARED / "weights"),
        "--outputs",
        "image,faces,crops,comparison",
        "--format",
        "png",
        "--color-correction",
        "wavelet",
        "--seed",
        "0",
    )
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "04.json",
        "04.png",
        "04_comparison.png",
        "04_crop00.png",
        "04_face00.png",
    ]
    assert Image.open(out / "04.png").size == (225, 225)
    report = json.loads((out / "04.json").read_text())
    (face,) = report["faces"]
    assert len(face["box"]) == 4 and face["score"] >= 0.97 and face["start_step"] in (2, 3, 4)
    assert 0 <= face["eta"] <= 1 and report["faces_dropped"] == 0 and report["seed"] == 0
    assert any("NOT a face restoration" in w for w in report["warnings"])


def test_restore_folders_keep_structure_skip_unreadable_and_report_extras(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two photos with the same name in different sub-folders, a broken file and a photo without a
    face: every readable photo is written (none overwrites another), the others are reported."""
    inputs = tmp_path / "in"
    for sub in ("a", "b"):
        (inputs / sub).mkdir(parents=True)
        shutil.copy(PHOTOS / "04.jpg", inputs / sub / "same.jpg")
    (inputs / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    Image.new("RGB", (64, 48), (90, 90, 90)).save(inputs / "blank.png")
    (inputs / "notes.txt").write_text("not an image suffix: ignored")
    out = tmp_path / "out"
    code = run(
        "restore",
        str(inputs),
        "-o",
        str(out),
        "--profile",
        "tiny",
        "--weights-dir",
        str(SHARED / "weights"),
        "--detector",
        "retinaface_mobile0.25",
        "--max-faces",
        "1",
        "--seed",
        "0",
    )
    assert code == 1
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["a/same.jpeg", "a/same.json", "b/same.jpeg", "b/same.json"]
    captured = capsys.readouterr()
    said = captured.out + captured.err
    assert "broken.jpg: invalid_image" in said and "blank.png: no_face" in said
    assert "restored 2 photo(s)" in said and "skipped 2" in said


def test_unflagged_files_come_from_the_service_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --dsst / --dblm-weights / --dgsa-weights / --dtype the CLI loads what a worker with the
    same DYNFACE_* variables loads (the library itself reads none); an empty variable is unset."""
    face = str(SHARED / "testdata" / "aligned" / "0143.png")
    for name in ("DYNFACE_DSST_TABLE", "DYNFACE_DBLM_WEIGHTS", "DYNFACE_DGSA_WEIGHTS"):
        monkeypatch.setenv(name, str(tmp_path / f"{name}.missing"))
        assert run("restore-faces", face, "-o", str(tmp_path / "out"), "--profile", "tiny") == 1
        assert f"{name}.missing" in capsys.readouterr().err
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("DYNFACE_BACKGROUND_MODEL", "esrgan")
    assert run("restore", face, "-o", str(tmp_path / "out"), "--profile", "tiny") == 1
    assert "Unknown background model 'esrgan'" in capsys.readouterr().err
    monkeypatch.delenv("DYNFACE_BACKGROUND_MODEL")
    monkeypatch.setenv("DYNFACE_DTYPE", "fp64")
    assert run("restore-faces", face, "-o", str(tmp_path / "out"), "--profile", "tiny") == 1
    assert "dtype must be one of" in capsys.readouterr().err
    monkeypatch.delenv("DYNFACE_DTYPE")
    assert run("restore-faces", face, "-o", str(tmp_path / "out"), "--profile", "tiny", "--seed", "0") == 0
    assert (tmp_path / "out" / "0143.png").is_file()


def test_restore_rejects_unknown_outputs_before_loading(capsys: pytest.CaptureFixture[str]) -> None:
    code = run("restore", "x.jpg", "-o", "out", "--profile", "real", "--outputs", "image,mask")
    assert code == 2 and "mask" in capsys.readouterr().err


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model load that fails at once: exit 1 and "model loaded" mean the inputs were accepted."""

    def load(args: argparse.Namespace) -> None:
        raise FileNotFoundError("model loaded")

    monkeypatch.setattr(cli_mod, "_load_pipeline", load)


@pytest.mark.parametrize(
    ("command", "files", "extra", "clash"),
    [
        # Folders a/ and b/ both hold x.png: both would be written to out/x.png.
        ("restore-faces", ("a/x.png", "b/x.png"), (), "x: {in}/a/x.png, {in}/b/x.png"),
        # One folder, x.jpg and x.png: one x.json report (and under --format png one x.png image).
        ("restore", ("a/x.jpg", "a/x.png"), ("--format", "png"), "x: {in}/a/x.jpg, {in}/a/x.png"),
        ("restore", ("a/x.jpg", "a/x.png"), (), "x: {in}/a/x.jpg, {in}/a/x.png"),
        # x.png's first face is x_face00.png, the name of another input's image.
        (
            "restore",
            ("a/x.png", "a/x_face00.png"),
            ("--outputs", "image,faces"),
            "x_face00: {in}/a/x_face00.png",
        ),
    ],
)
def test_inputs_whose_outputs_would_overwrite_each_other_are_refused_before_the_model_loads(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_model: None,
    command: str,
    files: tuple[str, ...],
    extra: tuple[str, ...],
    clash: str,
) -> None:
    inputs = tmp_path / "in"
    for name in files:
        (inputs / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SHARED / "testdata" / "aligned" / "0143.png", inputs / name)
    folders = sorted({str(inputs / Path(name).parent) for name in files})
    out = tmp_path / "out"
    assert run(command, *folders, "-o", str(out), *extra) == 2
    err = capsys.readouterr().err
    assert "would overwrite each other's outputs" in err and clash.format(**{"in": inputs}) in err
    assert "model loaded" not in err and not out.exists()


def test_distinct_output_names_pass_the_clash_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model: None
) -> None:
    """Same names in sub-folders of one input folder, and x_face00.png when no faces are written."""
    inputs = tmp_path / "in"
    for name in ("a/x.png", "b/x.png", "x.png", "x_face00.png"):
        (inputs / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SHARED / "testdata" / "aligned" / "0143.png", inputs / name)
    for command in ("restore-faces", "restore"):
        assert run(command, str(inputs), "-o", str(tmp_path / "out")) == 1
        assert "model loaded" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["restore-faces", "restore"])
def test_inputs_without_images_are_refused_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model: None, command: str
) -> None:
    """An empty folder, or one of other files: a usage error (exit 2, as `dsst build`'s), not a model
    load and "restored 0" with exit 0."""
    empty, other = tmp_path / "empty", tmp_path / "other"
    empty.mkdir()
    (other / "sub").mkdir(parents=True)
    (other / "sub" / "notes.txt").write_text("no image")
    out = tmp_path / "out"
    assert run(command, str(empty), str(other), "-o", str(out)) == 2
    err = capsys.readouterr().err
    assert "error: no images (" in err and f"found under {empty}, {other}" in err and "*.png" in err
    assert "model loaded" not in err and not out.exists()


def test_restore_max_faces_sets_the_pipelines_cap(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`restore --max-faces N` restores up to N faces: it replaces the pipeline's cap of 32 (it only
    lowered it: N = 50 restored 32). Unset, the cap stays the pipeline's own."""
    loaded: list[dict[str, object]] = []

    def from_pretrained(profile: str, **kwargs: object) -> None:
        loaded.append(kwargs)
        raise FileNotFoundError("stop before loading")

    monkeypatch.setattr(pipeline_mod.RestorationPipeline, "from_pretrained", from_pretrained)
    face = str(SHARED / "testdata" / "aligned" / "0143.png")
    assert run("restore", face, "-o", str(tmp_path / "out"), "--profile", "tiny", "--max-faces", "50") == 1
    assert run("restore", face, "-o", str(tmp_path / "out"), "--profile", "tiny") == 1
    assert loaded[0]["max_faces"] == 50 and "max_faces" not in loaded[1]


def _aligned_copies(root: Path, *names: str) -> dict[Path, bytes]:
    """Copies of a real aligned face at `names` under `root`; returns each file's bytes."""
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SHARED / "testdata" / "aligned" / "0143.png", root / name)
    return {root / name: (root / name).read_bytes() for name in names}


@pytest.mark.parametrize(
    ("command", "files", "args", "message"),
    [
        # The reviewer's run: the restored face replaced the original.
        ("restore-faces", ("a.png",), ("{in}", "-o", "{in}"), "-o {in} is the input folder {in}"),
        ("restore", ("a.png",), ("{in}", "-o", "{in}"), "-o {in} is the input folder {in}"),
        # Not replaced, but restored again by the next run over the folder.
        ("restore", ("a.png",), ("{in}", "-o", "{in}/out"), "-o {in}/out is inside the input folder {in}"),
        ("restore-faces", ("a.png",), ("{in}", "-o", "{in}/x/../."), "is the input folder {in}"),
        # A file named directly, written where it is (restore: --format same keeps PNG a PNG).
        ("restore-faces", ("a.png",), ("{in}/a.png", "-o", "{in}"), "would replace these inputs: {in}/a.png"),
        ("restore", ("a.png",), ("{in}/a.png", "-o", "{in}"), "would replace these inputs: {in}/a.png"),
        (
            "restore",
            ("a.png",),
            ("{in}/a.png", "-o", "{in}", "--format", "png"),
            "would replace these inputs: {in}/a.png (by the output of {in}/a.png)",
        ),
        # Folder d's sub/x.png writes out/sub/x_face00.png: the other input, named directly.
        (
            "restore",
            ("d/sub/x.png", "out/sub/x_face00.png"),
            ("{in}/d", "{in}/out/sub/x_face00.png", "-o", "{in}/out", "--outputs", "image,faces"),
            "would replace these inputs: {in}/out/sub/x_face00.png (by the output of {in}/d/sub/x.png)",
        ),
        ("restore-faces", ("a.png", "f"), ("{in}/a.png", "-o", "{in}/f"), "-o {in}/f is a file"),
    ],
)
def test_outputs_that_would_replace_or_join_the_inputs_are_refused_before_the_model_loads(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_model: None,
    command: str,
    files: tuple[str, ...],
    args: tuple[str, ...],
    message: str,
) -> None:
    """Nothing compared -o with the inputs: `restore-faces DIR -o DIR` replaced each face by its
    result, and an -o inside an input folder had its results restored on the next run."""
    inputs = tmp_path / "in"
    kept = _aligned_copies(inputs, *files)
    assert run(command, *(a.format(**{"in": inputs}) for a in args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.format(**{"in": inputs}) in err
    assert "model loaded" not in err
    assert {p: p.read_bytes() for p in kept} == kept
    assert sorted(p for p in inputs.rglob("*") if p.is_file()) == sorted(kept)


def test_outputs_beside_their_inputs_that_replace_none_pass_the_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model: None
) -> None:
    """a.jpg restored as JPEG is written as a.jpeg (and a.json): beside its input, replacing nothing."""
    photo = tmp_path / "a.jpg"
    shutil.copy(PHOTOS / "04.jpg", photo)
    assert run("restore", str(photo), "-o", str(tmp_path), "--format", "jpeg") == 1
    assert "model loaded" in capsys.readouterr().err


def test_an_interrupted_write_leaves_the_previous_output_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outputs were written in place: a Ctrl-C in the middle left a cut-off image under the final
    name. They are written to a temporary file renamed over the old one, which stays whole."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    _aligned_copies(inputs, "0143.png")
    out.mkdir()
    (out / "0143.png").write_bytes(b"the previous result")

    def interrupted(self: Path, data: bytes) -> int:
        with self.open("wb") as f:
            f.write(data[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run("restore-faces", str(inputs), "-o", str(out), "--profile", "tiny", "--seed", "0")
    assert [p.name for p in out.iterdir()] == ["0143.png"]
    assert (out / "0143.png").read_bytes() == b"the previous result"


def test_an_input_that_is_a_link_is_not_replaced_through_its_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model: None
) -> None:
    """Inputs were compared by their link's target: in/x.png → store/y.png restored into in/ wrote
    in/x.png, replacing the link with the result."""
    (store := tmp_path / "store").mkdir()
    _aligned_copies(store, "0143.png")
    (inputs := tmp_path / "in").mkdir()
    (inputs / "x.png").symlink_to(store / "0143.png")
    assert run("restore-faces", str(inputs / "x.png"), "-o", str(inputs)) == 2
    assert f"would replace these inputs: {inputs}/x.png" in capsys.readouterr().err
    assert (inputs / "x.png").is_symlink()


def test_an_atomic_write_keeps_links_modes_and_devices(tmp_path: Path) -> None:
    """The rename replaced a link (a mounted config's) with a plain file, and a file's mode with the
    default; a device (`--csv /dev/stdout`) must be written to, not replaced."""
    target = tmp_path / "target.json"
    target.write_text("old")
    target.chmod(0o600)
    (link := tmp_path / "link.json").symlink_to(target)
    cli_mod.write_atomically(link, b"new")
    assert link.is_symlink() and target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o600
    (device := tmp_path / "out.csv").symlink_to("/dev/null")
    cli_mod.write_atomically(device, b"rows")
    assert device.is_symlink() and Path("/dev/null").is_char_device()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "out.csv", "target.json"]


@pytest.mark.parametrize("command", ["restore-faces", "restore"])
@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cuda", "--device cuda: CUDA is not available here"),
        ("cuda:7", "--device cuda:7: CUDA is not available here"),
        ("gpu", "--device 'gpu' is not a device (cpu, cuda, cuda:N)"),
    ],
)
def test_a_device_that_cannot_be_used_is_refused_first(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_model: None,
    command: str,
    device: str,
    message: str,
) -> None:
    """`--device cuda` without a GPU listed the inputs, then ended in torch's traceback from the model
    load; refused now as `eval` and `dsst build` refuse it (exit 2), before anything else."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    _aligned_copies(tmp_path / "in", "a.png")
    assert run(command, str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--device", device) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and "model loaded" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["restore-faces", "restore"])
def test_inputs_that_do_not_exist_are_refused_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model: None, command: str
) -> None:
    """A mistyped input loaded the model, then was reported "skipped"."""
    _aligned_copies(tmp_path, "a.png")
    typo, out = tmp_path / "typo.png", tmp_path / "out"
    assert run(command, str(tmp_path / "a.png"), str(typo), "-o", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no such file or folder: {typo}") and "model loaded" not in err
    assert not out.exists()
