"""docker/k8s: valid manifests, and KEDA watches the list RQ really uses for dynface's queue.

Core kinds are validated against the Kubernetes OpenAPI schemas by `kubernetes-validate` (PyPI,
schemas bundled) in strict mode, so a misspelt field fails. KEDA and Prometheus Operator kinds
(CRDs) have no bundled schema: their fields the service depends on are checked here by hand.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate as kv  # the `test` extra: missing is a broken install, not a skip
import pytest
import yaml
from rq import Queue

from app.settings import Settings
from tests.conftest import settings_in_env
from worker.cli import build_parser
from worker.metrics import SCRAPE_WAIT_SECONDS

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
KUBERNETES_VERSION = "1.33"
CORE_KINDS = {"Namespace", "ConfigMap", "Secret", "PersistentVolumeClaim", "Job", "Deployment", "Service"}


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def one(name: str, kind: str) -> dict[str, Any]:
    (d,) = [d for d in docs(name) if d["kind"] == kind]
    return d


def all_manifests() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, d) for p in sorted(K8S.glob("*.yaml")) for d in docs(p.name)]


def config() -> dict[str, str]:
    return one("configmap.yaml", "ConfigMap")["data"]


def test_kustomization_lists_existing_files_only() -> None:
    k = docs("kustomization.yaml")[0]
    for res in k["resources"]:
        assert (K8S / res).is_file(), res
    # the Secret is created out of band; monitoring needs the Prometheus Operator's CRDs
    assert "secret.example.yaml" not in k["resources"] and "monitoring.yaml" not in k["resources"]


@pytest.mark.parametrize(
    "where,manifest",
    [(f, d) for f, d in all_manifests() if d["kind"] in CORE_KINDS],
    ids=lambda v: str(v)[:40],
)
def test_core_manifests_match_the_kubernetes_schema(where: str, manifest: dict[str, Any]) -> None:
    kv.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_schema_check_catches_a_typo() -> None:
    bad = copy.deepcopy(one("worker.yaml", "Deployment"))
    bad["spec"]["template"]["spec"]["terminationGracePeriod"] = 660  # missing "Seconds"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, KUBERNETES_VERSION, strict=True)


def test_keda_scales_workers_on_the_rq_queue_list() -> None:
    scaled = one("keda.yaml", "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == one("worker.yaml", "Deployment")["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"  # KEDA's Redis Lists scaler
    queue_name = config()["DYNFACE_QUEUE_NAME"]
    assert queue_name == Settings.model_fields["queue_name"].default
    # RQ's own key for that queue (also what app/metrics.py reads for dynface_queue_depth)
    rq_key = Queue.redis_queue_namespace_prefix + queue_name
    assert rq_key == f"rq:queue:{queue_name}"
    assert trigger["metadata"]["listName"] == rq_key
    assert int(trigger["metadata"]["listLength"]) >= 1
    # KEDA's scaler is active while the length is above this: one waiting job must wake a pool
    # scaled to 0 (minReplicaCount: 0, an option docs/scaling.md offers).
    assert int(trigger["metadata"].get("activationListLength", "0")) == 0
    assert scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    auth = one("keda.yaml", "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    (ref,) = auth["spec"]["secretTargetRef"]
    secret = one("secret.example.yaml", "Secret")
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]


def test_keda_scale_down_waits_out_short_lulls() -> None:
    """KEDA's cooldownPeriod only delays the step to 0 replicas (minReplicaCount is 1 here); N -> fewer
    is the HPA's, whose scale-down window (300 s by default) KEDA takes from
    advanced.horizontalPodAutoscalerConfig.behavior. It must be long enough not to drop a worker
    (and pay its model load again) after a short lull, and within the HPA's limit of 3600 s."""
    spec = one("keda.yaml", "ScaledObject")["spec"]
    assert spec["minReplicaCount"] >= 1  # so cooldownPeriod never applies and the HPA decides
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert 600 <= behavior["scaleDown"]["stabilizationWindowSeconds"] <= 3600
    # KEDA copies `behavior` verbatim into its HPA: it must be a valid autoscaling/v2 one.
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "keda-hpa-dynface-worker"},
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": spec["scaleTargetRef"]["name"],
            },
            "minReplicas": spec["minReplicaCount"],
            "maxReplicas": spec["maxReplicaCount"],
            "behavior": behavior,
        },
    }
    kv.validate(hpa, KUBERNETES_VERSION, strict=True)
    bad = copy.deepcopy(hpa)
    bad["spec"]["behavior"]["scaleDown"]["stabilizationWindow"] = 600  # the check above catches typos
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, KUBERNETES_VERSION, strict=True)


def _pod_env(secret: dict[str, str]) -> dict[str, str]:
    """What an API or worker container's envFrom gives it: the ConfigMap, then the Secret."""
    return {**config(), **secret}


def test_the_secret_alone_chooses_url_or_sentinel_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the Secret names the Redis (the pods' env comes from the ConfigMap and the Secret), so the
    Sentinel variant of secret.example.yaml, which leaves REDIS_URL out, gives valid settings."""
    redis_keys = {"REDIS_URL", "DYNFACE_REDIS_URL", "DYNFACE_REDIS_SENTINELS"}
    assert not redis_keys & set(config()), "the ConfigMap must not name the Redis"
    for name in ("api.yaml", "worker.yaml"):
        pod = one(name, "Deployment")["spec"]["template"]["spec"]
        for c in pod["containers"]:
            assert not redis_keys & {e["name"] for e in c.get("env", [])}, name
            assert {"secretRef": {"name": "dynface-secrets"}} in c["envFrom"], name
    url = settings_in_env(_pod_env(one("secret.example.yaml", "Secret")["stringData"]), monkeypatch)
    assert url.redis_url and not url.redis_sentinels
    # the variant in the file's comments: its --from-literal keys, REDIS_URL left out
    text = (K8S / "secret.example.yaml").read_text()
    variant = text[text.index("Redis Sentinel instead") : text.index("apiVersion:")]
    literals = dict(re.findall(r"--from-literal=([A-Z_]+)='([^']*)'", variant))
    assert "REDIS_URL" not in literals and "REDIS_PASSWORD" in literals  # KEDA's TriggerAuthentication key
    sentinel = settings_in_env(_pod_env(literals), monkeypatch)
    assert sentinel.redis_sentinels and not sentinel.redis_url and sentinel.redis_password is not None
    assert sentinel.redis_sentinel_master == literals["DYNFACE_REDIS_SENTINEL_MASTER"]


def test_worker_pod_has_one_gpu_and_outlasts_its_longest_job() -> None:
    spec = one("worker.yaml", "Deployment")["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["terminationGracePeriodSeconds"] > int(config()["DYNFACE_JOB_TIMEOUT_SECONDS"]) + 10
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
    # the device plugin assigns the GPU: the compose-only claim must stay off
    assert not any(e.get("name") == "DYNFACE_GPU_CLAIM_DIR" for e in c.get("env", []))
    assert "DYNFACE_GPU_CLAIM_DIR" not in config()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == int(config()["DYNFACE_WORKER_METRICS_PORT"])
    assert "dynface_worker_ready 1.0" in " ".join(c["readinessProbe"]["exec"]["command"])
    (init,) = spec["initContainers"]
    assert init["command"] == ["dynface", "weights", "verify"]
    assert all(m["readOnly"] for m in c["volumeMounts"] if m["mountPath"] == config()["DYNFACE_WEIGHTS_DIR"])


def test_worker_probes_outwait_a_scrape_held_by_a_job_end() -> None:
    """The worker's /metrics may wait SCRAPE_WAIT_SECONDS for a job's end while Redis is slow: a probe
    giving up sooner would take a live worker out of service, or restart it mid-job. An exec probe
    (Kubernetes' default timeout: 1 s) must also outlast its own urlopen."""
    (c,) = one("worker.yaml", "Deployment")["spec"]["template"]["spec"]["containers"]
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c[name]
        timeout = probe.get("timeoutSeconds", 1)
        assert timeout > SCRAPE_WAIT_SECONDS, (name, timeout)
        if "exec" in probe:
            (urlopen,) = re.findall(r"timeout=([\d.]+)", " ".join(probe["exec"]["command"]))
            assert SCRAPE_WAIT_SECONDS < float(urlopen) < timeout, (name, urlopen, timeout)


def test_weights_job_pulls_then_verifies_into_the_shared_claim() -> None:
    job = one("weights.yaml", "Job")["spec"]["template"]["spec"]
    script = " ".join(job["containers"][0]["command"])
    assert "dynface weights pull" in script and "dynface weights verify" in script
    # the Job reads the workers' ConfigMap, so it pulls the files their `verify` init container checks
    assert job["containers"][0]["envFrom"] == [{"configMapRef": {"name": "dynface-config"}}]
    claim = one("weights.yaml", "PersistentVolumeClaim")["metadata"]["name"]
    assert job["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim
    worker = one("worker.yaml", "Deployment")["spec"]["template"]["spec"]
    assert worker["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim


def test_api_probes_use_healthz() -> None:
    (c,) = one("api.yaml", "Deployment")["spec"]["template"]["spec"]["containers"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # The API image has no torch: its `dynface serve` must not start a worker of its own.
    assert c["command"][:2] == ["dynface", "serve"]
    assert build_parser().parse_args(c["command"][1:]).workers == 0, c["command"]
    svc = one("api.yaml", "Service")
    assert svc["spec"]["selector"] == one("api.yaml", "Deployment")["spec"]["selector"]["matchLabels"]


def test_pod_monitor_labels_targets_like_the_compose_prometheus() -> None:
    """The alert rules (`up{job=~"dynface-api|dynface-worker"}`) and the dashboard select on the job
    names of docker/prometheus/prometheus.yml; the operator's default job and per-pod labels would
    leave the target-down alert silent and count the API's gauges once per pod."""
    prometheus = yaml.safe_load((ROOT / "docker" / "prometheus" / "prometheus.yml").read_text())
    jobs = {c["job_name"] for c in prometheus["scrape_configs"]}
    ports = {"http": "dynface-api", "metrics": "dynface-worker"}
    for endpoint in one("monitoring.yaml", "PodMonitor")["spec"]["podMetricsEndpoints"]:
        rules = endpoint["relabelings"]
        assert {"targetLabel": "job", "replacement": ports[endpoint["port"]]} in rules
        assert ports[endpoint["port"]] in jobs
        dropped = [r["regex"] for r in rules if r.get("action") == "labeldrop"]
        assert dropped and all(label in dropped[0].split("|") for label in ("pod", "container"))


def _bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (`512Mi`, `4Gi`, `2G`, plain bytes) in bytes."""
    units = {
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "k": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
    }
    m = re.fullmatch(r"(\d+)([KMGT]i?|k)?", str(quantity))
    assert m, quantity
    return int(m.group(1)) * units.get(m.group(2) or "", 1)


def test_api_memory_limit_fits_its_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/scaling.md, "API memory": each API process may hold max_concurrent_image_checks decoded
    images of max_pixels at 4 bytes a pixel, twice that while one is rotated. The pod runs
    `--api-workers` such processes; its limit must hold them all, plus room for the interpreter and
    the uploads in flight, or the kernel kills the pod under a burst of large photos."""
    (c,) = one("api.yaml", "Deployment")["spec"]["template"]["spec"]["containers"]
    processes = build_parser().parse_args(c["command"][1:]).api_workers
    settings = settings_in_env(_pod_env(one("secret.example.yaml", "Secret")["stringData"]), monkeypatch)
    decoded = settings.max_concurrent_image_checks * settings.max_pixels * 4 * 2
    assert decoded > 10**9  # the ~1.3 GB the docs state at the defaults
    limit = _bytes(c["resources"]["limits"]["memory"])
    assert limit >= processes * (decoded + 256 * 2**20), (processes, decoded, limit)
    assert _bytes(c["resources"]["requests"]["memory"]) <= limit


def test_weights_job_makes_way_for_an_upgrade() -> None:
    """A Job's pod template is immutable and a new image tag changes it: the Job must remove itself
    after it ends, so that the next `kubectl apply -k` creates it with the new image instead of
    failing. Soon enough for a routine upgrade, late enough to read its logs."""
    job = one("weights.yaml", "Job")
    ttl = job["spec"]["ttlSecondsAfterFinished"]
    assert 60 <= ttl <= 3600, ttl
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] in {
        i["name"] for i in docs("kustomization.yaml")[0]["images"]
    }  # the tag kustomize sets is what changes the template
    scaling = (ROOT / "docs" / "scaling.md").read_text()
    assert (
        "ttlSecondsAfterFinished" in scaling
        and "kubectl -n dynface delete job dynface-weights-pull" in scaling
    )


def test_pods_have_no_generic_scrape_annotations() -> None:
    """The alert rules and the dashboard select on the PodMonitor's job names (dynface-api,
    dynface-worker). prometheus.io/* annotations would invite a generic kubernetes-pods job, whose
    own job name leaves the target-absent alerts firing for good."""
    for name in ("api.yaml", "worker.yaml"):
        meta = one(name, "Deployment")["spec"]["template"]["metadata"]
        assert not [a for a in meta.get("annotations") or {} if a.startswith("prometheus.io/")], name


def _pod_specs() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{where}:{d['metadata']['name']}", d["spec"]["template"]["spec"])
        for where, d in all_manifests()
        if d["kind"] in {"Deployment", "Job"}
    ]


@pytest.mark.parametrize("where,pod", _pod_specs(), ids=lambda v: str(v)[:40])
def test_every_pod_runs_confined(where: str, pod: dict[str, Any]) -> None:
    """Non-root under the runtime's default seccomp profile; no container may gain privileges or
    keep a capability; the API's and the weight check's root filesystems are read-only (the API
    writes only its /tmp emptyDir)."""
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    containers = {c["name"]: c for c in pod["containers"] + pod.get("initContainers", [])}
    for name, container in containers.items():
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, name
        assert context["capabilities"] == {"drop": ["ALL"]}, name
    for name in {"api", "verify-weights"} & set(containers):
        assert containers[name]["securityContext"]["readOnlyRootFilesystem"] is True, name
    if "api" in containers:
        (tmp,) = [m for m in containers["api"]["volumeMounts"] if m["mountPath"] == "/tmp"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == tmp["name"]]
        assert "emptyDir" in volume


def test_the_confinement_check_sees_every_pod() -> None:
    assert {where.split(":")[0] for where, _ in _pod_specs()} == {"api.yaml", "worker.yaml", "weights.yaml"}
