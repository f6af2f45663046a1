"""The Grafana dashboard and the Prometheus alert rules query only what dynface really exports.

Every PromQL expression of docker/grafana/dashboards/dynface.json and docker/prometheus/alerts.yml
is parsed with `promql-parser` (PyPI; Python bindings of GreptimeTeam's Rust port of Prometheus'
own PromQL grammar), and every metric it selects must appear on the /metrics of a real API and a
real worker process (tiny profile) after a job has run, so histograms have series. promtool (from
Debian's `prometheus` package, when installed) additionally checks the rule and config files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import promql_parser  # the `test` extra: missing is a broken install, not a skip
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.jobs import JobStore, connect
from app.main import create_app
from app.routers import health
from tests.conftest import aligned_png, base_settings, purge, start_workers

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "dynface.json"
ALERTS = ROOT / "docker" / "prometheus" / "alerts.yml"
PROMETHEUS_YML = ROOT / "docker" / "prometheus" / "prometheus.yml"
DATASOURCES = ROOT / "docker" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"

#: Series Prometheus itself adds to every scrape job.
PROMETHEUS_BUILTINS = {"up"}
#: Labels Prometheus attaches to every scraped series (target labels).
TARGET_LABELS = {"job", "instance"}
#: Metric families that a CPU worker declares but can never fill (torch.cuda memory stats only).
CUDA_ONLY = {"dynface_gpu_peak_memory_bytes"}
#: Grafana's built-in interval variables, replaced by a plain duration before parsing.
GRAFANA_INTERVALS = re.compile(r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}")


# --------------------------------------------------------------------------- expressions under test
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))  # collapsed rows keep their panels inside


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(where, expr, legendFormat) of every target of every panel."""
    out = []
    for p in _panels(dashboard()["panels"]):
        for t in p.get("targets", []):
            out.append((f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"], t.get("legendFormat", "")))
    return out


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def all_expressions() -> list[tuple[str, str, str]]:
    alerts = [(f"alert {r['alert']}", str(r["expr"]), "") for r in alert_rules()]
    return dashboard_queries() + alerts


def to_promql(expr: str) -> str:
    """Grafana's $__rate_interval etc. are not PromQL; any other `$variable` is a test failure."""
    text = GRAFANA_INTERVALS.sub("5m", expr)
    assert "$" not in text, f"unknown Grafana variable in {expr!r} (the dashboard defines none)"
    return text


@dataclass
class Selected:
    """What one expression reads: metric names, label names it matches/groups on."""

    metrics: set[str] = field(default_factory=set)
    labels: set[str] = field(default_factory=set)


def selected(expr: str) -> Selected:
    ast = promql_parser.parse(to_promql(expr))
    out = Selected()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"selector without a metric name in {expr!r}"
            out.metrics.add(node.name)
            out.labels.update(m.name for m in node.matchers.matchers if m.name != "__name__")
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            out.labels.update(node.modifier.labels)

    promql_parser.walk(ast, visit)
    return out


# --------------------------------------------------------------------------- what the service exports
@dataclass
class Exported:
    sampled: dict[str, set[str]]  # sample name -> label names seen on it
    declared: set[str]  # sample names implied by HELP/TYPE of families with no sample yet
    family_of: dict[str, str]  # sample name -> family name


def _exported(texts: list[str]) -> Exported:
    suffixes = {
        "counter": ["_total"],
        "histogram": ["_bucket", "_sum", "_count"],
        "summary": ["_sum", "_count"],
    }
    sampled: dict[str, set[str]] = {}
    declared: set[str] = set()
    family_of: dict[str, str] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            for suffix in suffixes.get(fam.type, [""]):
                declared.add(fam.name + suffix)
                family_of[fam.name + suffix] = fam.name
            for s in fam.samples:
                sampled.setdefault(s.name, set()).update(s.labels)
                family_of[s.name] = fam.name
    return Exported(sampled=sampled, declared=declared, family_of=family_of)


def _worker_counted_a_job(text: str) -> bool:
    """Whether the scrape holds the succeeded job's counter and end-to-end observation."""
    samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
    succeeded = any(
        s.name == "dynface_jobs_total" and s.labels.get("outcome") == "succeeded" for s in samples
    )
    observed = any(s.name == "dynface_job_duration_seconds_count" and s.value >= 1 for s in samples)
    return succeeded and observed


@pytest.fixture(scope="module")
def live(redis_conn, tmp_path_factory) -> Iterator[Exported]:
    """Scrape a real API and a real worker after one successful job and one refused upload."""
    settings = base_settings(uuid.uuid4().hex[:10])
    workers = start_workers(settings, tmp_path_factory.mktemp("ops-workers"))
    try:
        with TestClient(create_app(settings)) as client:
            r = client.post(
                "/v1/restorations",
                files={"image": ("face.png", aligned_png(), "image/png")},
                data={"aligned": "true"},
                headers={"Prefer": "wait=60"},
            )
            assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
            bad = client.post("/v1/restorations", files={"image": ("x.png", b"not an image", "image/png")})
            assert 400 <= bad.status_code < 500, bad.text  # a 4xx series and a rejection reason
            port = JobStore(connect(settings), settings).workers()[0]["metrics_port"]
            # The worker counts a job before its end can wake the waiting request (worker/metrics.py)
            worker_text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            assert _worker_counted_a_job(worker_text), worker_text
            api_text = client.get("/metrics").text
        yield _exported([api_text, worker_text])
    finally:
        for w in workers:
            w.stop()
        purge(redis_conn, settings)


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("where,expr,legend", all_expressions(), ids=lambda v: v if len(v) < 60 else None)
def test_every_expression_parses(where: str, expr: str, legend: str) -> None:
    try:
        promql_parser.parse(to_promql(expr))
    except Exception as e:  # the parser raises plain exceptions with the position of the error
        pytest.fail(f"{where}: PromQL does not parse: {e}\n{expr}")


def test_parser_rejects_broken_promql() -> None:
    """The check above means something: the parser refuses what Prometheus would refuse."""
    for bad in ("sum(rate(x[5m])", "rate(x[5m]) >", "histogram_quantile(0.9 sum(x))", "x{a=}"):
        with pytest.raises(Exception):  # noqa: B017 (the binding raises a plain Exception)
            promql_parser.parse(bad)


def test_every_metric_name_is_exported(live: Exported) -> None:
    missing = []
    for where, expr, _ in all_expressions():
        for name in selected(expr).metrics - PROMETHEUS_BUILTINS:
            if name in live.sampled:
                continue
            if name in live.declared and live.family_of.get(name) in CUDA_ONLY:
                continue  # declared with HELP/TYPE; only a CUDA worker has samples
            missing.append(f"{where}: {name}")
    assert not missing, "metrics not exported by api/worker /metrics:\n" + "\n".join(missing)


def test_every_label_is_exported(live: Exported) -> None:
    """Label names in matchers, by/without clauses and legends exist on the metrics selected."""
    wrong = []
    for where, expr, legend in all_expressions():
        sel = selected(expr)
        have = set(TARGET_LABELS)
        for name in sel.metrics:
            have |= live.sampled.get(name, set())
            if live.family_of.get(name) in CUDA_ONLY:
                have |= {"device"}  # GPU_PEAK's label, declared in worker/metrics.py
        used = sel.labels | set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        for label in sorted(used - have):
            wrong.append(f"{where}: label {label!r} not on {sorted(sel.metrics)}")
    assert not wrong, "\n".join(wrong)


def test_dashboard_has_the_panels_ops_asked_for() -> None:
    """Issue 5's panel list, each mapped to the metric family that carries it."""
    used = set().union(*(selected(e).metrics for _, e, _ in dashboard_queries()))
    required = {
        "request rate / error rate by code": "dynface_http_requests_total",
        "end-to-end latency": "dynface_job_duration_seconds_bucket",
        "queue-wait latency": "dynface_queue_wait_seconds_bucket",
        "inference latency": "dynface_inference_seconds_bucket",
        "per-stage latency": "dynface_stage_seconds_bucket",
        "queue depth": "dynface_queue_depth",
        "oldest-queued age": "dynface_queue_oldest_age_seconds",
        "workers ready/busy": "dynface_workers",
        "jobs by outcome/reason": "dynface_jobs_total",
        "faces per image": "dynface_faces_per_image_bucket",
        "NFE per face": "dynface_diffusion_steps_per_face_bucket",
        "GPU peak memory per device": "dynface_gpu_peak_memory_bytes",
        "Redis memory used": "dynface_redis_memory_used_bytes",
        "Redis memory limit": "dynface_redis_memory_max_bytes",
    }
    absent = {what: m for what, m in required.items() if m not in used}
    assert not absent, absent
    exprs = " ".join(e for _, e, _ in dashboard_queries())
    for q in ("0.5", "0.95", "0.99"):  # p50/p95/p99 of the three job latencies
        for m in ("dynface_job_duration_seconds", "dynface_queue_wait_seconds", "dynface_inference_seconds"):
            assert f"histogram_quantile({q}, sum by (le) (rate({m}_bucket" in exprs, (q, m)


def test_dashboard_is_well_formed_for_provisioning() -> None:
    d = dashboard()
    assert d["uid"] == "dynface" and d["title"]
    panels = list(_panels(d["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    ds_uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    for p in panels:
        grid = p["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["targets"], f"panel {p['title']!r} has no query"
        assert p["datasource"]["uid"] == ds_uid, p["title"]
        assert all(t["datasource"]["uid"] == ds_uid for t in p["targets"]), p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]


def test_alert_rules_cover_the_issue() -> None:
    rules = {r["alert"]: r for r in alert_rules()}
    for name in (
        "DynfaceQueueGrowing",
        "DynfaceNoReadyWorkers",
        "DynfaceHighErrorRatio",
        "DynfaceLatencyP95OverSLO",
        "DynfaceQueueFull",
        "DynfaceWorkerTargetsAbsent",
        "DynfaceApiTargetAbsent",
        "DynfaceRedisMemoryHigh",
    ):
        assert name in rules, name
        assert rules[name].get("for") and rules[name]["labels"]["severity"] in {"warning", "critical"}
    assert "dynface_queue_depth" in selected(rules["DynfaceQueueGrowing"]["expr"]).metrics
    assert "dynface_workers" in selected(rules["DynfaceNoReadyWorkers"]["expr"]).metrics
    assert "dynface_http_requests_total" in selected(rules["DynfaceHighErrorRatio"]["expr"]).metrics
    assert "histogram_quantile(0.95" in rules["DynfaceLatencyP95OverSLO"]["expr"]
    assert {"dynface_redis_memory_used_bytes", "dynface_redis_memory_max_bytes"} == selected(
        rules["DynfaceRedisMemoryHigh"]["expr"]
    ).metrics
    # Prometheus loads the rules: prometheus.yml names the file where compose mounts it.
    assert "/etc/prometheus/alerts.yml" in yaml.safe_load(PROMETHEUS_YML.read_text())["rule_files"]


def test_target_absent_rules_watch_the_scrape_jobs_prometheus_has() -> None:
    """With DNS discovery a removed container takes its target (and `up`) along, so `up == 0` never
    shows: one `absent(up{job=...})` rule per dynface scrape job, naming that job exactly as
    prometheus.yml (and monitoring.yaml's PodMonitor) does, or it would fire, or stay silent, for good.
    The API's is critical: every Redis, queue and worker-state gauge comes from its scrape."""
    jobs = {c["job_name"] for c in yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]}
    watched: dict[str, dict[str, Any]] = {}
    for rule in alert_rules():
        expr = str(rule["expr"]).strip()
        if not expr.startswith("absent("):
            continue
        (sel,) = _selectors(expr, "up")
        (job,) = [m.value for m in sel.matchers.matchers if m.name == "job"]
        assert job in jobs, f"{rule['alert']}: no scrape job {job!r} in prometheus.yml"
        watched[job] = rule
    assert set(watched) == {"dynface-api", "dynface-worker"}
    assert watched["dynface-api"]["labels"]["severity"] == "critical"
    # the gauges that the other alerts read come from the API job alone
    for name in ("DynfaceRedisDown", "DynfaceQueueGrowing", "DynfaceNoReadyWorkers"):
        rule = {r["alert"]: r for r in alert_rules()}[name]
        assert selected(rule["expr"]).metrics & {"dynface_redis_up", "dynface_queue_depth", "dynface_workers"}


def test_no_ready_worker_alert_is_gated_on_need() -> None:
    """DynfaceNoReadyWorkers fires on jobs waiting, or on workers that exist without being ready, not
    on an idle pool scaled to zero (alerts.test.yml has the cases): its expression must read the queue
    and the worker targets besides the worker states."""
    rule = {r["alert"]: r for r in alert_rules()}["DynfaceNoReadyWorkers"]
    assert {"dynface_workers", "dynface_queue_depth", "up"} <= selected(rule["expr"]).metrics
    assert rule["labels"]["severity"] == "critical"


def _selectors(expr: str, metric: str) -> list[Any]:
    found = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name == metric:
            found.append(node)

    promql_parser.walk(promql_parser.parse(to_promql(expr)), visit)
    return found


def test_error_ratio_counts_client_requests_only() -> None:
    """Probes and scrapes stay out of both sides of the HTTP error ratio: /readyz answers 503 while no
    worker is ready (a load balancer polls it constantly), and /healthz, /metrics would dilute it.
    Checked here without promtool; alerts.test.yml shows the rule's behaviour when promtool runs."""
    rule = {r["alert"]: r for r in alert_rules()}["DynfaceHighErrorRatio"]
    probes = {r.path for r in health.router.routes} & {"/healthz", "/readyz", "/metrics"}
    assert probes == {"/healthz", "/readyz", "/metrics"}  # the route label values of those endpoints
    selectors = _selectors(rule["expr"], "dynface_http_requests_total")
    assert len(selectors) == 2  # the 5xx numerator and the denominator
    for sel in selectors:
        excluded = [
            m.value
            for m in sel.matchers.matchers
            if m.name == "route" and m.op == promql_parser.MatchOp.NotRe
        ]
        assert excluded, f"no route!~ matcher in {rule['expr']}"
        for route in probes:  # Prometheus anchors label regexes at both ends
            assert re.fullmatch(excluded[0], route), (route, excluded[0])
        assert not re.fullmatch(excluded[0], "/v1/restorations")
    # queue_full 503s are left out of the 5xx by their error_code (never out of the denominator);
    # they have an alert of their own
    numerator, denominator = ([(m.name, m.op, m.value) for m in sel.matchers.matchers] for sel in selectors)
    assert ("status", promql_parser.MatchOp.Re, "5..") in numerator
    assert ("error_code", promql_parser.MatchOp.NotEqual, "queue_full") in numerator
    assert not [m for m in denominator if m[0] in {"status", "error_code"}]
    assert not _selectors(rule["expr"], "dynface_jobs_rejected_total")
    assert (
        "dynface_jobs_rejected_total"
        in selected({r["alert"]: r for r in alert_rules()}["DynfaceQueueFull"]["expr"]).metrics
    )


def test_error_ratio_job_reasons_are_real_and_documented() -> None:
    """The server-side job failure reasons of the alert are codes jobs really end with, and
    docs/scaling.md lists the same ones."""
    rule = {r["alert"]: r for r in alert_rules()}["DynfaceHighErrorRatio"]
    (failed,) = [
        s
        for s in _selectors(rule["expr"], "dynface_jobs_total")
        if any(m.name == "outcome" and m.value == "failed" for m in s.matchers.matchers)
    ]
    (pattern,) = [m.value for m in failed.matchers.matchers if m.name == "reason"]
    reasons = set(pattern.split("|"))
    assert {"internal", "timeout", "worker_lost", "queue_timeout", "cuda_oom"} <= reasons
    # cuda_oom is the pipeline's own error (models/errors.py), which the worker ends jobs with.
    ends = ("worker/tasks.py", "app/queued.py", "app/lost.py", "models/errors.py")
    sources = "".join((ROOT / f).read_text() for f in ends)
    for reason in reasons:
        assert f'"{reason}"' in sources, f"{reason}: no job ends with this code"
    scaling = (ROOT / "docs" / "scaling.md").read_text()
    alerts_doc = scaling[scaling.index("- Alerts (") :]
    alerts_doc = alerts_doc[: alerts_doc.index("\n\n")]
    documented = set(re.findall(r"`([a-z_]+)`", alerts_doc))
    assert reasons <= documented, reasons - documented


def _promtool() -> str | None:
    return os.environ.get("PROMTOOL") or shutil.which("promtool") or _beside_python("promtool")


def _beside_python(name: str) -> str | None:
    p = Path(sys.executable).parent / name
    return str(p) if p.is_file() else None


def test_promtool_checks_rules_and_config() -> None:
    promtool = _promtool()
    if promtool is None:
        pytest.skip(
            "promtool not installed (Debian: apt-get install prometheus); PromQL is still parsed above"
        )
    for args in (["check", "rules", str(ALERTS)], ["check", "config", "--syntax-only", str(PROMETHEUS_YML)]):
        r = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_has_a_case_that_fires_and_one_that_does_not() -> None:
    """alerts.test.yml's promise: a rule whose expression always (or never) fired would pass a file
    with only one kind of case for it. Checked without promtool: it is the file's shape."""
    rules = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    tests = yaml.safe_load((ALERTS.parent / "alerts.test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    firing = {c["alertname"] for c in cases if c.get("exp_alerts")}
    silent = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert rules - firing == set(), "alerts without a case that fires"
    assert rules - silent == set(), "alerts without a case that stays silent"


def test_promtool_alert_unit_tests() -> None:
    """docker/prometheus/alerts.test.yml feeds synthetic series and states which alerts fire."""
    promtool = _promtool()
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    r = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yml"],
        cwd=ALERTS.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
