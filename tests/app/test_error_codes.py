"""Every error code the service can answer or end a job with is documented (docs/design.md, 'API error
codes'), so clients can branch on all of them. The codes are read from the code itself."""

from __future__ import annotations

import re
from typing import Any

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app import errors
from models import errors as pipeline_errors
from tests.conftest import ROOT


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end != -1 else None]


def _emitted_codes() -> set[str]:
    app_source = "\n".join(p.read_text() for p in (ROOT / "app").rglob("*.py"))
    codes = set(re.findall(r'(?:ApiError\(|_respond\(\s*request,)\s*\d+,\s*"([a-z_]+)"', app_source))
    codes |= set(re.findall(r'"code":\s*"([a-z_]+)"', app_source))  # jobs the API ends (app/queued.py)
    codes |= set(errors._HTTP_CODES.values()) | set(errors.UPLOAD_ERROR_STATUS) | {"http_error"}
    codes |= {
        cls.code
        for cls in vars(pipeline_errors).values()
        if isinstance(cls, type)
        and issubclass(cls, pipeline_errors.PipelineError)
        and cls is not pipeline_errors.Cancelled  # a canceled job has status canceled and no error
    }
    worker_source = (ROOT / "worker" / "tasks.py").read_text()
    codes |= set(re.findall(r'"failed",\s*\(\s*"([a-z_]+)"', worker_source))
    codes |= set(re.findall(r'"code":\s*"([a-z_]+)"', worker_source))
    return codes


def test_every_error_code_is_documented() -> None:
    documented = set(
        re.findall(r"`([a-z_]+)`", _section((ROOT / "docs" / "design.md").read_text(), "## API error codes"))
    )
    emitted = _emitted_codes()
    # The scan must see the codes of every source (a broken regex would make this test vacuous).
    assert {
        "not_found",
        "redis_unavailable",
        "no_face",
        "cuda_oom",
        "timeout",
        "worker_lost",
        "queue_timeout",
        "http_error",
    } <= emitted
    assert emitted - documented == set()
    assert errors.CLIENT_CLOSED in documented  # the request counter's value no client receives


def test_the_web_page_has_a_sentence_for_every_error_code() -> None:
    """app/static/app.js shows ERROR_TEXT[code]; a code missing there reads 'The request failed (code)'."""
    js = (ROOT / "app" / "static" / "app.js").read_text()
    start = js.index("const ERROR_TEXT = {")
    block = js[start : js.index("};", start)]
    sentences = set(re.findall(r"^\s+([a-z_]+):", block, re.MULTILINE))
    assert {"network", "no_face"} <= sentences  # the scan reads the object
    assert _emitted_codes() - sentences == set()


def test_the_request_counter_labels_errors_with_these_codes_only(client: TestClient) -> None:
    """dynface_http_requests_total's `error_code` takes no value from the client (each value is a
    series): the framework's own refusals (unknown path or method) carry the codes app.errors maps
    them onto, ours their own, successes "", and a client that left mid-upload `client_closed` (with
    status 499, answered to no one: tests/app/test_api.py)."""
    sent: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/no/such/path-1", {}),
        ("GET", "/no/such/path-2", {}),
        ("X-MADE-UP", "/healthz", {}),
        ("POST", "/v1/restorations", {"json": {"aligned": True}}),  # no image
        ("POST", "/v1/restorations", {"content": b"{", "headers": {"Content-Type": "application/json"}}),
        ("POST", "/v1/restorations", {"content": b"x", "headers": {"Content-Type": "x-made/up"}}),
    ]
    for method, path, kwargs in sent:
        assert client.request(method, path, **kwargs).status_code >= 400
    labelled = {
        s.labels["error_code"]
        for fam in text_string_to_metric_families(client.get("/metrics").text)
        if fam.name == "dynface_http_requests"
        for s in fam.samples
    }
    expected = {"not_found", "method_not_allowed", "invalid_option", "invalid_request", "unsupported_format"}
    assert expected <= labelled
    assert labelled - _emitted_codes() <= {"", errors.CLIENT_CLOSED}
