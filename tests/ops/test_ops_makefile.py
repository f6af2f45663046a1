"""The Makefile behind the README's two commands: what a newcomer's failed first run leaves."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.conftest import ROOT

#: A Python whose `venv` fails as Debian's does without python3-venv: it leaves DIR/bin/python behind.
_PYTHON_WITHOUT_ENSUREPIP = """#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin" && ln -sf "$(command -v python3)" "$3/bin/python"
  echo "The virtual environment was not created successfully because ensurepip is not available." >&2
  exit 1
fi
exec python3 "$@"
"""


def test_a_venv_that_failed_half_way_is_made_again_on_the_next_run(tmp_path: Path) -> None:
    """`make serve` on a Python without ensurepip fails after `venv` made .venv/bin/python: that file
    must not stay, or the next `make` (ensurepip installed meanwhile, as the error says) takes the
    venv for made and fails on its missing pip."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    python = tmp_path / "python-without-ensurepip"
    python.write_text(_PYTHON_WITHOUT_ENSUREPIP)
    python.chmod(0o755)
    run = subprocess.run(
        ["make", f"PYTHON={python}", ".venv/.installed-runtime"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0 and "ensurepip is not available" in run.stderr, run.stderr
    assert not (tmp_path / ".venv/bin/python").exists()
    assert not (tmp_path / ".venv/bin/python").is_symlink()
