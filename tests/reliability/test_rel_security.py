"""Security properties of the API, proven against a real Redis (and a private password-protected
redis-server), real HTTP receivers and the real app; nothing is mocked.

Why: auth, rate limits, SSRF protection of webhooks, what we write into Redis and which headers a
browser sees are the parts an attacker probes first; each test below pins one of them so a
refactor cannot quietly weaken it.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import io
import json
import logging
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import SecretStr, ValidationError
from rel_support import RedisServer, WebhookSink, namespace_keys, pickled_values

from app import security
from app.main import create_app
from app.security import check_webhook_url
from app.settings import Settings
from app.webhooks import deliver, deliver_in_background, sign, verify

KEYS = ("key-alpha-0001", "key-bravo-0002", "key-charlie-03")


def png(size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 80, 60)).save(buf, "PNG")
    return buf.getvalue()


def submit(c: TestClient, headers: dict[str, str] | None = None, **fields: str) -> httpx.Response:
    return c.post(
        "/v1/restorations",
        files={"image": ("x.png", png(), "image/png")},
        data={"aligned": "true", **fields},
        headers=headers or {},
    )


def error_code(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return str(body["error"]["code"])


# --- API keys ---------------------------------------------------------------------------------------


@pytest.fixture
def counted_compare_digest(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, bytes]]:
    """Record every call of the real ``hmac.compare_digest`` (the result still comes from it)."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", counting)
    return calls


def test_api_keys_are_compared_in_constant_time_against_every_key(
    make_settings: Callable[..., Settings], counted_compare_digest: list[tuple[bytes, bytes]]
) -> None:
    """Key checks go through hmac.compare_digest, once per configured key whether the first, the
    last or no key matches (no early exit), on fixed-length digests (so neither which key matched
    nor the keys' lengths show in timing); the code path has no plain ``==`` on keys."""
    assert "compare_digest" in security.authenticate.__code__.co_names
    with TestClient(create_app(make_settings(api_keys=",".join(KEYS)))) as c:
        for presented, status in ((KEYS[0], 200), (KEYS[-1], 200), ("k", 401), ("x" * 500, 401)):
            counted_compare_digest.clear()
            r = c.get("/v1/models", headers={"X-API-Key": presented})
            assert r.status_code == status, r.text
            assert len(counted_compare_digest) == len(KEYS), presented
            assert {(len(a), len(b)) for a, b in counted_compare_digest} == {(32, 32)}


def test_unknown_or_missing_key_is_401_everywhere_without_hints(
    make_settings: Callable[..., Settings],
) -> None:
    """Every protected route answers 401 `unauthorized` with WWW-Authenticate for a missing, unknown,
    truncated, case-changed or wrong-scheme key, and the answer never echoes any key."""
    with TestClient(create_app(make_settings(api_keys=",".join(KEYS)))) as c:
        job_id = submit(c, headers={"X-API-Key": KEYS[1]}).json()["id"]
        routes = [
            ("POST", "/v1/restorations"),
            ("GET", f"/v1/restorations/{job_id}"),
            ("DELETE", f"/v1/restorations/{job_id}"),
            ("GET", f"/v1/restorations/{job_id}/image"),
            ("GET", f"/v1/restorations/{job_id}/faces/0"),
            ("GET", f"/v1/restorations/{job_id}/crops/0"),
            ("GET", f"/v1/restorations/{job_id}/comparison"),
            ("GET", "/v1/models"),
        ]
        bad_headers: list[dict[str, str]] = [
            {},
            {"X-API-Key": "nope"},
            {"X-API-Key": KEYS[1][:-1]},
            {"X-API-Key": KEYS[1].upper()},
            {"X-API-Key": KEYS[1] + " "},
            {"Authorization": f"Basic {base64.b64encode(KEYS[1].encode()).decode()}"},
            {"Authorization": "Bearer"},
            {"Authorization": f"Token {KEYS[1]}"},
        ]
        for method, path in routes:
            for headers in bad_headers:
                r = c.request(method, path, headers=headers)
                assert r.status_code == 401 and error_code(r) == "unauthorized", (
                    method,
                    path,
                    headers,
                    r.text,
                )
                assert r.headers["www-authenticate"] == "Bearer"
                assert not any(k in r.text for k in KEYS)


@pytest.mark.usefixtures("rate_window")
def test_rate_limit_is_per_key_and_shared_by_all_api_processes(
    make_settings: Callable[..., Settings], redis_conn: redis.Redis
) -> None:
    """Two API instances (as behind a load balancer) share one key's budget through Redis; another
    key keeps its own; refusals are 429 `rate_limited` with Retry-After and create no job; Redis
    holds only a key id, never the key itself."""
    s = make_settings(api_keys=",".join(KEYS), rate_limit_per_minute=3)
    with TestClient(create_app(s)) as a, TestClient(create_app(s)) as b:
        k0, k1 = {"X-API-Key": KEYS[0]}, {"Authorization": f"Bearer {KEYS[1]}"}
        assert [submit(c, headers=k0).status_code for c in (a, b, a)] == [202, 202, 202]
        for c in (a, b):
            r = submit(c, headers=k0)
            assert r.status_code == 429 and error_code(r) == "rate_limited", r.text
            assert r.headers["retry-after"] == "40"  # to the end of the pinned window
        assert [submit(c, headers=k1).status_code for c in (b, a, b)] == [202, 202, 202]
        assert submit(a, headers=k1).status_code == 429
        assert a.get("/v1/models", headers=k0).status_code == 200  # reads are not rate limited
    keys = namespace_keys(redis_conn, s.key_prefix, s.queue_name, [])
    assert len([k for k in keys if b":job:" in k]) == 6
    for key in keys:
        assert not any(secret.encode() in key for secret in KEYS)
        kind = redis_conn.type(key)
        if kind == b"hash":
            blob = b"".join(redis_conn.hgetall(key).values())
            assert not any(secret.encode() in blob for secret in KEYS), key


# --- webhooks: https only, never our own network -----------------------------------------------------

REFUSED_WEBHOOKS = [
    "http://example.com/hook",  # not https
    "ftp://example.com/hook",
    "javascript:alert(1)",
    "//127.0.0.1/hook",
    "https:///hook",
    "https://user:pw@example.com/hook",
    "https://127.0.0.1/hook",
    "https://127.0.0.1:8443/hook",
    "https://10.1.2.3/hook",
    "https://172.16.0.1/hook",
    "https://192.168.1.1/hook",
    "https://169.254.169.254/latest/meta-data",  # cloud metadata (link-local)
    "https://100.64.0.1/hook",  # carrier-grade NAT
    "https://0.0.0.0/hook",
    "https://0/hook",
    "https://224.0.0.1/hook",
    "https://2130706433/hook",  # 127.0.0.1 as a decimal integer
    "https://0x7f000001/hook",  # hex
    "https://0177.0.0.1/hook",  # octal
    "https://127.1/hook",  # short form
    "https://localhost/hook",  # a name resolving to loopback
    "https://LOCALHOST:443/hook",
    "https://[::1]/hook",
    "https://[::]/hook",
    "https://[::ffff:127.0.0.1]/hook",  # IPv4-mapped
    "https://[::ffff:a9fe:a9fe]/hook",  # IPv4-mapped 169.254.169.254
    "https://[::127.0.0.1]/hook",  # IPv4-compatible
    "https://[2002:7f00:1::]/hook",  # 6to4 of 127.0.0.1
    "https://[64:ff9b::7f00:1]/hook",  # NAT64 of 127.0.0.1
    "https://[64:ff9b::a9fe:a9fe]/hook",  # NAT64 of the metadata address
    "https://[64:ff9b:1::7f00:1]/hook",  # local-use NAT64 (RFC 8215) of 127.0.0.1
    "https://[64:ff9b:1::808:808]/hook",  # local-use NAT64 of a public address: the whole /48 is refused
    "https://[fec0::1]/hook",  # deprecated site-local (Python 3.11 calls these four global)
    "https://[3fff::1]/hook",  # documentation (RFC 9637)
    "https://[5f00::1]/hook",  # SRv6 segment identifiers (RFC 9602)
    "https://[fe80::1]/hook",
    "https://[fc00::1]/hook",
    "https://[fd12:3456::1]/hook",
    "https://[ff02::1]/hook",
    "https://does-not-exist.invalid/hook",  # unresolvable: refused, not deferred
    "https://example.com:99999/hook",  # no such port (httpx parses it: the check must refuse it)
    "https://a..b/hook",  # an empty label: not a host name
]

#: Literal public addresses (no DNS needed): the check must not refuse everything.
ALLOWED_WEBHOOKS = [
    "https://8.8.8.8/hook",
    "https://[2606:4700:4700::1111]/hook",
    "https://[64:ff9b::808:808]/hook",  # NAT64 of a public address
    "https://[2002:808:808::1]/hook",  # 6to4 of a public address
]


@pytest.fixture
def strict(make_settings: Callable[..., Settings]) -> Settings:
    """Production webhook policy (the defaults): https only, public addresses only."""
    defaults = Settings.model_fields
    assert defaults["webhook_allow_private"].default is False
    assert defaults["webhook_allow_http"].default is False
    return make_settings(webhook_allow_private=False, webhook_allow_http=False)


def test_webhook_targets_must_be_public_https(strict: Settings) -> None:
    """Submissions with a webhook that is not https or that resolves to loopback, private,
    link-local, multicast or unspecified space, in any spelling (decimal/hex/octal IPv4, IPv6,
    IPv4-mapped/compatible, 6to4, NAT64, names), are 422 `invalid_option` and queue nothing."""
    with TestClient(create_app(strict)) as c:
        wrong = []
        for url in REFUSED_WEBHOOKS:
            r = submit(c, webhook=url)
            if r.status_code != 422 or error_code(r) != "invalid_option" or "webhook" not in r.text:
                wrong.append(f"{url}: {r.status_code} {r.text[:120]}")
        assert not wrong, "\n".join(wrong)
        assert c.app.state.services.queue.count == 0
    for url in ALLOWED_WEBHOOKS:
        check_webhook_url(url, strict)  # raises ValueError if refused


def test_webhook_delivery_rechecks_the_target(
    strict: Settings, make_settings: Callable[..., Settings]
) -> None:
    """Delivery re-checks the destination (DNS may change after submission): under the production
    policy nothing ever reaches a loopback receiver, while the tests' permissive policy delivers to
    the same receiver (so the receiver itself works)."""
    sink = WebhookSink()
    try:

        def body(job_id: str) -> bytes:
            return json.dumps({"id": job_id}).encode()

        assert deliver(sink.url, "job-strict", body("job-strict"), strict, sleep=lambda _: None) is False
        https_loopback = sink.url.replace("http://", "https://")
        assert (
            deliver(https_loopback, "job-strict2", body("job-strict2"), strict, sleep=lambda _: None) is False
        )
        assert sink.per_job() == {}
        permissive = make_settings()
        assert permissive.webhook_allow_private and permissive.webhook_allow_http
        assert deliver(sink.url, "job-ok", body("job-ok"), permissive, sleep=lambda _: None) is True
        assert sink.per_job() == {"job-ok": 1}
    finally:
        sink.close()


@contextlib.contextmanager
def recording_server(
    host: str, port: int = 0, status: int = 204, extra: dict[str, str] | None = None, tls: Path | None = None
) -> Iterator[tuple[int, list[dict[str, str | None]]]]:
    """A server on ``host`` answering every POST with ``status`` (plus ``extra`` headers), over TLS
    with ``tls``/cert.pem + key.pem if given; yields its port and what it saw (Host, SNI)."""
    seen: list[dict[str, str | None]] = []
    sni: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            seen.append({"host": self.headers.get("host"), "sni": sni[-1] if sni else None})
            self.send_response(status)
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    if tls is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tls / "cert.pem", tls / "key.pem")
        ctx.sni_callback = lambda _sock, name, _ctx: sni.append(name)  # type: ignore[assignment,func-returns-value]
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port, seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _resolve_hook_test(monkeypatch: pytest.MonkeyPatch, answer: Callable[[int], str]) -> list[str]:
    """Name `hook.test` resolves to `answer(n)` at its n-th lookup (which may raise, as a resolver
    does); other names as usual. Returns the list the lookups of `hook.test` are appended to."""
    real_getaddrinfo = socket.getaddrinfo
    lookups: list[str] = []

    def resolve(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "hook.test":
            return real_getaddrinfo(host, port, *args, **kwargs)
        lookups.append(host)
        ip = answer(len(lookups))
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port or 443))]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    return lookups


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_webhook_delivery_connects_to_the_checked_address(
    scheme: str,
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DNS rebinding: a name that answers a public address to the check and then loopback (TTL 0)
    must not get the POST to loopback. Delivery connects to the checked address, with the original
    name as Host and, for https, as SNI and certificate name (the certificate is for the name)."""
    checked, internal = "127.0.0.2", "127.0.0.1"
    # Stands in for a public address: loopback alias 127.0.0.2 is what this machine can serve on.
    monkeypatch.setattr(security, "_is_public", lambda ip: str(ip) == checked)
    lookups = _resolve_hook_test(monkeypatch, lambda n: checked if n == 1 else internal)
    tls = None
    if scheme == "https":
        tls = tmp_path
        cert = "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=hook.test"
        san = ["-addext", "subjectAltName=DNS:hook.test"]
        files = ["-keyout", str(tls / "key.pem"), "-out", str(tls / "cert.pem")]
        subprocess.run([*cert.split(), *san, *files], check=True, capture_output=True)
        monkeypatch.setenv("SSL_CERT_FILE", str(tls / "cert.pem"))  # read by httpx's default context
    s = make_settings(webhook_allow_private=False, webhook_allow_http=True)
    with (
        recording_server(checked, tls=tls) as (port, at_checked),
        recording_server(internal, port, tls=tls) as (_, at_internal),
    ):
        url = f"{scheme}://hook.test:{port}/hook"
        assert deliver(url, "job-rebind", b"{}", s, sleep=lambda _: None) is True
    assert at_internal == []
    sni = "hook.test" if scheme == "https" else None
    assert at_checked == [{"host": f"hook.test:{port}", "sni": sni}]
    assert lookups == ["hook.test"]  # resolved once, by the check; never again for the connection


#: URLs the standard library reads (it drops tab and newline, keeps DEL and NUL, encodes names as
#: IDNA 2003) but httpx, which delivers webhooks, refuses: refused at submission, whatever the policy.
UNSENDABLE_WEBHOOKS = [
    "https://example.com/ho\tok",
    "https://exam\nple.com/hook",
    "https://example.com/\x7f",
    "https://exa\x00mple.com/hook",
    "https://\u2603.net/hook",  # a snowman: IDNA 2003 has a name for it, IDNA 2008 none
]


def test_webhook_urls_httpx_cannot_send_are_refused_at_submission(
    make_settings: Callable[..., Settings],
) -> None:
    permissive = make_settings()
    assert permissive.webhook_allow_private  # no lookup: the URL itself is what is refused
    image = "data:image/png;base64," + base64.b64encode(png()).decode()
    with TestClient(create_app(permissive)) as c:
        for url in UNSENDABLE_WEBHOOKS:
            r = c.post("/v1/restorations", json={"image": image, "aligned": True, "webhook": url})
            assert r.status_code == 422 and error_code(r) == "invalid_option", (url, r.text)
            assert "webhook" in r.json()["error"]["message"], r.text
        assert c.app.state.services.queue.count == 0


def test_webhook_delivery_to_a_url_httpx_cannot_send_ends_at_once(
    make_settings: Callable[..., Settings],
) -> None:
    """A job stored before the check read URLs as httpx does: its delivery is refused (False, one
    attempt), where httpx.InvalidURL used to escape `deliver` (no retries, no refusal logged)."""
    sleeps: list[float] = []
    for url in UNSENDABLE_WEBHOOKS:
        assert deliver(url, "job-unsendable", b"{}", make_settings(), sleep=sleeps.append) is False
    assert sleeps == [0.0] * len(UNSENDABLE_WEBHOOKS)


def test_webhook_host_is_looked_up_as_httpx_will_connect_to_it(
    strict: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name checked is the one delivery connects to: httpx's IDNA 2008 form (`faß` is
    `xn--fa-hia`), not the resolver's IDNA 2003 one (`fass`), a different domain."""
    lookups: list[str] = []

    def resolver(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("8.8.8.8", port))]

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    assert check_webhook_url("https://faß.example/hook", strict) == ["8.8.8.8"]
    assert lookups == ["xn--fa-hia.example"]


def test_webhook_delivery_retries_a_name_that_did_not_resolve(
    strict: Settings, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lookup that fails for a moment (EAI_AGAIN) is retried like a failed POST, where it used to
    end the delivery; a destination the policy refuses still ends it at the first attempt."""
    monkeypatch.setattr(security, "_is_public", lambda ip: str(ip) == "127.0.0.1")  # stands in for public

    def flaky(n: int) -> str:
        if n == 1:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return "127.0.0.1"

    lookups = _resolve_hook_test(monkeypatch, flaky)
    s = make_settings(webhook_allow_private=False, webhook_allow_http=True)
    sleeps: list[float] = []
    with recording_server("127.0.0.1") as (port, seen):
        assert deliver(f"http://hook.test:{port}/hook", "job-dns", b"{}", s, sleep=sleeps.append) is True
    assert sleeps == [0.0, s.webhook_retry_delays_seconds[0]] and lookups == ["hook.test"] * 2
    assert [h["host"] for h in seen] == [f"hook.test:{port}"]

    for url in ("https://10.0.0.1/hook", "http://example.com/hook", "https://a..b/hook"):
        refused: list[float] = []
        assert deliver(url, "job-refused", b"{}", strict, sleep=refused.append) is False
        assert refused == [0.0], url


def test_webhook_redirects_are_not_followed(make_settings: Callable[..., Settings]) -> None:
    """A receiver answering 307 to another address does not get the POST forwarded there (that
    address was never checked): the attempt counts as failed."""
    with recording_server("127.0.0.1") as (port, elsewhere):
        to = {"location": f"http://127.0.0.1:{port}/internal"}
        with recording_server("127.0.0.1", status=307, extra=to) as (hook_port, at_hook):
            url = f"http://127.0.0.1:{hook_port}/hook"
            assert deliver(url, "job-redirect", b"{}", make_settings(), sleep=lambda _: None) is False
    assert len(at_hook) == 3 and elsewhere == []  # first attempt + the two configured retries


def _signed_headers(secret: str) -> dict[str, str]:
    ts = int(time.time())
    return {
        "webhook-id": "msg",
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, "msg", ts, b"{}"),
    }


def test_malformed_webhook_secret_is_refused_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """``whsec_`` must be followed by base64 (signing would otherwise fail on every delivery): the
    settings refuse it naming the variable, without echoing the secret."""
    for bad in ("whsec_notbase64!", "whsec_", "whsec_abc"):
        monkeypatch.setenv("DYNFACE_WEBHOOK_SECRET", bad)
        with pytest.raises(ValidationError, match="DYNFACE_WEBHOOK_SECRET") as e:
            Settings()
        tail = bad.removeprefix("whsec_")
        assert not tail or tail not in str(e.value)
    # A secret read from a file (a Kubernetes secret made --from-file) ends with a newline.
    for good in ("whsec_dGVzdA==", "whsec_dGVzdA==\n", "any string!"):
        monkeypatch.setenv("DYNFACE_WEBHOOK_SECRET", good)
        assert Settings().webhook_secret == SecretStr(good)
    assert verify("whsec_dGVzdA==", _signed_headers("whsec_dGVzdA==\n"), b"{}")


def test_webhook_delivery_error_is_logged(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected error on the delivery thread (here signing with a secret that bypassed the
    settings check) is logged with the job id, not lost with the thread."""
    s = make_settings()
    s.webhook_secret = SecretStr("whsec_notbase64!")
    with caplog.at_level(logging.ERROR, logger="app.webhooks"):
        deliver_in_background("http://127.0.0.1:9/hook", "job-broken", b"{}", s).join(10)
    assert [r.exc_info is not None for r in caplog.records if "job-broken" in r.getMessage()] == [True]


# --- what goes into Redis -----------------------------------------------------------------------------


def test_api_never_writes_pickle_into_redis(
    make_settings: Callable[..., Settings], redis_conn: redis.Redis
) -> None:
    """Everything the API writes for a job (record, input, RQ job hash, queue, idempotency claim,
    rate-limit counters) is JSON or raw bytes: a pickle in Redis would let whoever can write Redis
    execute code in the workers."""
    settings = make_settings(api_keys=",".join(KEYS), rate_limit_per_minute=100)
    key = {"X-API-Key": KEYS[0]}
    hook = "https://example.com/hook"
    with TestClient(create_app(settings)) as client:
        ids = [
            submit(client, headers=key).json()["id"],
            submit(client, headers=key, webhook=hook, outputs="image,faces").json()["id"],
            submit(client, headers={**key, "Idempotency-Key": "idem-1"}).json()["id"],
            client.post(
                "/v1/restorations",
                json={"image": "data:image/png;base64," + base64.b64encode(png()).decode()},
                headers=key,
            ).json()["id"],
        ]
        assert client.delete(f"/v1/restorations/{ids[0]}", headers=key).status_code == 200
    keys = namespace_keys(redis_conn, settings.key_prefix, settings.queue_name, ids)
    # Every kind of key the docstring names is among those scanned.
    assert any(k.startswith(b"rq:job:") for k in keys) and any(b":idem:" in k for k in keys)
    assert any(k.startswith(f"{settings.key_prefix}:rate:".encode()) for k in keys), keys
    assert any(k == f"rq:queue:{settings.queue_name}".encode() for k in keys), keys
    for job_id in ids:
        assert f"{settings.key_prefix}:job:{job_id}".encode() in keys, job_id
    for job_id in ids[1:]:  # inputs live until the job ends; the first was canceled
        assert f"{settings.key_prefix}:input:{job_id}".encode() in keys, job_id
    patterns = [k.decode() for k in keys]
    assert pickled_values(redis_conn, patterns) == []


# --- Redis with a password ----------------------------------------------------------------------------


def test_redis_password_is_supported_and_never_shown(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """A private redis-server with --requirepass: the API works through a password URL, a wrong
    password is 503 `redis_unavailable`, and no response ever contains the password."""
    password = "pw-" + uuid.uuid4().hex
    server = RedisServer(tmp_path, password=password)
    server.start()
    try:
        anonymous = redis.Redis(host="127.0.0.1", port=server.port)
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.ping()
        s = make_settings(redis_url=server.url)
        with TestClient(create_app(s)) as c:
            r = submit(c)
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            assert c.get(f"/v1/restorations/{job_id}").json()["status"] == "queued"
            authed = redis.Redis.from_url(server.url)
            assert authed.exists(f"{s.key_prefix}:job:{job_id}") == 1
            for path in ("/readyz", "/healthz", "/v1/models", f"/v1/restorations/{job_id}"):
                assert password not in c.get(path).text
        bad = make_settings(redis_url=server.url.replace(password, "wrong-password"))
        with TestClient(create_app(bad)) as c:
            r = submit(c)
            assert r.status_code == 503 and error_code(r) == "redis_unavailable", r.text
            assert password not in r.text and "wrong-password" not in r.text
    finally:
        server.stop()


# --- headers a browser sees ---------------------------------------------------------------------------


def test_api_responses_and_results_cannot_be_sniffed_into_html(
    client: TestClient, settings: Settings
) -> None:
    """JSON answers (success and every error kind) carry nosniff; result downloads carry nosniff,
    their recorded image media type and an inline Content-Disposition with an image extension, so
    even result bytes that look like HTML are never rendered as a page."""
    r = submit(client)
    assert r.status_code == 202
    job_id = r.json()["id"]
    answers = [
        r,
        client.get(f"/v1/restorations/{job_id}"),
        client.get("/v1/restorations/unknown"),  # 404
        client.get(f"/v1/restorations/{job_id}/image"),  # 409 not ready
        client.post("/v1/restorations", content=b"x", headers={"content-type": "text/html"}),  # 415
        submit(client, upscale="9"),  # 422
        client.post("/v1/restorations", content=b"{", headers={"content-type": "application/json"}),  # 400
        client.delete(f"/v1/restorations/{job_id}"),
    ]
    for a in answers:
        assert a.headers["x-content-type-options"] == "nosniff", (a.request.url, a.status_code)
        assert a.headers["content-type"] == "application/json", a.headers

    # A finished job, written through the same JobStore calls the worker uses. One result's bytes
    # look like HTML on purpose: the headers, not the bytes, must decide how a browser treats it.
    store = client.app.state.services.store
    done = submit(client).json()["id"]
    results = {"image": png(), "face:0": b"<html><script>alert(1)</script></html>", "comparison": png()}
    outputs = {"image": "image/png", "faces": ["image/webp"], "comparison": "image/jpeg"}
    assert store.finish(
        done,
        {"status": "succeeded", "outputs": outputs},
        results=results,
        allowed=["queued"],
        owner="anonymous",
    )
    for path, media, ext in (
        ("image", "image/png", "png"),
        ("faces/0", "image/webp", "webp"),
        ("comparison", "image/jpeg", "jpg"),
    ):
        res = client.get(f"/v1/restorations/{done}/{path}")
        assert res.status_code == 200, res.text
        assert res.headers["content-type"] == media
        assert res.headers["x-content-type-options"] == "nosniff"
        disposition = res.headers["content-disposition"]
        assert disposition.startswith("inline; filename=") and disposition.endswith(f'.{ext}"'), disposition
        assert "html" not in res.headers["content-type"]


def test_every_route_sends_nosniff(client: TestClient) -> None:
    """Not only /v1/restorations: probes, the model list, metrics and the OpenAPI document are
    fetched by browsers too (the web page, Swagger UI), so none of them may be sniffed."""
    for path in ("/healthz", "/readyz", "/v1/models", "/metrics", "/openapi.json"):
        r = client.get(path)
        assert r.headers.get("x-content-type-options") == "nosniff", path
