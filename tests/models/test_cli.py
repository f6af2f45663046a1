"""`dynface restore-faces` and `dynface restore` (model commands) with the tiny profile."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
from PIL import Image

from models.cli import register_commands

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared test data not found at {SHARED}")


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="dynface")
    register_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_restore_faces_writes_one_png_per_face_and_skips_bad_files(tmp_path: Path, capsys) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("0143.png", "0240.png"):
        shutil.copy(SHARED / "testdata" / "aligned" / name, inputs / name)
    (inputs / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    code = run(
        "restore-faces", str(inputs), "-o", str(out), "--profile", "tiny", "--mode", "difface", "--seed", "0"
    )
    assert code == 1  # one input was unreadable: reported, not fatal for the others
    assert sorted(p.name for p in out.iterdir()) == ["0143.png", "0240.png"]
    assert Image.open(out / "0143.png").size == (512, 512)
    captured = capsys.readouterr()
    assert "skipped" in captured.out + captured.err and "broken.png" in captured.out + captured.err


def test_restore_photo_with_faces_and_comparison(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = run(
        "restore",
        str(SHARED / "testdata" / "photos" / "04.jpg"),
        "-o",
        str(out),
        "--profile",
        "tiny",
        "--weights-dir",
        str(SHARED / "weights"),
        "--outputs",
        "image,faces,comparison",
        "--format",
        "png",
        "--mode",
        "difface",
        "--seed",
        "0",
    )
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["04.png", "04_comparison.png", "04_face00.png"]
    assert Image.open(out / "04.png").size == (225, 225)
