"""The web page at ``/``: headers (TestClient) and end to end in headless Chromium.

The browser tests start a real uvicorn server (in a thread, on a free port) and a real tiny-profile
worker, and drive Debian's Chromium (``scripts/setup-system-tools`` installs it) with Playwright (the
'test' extra). They are skipped, with the reason, only when no Chromium is available. Screenshots go
to ``artifacts/web/``.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.routers import web
from app.routers.docs import DOCS_ASSETS_URL, content_security_policy
from app.routers.web import CONTENT_SECURITY_POLICY
from app.settings import Settings
from models.images import ALLOWED_FORMATS
from tests.conftest import ROOT, TESTDATA, WorkerProcess, base_settings, purge, start_workers, wait_for

ARTIFACTS = ROOT / "artifacts" / "web"
FACE = TESTDATA / "aligned" / "0143.png"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
API_KEY = "page-test-key-" + "x" * 16


# ---------------------------------------------------------------- plain HTTP (no browser)


def test_index_is_served_with_nosniff_and_csp(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    csp = dict(part.strip().split(" ", 1) for part in CONTENT_SECURITY_POLICY.split(";"))
    assert csp["default-src"] == "'none'" and csp["script-src"] == "'self'"
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY and "unsafe-eval" not in CONTENT_SECURITY_POLICY
    assert csp["frame-ancestors"] == "'none'"
    # no inline script or style: everything the CSP has to allow is our own static files
    assert "<script>" not in r.text and "<style" not in r.text and " style=" not in r.text
    assert 'src="static/app.js"' in r.text and 'href="static/style.css"' in r.text
    # relative to the page, so that they are under the prefix of a page served under one
    refs = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert "docs" in refs and not [ref for ref in refs if ref.startswith("/")], refs

    for name, media in [("app.js", "text/javascript"), ("style.css", "text/css")]:
        s = client.get(f"/static/{name}")
        assert s.status_code == 200 and s.headers["content-type"].startswith(media), name
        assert s.headers["x-content-type-options"] == "nosniff"
    assert not re.search(
        r"\.(innerHTML|outerHTML)\s*=|insertAdjacentHTML|document\.write", client.get("/static/app.js").text
    )


@pytest.mark.parametrize("path", ["/", "/static/app.js", "/static/style.css"])
def test_a_revalidated_static_file_is_answered_not_modified(client: TestClient, path: str) -> None:
    """Sent with `Cache-Control: no-cache` and an ETag, the page's files were sent whole again on
    every load: the browser's If-None-Match is now answered 304, with no body."""
    first = client.get(path)
    etag = first.headers["etag"]
    assert first.status_code == 200 and first.headers["cache-control"] == "no-cache"
    for if_none_match in [etag, f"W/{etag}", f'"other", {etag}', "*"]:
        r = client.get(path, headers={"If-None-Match": if_none_match})
        assert r.status_code == 304 and r.content == b"", if_none_match
        assert r.headers["etag"] == etag and r.headers["cache-control"] == "no-cache"
        assert r.headers["x-content-type-options"] == "nosniff"
    for if_none_match in ['"other"', etag.replace('"', "")]:  # another tag; an unquoted one is none
        r = client.get(path, headers={"If-None-Match": if_none_match})
        assert r.status_code == 200 and r.content == first.content, if_none_match


def test_static_etags_follow_the_content(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ETag was FileResponse's, of mtime and size: a release whose build fixes timestamps, with a
    same-size change to a file, was answered 304 and the browser kept the old file."""
    served = tmp_path / "app.js"
    served.write_text("let a = 1;")
    monkeypatch.setitem(web._FILES, "app.js", (served, "text/javascript; charset=utf-8"))
    before = client.get("/static/app.js").headers["etag"]
    stat = served.stat()
    served.write_text("let b = 2;")  # same size
    os.utime(served, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same time
    r = client.get("/static/app.js", headers={"If-None-Match": before})
    assert r.status_code == 200 and r.text == "let b = 2;" and r.headers["etag"] != before


def test_the_page_is_served_at_its_root_only(client: TestClient) -> None:
    """Its URLs are relative to the page: from /static/index.html they named /static/static/app.js."""
    r = client.get("/static/index.html")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_the_file_picker_offers_the_formats_the_api_reads(client: TestClient) -> None:
    """`accept="image/*"` offered HEIC and every other image format the API refuses."""
    accept = re.search(r'id="file"[^>]*accept="([^"]+)"', client.get("/").text)
    assert accept is not None
    offered = accept.group(1).split(",")
    media_types = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "BMP": "image/bmp"}
    media_types |= {"TIFF": "image/tiff", "GIF": "image/gif"}
    assert [t for t in offered if t.startswith("image/")] == [media_types[f] for f in ALLOWED_FORMATS]
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"} <= set(offered)


def test_only_known_static_files_are_served(client: TestClient) -> None:
    for path in ["/static/nope.js", "/static/..%2F..%2Fmain.py", "/static/%2e%2e/routers/web.py"]:
        r = client.get(path)
        assert r.status_code == 404, path
        assert set(r.json()["error"]) == {"code", "message"}
    assert "/" not in client.get("/openapi.json").json()["paths"]


def test_the_api_docs_pages_load_only_files_of_this_origin(client: TestClient) -> None:
    """/docs and /redoc loaded Swagger UI and ReDoc from a CDN at a floating version, without an
    integrity check, into the origin whose tab may hold an API key: now every file is served here."""
    for path, wanted in [("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")]:
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), path
        csp = r.headers["content-security-policy"]
        assert csp == content_security_policy(r.text) and "default-src 'none'" in csp, csp
        assert "unsafe-eval" not in csp and "script-src 'self'" in csp and "https:" not in csp
        assert "img-src 'self' data: blob:" in csp  # Swagger UI shows an image answer from a blob: URL
        refs = re.findall(r'(?:src|href|url)\s*[=:]\s*["\']([^"\']+)', r.text)
        assert f"{DOCS_ASSETS_URL}/{wanted}" in refs, refs  # the scan reads the page
        assert all(ref.startswith("/") and not ref.startswith("//") for ref in refs), refs
        assert "fonts.googleapis" not in r.text and "https://" not in r.text.split("</head>")[0], path
        for ref in refs:
            asset = client.get(ref)
            assert asset.status_code == 200 and len(asset.content) > 1000, ref
            assert asset.headers["x-content-type-options"] == "nosniff"
    assert client.get(f"{DOCS_ASSETS_URL}/..%2Fmain.py").status_code == 404
    # Behind a proxy that strips a prefix (uvicorn --root-path): the prefix once, never `//` (which a
    # browser reads as another host).
    for root_path in ("/api", "/api/"):
        page = TestClient(client.app, root_path=root_path).get("/docs").text
        assert "'/api/openapi.json'" in page and 'src="/api/docs-assets/swagger-ui-bundle.js"' in page


# ---------------------------------------------------------------- browser


def _chromium() -> str | None:
    found = os.environ.get("DYNFACE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    return found if Path(found).is_file() and os.access(found, os.X_OK) else None


#: The path prefix under which a proxy may serve the service (`PathPrefix`).
PREFIX = "/dynface"


class PathPrefix:
    """ASGI app in front of the API: a request under PREFIX reaches it as through a proxy that strips
    the prefix to uvicorn started with `--root-path PREFIX` (the path keeps it, `root_path` names it);
    any other goes to the API as it is."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith(f"{PREFIX}/"):
            scope = {**scope, "root_path": PREFIX}
        await self.app(scope, receive, send)


class LiveServer:
    """The real app under uvicorn, in a thread, on a free port (``wrap``: an ASGI app around it)."""

    def __init__(self, settings: Settings, wrap: Callable[[Any], Any] | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        app = create_app(settings)
        config = uvicorn.Config(wrap(app) if wrap else app, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_for(lambda: self.server.started, 30, what="uvicorn started")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    # Playwright comes with the `test` extra (pip): missing is a broken install, a failure. Chromium
    # is Debian's, which setup-system-tools may be unable to install: its absence skips.
    from playwright.sync_api import sync_playwright

    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium browser (run scripts/setup-system-tools, or set DYNFACE_CHROMIUM)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def service(redis_conn, tmp_path_factory, browser) -> Iterator[str]:
    """Open API + one real tiny worker + uvicorn; yields the base URL. The service is under PREFIX too."""
    settings = base_settings(uuid.uuid4().hex[:10])
    workers: list[WorkerProcess] = start_workers(settings, tmp_path_factory.mktemp("web-workers"))
    try:
        with LiveServer(settings, wrap=PathPrefix) as server:
            yield server.url
    finally:
        for w in workers:
            w.stop()
        purge(redis_conn, settings)


@pytest.fixture
def page(browser) -> Iterator[Any]:
    """A fresh browser context per test (its own sessionStorage); fails on page errors.

    `wait_for_function` takes arrow functions only: Playwright evaluates a bare expression again
    with `eval` on every poll, which the page's CSP (no 'unsafe-eval') blocks once the first check,
    run through DevTools, has come back false."""
    context = browser.new_context(viewport={"width": 1100, "height": 1400})
    pg = context.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    # With the path it is about: a failed load's message names only its status.
    pg.on(
        "console",
        lambda m: (
            problems.append(f"console: {m.text} at {urlsplit(m.location['url']).path}")
            if m.type == "error"
            else None
        ),
    )
    pg.problems = problems
    yield pg
    context.close()


def _screenshot(pg: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _natural_size(pg: Any, selector: str) -> tuple[int, int]:
    w, h = pg.eval_on_selector(selector, "img => [img.complete ? img.naturalWidth : 0, img.naturalHeight]")
    return w, h


def _wait_for_message(pg: Any, code: str, name: str) -> str:
    try:
        pg.wait_for_selector(f"#message[data-code='{code}']", state="visible", timeout=60_000)
    finally:
        _screenshot(pg, name)
    return pg.inner_text("#message")


def _record_texts(pg: Any, element_id: str) -> None:
    """From now on, keep every text the element shows (`_recorded_texts`), however briefly."""
    pg.evaluate(
        """(id) => {
            window.recordedTexts = [];
            const element = document.getElementById(id);
            new MutationObserver(() => window.recordedTexts.push(element.textContent))
                .observe(element, { childList: true, characterData: true, subtree: true });
        }""",
        element_id,
    )


def _recorded_texts(pg: Any) -> list[str]:
    return pg.evaluate("window.recordedTexts")


def _unexpected_console(pg: Any, allowed: tuple[str, ...] = ()) -> list[str]:
    """The page's problems but those ``allowed`` (regular expressions): Chromium logs each error answer
    a test provokes as a console error, which `_refused` names."""
    return [p for p in pg.problems if not any(re.search(a, p) for a in allowed)]


def _refused(status: int, path: str) -> str:
    """Allows (`_unexpected_console`) the console error of a load of ``path`` (a regular expression
    for the whole path) answered ``status``."""
    return rf"status of {status} \(.*\) at {path}$"


def test_the_api_docs_render_from_this_origin_alone(service: str, page: Any) -> None:
    """Swagger UI and ReDoc render the API's operations under their CSP, with every request to
    another origin refused besides: they need nothing from a CDN, and break no rule of their CSP."""
    elsewhere: list[str] = []
    page.route(
        lambda url: not url.startswith(service),
        lambda route: (elsewhere.append(route.request.url), route.abort()),
    )
    page.goto(service + "/docs")
    page.wait_for_selector("#operations-restorations-create_restoration_v1_restorations_post", timeout=30000)
    assert "dynface" in page.inner_text(".swagger-ui .info .title")
    _screenshot(page, "docs")
    page.goto(service + "/redoc")
    page.wait_for_selector("h2:has-text('Submit a photo')", timeout=30000)
    _screenshot(page, "redoc")
    # ReDoc's vendor logo is the one thing either page asks of another origin: the CSP refuses it.
    assert elsewhere == [] and _unexpected_console(page, ("cdn.redoc.ly/redoc/logo-mini.svg",)) == []


def test_restores_a_photo_in_the_browser(service: str, page: Any) -> None:
    page.goto(service + "/")
    page.set_input_files("#file", str(FACE))
    page.check("#aligned")
    # DifFace always samples its fixed 100 steps (DynFaceRestore's count depends on the face: 24 for
    # this one, under a second on a fast CPU), so sampling spans several of the page's 500 ms polls
    # and the step counter below is seen whatever the machine's speed.
    page.select_option("#mode", "difface")
    page.select_option("#upscale", "2")
    page.uncheck("#fidelity-auto")
    page.eval_on_selector("#fidelity", "el => { el.value = '0.3'; el.dispatchEvent(new Event('input')); }")
    assert page.inner_text("#fidelity-value") == "0.30"

    _record_texts(page, "status-line")
    with page.expect_response(
        lambda r: r.url.endswith("/v1/restorations") and r.request.method == "POST"
    ) as sub:
        page.click("#submit")
    job = sub.value.json()
    assert sub.value.status == 202, job
    assert job["options"]["aligned"] is True and job["options"]["upscale"] == 2
    assert job["options"]["mode"] == "difface"
    assert job["options"]["fidelity"] == 0.3 and job["options"]["outputs"] == ["image", "faces"]
    page.wait_for_selector("#status-panel[data-status]", state="visible")
    _screenshot(page, "progress")

    try:
        page.wait_for_selector("#results[data-loaded='true']", state="visible", timeout=180_000)
        page.wait_for_function("() => document.querySelectorAll('#faces img').length === 1", timeout=30_000)
        page.wait_for_function(
            "() => [...document.querySelectorAll('#faces img')].every(i => i.naturalWidth > 0)"
        )
    finally:
        _screenshot(page, "result")

    assert page.get_attribute("#status-panel", "data-status") == "succeeded"
    assert page.inner_text("#status-line") == "Done."
    seen = _recorded_texts(page)
    # live progress: the diffusion steps were shown while the worker sampled
    assert any(re.fullmatch(r"Processing: diffusion sampling \(step \d+ of \d+\)", t) for t in seen), seen
    with Image.open(FACE) as im:
        w, h = im.size
    assert _natural_size(page, "#after") == (2 * w, 2 * h)  # aligned face, upscaled 2×
    assert _natural_size(page, "#before") == (w, h)
    assert _natural_size(page, "#faces img") == (512, 512)
    assert page.eval_on_selector("#boxes", "c => [c.width, c.height]") == [w, h]
    boxes = page.get_by_role("img", name="Your photo with its 1 detected face outlined and numbered")
    assert boxes.get_attribute("id") == "boxes"
    href = page.get_attribute("#download-image", "href")
    assert href.startswith("blob:") and page.get_attribute("#download-image", "download").endswith(".png")
    assert page.get_attribute("#faces a", "download").startswith("face-1-")
    assert page.is_hidden("#message") or page.get_attribute("#message", "class") == "message info"

    page.eval_on_selector("#split", "el => { el.value = '20'; el.dispatchEvent(new Event('input')); }")
    clip = page.eval_on_selector("#after", "img => getComputedStyle(img).clipPath")
    assert "20%" in clip, clip
    _screenshot(page, "result-slider")
    assert _unexpected_console(page) == []


def test_restores_a_photo_on_a_page_served_under_a_path_prefix(service: str, page: Any) -> None:
    """Behind a proxy that serves the service under a path prefix, the page asked for its files, the
    API and the results at the host's root: every request it makes now stays under the prefix."""
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url) if r.url.startswith("http") else None)
    home = f"{service}{PREFIX}/"
    page.goto(home)
    page.set_input_files("#file", str(FACE))
    page.check("#aligned")
    with page.expect_response(lambda r: _is_submission(r.url) and r.request.method == "POST") as sub:
        page.click("#submit")
    job = sub.value.json()
    assert sub.value.status == 202 and sub.value.url == f"{home}v1/restorations", job
    assert job["urls"]["self"] == f"{home}v1/restorations/{job['id']}"  # the API knows of the prefix too
    try:
        page.wait_for_selector("#results[data-loaded='true']", state="visible", timeout=180_000)
        page.wait_for_function("() => document.querySelectorAll('#faces img').length === 1", timeout=30_000)
    finally:
        _screenshot(page, "result-under-prefix")
    assert page.get_attribute("#status-panel", "data-status") == "succeeded"
    assert page.evaluate("location.pathname") == f"{PREFIX}/"
    with Image.open(FACE) as im:
        assert _natural_size(page, "#after") == im.size
    assert page.eval_on_selector("header a", "a => a.href") == f"{home}docs"
    assert httpx.get(f"{home}docs").status_code == 200
    paths = {urlsplit(url).path for url in requested}
    assert {f"{PREFIX}/static/app.js", f"{PREFIX}/static/style.css", f"{PREFIX}/readyz"} <= paths, paths
    assert [url for url in requested if not url.startswith(home)] == []
    assert _unexpected_console(page) == []


def test_bad_file_shows_a_clear_error(service: str, page: Any) -> None:
    page.goto(service + "/")
    page.set_input_files("#file", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"hello"}])
    page.click("#submit")
    text = _wait_for_message(page, "invalid_image", "error-bad-file")
    assert "not an image that can be read" in text
    assert "PNG, JPEG, WebP, BMP, TIFF or GIF" in text  # models/images.py ALLOWED_FORMATS
    assert page.is_hidden("#results")
    assert page.is_enabled("#submit")  # ready for another try
    assert _unexpected_console(page, allowed=(_refused(400, "/v1/restorations"),)) == []


def test_photo_without_a_face_shows_no_face(service: str, page: Any) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (96, 96), (128, 128, 128)).save(buf, "PNG")
    page.goto(service + "/")
    page.set_input_files(
        "#file", files=[{"name": "wall.png", "mimeType": "image/png", "buffer": buf.getvalue()}]
    )
    page.click("#submit")
    text = _wait_for_message(page, "no_face", "error-no-face")
    assert "No face was found" in text
    assert page.get_attribute("#status-panel", "data-status") == "failed"
    assert _unexpected_console(page) == []


def test_api_key_is_asked_for_and_kept_in_the_session(redis_conn, browser, page: Any) -> None:
    settings = base_settings(uuid.uuid4().hex[:10], api_keys=[API_KEY])
    try:
        with LiveServer(settings) as server:
            page.goto(server.url + "/")
            page.wait_for_selector("#key-panel", state="visible")
            page.set_input_files("#file", str(FACE))
            page.click("#submit")
            _wait_for_message(page, "unauthorized", "error-unauthorized")

            # a key fetch() could not put in a header is refused when saved, not sent as "unreachable"
            for bad in ["clé-€", "two words", "tab\tkey"]:
                page.fill("#api-key", bad)
                page.click("#key-form button[type=submit]")
                assert "not a valid API key" in _wait_for_message(page, "invalid_key", "error-invalid-key")
                assert page.evaluate("sessionStorage.getItem('dynface.apiKey')") is None
                page.click("#submit")
                _wait_for_message(page, "unauthorized", "error-unauthorized")

            page.fill("#api-key", API_KEY)
            page.click("#key-form button[type=submit]")
            assert page.evaluate("sessionStorage.getItem('dynface.apiKey')") == API_KEY
            assert page.evaluate("localStorage.length") == 0
            assert page.evaluate("document.cookie") == ""
            # with the key, the same (non-aligned, tiny) submission is accepted and queued/processed
            with page.expect_response(lambda r: r.url.endswith("/v1/restorations")) as sub:
                page.click("#submit")
            assert sub.value.status == 202
            job_id = sub.value.json()["id"]
            page.wait_for_selector("#status-panel[data-status='queued']", timeout=10_000)
            assert "Queued" in page.inner_text("#status-line")
            _screenshot(page, "queued-with-key")
            # the key never reaches the job JSON or the page's URL
            r = httpx.get(f"{server.url}/v1/restorations/{job_id}", headers={"X-API-Key": API_KEY})
            assert r.status_code == 200 and API_KEY not in r.text and API_KEY not in page.url

            page.click("#forget-key")
            assert page.evaluate("sessionStorage.getItem('dynface.apiKey')") is None
    finally:
        purge(redis_conn, settings)
    assert (
        _unexpected_console(page, allowed=(_refused(401, "/v1/restorations"), _refused(503, "/readyz"))) == []
    )


# ---------------------------------------------------------------- job watching (API faked for timing)

FAKE_ID = "f" * 32
CLOCK_START = 1_900_000_000  # s since the epoch (Playwright's Python clock takes seconds), for the fake clock
JOB_URL = re.compile(r"/v1/restorations/[0-9a-f]{32}$")  # the job itself, not /image or /faces/k
# Counts the page's GETs of a job as they are made (synchronously, unlike route handlers), so that with
# a paused fake clock "no poll yet" can be checked without waiting.
COUNT_JOB_GETS = r"""(() => {
  window.jobGets = 0;
  const realFetch = window.fetch;
  window.fetch = (input, init = {}) => {
    if (/\/v1\/restorations\/[0-9a-f]{32}$/.test(String(input)) && !init.method) window.jobGets += 1;
    return realFetch(input, init);
  };
})();"""


def _fake_job(status: str, **fields: Any) -> dict[str, Any]:
    return {"id": FAKE_ID, "status": status, "warnings": [], **fields}


def _answering(job: dict[str, Any]) -> Any:
    """A route handler: the restored image and face crops are FACE, anything else `job` (202 to the
    submission)."""

    def handle(route: Any) -> None:
        if route.request.url.endswith("/image") or "/faces/" in route.request.url:
            route.fulfill(body=FACE.read_bytes(), content_type="image/png")
        else:
            route.fulfill(status=202 if route.request.method == "POST" else 200, json=job)

    return handle


def _open_on_paused_clock(pg: Any, url: str) -> None:
    """Open `url` with the page's fake clock installed and paused, so a test moves time itself."""
    pg.clock.install(time=CLOCK_START)
    pg.clock.pause_at(CLOCK_START + 1)
    pg.goto(url)


def _job_gets(pg: Any) -> int:
    return pg.evaluate("window.jobGets")


def _wait_status_line(pg: Any, text: str) -> None:
    pg.wait_for_function(
        "t => document.getElementById('status-line').textContent === t", arg=text, timeout=10_000
    )


def _submit_until_sampling(pg: Any, service: str, handle: Callable[[Any], None]) -> None:
    """Submit a photo on the page, the API answered by ``handle`` (fake job routes), and wait until
    the status line shows the job at its first diffusion step."""
    pg.route(lambda url: "/v1/restorations" in url, handle)
    pg.goto(service + "/")
    pg.set_input_files("#file", files=[_photo()])
    pg.click("#submit")
    _wait_status_line(pg, "Processing: diffusion sampling (step 1 of 50)")


def test_picking_a_photo_mid_job_does_not_enable_restore(service: str, page: Any) -> None:
    job = _fake_job("queued", queue_position=2)
    deleted: list[str] = []

    def handle(route: Any) -> None:
        request = route.request
        if request.method == "POST":
            route.fulfill(status=202, json=job)
        elif request.method == "DELETE":
            deleted.append(request.url)
            job.update(status="canceled", queue_position=None)
            route.fulfill(json=job)
        else:
            route.fulfill(json=job)

    page.route(lambda url: "/v1/restorations" in url, handle)
    page.goto(service + "/")
    page.set_input_files("#file", str(FACE))
    page.click("#submit")
    page.wait_for_selector("#status-panel[data-status='queued']")
    assert page.is_disabled("#submit") and page.is_visible("#cancel")

    page.set_input_files("#file", files=[{"name": "next.png", "mimeType": "image/png", "buffer": b"x"}])
    assert "next.png" in page.inner_text("#drop-text")
    # one job (and one poll loop) at a time: Restore waits for the running job to end
    assert page.is_disabled("#submit") and page.is_visible("#cancel")

    page.click("#cancel")
    _wait_for_message(page, "canceled", "mid-job-pick-canceled")
    assert deleted == [f"{service}/v1/restorations/{FAKE_ID}"]
    assert page.is_enabled("#submit") and page.is_hidden("#cancel")  # now the picked photo can go
    assert _unexpected_console(page) == []


def test_polling_rides_out_a_short_outage(service: str, page: Any) -> None:
    outage = [
        {
            "status": 503,
            "headers": {"Retry-After": "1"},
            "json": {"error": {"code": "redis_unavailable", "message": "down"}},
        },
        {"status": 502, "body": "Bad Gateway", "content_type": "text/plain"},
        {"status": 504, "body": "Gateway Timeout", "content_type": "text/plain"},
    ]
    injected: list[int] = []

    def handle(route: Any) -> None:
        if route.request.method != "GET" or not outage:
            route.fallback()
            return
        answer = outage.pop(0)
        injected.append(answer["status"])
        route.fulfill(**answer)

    page.route(lambda url: bool(JOB_URL.search(url)), handle)
    page.goto(service + "/")
    page.set_input_files("#file", str(FACE))
    page.check("#aligned")
    page.click("#submit")
    page.wait_for_selector("#message[data-code='reconnecting']", state="visible", timeout=30_000)
    try:
        page.wait_for_selector("#results[data-loaded='true']", state="visible", timeout=180_000)
    finally:
        _screenshot(page, "after-outage")
    assert injected == [503, 502, 504]
    assert page.get_attribute("#status-panel", "data-status") == "succeeded"
    assert page.get_attribute("#message", "data-code") != "reconnecting"  # cleared once answered again
    assert _unexpected_console(page, allowed=("status of 5",)) == []


def test_reload_resumes_watching_the_job(service: str, page: Any) -> None:
    page.goto(service + "/")
    page.set_input_files("#file", str(FACE))
    page.check("#aligned")
    with page.expect_response(lambda r: r.url.endswith("/v1/restorations")) as sub:
        page.click("#submit")
    job_id = sub.value.json()["id"]
    page.wait_for_function("id => location.hash === '#job=' + id", arg=job_id)

    page.reload()
    try:
        page.wait_for_selector("#results[data-loaded='true']", state="visible", timeout=180_000)
        page.wait_for_function("() => document.querySelectorAll('#faces img').length === 1", timeout=30_000)
    finally:
        _screenshot(page, "resumed-after-reload")
    assert page.get_attribute("#status-panel", "data-status") == "succeeded"
    assert page.get_attribute("#download-image", "download").startswith(f"restored-{job_id}.")
    # the photo is not kept: nothing to compare, and no face boxes drawn on it
    assert page.is_hidden("#before") and page.is_hidden("#split") and page.is_hidden("#faces-note")
    assert page.eval_on_selector("#results", "c => c.classList.contains('no-before')")
    assert _natural_size(page, "#after")[0] > 0
    assert page.evaluate("location.hash") == f"#job={job_id}"
    assert _unexpected_console(page) == []


@pytest.mark.parametrize(
    ("base_url", "page_prefix"),
    [
        ("http://api.internal:8000", ""),
        ("https://faces.example/dynface", ""),  # a public base URL whose prefix is not the page's
        ("http://api.internal:8000", PREFIX),  # the page under a prefix the API does not know of
        ("https://faces.example/dynface", PREFIX),
    ],
)
def test_a_resumed_job_without_an_image_shows_the_result_the_api_names(
    service: str, page: Any, base_url: str, page_prefix: str
) -> None:
    """A job submitted by another client (outputs faces + comparison, no `image`) opened from the
    address: the page fetches the URLs the job JSON gives where it fetches the job itself, on its own
    origin and under its own base (the public base URL's host and path prefix need not be the page's),
    never `/image`."""
    elsewhere = f"{base_url}/v1/restorations/{FAKE_ID}"  # the base URL it was submitted to
    job = _fake_job(
        "succeeded",
        faces=[],
        outputs={
            "image": None,
            "faces": [f"{elsewhere}/faces/0"],
            "crops": [],
            "comparison": f"{elsewhere}/comparison",
        },
        urls={"self": elsewhere, "result": f"{elsewhere}/comparison", "cancel": elsewhere},
    )
    fetched: list[str] = []

    def handle(route: Any) -> None:
        path = route.request.url.removeprefix(service + page_prefix)
        fetched.append(path)
        if JOB_URL.search(path):
            route.fulfill(json=job)
        elif path.endswith(("/comparison", "/faces/0")):
            route.fulfill(body=FACE.read_bytes(), content_type="image/png")
        else:  # what the API answers for an output the job does not have
            route.fulfill(status=404, json={"error": {"code": "not_found", "message": "no image output"}})

    page.route(lambda url: "/v1/restorations/" in url, handle)
    page.goto(f"{service}{page_prefix}/#job={FAKE_ID}")
    try:
        page.wait_for_selector("#results[data-loaded='true']", state="visible", timeout=30_000)
        page.wait_for_function("() => document.querySelectorAll('#faces img').length === 1", timeout=30_000)
    finally:
        _screenshot(page, "resumed-without-image")
    base = f"/v1/restorations/{FAKE_ID}"
    assert fetched == [base, f"{base}/comparison", f"{base}/faces/0"]
    assert page.is_hidden("#message")
    assert _natural_size(page, "#after")[0] > 0
    assert _unexpected_console(page) == []


def test_the_status_has_accessible_names_and_only_its_sentence_is_live(service: str, page: Any) -> None:
    """The progress bar and the face-box picture have names; the live region is the status sentence
    alone, so the step and queue counters (new every poll) are not read out on every poll."""
    answers: list[dict[str, Any]] = []

    def handle(route: Any) -> None:
        n = len(answers)
        job = (
            _fake_job("queued", queue_position=2)
            if n == 0
            else _fake_job("processing", stage="sample", progress={"step": n, "total": 50})
        )
        answers.append(job)
        route.fulfill(json=job)

    page.route(lambda url: bool(JOB_URL.search(url)), handle)
    # Fake time, paused: the next poll waits for run_for, so the recorder is in place before it
    # however long this process stalls (on the real clock a 1 s stall let "processing" land first).
    _open_on_paused_clock(page, f"{service}/#job={FAKE_ID}")
    _wait_status_line(page, "Queued: 2 ahead of you.")
    _record_texts(page, "status-text")  # what a screen reader announces
    for step, delay in ((1, 1000), (2, 500), (3, 500)):  # the queued, then the processing poll delay
        page.clock.run_for(delay)
        _wait_status_line(page, f"Processing: diffusion sampling (step {step} of 50)")
    # read out once, when the job started sampling; steps 2 and 3 changed only the counter
    assert _recorded_texts(page) == ["Processing: diffusion sampling"]
    live = page.eval_on_selector_all("[aria-live]", "es => es.map(e => [e.id, e.getAttribute('aria-live')])")
    assert live == [["status-text", "polite"]]
    assert page.eval_on_selector("#status-count", "e => e.closest('[aria-live], [role=status]')") is None
    assert page.get_by_role("progressbar", name="Job progress").get_attribute("id") == "progress"
    # Before any face is known, the canvas is announced by the page's own label (drawBoxes then
    # counts the faces in it).
    assert page.get_attribute("#boxes", "role") == "img"
    label = page.get_attribute("#boxes", "aria-label")
    assert label == "Your photo with the detected faces outlined and numbered"
    assert _unexpected_console(page) == []


def test_polling_gives_up_after_two_minutes_of_outage(service: str, page: Any) -> None:
    gets: list[int] = []

    def handle(route: Any) -> None:
        gets.append(1)
        route.fulfill(status=502, json={"error": {"code": "bad_gateway", "message": f"outage {len(gets)}"}})

    page.route(lambda url: bool(JOB_URL.search(url)), handle)
    # fake time, paused: it moves only by run_for, so "two minutes" takes no real time
    _open_on_paused_clock(page, f"{service}/#job={FAKE_ID}")
    page.wait_for_selector("#message[data-code='reconnecting']", state="visible")
    _record_texts(page, "message")
    advanced = 0
    # In 1 s steps: the page's retry waits are whole seconds but for the first (0.5 s), and a failure
    # answered a step late only moves the next GET later (the two minutes count on the page's clock).
    while page.get_attribute("#message", "data-code") == "reconnecting" and advanced < 200_000:
        page.clock.run_for(1000)
        advanced += 1000
    _screenshot(page, "gave-up")
    assert page.get_attribute("#message", "data-code") == "lost_contact"
    assert 120_000 <= advanced <= 130_000, advanced  # retried for about two minutes, then stopped
    assert 10 <= len(gets) <= 20, len(gets)  # backing off to one GET in 10 s
    # The alert was not rewritten on each retry (a screen reader reads every rewrite out), only once
    # to say that the page gave up.
    recorded = _recorded_texts(page)
    assert len(recorded) == 1 and "Reload the page" in recorded[0], recorded
    assert "Reload the page" in page.inner_text("#message")
    assert page.evaluate("location.hash") == f"#job={FAKE_ID}"  # so a reload can look again
    assert page.is_hidden("#cancel")
    assert _unexpected_console(page, allowed=("status of 502",)) == []


def test_polling_slows_down_while_queued_and_in_a_background_tab(service: str, page: Any) -> None:
    answers: list[dict[str, Any]] = []
    phase = {"status": "queued"}

    def answer(n: int) -> dict[str, Any]:
        # every answer differs, so the page shows when it has handled each one
        if phase["status"] == "queued":
            return _fake_job("queued", queue_position=20 - n)
        return _fake_job("processing", stage="sample", progress={"step": n, "total": 100})

    def handle(route: Any) -> None:
        job = answer(len(answers) + 1)
        answers.append(job)
        route.fulfill(json=job)

    def line(job: dict[str, Any]) -> str:
        if job["status"] == "queued":
            return f"Queued: {job['queue_position']} ahead of you."
        return f"Processing: diffusion sampling (step {job['progress']['step']} of 100)"

    def next_poll_after(delay_ms: int) -> None:
        """No GET until ``delay_ms`` of (fake) time has passed since the last answer, then one."""
        before = _job_gets(page)
        page.clock.run_for(delay_ms - 1)
        assert _job_gets(page) == before, f"polled before {delay_ms} ms"
        page.clock.run_for(1)
        assert _job_gets(page) == before + 1, f"no poll at {delay_ms} ms"
        # Waited for in the page, not with a Python sleep: the sync API runs the route handler only
        # while a Playwright call is waiting.
        _wait_status_line(page, line(answer(before + 1)))
        assert len(answers) == before + 1

    page.add_init_script(COUNT_JOB_GETS)
    page.route(lambda url: bool(JOB_URL.search(url)), handle)
    _open_on_paused_clock(page, f"{service}/#job={FAKE_ID}")  # resumes watching the job at once
    _wait_status_line(page, "Queued: 19 ahead of you.")
    assert _job_gets(page) == 1

    for delay in (1000, 2000, 4000, 4000):  # queued: back off, capped
        next_poll_after(delay)
    phase["status"] = "processing"
    next_poll_after(4000)  # answers "processing"
    next_poll_after(500)  # live steps: fast

    page.evaluate(
        "() => { Object.defineProperty(document, 'hidden', { value: true, configurable: true });"
        " document.dispatchEvent(new Event('visibilitychange')); }"
    )
    next_poll_after(500)  # scheduled while visible; its answer is handled in the background
    next_poll_after(10_000)  # background tab: slow
    page.clock.run_for(5000)
    before = _job_gets(page)
    page.evaluate("() => { delete document.hidden; document.dispatchEvent(new Event('visibilitychange')); }")
    page.clock.run_for(1)
    assert _job_gets(page) == before + 1  # back in view: polled at once
    assert _unexpected_console(page) == []


def test_fidelity_slider_has_an_accessible_name(service: str, page: Any) -> None:
    page.goto(service + "/")
    slider = page.get_by_role("slider", name="Fidelity", exact=True)
    assert slider.get_attribute("id") == "fidelity"
    assert page.get_by_label("Fidelity", exact=True).get_attribute("id") == "fidelity"
    # The value shown beside it is an <output> (a live region): hidden from screen readers, which read
    # the slider's own value, so that it is not announced twice.
    assert page.get_attribute("#fidelity-value", "aria-hidden") == "true"


def test_a_photo_dropped_anywhere_is_picked_not_opened(service: str, page: Any) -> None:
    page.goto(service + "/")
    page.set_input_files("#file", files=[{"name": "picked.png", "mimeType": "image/png", "buffer": b"x"}])
    assert "picked.png" in page.inner_text("#drop-text")
    # Returns, per event, whether the page canceled the browser's default (opening the file / leaving).
    prevented = page.evaluate(
        """() => {
            const send = (type, target, dataTransfer) => !target.dispatchEvent(
                new DragEvent(type, { dataTransfer, bubbles: true, cancelable: true }));
            const files = new DataTransfer();
            files.items.add(new File(["x"], "dropped.png", { type: "image/png" }));
            const text = new DataTransfer();
            text.setData("text/plain", "hello");
            const outside = document.querySelector("header h1");
            return {
                fileOver: send("dragover", outside, files),
                fileDrop: send("drop", outside, files),
                textOver: send("dragover", outside, text),
            };
        }"""
    )
    assert prevented == {"fileOver": True, "fileDrop": True, "textOver": False}
    assert "dropped.png" in page.inner_text("#drop-text")
    # The input holds the dropped photo too: a browser fires "change" only when its value changes, so
    # picking picked.png again from the dialog would have been ignored had it kept that one.
    assert page.eval_on_selector("#file", "input => [...input.files].map(f => f.name)") == ["dropped.png"]
    assert page.is_enabled("#submit")
    assert page.evaluate("location.pathname") == "/"


# ---------------------------------------------------------------- uploads, submission retries, errors

# What Chrome does when the user blocks site data: reading `window.sessionStorage` throws.
BLOCKED_STORAGE = """Object.defineProperty(window, "sessionStorage", {
  get() {
    throw new DOMException("Failed to read the 'sessionStorage' property from 'Window': Access is denied "
      + "for this document.", "SecurityError");
  },
});"""


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 90, 60)).save(buf, "PNG")
    return buf.getvalue()


def _photo(name: str = "photo.png", width: int = 64, height: int = 64) -> dict[str, Any]:
    return {"name": name, "mimeType": "image/png", "buffer": _png(width, height)}


def _error(code: str, message: str = "") -> dict[str, Any]:
    return {"error": {"code": code, "message": message or code}}


def _http_date(seconds: int) -> str:
    return formatdate(seconds, usegmt=True)


def _is_submission(url: str) -> bool:
    return url.endswith("/v1/restorations")


def test_the_upload_shows_its_progress_and_cancel_stops_it(service: str, page: Any) -> None:
    """A real upload, slowed down (DevTools' upload throttling): its progress is shown from the start,
    and Cancel aborts it, so the API never has a whole body to store a job from (tests/app/test_api.py
    checks that side: `client_closed`)."""
    noise = Image.frombytes("RGB", (600, 600), os.urandom(600 * 600 * 3))  # ≈ 1 MB as PNG: ~10 s here
    buf = io.BytesIO()
    noise.save(buf, "PNG")
    failed: list[tuple[str, str]] = []
    page.on("requestfailed", lambda r: failed.append((r.method, r.url)))
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.method) if "/v1/restorations" in r.url else None)
    page.goto(service + "/")
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": 100_000},
    )
    page.set_input_files(
        "#file", files=[{"name": "noise.png", "mimeType": "image/png", "buffer": buf.getvalue()}]
    )
    page.click("#submit")
    page.wait_for_function(
        "() => /^Uploading the photo: [1-9][0-9]?%$/"
        ".test(document.getElementById('status-line').textContent)",
        timeout=10_000,
    )
    _screenshot(page, "uploading")
    assert page.get_attribute("#status-panel", "data-status") == "uploading"
    assert page.is_visible("#progress") and page.is_visible("#cancel")
    page.click("#cancel")
    assert _wait_for_message(page, "upload_canceled", "upload-canceled").startswith(
        "The upload was canceled."
    )
    assert failed == [("POST", f"{service}/v1/restorations")]  # aborted, not finished
    assert sent == ["POST"]  # and nothing to DELETE
    assert page.evaluate("location.hash") == ""
    assert page.is_enabled("#submit") and page.is_hidden("#cancel")
    assert page.inner_text("#status-line") == ""
    assert _unexpected_console(page) == []


def test_cancel_of_a_running_job_says_so_until_it_ends(service: str, page: Any) -> None:
    """A running job asked to stop (DELETE answered 202) goes on until its next check: the page says
    the cancel was requested, not the job's steps, until the job has ended."""
    job = _fake_job("processing", stage="sample", progress={"step": 1, "total": 50})
    deletes: list[int] = []

    def handle(route: Any) -> None:
        method = route.request.method
        if method == "DELETE":
            deletes.append(route.request.headers.get("idempotency-key") is None)
        route.fulfill(status=200 if method == "GET" else 202, json=job)

    page.add_init_script(COUNT_JOB_GETS)
    _submit_until_sampling(page, service, handle)
    page.click("#cancel")
    _wait_status_line(page, "Cancel requested…")
    assert page.is_disabled("#cancel")  # asked once
    gets = _job_gets(page)
    page.wait_for_function("n => window.jobGets >= n + 2", arg=gets, timeout=10_000)
    assert page.inner_text("#status-line") == "Cancel requested…"  # polled: still processing
    assert deletes == [True]
    job.update(status="canceled", stage=None, progress=None)
    _wait_for_message(page, "canceled", "cancel-requested-then-canceled")
    assert page.inner_text("#status-line") == "Canceled."
    assert page.is_hidden("#cancel") and page.is_enabled("#submit")
    assert _unexpected_console(page) == []


def test_the_page_works_when_session_storage_is_blocked(service: str, page: Any) -> None:
    """Where the browser blocks site data, reading sessionStorage throws: requests still go out
    (they failed as "server could not be reached"), and a key entered is kept for the page's life."""
    authorizations: list[str | None] = []

    def handle(route: Any) -> None:
        authorizations.append(route.request.headers.get("authorization"))
        route.fulfill(status=401, json=_error("unauthorized", "A valid API key is required."))

    page.add_init_script(BLOCKED_STORAGE)
    page.route(lambda url: _is_submission(url), handle)
    page.goto(service + "/")
    page.set_input_files("#file", files=[_photo()])
    page.click("#submit")
    _wait_for_message(page, "unauthorized", "storage-blocked-unauthorized")
    page.fill("#api-key", API_KEY)
    page.click("#key-form button[type=submit]")
    assert page.inner_text("#key-state") == "A key is set for this tab."
    page.click("#submit")
    _wait_for_message(page, "unauthorized", "storage-blocked-with-key")
    assert authorizations == [None, f"Bearer {API_KEY}"]
    assert (
        _unexpected_console(page, allowed=(_refused(401, "/v1/restorations"),)) == []
    )  # init() ran to its end


@pytest.mark.parametrize(
    ("retry_after", "wait_ms"),
    [
        ("0", 500),  # the first retry's backoff
        (_http_date(CLOCK_START - 60), 500),  # a date in the past: the same
        (_http_date(CLOCK_START + 6), 5000),  # a date ahead (the page's clock is paused at CLOCK_START + 1)
    ],
)
def test_a_poll_retry_waits_at_least_its_backoff(
    service: str, page: Any, retry_after: str, wait_ms: int
) -> None:
    """`Retry-After: 0` or a past date made the page poll in a busy loop; coming back into view
    during a retry's wait polled at once too."""

    def handle(route: Any) -> None:
        route.fulfill(status=503, headers={"Retry-After": retry_after}, json=_error("redis_unavailable"))

    page.add_init_script(COUNT_JOB_GETS)
    page.route(lambda url: bool(JOB_URL.search(url)), handle)
    _open_on_paused_clock(page, f"{service}/#job={FAKE_ID}")
    page.wait_for_selector("#message[data-code='reconnecting']", state="visible")
    assert _job_gets(page) == 1
    page.evaluate("() => document.dispatchEvent(new Event('visibilitychange'))")  # back in view
    page.clock.run_for(wait_ms - 1)
    assert _job_gets(page) == 1
    page.clock.run_for(1)
    assert _job_gets(page) == 2
    assert _unexpected_console(page, allowed=(_refused(503, f"/v1/restorations/{FAKE_ID}"),)) == []


def test_retry_after_as_a_date_is_shown_in_seconds(service: str, page: Any) -> None:
    when = _http_date(CLOCK_START + 91)  # the page's clock is paused at CLOCK_START + 1
    page.route(
        lambda url: _is_submission(url),
        lambda route: route.fulfill(status=429, headers={"Retry-After": when}, json=_error("rate_limited")),
    )
    _open_on_paused_clock(page, service + "/")
    page.set_input_files("#file", files=[_photo()])
    page.click("#submit")
    text = _wait_for_message(page, "rate_limited", "error-rate-limited-until")
    assert "Try again in 90 s." in text, text
    assert _unexpected_console(page, allowed=(_refused(429, "/v1/restorations"),)) == []


def test_a_submission_is_retried_with_one_idempotency_key(service: str, page: Any) -> None:
    """A POST whose answer is lost may still have made its job: it is sent again with the same
    Idempotency-Key (the API then answers with that job rather than making another), and so is the
    next submission of the same photo and options after the page gave up. A new submission gets a
    new key."""
    failures: list[dict[str, Any] | None] = [
        {"status": 503, "json": _error("redis_unavailable", "down")},
        None,  # the connection drops: no answer at all
        {"status": 409, "headers": {"Retry-After": "5"}, "json": _error("idempotency_in_progress")},
        {"status": 504, "body": "<html><body>Gateway Timeout</body></html>", "content_type": "text/html"},
    ]
    job = _fake_job("queued", queue_position=0)
    keys: list[str | None] = []

    def handle(route: Any) -> None:
        request = route.request
        if request.method == "POST":
            keys.append(request.headers.get("idempotency-key"))
            answer = failures.pop(0) if failures else {"status": 202, "json": job}
            if answer is None:
                route.abort("connectionreset")
            else:
                route.fulfill(**answer)
        elif request.method == "DELETE":
            job.update(status="canceled", queue_position=None)
            route.fulfill(json=job)
        else:
            route.fulfill(json=job)

    page.route(lambda url: "/v1/restorations" in url, handle)
    _open_on_paused_clock(page, service + "/")
    page.set_input_files("#file", files=[_photo()])
    page.click("#submit")
    page.wait_for_selector("#message[data-code='reconnecting']", state="visible")
    assert page.get_attribute("#status-panel", "data-status") == "uploading"
    advanced = 0
    while page.get_attribute("#message", "data-code") == "reconnecting" and advanced < 30_000:
        page.clock.run_for(500)
        advanced += 500
    # three retries, 1 s, 2 s, then the 409's Retry-After (5 s) apart; a proxy's 504 page ends them
    text = _wait_for_message(page, "unavailable", "submit-gave-up")
    assert "unavailable right now" in text
    assert 8000 <= advanced <= 10_000, advanced
    assert len(keys) == 4 and keys[0] is not None and re.fullmatch(r"[0-9a-f]{32}", keys[0])
    assert set(keys) == {keys[0]}
    assert page.is_enabled("#submit") and page.evaluate("location.hash") == ""

    page.clock.resume()
    page.click("#submit")  # the same photo and options: maybe the job one of those POSTs made
    page.wait_for_selector("#status-panel[data-status='queued']")
    assert keys[4] == keys[0]
    assert page.is_hidden("#message")
    assert page.evaluate("location.hash") == f"#job={FAKE_ID}"
    page.click("#cancel")
    _wait_for_message(page, "canceled", "submit-retried-canceled")

    job.update(status="queued", queue_position=0)
    page.click("#submit")  # a new submission
    page.wait_for_selector("#status-panel[data-status='queued']")
    assert len(keys) == 6 and keys[5] != keys[0] and re.fullmatch(r"[0-9a-f]{32}", keys[5] or "")
    assert (
        _unexpected_console(
            page, allowed=("status of 5", "ERR_CONNECTION_RESET", _refused(409, "/v1/restorations"))
        )
        == []
    )


@pytest.mark.parametrize(
    ("reasons", "code", "says"),
    [
        (["no worker is running"], "no_worker", "will wait in the queue"),
        (["no worker has its model loaded"], "no_model", "will wait in the queue"),
        (["redis unreachable: ConnectionError"], "redis_unreachable", "will fail"),
    ],
)
def test_the_readiness_notice_keeps_errors_and_says_what_a_submission_will_do(
    service: str, page: Any, reasons: list[str], code: str, says: str
) -> None:
    """/readyz may answer after the resumed job's 404 is shown: its notice has its own box. It is
    asked with the key (the detailed reasons), and worded by its reason."""
    held: list[Any] = []
    page.route(lambda url: url.endswith("/readyz"), lambda route: held.append(route))
    page.route(
        lambda url: bool(JOB_URL.search(url)),
        lambda route: route.fulfill(status=404, json=_error("not_found", "No restoration")),
    )
    page.add_init_script(f"sessionStorage.setItem('dynface.apiKey', '{API_KEY}')")
    page.goto(f"{service}/#job={FAKE_ID}")
    _wait_for_message(page, "not_found", "not-found-before-readyz")
    for _ in range(100):
        if held:
            break
        page.wait_for_timeout(50)
    assert held[0].request.headers.get("authorization") == f"Bearer {API_KEY}"
    ready = {"ready": False, "reasons": reasons, "auth": "api_key", "queue_depth": None, "workers": []}
    held[0].fulfill(status=503, json=ready)
    page.wait_for_selector(f"#notice[data-code='{code}']", state="visible")
    _screenshot(page, f"notice-{code}")
    assert says in page.inner_text("#notice-title")
    assert page.inner_text("#notice-detail") == f"Details: {reasons[0]}"
    assert page.get_attribute("#message", "data-code") == "not_found" and page.is_visible("#message")
    assert (
        _unexpected_console(
            page, allowed=(_refused(404, f"/v1/restorations/{FAKE_ID}"), _refused(503, "/readyz"))
        )
        == []
    )


@pytest.mark.parametrize(
    ("status", "code"), [(413, "too_large"), (401, "unauthorized"), (429, "rate_limited"), (404, "not_found")]
)
def test_a_proxy_error_page_is_read_by_its_status(service: str, page: Any, status: int, code: str) -> None:
    """An error answer that is not the API's JSON (a proxy's own HTML page) is told by its status."""
    page.route(
        lambda url: _is_submission(url),
        lambda route: route.fulfill(
            status=status,
            body=f"<html><body><h1>{status}</h1><hr>nginx</body></html>",
            content_type="text/html",
        ),
    )
    page.goto(service + "/")
    page.set_input_files("#file", files=[_photo()])
    page.click("#submit")
    _wait_for_message(page, code, f"proxy-{status}")
    assert _unexpected_console(page, allowed=(_refused(status, "/v1/restorations"),)) == []


def test_a_job_gone_behind_a_proxy_is_forgotten(service: str, page: Any) -> None:
    page.route(
        lambda url: bool(JOB_URL.search(url)),
        lambda route: route.fulfill(status=404, body="<html>Not Found</html>", content_type="text/html"),
    )
    page.goto(f"{service}/#job={FAKE_ID}")
    _wait_for_message(page, "not_found", "proxy-404-poll")
    assert page.evaluate("location.hash") == ""  # a reload does not look for it again
    assert _unexpected_console(page, allowed=(_refused(404, f"/v1/restorations/{FAKE_ID}"),)) == []


def test_an_aligned_photo_must_be_square(service: str, page: Any) -> None:
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    page.goto(service + "/")
    page.set_input_files("#file", files=[_photo("crop.png", 300, 200)])
    page.check("#aligned")
    page.click("#submit")
    text = _wait_for_message(page, "not_square", "error-not-square")
    assert "needs a square face crop" in text and "300×200" in text
    assert posts == []  # told before uploading
    assert page.is_enabled("#submit") and page.inner_text("#status-line") == ""
    assert _unexpected_console(page) == []


@pytest.mark.parametrize(
    ("code", "status", "photo", "says"),
    [
        ("output_too_large", 413, "photo.png", "a smaller upscale, or a smaller photo"),
        # what the API answers for a phone's HEIC photo (the file picker does not offer it; a drop may)
        (
            "unsupported_format",
            415,
            "IMG_0001.HEIC",
            "(nor is HEIC, the format of many phone photos). Save the photo as JPEG",
        ),
    ],
)
def test_advice_names_only_what_the_page_and_server_offer(
    service: str, page: Any, code: str, status: int, photo: str, says: str
) -> None:
    page.route(lambda url: _is_submission(url), lambda route: route.fulfill(status=status, json=_error(code)))
    page.goto(service + "/")
    page.set_input_files("#file", files=[_photo(photo)])
    page.click("#submit")
    _wait_for_message(page, code, f"advice-{code}")
    title = page.inner_text("#message-title")
    assert says in title
    assert "format." not in title or code == "unsupported_format"  # the page has no format control


def test_a_result_this_browser_cannot_show_has_its_own_text(service: str, page: Any) -> None:
    job = _fake_job(
        "succeeded",
        faces=[],
        outputs={"image": f"{service}/v1/restorations/{FAKE_ID}/image", "faces": []},
        urls={"self": "", "result": None, "cancel": ""},
    )

    def handle(route: Any) -> None:
        if route.request.url.endswith("/image"):
            route.fulfill(body=b"not really a picture", content_type="image/png")
        else:
            route.fulfill(json=job)

    page.route(lambda url: "/v1/restorations/" in url, handle)
    page.goto(f"{service}/#job={FAKE_ID}")
    text = _wait_for_message(page, "display_failed", "error-display-failed")
    assert "cannot display" in text and "Pick a" not in text
    assert page.is_visible("#download-image")  # the result can still be saved
    assert _unexpected_console(page) == []


def test_a_bug_in_the_page_is_not_blamed_on_the_server(service: str, page: Any) -> None:
    """A face the page cannot draw made drawBoxes throw before the restored faces were listed: they
    are listed all the same, the half-drawn picture is not shown, and the bug is told as the page's."""
    elsewhere = f"{service}/v1/restorations/{FAKE_ID}"
    job = _fake_job(
        "succeeded",
        faces=[{"box": None}],  # one the page cannot draw: drawBoxes throws
        outputs={"image": f"{elsewhere}/image", "faces": [f"{elsewhere}/faces/0"]},
        urls={"self": "", "result": None, "cancel": ""},
    )

    page.route(lambda url: "/v1/restorations" in url, _answering(job))
    page.goto(service + "/")
    page.set_input_files("#file", str(FACE))
    page.click("#submit")
    text = _wait_for_message(page, "page_error", "error-page-bug")
    assert "in this page" in text and "on the server" not in text
    assert page.eval_on_selector_all("#faces img", "imgs => imgs.map(i => i.alt)") == ["Restored face 1"]
    assert page.is_hidden("#boxes")
    assert _unexpected_console(page) == []


def test_the_face_boxes_of_a_big_photo_are_drawn_smaller(service: str, page: Any) -> None:
    """The face boxes were drawn on a canvas of the photo's own size (40 MP is accepted), over what
    iOS Safari draws: it is at most 2048 px a side now, and the boxes are scaled with the photo."""
    elsewhere = f"{service}/v1/restorations/{FAKE_ID}"
    job = _fake_job(
        "succeeded",
        faces=[{"box": [300, 300, 900, 900]}],
        outputs={"image": f"{elsewhere}/image", "faces": [f"{elsewhere}/faces/0"]},
        urls={"self": "", "result": None, "cancel": ""},
    )
    page.route(lambda url: "/v1/restorations" in url, _answering(job))
    page.goto(service + "/")
    page.set_input_files("#file", files=[_photo("big.png", 3000, 1500)])
    page.click("#submit")
    page.wait_for_selector("#boxes", state="visible", timeout=30_000)
    _screenshot(page, "big-photo-boxes")
    assert page.eval_on_selector("#boxes", "c => [c.width, c.height]") == [2048, 1024]
    scale = 2048 / 3000  # the box's left edge, 300 px into the photo, is drawn at 205 px
    pixel = "(c, [x, y]) => [...c.getContext('2d').getImageData(x, y, 1, 1).data.slice(0, 3)]"
    assert page.eval_on_selector("#boxes", pixel, [round(300 * scale), 400]) == [0x34, 0xE0, 0x7A]
    assert page.eval_on_selector("#boxes", pixel, [300, 400]) == [120, 90, 60]  # the photo, in the box
    assert page.eval_on_selector_all("#faces img", "imgs => imgs.length") == 1
    assert _unexpected_console(page) == []


def test_the_status_sentence_is_a_live_region_before_its_first_status(service: str, page: Any) -> None:
    """A live region shown in the same step as its first text is not read out: the status sentence is
    in the accessibility tree (emptied, out of sight) from the start, so "Uploading the photo" is."""
    held: list[Any] = []
    page.route(lambda url: _is_submission(url), lambda route: held.append(route))
    page.goto(service + "/")
    # in the accessibility tree: no ancestor is display: none
    rendered = """e => {
        for (let n = e; n; n = n.parentElement) if (getComputedStyle(n).display === "none") return false;
        return true;
    }"""
    assert page.eval_on_selector("#status-text", rendered)
    assert page.inner_text("#status-text") == ""
    assert not page.eval_on_selector("#progress", rendered)  # no empty progress bar meanwhile
    page.set_input_files("#file", files=[_photo()])
    page.click("#submit")
    _wait_status_line(page, "Uploading the photo…")
    assert page.is_visible("#status-panel h2") and page.is_visible("#progress")
    assert page.get_attribute("#status-text", "aria-live") == "polite"


# ---------------------------------------------------------------- Cancel of a submission whose answer is lost

ANSWER_TIMEOUT_MS = 60_000  # app.js: a POST unanswered this long after its body went out is tried again


@pytest.fixture(scope="module")
def bare_service(redis_conn, browser) -> Iterator[str]:
    """The open API with no worker: a job it stores stays queued until it is canceled."""
    settings = base_settings(uuid.uuid4().hex[:10])
    try:
        with LiveServer(settings) as server:
            yield server.url
    finally:
        purge(redis_conn, settings)


def _run_clock_until(pg: Any, code: str, limit_ms: int = 30_000) -> int:
    """Move the page's paused fake clock on, 500 ms at a time, until #message shows ``code``."""
    advanced = 0
    while pg.get_attribute("#message", "data-code") != code and advanced < limit_ms:
        pg.clock.run_for(500)
        advanced += 500
    return advanced


@pytest.mark.parametrize("stored", [True, False], ids=["answer-lost", "never-arrived"])
def test_cancel_before_a_retried_submission_deletes_the_job_it_may_have_made(
    bare_service: str, page: Any, stored: bool
) -> None:
    """A POST that got no answer may have stored its job. Cancel in the wait before the retry used to
    stop there ("The upload was canceled"), leaving that job to run: the retry, with the same
    Idempotency-Key, now goes on to learn the job (the API replays the stored one; with none stored
    it makes one) and the page deletes it, saying "Cancel requested…" meanwhile."""
    posts: list[tuple[str | None, str | None, str]] = []  # (key, Idempotent-Replayed, job id)
    first: list[str | None] = []  # the id of the job the first POST stored (its answer lost), or None
    deletes: list[str] = []

    def handle(route: Any) -> None:
        request = route.request
        if request.method == "POST" and not first:
            first.append(route.fetch().json()["id"] if stored else None)  # stored, or never arrived
            route.abort("connectionreset")  # the answer is lost
            return
        if request.method == "POST":
            answer = route.fetch()
            posts.append(
                (
                    request.headers.get("idempotency-key"),
                    answer.headers.get("idempotent-replayed"),
                    answer.json()["id"],
                )
            )
            route.fulfill(response=answer)
            return
        if request.method == "DELETE":
            deletes.append(request.url.rsplit("/", 1)[1])
        route.fallback()

    page.route(lambda url: "/v1/restorations" in url, handle)
    _open_on_paused_clock(page, bare_service + "/")
    page.set_input_files("#file", files=[_photo()])
    with page.expect_request(lambda r: _is_submission(r.url)) as sent:
        page.click("#submit")
    key = sent.value.headers.get("idempotency-key")
    page.wait_for_selector("#message[data-code='reconnecting']", state="visible")
    page.click("#cancel")  # in the wait before the retry
    assert page.inner_text("#status-line") == "Cancel requested…"
    assert page.is_disabled("#cancel") and page.is_disabled("#submit")
    assert page.get_attribute("#message", "data-code") == "reconnecting"  # not "upload_canceled"

    _run_clock_until(page, "canceled")
    _screenshot(page, f"cancel-before-retry-{'stored' if stored else 'not-stored'}")
    assert page.get_attribute("#message", "data-code") == "canceled"
    assert page.inner_text("#status-line") == "Canceled."
    assert len(posts) == 1 and posts[0][0] == key
    job_id = posts[0][2]
    if stored:
        assert posts[0][1] == "true" and job_id == first[0]  # the job the lost answer was for
    else:
        assert posts[0][1] is None  # none was stored: the retry made it, and it goes at once
    assert deletes == [job_id]
    assert httpx.get(f"{bare_service}/v1/restorations/{job_id}").json()["status"] == "canceled"
    assert page.is_enabled("#submit") and page.is_hidden("#cancel")
    allowed = (_refused(503, "/readyz"), "ERR_CONNECTION_RESET")  # /readyz: no worker here
    assert _unexpected_console(page, allowed=allowed) == []


def test_cancel_that_cannot_learn_the_job_says_it_may_exist(service: str, page: Any) -> None:
    """When no try answers, the page cannot know whether a job was stored: it says so (not "The upload
    was canceled"), and submitting the same photo again uses the same Idempotency-Key, so it finds
    that job rather than making a second."""
    keys: list[str | None] = []
    methods: list[str] = []

    def handle(route: Any) -> None:
        request = route.request
        methods.append(request.method)
        if request.method == "POST":
            keys.append(request.headers.get("idempotency-key"))
            if len(keys) <= 4:  # the first try and its three retries: no answer
                route.abort("connectionreset")
                return
        route.fulfill(
            status=202 if request.method == "POST" else 200, json=_fake_job("queued", queue_position=0)
        )

    page.route(lambda url: "/v1/restorations" in url, handle)
    _open_on_paused_clock(page, service + "/")
    page.set_input_files("#file", files=[_photo()])
    page.click("#submit")
    page.wait_for_selector("#message[data-code='reconnecting']", state="visible")
    page.click("#cancel")
    _record_texts(page, "status-text")
    _run_clock_until(page, "cancel_unconfirmed")
    text = _wait_for_message(page, "cancel_unconfirmed", "cancel-unconfirmed")
    assert "may still run" in text and "same photo" in text, text
    assert _recorded_texts(page) == [""]  # "Cancel requested…" until the page gave up (then emptied)
    assert methods == ["POST"] * 4  # no id was learnt: nothing to DELETE
    assert page.is_enabled("#submit") and page.is_hidden("#cancel")
    assert page.evaluate("location.hash") == ""

    page.click("#submit")  # the same photo and options: finds the job, if there is one
    page.wait_for_selector("#status-panel[data-status='queued']")
    assert len(keys) == 5 and set(keys) == {keys[0]}
    assert _unexpected_console(page, allowed=("ERR_CONNECTION_RESET",)) == []


@pytest.mark.parametrize("cancel", [False, True], ids=["waiting", "cancel-requested"])
@pytest.mark.parametrize(
    ("status", "code", "kept"),
    [
        (429, "too_many_active_jobs", True),
        (503, "queue_full", True),
        (401, "unauthorized", True),
        (415, "unsupported_format", False),  # the first try, had it arrived, was refused the same
    ],
)
def test_a_refusal_after_an_unanswered_try_keeps_its_key_unless_it_refuses_the_photo(
    service: str, page: Any, status: int, code: str, kept: bool, cancel: bool
) -> None:
    """The first try went unanswered (it may have stored its job) and its retry was refused for a
    reason that comes and goes: the page forgot the key (submitting again made a second job) and,
    after Cancel, said "The upload was canceled". The key is kept, and the page says it cannot tell;
    only a refusal of the photo itself proves that no job was stored."""
    keys: list[str | None] = []

    def handle(route: Any) -> None:
        keys.append(route.request.headers.get("idempotency-key"))
        if len(keys) == 1:
            route.abort("connectionreset")  # no answer: the job may have been stored
        elif len(keys) == 2:
            route.fulfill(status=status, json=_error(code))
        else:
            route.fulfill(status=202, json=_fake_job("queued", queue_position=0))

    page.route(lambda url: _is_submission(url), handle)
    _open_on_paused_clock(page, service + "/")
    page.set_input_files("#file", files=[_photo()])
    page.click("#submit")
    page.wait_for_selector("#message[data-code='reconnecting']", state="visible")
    if cancel:
        page.click("#cancel")
    shown = ("cancel_unconfirmed" if kept else "upload_canceled") if cancel else code
    _run_clock_until(page, shown)
    _wait_for_message(page, shown, f"refused-after-unanswered-{code}-{'cancel' if cancel else 'wait'}")
    assert len(keys) == 2 and keys[1] == keys[0]
    page.click("#submit")  # the same photo and options
    page.wait_for_selector("#status-panel[data-status='queued']")
    assert len(keys) == 3 and (keys[2] == keys[0]) == kept
    allowed = ("ERR_CONNECTION_RESET", _refused(status, "/v1/restorations"))
    assert _unexpected_console(page, allowed=allowed) == []


def test_the_same_photo_picked_again_is_submitted_with_the_key_of_its_unsure_try(
    service: str, page: Any, tmp_path: Path
) -> None:
    """ "The same photo" was the same File object: picking the file again (a new one) after a
    submission whose outcome is unknown made a new Idempotency-Key, so a job that submission stored
    would have been made twice. It is the same file (name, size, time, type) now."""
    keys: list[str | None] = []

    def handle(route: Any) -> None:
        keys.append(route.request.headers.get("idempotency-key"))
        if len(keys) <= 4:  # the first try and its three retries: no answer
            route.abort("connectionreset")
        else:
            route.fulfill(status=202, json=_fake_job("queued", queue_position=0))

    photo = tmp_path / "photo.png"
    photo.write_bytes(_png(64, 64))
    page.route(lambda url: _is_submission(url), handle)
    _open_on_paused_clock(page, service + "/")
    page.set_input_files("#file", str(photo))
    page.click("#submit")
    page.wait_for_selector("#message[data-code='reconnecting']", state="visible")
    _run_clock_until(page, "network")
    _wait_for_message(page, "network", "same-photo-picked-again")
    # picked again, after another one (a browser fires no "change" for the file the input holds): a
    # new File object
    page.set_input_files("#file", files=[_photo("other.png")])
    page.set_input_files("#file", str(photo))
    page.click("#submit")
    page.wait_for_selector("#status-panel[data-status='queued']")
    assert len(keys) == 5 and set(keys) == {keys[0]}
    assert _unexpected_console(page, allowed=("ERR_CONNECTION_RESET",)) == []


def test_another_photo_of_the_same_name_and_size_gets_a_key_of_its_own(
    service: str, page: Any, tmp_path: Path
) -> None:
    """A photo is known by name, size and type (its date is the time of the pick on iOS): another one
    alike after an unanswered try is sent with that try's key, the API answers 409
    idempotency_conflict (another body), and the page sends it again with a key of its own."""
    keys: list[str | None] = []

    def handle(route: Any) -> None:
        keys.append(route.request.headers.get("idempotency-key"))
        if len(keys) <= 4:  # the first try and its three retries: no answer
            route.abort("connectionreset")
        elif len(keys) == 5:
            message = "This Idempotency-Key was used with a different request body."
            route.fulfill(status=409, json=_error("idempotency_conflict", message))
        else:
            route.fulfill(status=202, json=_fake_job("queued", queue_position=0))

    page.route(lambda url: _is_submission(url), handle)
    _open_on_paused_clock(page, service + "/")
    page.set_input_files("#file", files=[_photo()])
    page.click("#submit")
    page.wait_for_selector("#message[data-code='reconnecting']", state="visible")
    _run_clock_until(page, "network")
    _wait_for_message(page, "network", "alike-photo-first-try")
    other_colour = io.BytesIO()
    Image.new("RGB", (64, 64), (60, 90, 120)).save(other_colour, "PNG")
    assert len(other_colour.getvalue()) == len(_png(64, 64)) and other_colour.getvalue() != _png(64, 64)
    alike = {"name": "photo.png", "mimeType": "image/png", "buffer": other_colour.getvalue()}
    page.set_input_files("#file", files=[_photo("other.png")])
    page.set_input_files("#file", files=[alike])
    page.click("#submit")
    page.wait_for_selector("#status-panel[data-status='queued']")
    assert len(keys) == 6 and set(keys[:5]) == {keys[0]} and keys[5] not in (None, keys[0]), keys
    assert (
        _unexpected_console(page, allowed=("ERR_CONNECTION_RESET", _refused(409, "/v1/restorations"))) == []
    )


class FirstSubmissionUnanswered:
    """ASGI app in front of the API: reads the first POST /v1/restorations whole and never answers it
    (it ends when the client gives up); everything else goes to the API."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.hung = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        first = scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/v1/restorations"
        if first and not self.hung.is_set():
            while (await receive()).get("more_body", False):
                pass
            self.hung.set()
            await receive()  # http.disconnect: the client gave up
            return
        await self.app(scope, receive, send)


@pytest.mark.parametrize("cancel", [False, True], ids=["waiting", "cancel-requested"])
def test_a_submission_the_server_never_answers_is_tried_again(
    redis_conn, browser, page: Any, cancel: bool
) -> None:
    """A POST whose body is all sent and that is never answered left the page waiting for good, with
    Cancel (once pressed) and Restore disabled until a reload: it is given up after ANSWER_TIMEOUT_MS
    and tried again with the same Idempotency-Key. After Cancel, the retry only learns the job (its
    upload does not replace "Cancel requested…"), which is then deleted."""
    settings = base_settings(uuid.uuid4().hex[:10])
    fronts: list[FirstSubmissionUnanswered] = []

    def wrap(app: Any) -> FirstSubmissionUnanswered:
        fronts.append(FirstSubmissionUnanswered(app))
        return fronts[0]

    try:
        with LiveServer(settings, wrap=wrap) as server:
            _open_on_paused_clock(page, server.url + "/")
            page.set_input_files("#file", files=[_photo()])
            page.click("#submit")
            _wait_status_line(page, "Uploading the photo: 100%")  # the whole body is sent
            assert fronts[0].hung.wait(10)
            _record_texts(page, "status-text")
            if cancel:
                page.click("#cancel")
                _wait_status_line(page, "Cancel requested…")
                assert page.is_disabled("#cancel") and page.is_disabled("#submit")
            page.clock.run_for(ANSWER_TIMEOUT_MS - 1000)
            page.wait_for_timeout(200)
            assert page.is_hidden("#message")  # still waiting for the answer
            if cancel:
                _run_clock_until(page, "canceled")
                assert page.inner_text("#status-line") == "Canceled."
                # the retry's upload did not replace it
                assert _recorded_texts(page) == ["Cancel requested…", "Canceled."]
                expected = "canceled"
            else:
                _run_clock_until(page, "reconnecting")  # the first try given up
                page.clock.run_for(1000)  # the wait before the retry
                page.wait_for_selector("#status-panel[data-status='queued']", timeout=10_000)
                expected = "queued"
            _screenshot(page, f"never-answered-{'canceled' if cancel else 'retried'}")
            job_id = page.evaluate("location.hash").removeprefix("#job=")
            r = httpx.get(f"{server.url}/v1/restorations/{job_id}")
            assert r.status_code == 200 and r.json()["status"] == expected
    finally:
        purge(redis_conn, settings)
    assert _unexpected_console(page, allowed=(_refused(503, "/readyz"),)) == []  # /readyz: no worker here


# ---------------------------------------------------------------- messages and the readiness notice


def test_a_repeated_error_shows_its_new_wait_and_asks_for_the_key_again(service: str, page: Any) -> None:
    """The same error again is left as it is only when it reads the same: a new Retry-After is shown,
    and "unauthorized" takes the focus to the key each time."""
    job = _fake_job("processing", stage="sample", progress={"step": 1, "total": 50})
    refusals: list[dict[str, Any]] = [
        {"status": 429, "headers": {"Retry-After": "30"}, "json": _error("rate_limited")},
        {"status": 429, "headers": {"Retry-After": "10"}, "json": _error("rate_limited")},
        {"status": 401, "json": _error("unauthorized", "A valid API key is required.")},
        {"status": 401, "json": _error("unauthorized", "A valid API key is required.")},
    ]

    def handle(route: Any) -> None:
        method = route.request.method
        if method == "DELETE":
            route.fulfill(**refusals.pop(0))
        else:
            route.fulfill(status=202 if method == "POST" else 200, json=job)

    def title_is(text: str) -> None:
        page.wait_for_function(
            "t => document.getElementById('message-title').textContent === t", arg=text, timeout=10_000
        )

    page.add_init_script(
        "document.addEventListener('focusin', (e) => {"
        " if (e.target.id === 'api-key') window.keyFocused = (window.keyFocused || 0) + 1; });"
    )
    _submit_until_sampling(page, service, handle)
    page.click("#cancel")
    title_is("Too many photos submitted in the last minute. Try again in 30 s.")
    page.click("#cancel")
    title_is("Too many photos submitted in the last minute. Try again in 10 s.")
    page.click("#cancel")
    _wait_for_message(page, "unauthorized", "repeated-unauthorized")
    page.wait_for_function("() => window.keyFocused === 1", timeout=10_000)
    page.click("#cancel")  # the focus leaves the key field for the button
    page.wait_for_function("() => window.keyFocused === 2", timeout=10_000)
    assert page.evaluate("document.activeElement.id") == "api-key"
    assert refusals == []
    assert (
        _unexpected_console(
            page,
            allowed=(
                _refused(429, f"/v1/restorations/{FAKE_ID}"),
                _refused(401, f"/v1/restorations/{FAKE_ID}"),
            ),
        )
        == []
    )


@pytest.mark.parametrize(
    ("reasons", "code", "proof"),
    [
        (["no worker is running"], "no_worker", "processing"),  # a worker took the job
        (["redis unreachable: ConnectionError"], "redis_unreachable", "queued"),  # the job was stored
    ],
)
def test_a_job_outdates_the_readiness_notice(
    service: str, page: Any, reasons: list[str], code: str, proof: str
) -> None:
    """The notice said what /readyz said when the page was opened: a job that was stored, or that a
    worker took, proves otherwise (it stayed on screen beside the result), and its end asks again."""
    readyz: list[int] = []

    def ready(route: Any) -> None:
        readyz.append(1)
        body = {"ready": len(readyz) > 1, "auth": "open", "queue_depth": 0, "workers": []}
        route.fulfill(
            status=503 if len(readyz) == 1 else 200,
            json={**body, "reasons": reasons if len(readyz) == 1 else []},
        )

    job = _fake_job(
        "queued",
        queue_position=0,
        faces=[],
        outputs={"image": f"{service}/v1/restorations/{FAKE_ID}/image", "faces": []},
        urls={"self": "", "result": None, "cancel": ""},
    )

    page.route(lambda url: url.endswith("/readyz"), ready)
    page.route(lambda url: "/v1/restorations" in url, _answering(job))
    page.goto(service + "/")
    page.wait_for_selector(f"#notice[data-code='{code}']", state="visible")
    page.set_input_files("#file", files=[_photo()])
    page.click("#submit")
    page.wait_for_selector("#status-panel[data-status='queued']")
    assert page.is_visible("#notice") == (proof != "queued")  # a queued job says nothing of workers
    job.update(status="processing", stage="sample", progress={"step": 1, "total": 50}, queue_position=None)
    _wait_status_line(page, "Processing: diffusion sampling (step 1 of 50)")
    assert page.is_hidden("#notice")
    assert len(readyz) == 1  # hidden for what the job showed, not asked again yet
    job.update(status="succeeded", stage=None, progress=None)
    page.wait_for_selector("#results[data-loaded='true']", state="visible", timeout=10_000)
    _screenshot(page, f"notice-outdated-{code}")
    assert page.is_hidden("#notice")
    for _ in range(100):  # the re-check made as the job ended
        if len(readyz) == 2:
            break
        page.wait_for_timeout(50)
    assert len(readyz) == 2
    assert _unexpected_console(page, allowed=(_refused(503, "/readyz"),)) == []


def test_a_photo_refused_by_the_page_keeps_the_key_of_an_unsure_submission(service: str, page: Any) -> None:
    """A refusal of the page's own (not_square: nothing is sent) said nothing about the earlier
    submission whose outcome is unknown: submitting that one again must still reuse its key."""
    keys: list[str | None] = []

    def handle(route: Any) -> None:
        if route.request.method == "POST":
            keys.append(route.request.headers.get("idempotency-key"))
            if len(keys) <= 4:  # the first try and its three retries
                route.fulfill(status=503, json=_error("redis_unavailable", "down"))
                return
        route.fulfill(status=202 if route.request.method == "POST" else 200, json=_fake_job("queued"))

    page.route(lambda url: "/v1/restorations" in url, handle)
    _open_on_paused_clock(page, service + "/")
    page.set_input_files("#file", files=[_photo("crop.png", 300, 200)])
    page.click("#submit")
    page.wait_for_selector("#message[data-code='reconnecting']", state="visible")
    _run_clock_until(page, "redis_unavailable")
    _wait_for_message(page, "redis_unavailable", "unsure-then-not-square")
    page.check("#aligned")
    page.click("#submit")
    _wait_for_message(page, "not_square", "unsure-not-square")
    page.uncheck("#aligned")
    page.click("#submit")  # the unsure submission again
    page.wait_for_selector("#status-panel[data-status='queued']")
    assert len(keys) == 5 and set(keys) == {keys[0]}
    assert _unexpected_console(page, allowed=(_refused(503, "/v1/restorations"),)) == []


@pytest.mark.parametrize("late", [False, True], ids=["before-the-end", "after-the-end"])
def test_a_cancel_that_came_too_late_is_not_left_above_the_result(
    service: str, page: Any, late: bool
) -> None:
    """DELETE answered 409 not_cancelable: the job has ended. Its error stayed above the result: the
    end state (polled at once) now takes its place, and one that comes once the end is shown is not
    shown at all."""
    job = _fake_job(
        "processing",
        stage="sample",
        progress={"step": 1, "total": 50},
        faces=[],
        outputs={"image": f"{service}/v1/restorations/{FAKE_ID}/image", "faces": []},
        urls={"self": "", "result": None, "cancel": ""},
    )
    held: list[Any] = []
    too_late = {"status": 409, "json": _error("not_cancelable", "The job is already succeeded.")}

    def handle(route: Any) -> None:
        method = route.request.method
        if route.request.url.endswith("/image"):
            route.fulfill(body=FACE.read_bytes(), content_type="image/png")
        elif method == "DELETE":
            job.update(status="succeeded", stage=None, progress=None)
            if late:
                held.append(route)
            else:
                route.fulfill(**too_late)
        else:
            route.fulfill(status=202 if method == "POST" else 200, json=job)

    _submit_until_sampling(page, service, handle)
    page.click("#cancel")
    page.wait_for_selector("#results[data-loaded='true']", state="visible", timeout=10_000)
    if late:
        with page.expect_response(lambda r: r.request.method == "DELETE"):
            held[0].fulfill(**too_late)
        page.wait_for_timeout(300)  # its handling: nothing to wait for when it is right
    _screenshot(page, f"cancel-too-late-{'after' if late else 'before'}")
    assert page.inner_text("#status-line") == "Done."
    assert page.is_hidden("#message"), page.inner_text("#message")
    assert _unexpected_console(page, allowed=(_refused(409, f"/v1/restorations/{FAKE_ID}"),)) == []
