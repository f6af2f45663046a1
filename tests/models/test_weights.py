"""Weights manifest, pull (against a local HTTP server), verify, offline mode and the CLI."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import ValidationError

from models import weights as W
from models.weights import MANIFEST, MissingWeightsError, WeightFile, missing_for, pull, verify
from tests.conftest import http_server, wait_for

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
PAYLOAD = bytes(range(256)) * 400  # 100 KiB
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


PATHS = (
    "/good.bin",
    "/norange.bin",
    "/flaky.bin",
    "/truncated.bin",
    "/slow.bin",
    "/reset.bin",
    "/unavailable.bin",
    "/down.bin",
)

needs_non_root = pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")


class _Handler(BaseHTTPRequestHandler):
    """Serves PAYLOAD under several behaviours:

    /good.bin      honours Range (206 + Content-Range), as GitHub's release CDN does; a Range past
                   the end gets 416 with `Content-Range: bytes */<size>`
    /norange.bin   ignores Range and always sends the whole file with 200
    /flaky.bin     the first request promises the payload, sends half and hangs up; later ones are good
    /truncated.bin always promises what was asked for, sends half of it and hangs up
    /slow.bin      the first request sends half, then waits until another request arrives (or 1 s)
    /reset.bin     the first request promises the payload, sends half and resets the connection (RST)
    /unavailable.bin the first request gets `unavailable` (a 5xx status); later ones are good
    /down.bin      every request gets 503

    With `etag` set, HEAD and GET send it as the ETag and a Range whose If-Range names another
    version is ignored (RFC 9110 13.1.5). `requests` logs GETs: (path, Range, If-Range).
    """

    requests: ClassVar[list[tuple[str, str | None, str | None]]] = []
    etag: ClassVar[str | None] = None
    unavailable: ClassVar[int] = 503
    another_request: ClassVar[threading.Event] = threading.Event()

    def do_HEAD(self) -> None:
        if self.path not in PATHS:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        if self.etag:
            self.send_header("ETag", self.etag)
        self.end_headers()

    def do_GET(self) -> None:
        type(self).requests.append((self.path, self.headers.get("Range"), self.headers.get("If-Range")))
        if self.path not in PATHS:
            self.send_error(404)
            return
        first = sum(p == self.path for p, _, _ in self.requests) == 1
        if not first:
            self.another_request.set()
        if self.path == "/down.bin" or (first and self.path == "/unavailable.bin"):
            self.send_response(503 if self.path == "/down.bin" else self.unavailable)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        ranged = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if ranged and self.path != "/norange.bin" and (if_range is None or if_range == self.etag):
            start = int(ranged.removeprefix("bytes=").split("-")[0])
        if start >= len(PAYLOAD):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = PAYLOAD[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        if self.etag:
            self.send_header("ETag", self.etag)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.end_headers()
        if self.path == "/truncated.bin" or (first and self.path == "/flaky.bin"):
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
        elif first and self.path == "/reset.bin":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            # Closed with a zero linger time: the client gets a reset (ECONNRESET), not an end of file.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
        elif first and self.path == "/slow.bin":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            # A second pull that does not wait for this one asks now, and both stream at once; one
            # that waits never asks while this download runs, so after 1 s it completes.
            self.another_request.wait(timeout=1.0)
            self.wfile.write(body[len(body) // 2 :])
        else:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with http_server(_Handler) as url:
        yield url


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.file_download

    monkeypatch.delenv("DYNFACE_OFFLINE", raising=False)
    monkeypatch.delenv("DYNFACE_WEIGHTS_DIR", raising=False)
    monkeypatch.delenv("DYNFACE_PROFILE", raising=False)
    # A pull pauses 1 s before each retry (and huggingface_hub's backoff starts there); the local
    # server needs none.
    monkeypatch.setattr(W, "_RETRY_PAUSE_S", 0.0)
    # A pull writes in huggingface_hub's 10 MB chunks, so a cut 100 KiB test file would leave nothing
    # to resume from.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    _Handler.requests.clear()
    _Handler.etag = None
    _Handler.unavailable = 503
    _Handler.another_request = threading.Event()


def entry(
    url: str, *, name: str = "good", sha: str | None = PAYLOAD_SHA, size: int | None = len(PAYLOAD)
) -> WeightFile:
    return WeightFile(
        name=name,
        path=f"{name}.bin",
        url=url,
        size=size,
        sha256=sha,
        description="test file",
    )


def leftovers(directory: Path) -> list[str]:
    """Every file under `directory`, relative, so a stray partial download anywhere shows up; but the
    empty lock files, which stay by design."""
    return sorted(
        str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.suffix != ".lock"
    )


def leave_partial(
    directory: Path, data: bytes, url: str, validator: str | None = '"v1"', total: int | None = None
) -> Path:
    """What an interrupted pull of `url` leaves: the bytes so far, and where they came from (the
    version and full length its server named)."""
    partial = directory / W.PARTIAL_DIR / "good.bin"
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(data)
    record = {"url": url, "validator": validator, "total": total}
    (partial.parent / "good.bin.json").write_text(json.dumps(record))
    return partial


def head_fails(self: BaseHTTPRequestHandler) -> None:
    """A server (or proxy) that refuses HEAD: the download learns the version from the GET alone."""
    self.send_error(501)


def test_good_file_is_pulled_and_verified(server: str, tmp_path: Path) -> None:
    manifest = [entry(f"{server}/good.bin")]
    statuses = pull(weights_dir=tmp_path, progress=False, manifest=manifest)
    assert [(s.name, s.state) for s in statuses] == [("good", "present")]
    assert (tmp_path / "good.bin").read_bytes() == PAYLOAD
    assert leftovers(tmp_path) == ["good.bin"]  # no partial file left behind
    assert verify(tmp_path, manifest=manifest)[0].state == "present"
    # Already present: pulling again does not download again.
    pull(weights_dir=tmp_path, progress=False, manifest=manifest)
    assert _Handler.requests == [("/good.bin", None, None)]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bar_is_shown_on_a_terminal_only(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, terminal: bool
) -> None:
    """A worker pulls with progress on: in a log file or a container's log (no terminal) each refresh
    of the bar was one more line."""
    err = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    pull(weights_dir=tmp_path, progress=True, manifest=[entry(f"{server}/good.bin")])
    assert ("good.bin" in err.getvalue() and "100%" in err.getvalue()) is terminal
    (tmp_path / "good.bin").unlink()
    pull(weights_dir=tmp_path, progress=False, manifest=[entry(f"{server}/good.bin")])
    assert err.getvalue().count("100%") == (1 if terminal else 0)  # progress=False: never a bar


def test_wrong_checksum_leaves_nothing(server: str, tmp_path: Path) -> None:
    """A DownloadError naming the file, as a network failure is, so a worker reports it in
    `missing_weights` and retries instead of exiting."""
    manifest = [entry(f"{server}/good.bin", sha="0" * 64)]
    with pytest.raises(W.DownloadError, match=r"good \(good.bin\).*hash mismatch.*--only good") as err:
        pull(weights_dir=tmp_path, progress=False, manifest=manifest)
    assert err.value.names == ["good"]
    assert leftovers(tmp_path) == []  # a wrong file is not kept for resuming either
    assert verify(tmp_path, manifest=manifest)[0].state == "missing"


def test_wrong_size_without_checksum_leaves_nothing(server: str, tmp_path: Path) -> None:
    manifest = [entry(f"{server}/good.bin", sha=None, size=len(PAYLOAD) + 1)]
    with pytest.raises(W.DownloadError) as err:
        pull(weights_dir=tmp_path, progress=False, manifest=manifest)
    assert err.value.names == ["good"]
    assert not (tmp_path / "good.bin").exists()


@pytest.mark.parametrize("sha", [PAYLOAD_SHA, None])
@pytest.mark.parametrize("head", ["ok", "fails"])
def test_truncated_download_fails_and_never_reaches_the_final_path(
    server: str, tmp_path: Path, sha: str | None, head: str
) -> None:
    """What arrived is kept for the next pull with the version the server named: the HEAD's, or, where
    the HEAD fails, the GET's (before, a partial begun without a HEAD had no version and was later
    resumed blind)."""
    _Handler.etag = '"v1"'
    manifest = [entry(f"{server}/truncated.bin", sha=sha)]
    with pytest.MonkeyPatch.context() as m:
        if head == "fails":
            m.setattr(_Handler, "do_HEAD", head_fails)
        with pytest.raises(W.DownloadError, match="next pull resumes"):
            pull(weights_dir=tmp_path, progress=False, manifest=manifest)
    assert not (tmp_path / "good.bin").exists()
    assert verify(tmp_path, manifest=manifest)[0].state == "missing"
    # What did arrive waits under .partial/ for the next pull, beside where it came from; it is a
    # prefix of the real file.
    kept = f"{W.PARTIAL_DIR}/good.bin"
    assert leftovers(tmp_path) == [kept, f"{kept}.json"]
    record = json.loads((tmp_path / f"{kept}.json").read_text())
    assert record == {"url": manifest[0].url, "validator": '"v1"', "total": len(PAYLOAD)}
    part = (tmp_path / kept).read_bytes()
    assert 0 < len(part) < len(PAYLOAD) and PAYLOAD.startswith(part)
    # Every retry within the pull asked for the rest of that version only.
    assert all(r[2] == '"v1"' for r in _Handler.requests[1:]) and len(_Handler.requests) > 1


def test_truncated_download_of_an_unnamed_version_keeps_nothing(server: str, tmp_path: Path) -> None:
    """A server that names no version (no ETag, no Last-Modified): bytes from it cannot be told from
    another version's, so a pull never resumes them, within the call or in the next one, and keeps none."""
    manifest = [entry(f"{server}/truncated.bin", sha=None)]
    with pytest.raises(W.DownloadError) as err:
        pull(weights_dir=tmp_path, progress=False, manifest=manifest)
    assert "resume" not in str(err.value)
    assert leftovers(tmp_path) == []
    assert {r[1:] for r in _Handler.requests} == {(None, None)}  # every retry from the start


@pytest.mark.parametrize("head", ["ok", "fails"])
def test_dropped_connection_is_resumed_with_a_range_request(server: str, tmp_path: Path, head: str) -> None:
    """The retry after a dropped connection asks for the rest of the version it began, with If-Range
    (before, a download begun from zero retried with a bare Range: a file replaced in between was
    spliced); that version comes from the GET where the HEAD fails."""
    _Handler.etag = '"v1"'
    manifest = [entry(f"{server}/flaky.bin")]
    with pytest.MonkeyPatch.context() as m:
        if head == "fails":
            m.setattr(_Handler, "do_HEAD", head_fails)
        assert pull(weights_dir=tmp_path, progress=False, manifest=manifest)[0].state == "present"
    assert (tmp_path / "good.bin").read_bytes() == PAYLOAD
    (first, retry) = _Handler.requests
    assert first == ("/flaky.bin", None, None)
    # The retry asks only for what is missing (what arrived, rounded down to whole chunks).
    resumed_at = int(retry[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= len(PAYLOAD) // 2
    assert retry[2] == '"v1"'
    assert leftovers(tmp_path) == ["good.bin"]


def test_reset_connection_is_resumed(server: str, tmp_path: Path) -> None:
    """A connection reset mid-download (httpx's ReadError) is retried like a dropped one (before, only
    refused connections, timeouts and early ends were: a reset failed the pull at once)."""
    _Handler.etag = '"v1"'
    manifest = [entry(f"{server}/reset.bin")]
    assert pull(weights_dir=tmp_path, progress=False, manifest=manifest)[0].state == "present"
    assert (tmp_path / "good.bin").read_bytes() == PAYLOAD
    assert [r[0] for r in _Handler.requests] == ["/reset.bin", "/reset.bin"]
    assert leftovers(tmp_path) == ["good.bin"]


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_a_passing_server_error_is_retried(server: str, tmp_path: Path, status: int) -> None:
    """A CDN's passing 5xx is retried with backoff (before, only 408 and 429 were: it failed the pull)."""
    _Handler.unavailable = status
    manifest = [entry(f"{server}/unavailable.bin")]
    assert pull(weights_dir=tmp_path, progress=False, manifest=manifest)[0].state == "present"
    assert (tmp_path / "good.bin").read_bytes() == PAYLOAD
    assert _Handler.requests == [("/unavailable.bin", None, None)] * 2


def test_a_server_that_stays_down_fails_after_a_few_retries_saying_what_to_try(
    server: str, tmp_path: Path
) -> None:
    """Retries are bounded; the error says what to try next: a proxy, or bringing the file in by hand."""
    with pytest.raises(W.DownloadError) as err:
        pull(weights_dir=tmp_path, progress=False, manifest=[entry(f"{server}/down.bin")])
    assert len(_Handler.requests) == 1 + 5
    message = str(err.value)
    assert "503" in message and "set HTTPS_PROXY" in message
    command = "`dynface weights pull --only good`"
    assert f"run {command} on a machine that can reach them and copy the files into {tmp_path}" in message
    assert err.value.names == ["good"] and leftovers(tmp_path) == []


def test_dropped_connection_of_a_replaced_file_starts_over(server: str, tmp_path: Path) -> None:
    """The file is replaced between the dropped answer and the retry: the retry's If-Range names the
    old version, the server sends all of the new one, and no byte of the old one stays."""
    _Handler.etag = '"v1"'
    new = bytes(reversed(PAYLOAD))
    manifest = [entry(f"{server}/flaky.bin", sha=hashlib.sha256(new).hexdigest())]
    original = _Handler.do_GET

    def replaced_after_the_first(self: _Handler) -> None:
        if _Handler.requests:  # the first answer (v1) went out: the server now has v2
            _Handler.etag = '"v2"'
            m.setattr(sys.modules[__name__], "PAYLOAD", new)
        original(self)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(_Handler, "do_GET", replaced_after_the_first)
        assert pull(weights_dir=tmp_path, progress=False, manifest=manifest)[0].state == "present"
    assert (tmp_path / "good.bin").read_bytes() == new
    (first, retry) = _Handler.requests
    assert first == ("/flaky.bin", None, None) and retry[2] == '"v1"'


@pytest.mark.parametrize("path", ["/good.bin", "/norange.bin"])
def test_next_pull_resumes_a_partial_file(server: str, tmp_path: Path, path: str) -> None:
    """A pull interrupted earlier (process killed) left a prefix; the next pull asks only for the
    rest, and a server that ignores Range still yields the right file (restarted from zero)."""
    _Handler.etag = '"v1"'
    manifest = [entry(f"{server}{path}")]
    leave_partial(tmp_path, PAYLOAD[:1000], manifest[0].url, '"v1"')
    assert pull(weights_dir=tmp_path, progress=False, manifest=manifest)[0].state == "present"
    assert (tmp_path / "good.bin").read_bytes() == PAYLOAD
    assert _Handler.requests == [(path, "bytes=1000-", '"v1"')]
    assert leftovers(tmp_path) == ["good.bin"]


@pytest.mark.parametrize("origin", ["other url", "no record"])
def test_partial_file_from_elsewhere_is_discarded(server: str, tmp_path: Path, origin: str) -> None:
    """A partial file from another URL (the manifest changed) or of unknown origin is not a prefix
    of this file: appending to it would install garbage, unnoticed where no checksum is pinned."""
    _Handler.etag = '"v1"'
    manifest = [entry(f"{server}/good.bin", sha=None, size=None)]
    partial = leave_partial(tmp_path, b"x" * 1000, f"{server}/old.bin")
    if origin == "no record":
        (partial.parent / "good.bin.json").unlink()
    assert pull(weights_dir=tmp_path, progress=False, manifest=manifest)[0].state == "unverified"
    assert (tmp_path / "good.bin").read_bytes() == PAYLOAD
    assert _Handler.requests == [("/good.bin", None, None)]
    assert leftovers(tmp_path) == ["good.bin"]


@pytest.mark.parametrize("then", ['"v1"', '"v2"'])
def test_partial_file_resumes_only_the_same_version(server: str, tmp_path: Path, then: str) -> None:
    """The version (ETag) the partial file began with is kept beside it; the next pull resumes it
    only if the server still has that version, and says so with If-Range."""
    _Handler.etag = '"v2"'
    manifest = [entry(f"{server}/good.bin", sha=None, size=None)]
    stale = b"x" * 1000  # what v1 began with, in this test
    leave_partial(tmp_path, PAYLOAD[:1000] if then == '"v2"' else stale, manifest[0].url, then)
    assert pull(weights_dir=tmp_path, progress=False, manifest=manifest)[0].state == "unverified"
    assert (tmp_path / "good.bin").read_bytes() == PAYLOAD
    expected = ("bytes=1000-", '"v2"') if then == '"v2"' else (None, None)
    assert _Handler.requests == [("/good.bin", *expected)]


def test_if_range_restarts_a_replaced_file(server: str, tmp_path: Path) -> None:
    """Where the version cannot be checked first (the HEAD failed), If-Range still makes a server
    that has replaced the file send all of it, which replaces the old prefix."""
    manifest = [entry(f"{server}/good.bin", sha=None, size=None)]
    leave_partial(tmp_path, b"x" * 1000, manifest[0].url, '"v1"')
    _Handler.etag = '"v2"'  # GET only: HEAD's 501 below
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_Handler, "do_HEAD", head_fails)
        assert pull(weights_dir=tmp_path, progress=False, manifest=manifest)[0].state == "unverified"
    assert (tmp_path / "good.bin").read_bytes() == PAYLOAD
    assert _Handler.requests == [("/good.bin", "bytes=1000-", '"v1"')]


def test_partial_file_begun_without_a_version_restarts_once_the_server_names_one(
    server: str, tmp_path: Path
) -> None:
    """A partial begun when the HEAD failed has no recorded version: once the server names one, the
    partial may be of an older file, and a resume without If-Range would splice the two. It starts over."""
    _Handler.etag = '"v2"'
    manifest = [entry(f"{server}/good.bin", sha=None, size=None)]
    leave_partial(tmp_path, b"x" * 1000, manifest[0].url, None)
    assert pull(weights_dir=tmp_path, progress=False, manifest=manifest)[0].state == "unverified"
    assert (tmp_path / "good.bin").read_bytes() == PAYLOAD
    assert _Handler.requests == [("/good.bin", None, None)]
    assert leftovers(tmp_path) == ["good.bin"]


@pytest.mark.parametrize("server_names", ["a version on GET only", "no version"])
def test_partial_file_begun_without_a_version_is_never_resumed(
    server: str, tmp_path: Path, server_names: str
) -> None:
    """The same where the server names no version now either (the HEAD fails, or it has no
    validators at all): nothing tells the old prefix from another version's, so it starts over
    (before, it was resumed with a bare Range: v1's head spliced to v2's tail, installed
    "unverified")."""
    manifest = [entry(f"{server}/good.bin", sha=None, size=None)]
    leave_partial(tmp_path, b"x" * 1000, manifest[0].url, None)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_Handler, "do_HEAD", head_fails)
        if server_names == "a version on GET only":
            _Handler.etag = '"v2"'
        assert pull(weights_dir=tmp_path, progress=False, manifest=manifest)[0].state == "unverified"
    assert (tmp_path / "good.bin").read_bytes() == PAYLOAD
    assert _Handler.requests == [("/good.bin", None, None)]
    assert leftovers(tmp_path) == ["good.bin"]


def test_partial_file_of_another_length_starts_over(server: str, tmp_path: Path) -> None:
    """The full length recorded with a partial is part of its version: a server whose file now has
    another length (same ETag: a careless server) gets no resume."""
    _Handler.etag = '"v1"'
    manifest = [entry(f"{server}/good.bin", sha=None, size=None)]
    leave_partial(tmp_path, b"x" * 1000, manifest[0].url, '"v1"', total=len(PAYLOAD) + 5)
    assert pull(weights_dir=tmp_path, progress=False, manifest=manifest)[0].state == "unverified"
    assert (tmp_path / "good.bin").read_bytes() == PAYLOAD
    assert _Handler.requests == [("/good.bin", None, None)]


def test_force_downloads_a_present_file_again(server: str, tmp_path: Path) -> None:
    """A file without a pinned checksum that is present is "unverified": a plain pull keeps it, even
    cut short; --force replaces it (and the old file stays until the new one is complete)."""
    manifest = [entry(f"{server}/good.bin", sha=None, size=None)]
    (tmp_path / "good.bin").write_bytes(PAYLOAD[:1000])  # a truncated hand-copied file
    assert pull(weights_dir=tmp_path, progress=False, manifest=manifest)[0].state == "unverified"
    assert _Handler.requests == [] and (tmp_path / "good.bin").read_bytes() == PAYLOAD[:1000]
    with pytest.raises(W.DownloadError, match="404"):
        pull(weights_dir=tmp_path, progress=False, manifest=[entry(f"{server}/nope.bin")], force=True)
    assert (tmp_path / "good.bin").read_bytes() == PAYLOAD[:1000]  # a failed forced pull keeps it
    assert pull(weights_dir=tmp_path, progress=False, manifest=manifest, force=True)[0].state == "unverified"
    assert (tmp_path / "good.bin").read_bytes() == PAYLOAD
    assert _Handler.requests[-1] == ("/good.bin", None, None)
    assert leftovers(tmp_path) == ["good.bin"]
    with pytest.raises(ValueError, match="offline"):
        pull(weights_dir=tmp_path, offline=True, manifest=manifest, force=True)


@pytest.mark.parametrize("head", ["ok", "fails"])
@pytest.mark.parametrize("extra", [b"", b"x"])
def test_range_not_satisfiable(server: str, tmp_path: Path, extra: bytes, head: str) -> None:
    """A file of unknown size downloaded whole before the process died (before the rename): the
    server answers the resume with 416 and the full size, which is the partial's, so it is done.
    A partial longer than the file is no prefix of it: dropped (as soon as the HEAD tells the length,
    else on the 416) and the file fetched from the start in the same pull (before, that pull failed
    with no next step, and only the next one succeeded)."""
    _Handler.etag = '"v1"'
    manifest = [entry(f"{server}/good.bin", size=None)]
    leave_partial(tmp_path, PAYLOAD + extra, manifest[0].url, '"v1"')
    with pytest.MonkeyPatch.context() as m:
        if head == "fails":
            m.setattr(_Handler, "do_HEAD", head_fails)
        assert pull(weights_dir=tmp_path, progress=False, manifest=manifest)[0].state == "present"
    assert (tmp_path / "good.bin").read_bytes() == PAYLOAD
    assert leftovers(tmp_path) == ["good.bin"]
    asked = [r[1:] for r in _Handler.requests]
    resume = (f"bytes={len(PAYLOAD + extra)}-", '"v1"')
    if not extra:
        assert asked == [resume]
    else:
        assert asked == ([resume] if head == "fails" else []) + [(None, None)]


def test_concurrent_pulls_of_one_file_take_turns(server: str, tmp_path: Path) -> None:
    """Two workers starting on a fresh machine pull the same file at once: one downloads it, the
    other waits for it and downloads nothing; no interleaved bytes, no failed rename. No size or
    checksum pinned, as for the DifFace prior, so a mixed-up file would be installed "unverified"."""
    manifest = [entry(f"{server}/slow.bin", sha=None, size=None)]
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(pull, weights_dir=tmp_path, progress=False, manifest=manifest)
        wait_for(lambda: _Handler.requests, timeout=10, what="the first download started")
        second = pool.submit(pull, weights_dir=tmp_path, progress=False, manifest=manifest)
        results = [first.result(timeout=30), second.result(timeout=30)]
    assert [[s.state for s in r] for r in results] == [["unverified"], ["unverified"]]
    assert (tmp_path / "good.bin").read_bytes() == PAYLOAD
    assert _Handler.requests == [("/slow.bin", None, None)]
    assert leftovers(tmp_path) == ["good.bin"]


def test_missing_url_is_a_download_error(server: str, tmp_path: Path) -> None:
    with pytest.raises(W.DownloadError, match=r"404.*HTTPS_PROXY"):
        pull(weights_dir=tmp_path, progress=False, manifest=[entry(f"{server}/nope.bin")])
    assert leftovers(tmp_path) == []
    assert _Handler.requests == [("/nope.bin", None, None)]  # a 404 is not retried


def test_corrupt_file_is_replaced(server: str, tmp_path: Path) -> None:
    manifest = [entry(f"{server}/good.bin")]
    (tmp_path / "good.bin").write_bytes(b"x" * len(PAYLOAD))
    status = verify(tmp_path, manifest=manifest)[0]
    assert status.state == "corrupt" and "sha256" in status.detail
    assert pull(weights_dir=tmp_path, progress=False, manifest=manifest)[0].state == "present"
    assert (tmp_path / "good.bin").read_bytes() == PAYLOAD


@pytest.mark.parametrize("how", ["param", "env"])
def test_offline_names_missing_files_and_never_downloads(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    manifest = [entry(f"{server}/good.bin", name="a"), entry(f"{server}/good.bin", name="b")]
    (tmp_path / "a.bin").write_bytes(PAYLOAD)
    if how == "env":
        monkeypatch.setenv("DYNFACE_OFFLINE", "1")
    with pytest.raises(MissingWeightsError) as err:
        pull(weights_dir=tmp_path, offline=True if how == "param" else None, manifest=manifest)
    assert err.value.names == ["b"]
    assert "dynface weights pull --only b" in str(err.value)
    assert str(tmp_path) in str(err.value)
    assert _Handler.requests == []
    # Offline with everything present is fine.
    assert pull(["a"], tmp_path, offline=True, manifest=manifest)[0].state == "present"


def test_offline_message_says_how_to_get_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, the pull command alone is no advice (it is what just refused to download, before):
    the message says offline mode is on and how to leave it or bring the files in. Raised anywhere
    (a model loading without downloads) it follows $DYNFACE_OFFLINE."""
    with pytest.raises(MissingWeightsError) as err:
        pull(["parsenet"], tmp_path, offline=True)
    message = str(err.value)
    assert "Offline mode is on" in message and "unset DYNFACE_OFFLINE" in message
    assert f"copy the files into {tmp_path}" in message
    assert "`dynface weights pull --only parsenet`" in message
    assert "Offline" not in str(MissingWeightsError(["parsenet"], tmp_path))
    monkeypatch.setenv("DYNFACE_OFFLINE", "1")
    assert "Offline mode is on" in str(MissingWeightsError(["parsenet"], tmp_path))
    unloadable = W.UnloadableWeightsError(
        ["parsenet"], tmp_path, tmp_path / "parsing_parsenet.pth", "EOFError"
    )
    assert "Offline mode is on" in str(unloadable) and "--force --only parsenet" in str(unloadable)


def test_empty_or_cut_short_files_are_corrupt(server: str, tmp_path: Path) -> None:
    """Without a pinned size, an empty file and a checkpoint (zip archive, as torch writes them) cut
    before its end record are corrupt, not "unverified": the cheap probe (/readyz, a worker's load)
    reports them and a plain pull replaces them (before, both counted as there, and the worker failed
    on them with torch's error naming no file). An intact archive is still "unverified"."""
    import zipfile

    manifest = [entry(f"{server}/good.bin", sha=None, size=None)]
    checkpoint = tmp_path / "model.pth"
    with zipfile.ZipFile(checkpoint, "w") as z:  # what torch.save writes: a zip archive
        z.writestr("archive/data.pkl", b"x" * 5000)
        z.writestr("archive/data/0", PAYLOAD)
    archive = checkpoint.read_bytes()
    for data, detail in (
        (b"", "empty"),
        (archive[: len(archive) // 2], "cut short"),
        (archive[:-10], "cut short"),
    ):
        (tmp_path / "good.bin").write_bytes(data)
        status = verify(tmp_path, manifest=manifest)[0]
        assert (status.state, detail in status.detail) == ("corrupt", True)
        assert [m.name for m in missing_for(["good"], tmp_path, manifest=manifest)] == ["good"]
    (tmp_path / "good.bin").write_bytes(archive)
    assert verify(tmp_path, manifest=manifest)[0].state == "unverified"
    assert missing_for(["good"], tmp_path, manifest=manifest) == []
    (tmp_path / "good.bin").write_bytes(b"")
    assert pull(weights_dir=tmp_path, progress=False, manifest=manifest)[0].state == "unverified"
    assert (tmp_path / "good.bin").read_bytes() == PAYLOAD


def test_unloadable_weights_error_reads_as_missing_weights(tmp_path: Path) -> None:
    """A file that is there but does not load: a MissingWeightsError (what a worker waits on in
    `missing_weights`, naming the files in `names`) whose fix is a --force pull."""
    path = tmp_path / "iddpm_ffhq512_ema500000.pth"
    e = W.UnloadableWeightsError(["difface_prior"], tmp_path, path, "EOFError")
    assert isinstance(e, MissingWeightsError) and isinstance(e, FileNotFoundError)
    assert e.names == ["difface_prior"] and e.force and not MissingWeightsError.force
    assert e.command == "dynface weights pull --force --only difface_prior"
    assert str(path) in str(e) and "(EOFError)" in str(e) and e.command in str(e)


@needs_non_root
def test_an_unreadable_pinned_file_says_how_to_make_it_readable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Hashing a pinned file this process may not read (a worker's own pull does) raises an error that
    says how to make it readable (a worker reports it as `misconfigured`), as `verify` prints it."""
    manifest = [entry("http://unused/")]
    path = tmp_path / "good.bin"
    path.write_bytes(PAYLOAD)
    path.chmod(0)
    for check in (verify, pull):
        with pytest.raises(W.UnreadableWeightsError, match=f"chmod a\\+r {re.escape(str(path))}"):
            check(weights_dir=tmp_path, manifest=manifest)
    (detector_entry,) = W.select(["retinaface_mobile0.25"])
    detector = tmp_path / detector_entry.path
    with detector.open("wb") as f:
        f.truncate(detector_entry.size)  # the pinned size, so it gets as far as being hashed
    detector.chmod(0)
    assert _cli(["weights", "--dir", str(tmp_path), "verify", "--only", "retinaface_mobile0.25"]) == 1
    assert capsys.readouterr().err.startswith(f"error: The weights file {detector} (retinaface_mobile0.25)")


def test_verify_states(tmp_path: Path) -> None:
    manifest = [
        entry("http://unused/", name="ok"),
        entry("http://unused/", name="gone"),
        entry("http://unused/", name="short"),
        entry("http://unused/", name="nosum", sha=None),
    ]
    (tmp_path / "ok.bin").write_bytes(PAYLOAD)
    (tmp_path / "short.bin").write_bytes(PAYLOAD[:10])
    (tmp_path / "nosum.bin").write_bytes(PAYLOAD)
    states = {s.name: s for s in verify(tmp_path, manifest=manifest)}
    assert {n: s.state for n, s in states.items()} == {
        "ok": "present",
        "gone": "missing",
        "short": "corrupt",
        "nosum": "unverified",
    }
    assert states["nosum"].detail == "unverified (no pinned checksum)"
    assert states["short"].path == tmp_path / "short.bin"
    missing = missing_for(["ok", "gone", "short", "nosum"], tmp_path, manifest=manifest)
    assert [(m.name, m.path) for m in missing] == [
        ("gone", tmp_path / "gone.bin"),
        ("short", tmp_path / "short.bin"),
    ]


def test_unknown_name_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="nonexistent"):
        verify(tmp_path, names=["nonexistent"])
    with pytest.raises(KeyError):
        missing_for(["nonexistent"], tmp_path)
    assert [s.name for s in verify(tmp_path, names="parsenet")] == ["parsenet"]
    assert [s.name for s in verify(tmp_path, names=["parsing_parsenet.pth"])] == ["parsenet"]


def test_hub_files_use_hf_hub_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls = []
    bars: list[type | None] = []

    def fake_download(
        repo_id: str,
        filename: str,
        *,
        revision: str,
        local_dir: Path,
        force_download: bool,
        tqdm_class: type | None,
    ) -> str:
        calls.append((repo_id, filename, revision, Path(local_dir), force_download))
        bars.append(tqdm_class)
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / filename).write_bytes(b"{}" + b" " * 973)
        return str(Path(local_dir) / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    statuses = pull(["hf_difface_config"], tmp_path, progress=False)
    assert calls == [("OAOA/DifFace", "config.json", "main", tmp_path / "OAOA-DifFace", False)]
    assert statuses[0].state == "unverified"  # right size, but no pinned checksum
    assert pull(["hf_difface_config"], tmp_path, progress=False)[0].state == "unverified"
    assert len(calls) == 1  # present: not fetched again
    # --force: fetched again, and huggingface_hub told to replace its local copy.
    assert pull(["hf_difface_config"], tmp_path, progress=True, force=True)[0].state == "unverified"
    assert calls[1:] == [("OAOA/DifFace", "config.json", "main", tmp_path / "OAOA-DifFace", True)]
    # Progress off (`--quiet`) reaches huggingface_hub: a bar class that never draws, even on a
    # terminal; on, its own bars (None), which it draws on a terminal only.
    quiet, shown = bars
    assert quiet is not None and quiet(total=1, file=_Terminal()).disable
    assert shown is None
    assert (
        _cli(["weights", "--dir", str(tmp_path), "pull", "--quiet", "--force", "--only", "hf_difface_config"])
        == 0
    )
    assert bars[-1] is quiet


@pytest.mark.parametrize("failure", ["network", "offline", "unwritable"])
def test_a_failed_hub_download_is_a_download_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """As a release asset's: named (a worker reports it in `missing_weights`), with what to try next
    (before, huggingface_hub's own errors came out, which a worker did not catch)."""
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled

    errors = {
        "network": httpx2.ConnectError("[Errno 111] Connection refused"),
        "offline": OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled."),
        "unwritable": PermissionError(13, "Permission denied"),
    }

    def failing_download(*args: object, **kwargs: object) -> str:
        raise errors[failure]

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing_download)
    with pytest.raises(W.DownloadError) as err:
        pull(["hf_difface_config"], tmp_path, progress=False)
    assert err.value.names == ["hf_difface_config"]
    message = str(err.value)
    if failure == "unwritable":
        assert message.startswith("Cannot write hf_difface_config") and "HTTPS_PROXY" not in message
    else:
        assert message.startswith("Could not download hf_difface_config") and "set HTTPS_PROXY" in message


def test_corrupt_hub_file_is_a_download_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def short_download(
        repo_id: str,
        filename: str,
        *,
        revision: str,
        local_dir: Path,
        force_download: bool,
        **options: object,
    ) -> str:
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / filename).write_bytes(b"{}")
        return str(Path(local_dir) / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", short_download)
    with pytest.raises(W.DownloadError, match=r"hf_difface_config .*size 2 B, expected 975 B") as err:
        pull(["hf_difface_config"], tmp_path, progress=False)
    assert err.value.names == ["hf_difface_config"]
    assert not (tmp_path / "OAOA-DifFace" / "config.json").exists()


def test_unwritable_weights_dir_is_a_download_error(server: str, tmp_path: Path) -> None:
    """An OS error writing the weights dir (here: a file where a folder should be; read-only and
    full disks alike) names the file, so a worker waits in `missing_weights` instead of exiting."""
    (tmp_path / "file").write_bytes(b"")
    root = tmp_path / "file" / "weights"
    with pytest.raises(W.DownloadError, match=r"Cannot write good \(good.bin\) into the weights dir") as err:
        pull(weights_dir=root, progress=False, manifest=[entry(f"{server}/good.bin")])
    assert err.value.names == ["good"]
    assert "--only good" in str(err.value)
    assert _Handler.requests == []


def test_default_dir_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DYNFACE_WEIGHTS_DIR", str(tmp_path))
    assert W.resolve_dir() == tmp_path
    monkeypatch.delenv("DYNFACE_WEIGHTS_DIR")
    assert W.resolve_dir() == Path.home() / ".cache" / "dynface" / "weights"


def test_one_rule_for_the_weights_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`~` is expanded and an empty value is unset, wherever the dir comes from (the worker's and the
    pipeline's agreement: tests/worker/test_missing_weights.py)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    default = tmp_path / ".cache" / "dynface" / "weights"
    assert W.resolve_dir() == W.resolve_dir("") == default
    assert W.resolve_dir("~/x") == W.resolve_dir(Path("~/x")) == tmp_path / "x"
    monkeypatch.setenv("DYNFACE_WEIGHTS_DIR", "~/w")
    assert W.resolve_dir() == W.resolve_dir("") == tmp_path / "w"
    monkeypatch.setenv("DYNFACE_WEIGHTS_DIR", "")
    assert W.resolve_dir() == default
    # A profile that is a path is itself the (real) weights dir; an empty one is `real`.
    assert W.profile_and_dir("tiny", "~/x") == ("tiny", tmp_path / "x")
    assert W.profile_and_dir("~/p", "~/x") == ("real", tmp_path / "p")
    assert W.profile_and_dir("", "") == W.profile_and_dir(None) == ("real", default)


def test_manifest_is_consistent() -> None:
    from models.faces import FACEXLIB_FILES

    names = [e.name for e in MANIFEST]
    files = [e.file_name for e in MANIFEST]
    assert len(set(names)) == len(names) and len(set(files)) == len(files)
    assert set(FACEXLIB_FILES.values()) <= {e.path for e in MANIFEST}
    for e in MANIFEST:
        assert e.url.startswith("https://")
        assert e.sha256 is None or len(e.sha256) == 64
        assert (e.hf_repo is None) == (e.hf_revision is None)


@pytest.mark.skipif(not (SHARED / "weights").is_dir(), reason=f"shared weights not found at {SHARED}")
def test_shared_mobilenet_matches_the_pinned_checksum() -> None:
    (status,) = verify(SHARED / "weights", names=["retinaface_mobile0.25"])
    assert status.state == "present"


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dynface")
    W.add_weights_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "parsing_parsenet.pth").write_bytes(b"short")
    assert _cli(["weights", "--dir", str(tmp_path), "list"]) == 0
    lines = {
        line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines() if line[0] != " "
    }
    assert set(lines) == {e.name for e in MANIFEST}
    assert lines["parsenet"] == "corrupt" and lines["retinaface_resnet50"] == "missing"

    assert _cli(["weights", "--dir", str(tmp_path), "verify", "--only", "parsenet"]) == 1
    assert "corrupt" in capsys.readouterr().out
    (tmp_path / "parsing_parsenet.pth").unlink()

    assert _cli(["weights", "--dir", str(tmp_path), "pull", "--offline", "--only", "parsenet"]) == 1
    assert "dynface weights pull --only parsenet" in capsys.readouterr().err


def test_cli_list_shows_unfinished_downloads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    partial = tmp_path / W.PARTIAL_DIR / "iddpm_ffhq512_ema500000.pth"
    partial.parent.mkdir()
    partial.write_bytes(b"x" * 1234)
    assert _cli(["weights", "--dir", str(tmp_path), "list"]) == 0
    out = capsys.readouterr().out
    assert f"unfinished download: 1234 B in {partial}" in out
    assert out.count("unfinished download") == 1


@pytest.mark.skipif(not (SHARED / "weights").is_dir(), reason=f"shared weights not found at {SHARED}")
def test_cli_verify_passes_on_a_good_file(capsys: pytest.CaptureFixture[str]) -> None:
    """`verify` of a file matching its pinned checksum: exit 0 and one `present` line with its path
    (the function itself: test_shared_mobilenet_matches_the_pinned_checksum)."""
    root = SHARED / "weights"
    assert _cli(["weights", "--dir", str(root), "verify", "--only", "retinaface_mobile0.25"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split() for line in lines] == [
        ["retinaface_mobile0.25", "present", str(root / "detection_mobilenet0.25_Final.pth")]
    ]


def missing_in(message: str) -> list[str]:
    """The names a MissingWeightsError's message lists."""
    found = re.search(r"Missing weights in [^:]+: (.+?)\. ", message)
    assert found, message
    return found.group(1).split(", ")


def test_cli_pulls_the_service_files_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Plain `pull`/`verify` cover what the configured profile's worker uses (with the configured
    background model); the Hub copy of the prior and unconfigured background models need --only or
    --all. The tiny profile's worker needs only its small detector (a tiny demo pulls 1.8 MB)."""

    def missing_named(argv: list[str]) -> set[str]:
        assert _cli(argv) == 1
        return set(missing_in(capsys.readouterr().err))

    pull = ["weights", "--dir", str(tmp_path), "pull", "--offline"]
    monkeypatch.delenv("DYNFACE_BACKGROUND_MODEL", raising=False)
    monkeypatch.setenv("DYNFACE_PROFILE", "tiny")
    assert missing_named(pull) == {"retinaface_mobile0.25"}
    monkeypatch.setenv("DYNFACE_PROFILE", str(tmp_path))  # a path profile is a real weights dir
    real = missing_named(pull)
    monkeypatch.delenv("DYNFACE_PROFILE")
    required = {"difface_prior", "difface_swinir", "retinaface_resnet50"}
    service = required | {"parsenet", "retinaface_mobile0.25"}  # the last two optional: not in the error
    assert missing_named(pull) == required == real
    monkeypatch.setenv("DYNFACE_BACKGROUND_MODEL", "realesrgan_x2plus")
    assert missing_named(pull) == required | {"realesrgan_x2plus"}
    assert missing_named([*pull, "--all"]) == {e.name for e in MANIFEST}
    with pytest.raises(SystemExit):  # --only and --all exclude each other
        _cli([*pull, "--all", "--only", "parsenet"])

    assert _cli(["weights", "--dir", str(tmp_path), "verify"]) == 1
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert listed == service | {"realesrgan_x2plus"}


def test_cli_uses_the_dir_a_path_profile_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Where DYNFACE_PROFILE is a path, the worker loads from that dir, so `pull`, `verify` and `list`
    work there (before, they used the path only to pick the profile and fetched into
    DYNFACE_WEIGHTS_DIR: compose's weights-init filled one dir and the worker downloaded again into
    another). A --dir naming another dir is refused; naming that one (spelled with `~`) is fine."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("DYNFACE_BACKGROUND_MODEL", raising=False)
    profile_dir, other = tmp_path / "profile", tmp_path / "other"
    monkeypatch.setenv("DYNFACE_PROFILE", "~/profile")
    monkeypatch.setenv("DYNFACE_WEIGHTS_DIR", str(other))
    assert _cli(["weights", "pull", "--offline"]) == 1
    assert f"Missing weights in {profile_dir}: " in capsys.readouterr().err
    for argv in (["weights", "verify"], ["weights", "--dir", "~/profile", "verify"]):
        assert _cli(argv) == 1  # missing files
        lines = capsys.readouterr().out.splitlines()
        assert lines and {Path(line.split()[2]).parent for line in lines} == {profile_dir}
    partial = profile_dir / W.PARTIAL_DIR / "iddpm_ffhq512_ema500000.pth"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"x" * 10)
    assert _cli(["weights", "list"]) == 0
    assert f"unfinished download: 10 B in {partial}" in capsys.readouterr().out
    for command in (["pull", "--offline"], ["verify"], ["list"]):
        assert _cli(["weights", "--dir", str(other), *command]) == 1
        out, err = capsys.readouterr()
        assert err.startswith(f"error: --dir {other} is not the dir the service loads its weights from")
        assert f"Leave out --dir to use {profile_dir}" in err and out == ""


def test_cli_default_set_is_what_the_pipeline_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tiny profile never reads a background model's file (it makes a random one): a configured
    one is not in its set (before, `verify` reported it missing and failed). Optional files (the
    profile's `optional_weights`: parsing net, other detector) are listed, marked optional, and a
    missing one does not fail `verify` (before, it did), since the service runs without it; a corrupt
    one does, since the service would load it."""
    # The pinned detectors, as if there (their files are 1.8 and 109 MB).
    monkeypatch.setattr(
        W, "_check", _pretend_present(W._check, {"retinaface_mobile0.25", "retinaface_resnet50"})
    )
    monkeypatch.setenv("DYNFACE_BACKGROUND_MODEL", "realesrgan_x4plus")
    monkeypatch.setenv("DYNFACE_PROFILE", "tiny")
    assert _cli(["weights", "--dir", str(tmp_path), "verify"]) == 0
    assert [line.split()[:2] for line in capsys.readouterr().out.splitlines()] == [
        ["retinaface_mobile0.25", "present"]
    ]
    assert _cli(["weights", "--dir", str(tmp_path), "pull", "--offline"]) == 0  # nothing to fetch
    capsys.readouterr()

    monkeypatch.delenv("DYNFACE_PROFILE")
    monkeypatch.delenv("DYNFACE_BACKGROUND_MODEL")
    for name in ("iddpm_ffhq512_ema500000.pth", "swinir_restoration512_L1.pth"):
        (tmp_path / name).write_bytes(b"unpinned")
    assert _cli(["weights", "--dir", str(tmp_path), "verify"]) == 0  # parsenet missing: optional
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert set(lines) == {
        "difface_prior",
        "difface_swinir",
        "retinaface_resnet50",
        "retinaface_mobile0.25",
        "parsenet",
    }
    assert lines["parsenet"].split()[1] == "missing" and "optional" in lines["parsenet"]
    assert "optional" in lines["retinaface_mobile0.25"] and "optional" not in lines["difface_swinir"]
    (tmp_path / "parsing_parsenet.pth").write_bytes(b"short")  # there but corrupt: the pipeline loads it
    assert _cli(["weights", "--dir", str(tmp_path), "verify"]) == 1
    capsys.readouterr()
    (tmp_path / "parsing_parsenet.pth").unlink()
    (tmp_path / "swinir_restoration512_L1.pth").unlink()  # required: missing fails
    assert _cli(["weights", "--dir", str(tmp_path), "verify"]) == 1
    (tmp_path / "swinir_restoration512_L1.pth").write_bytes(b"unpinned")
    # Named, or with --all, an optional file is wanted: missing fails.
    assert _cli(["weights", "--dir", str(tmp_path), "verify", "--only", "parsenet"]) == 1


def test_cli_pull_does_not_fail_for_an_optional_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A plain `pull` fetches the service's optional files (parsing net, other detector) best effort,
    as a worker does at start: one that cannot be fetched (here: offline) is a warning and the pull
    succeeds once the required files are there, so an init job's `pull && verify` goes on (it
    failed, stopping a deployment for a file the service runs without). Named, it must be fetched."""
    monkeypatch.delenv("DYNFACE_BACKGROUND_MODEL", raising=False)
    monkeypatch.delenv("DYNFACE_PROFILE", raising=False)
    monkeypatch.setattr(W, "_check", _pretend_present(W._check, {"retinaface_resnet50"}))
    for name in ("iddpm_ffhq512_ema500000.pth", "swinir_restoration512_L1.pth"):
        (tmp_path / name).write_bytes(b"unpinned")
    assert _cli(["weights", "--dir", str(tmp_path), "pull", "--offline"]) == 0
    out, err = capsys.readouterr()
    warned = [line for line in err.splitlines() if line.startswith("warning: optional ")]
    assert [line.split()[2] for line in warned] == ["parsenet", "retinaface_mobile0.25"], err
    assert all("Offline mode is on" in line for line in warned), err
    states = {line.split()[0]: line.split()[1] for line in out.splitlines()}
    assert states == {
        "difface_prior": "unverified",
        "difface_swinir": "unverified",
        "retinaface_resnet50": "present",
        "parsenet": "missing",
        "retinaface_mobile0.25": "missing",
    }
    assert _cli(["weights", "--dir", str(tmp_path), "verify"]) == 0
    capsys.readouterr()
    assert _cli(["weights", "--dir", str(tmp_path), "pull", "--offline", "--only", "parsenet"]) == 1


def _pretend_present(check: Any, names: set[str]) -> Any:
    """`W._check` that reports the manifest files `names` present without them."""

    def checked(e: WeightFile, path: Path, *, hash_it: bool) -> W.Status:
        return W.Status(e.name, "present", path) if e.name in names else check(e, path, hash_it=hash_it)

    return checked


def test_cli_verify_reports_a_bad_background_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong $DYNFACE_BACKGROUND_MODEL is an error message and exit code 1 for `verify` as for `pull`."""
    monkeypatch.setenv("DYNFACE_BACKGROUND_MODEL", "bogus")
    for command in (["verify"], ["pull", "--offline"]):
        assert _cli(["weights", "--dir", str(tmp_path), *command]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: Unknown background model 'bogus'") and "Traceback" not in err


def test_cli_default_set_takes_the_prior_format_the_pipeline_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Where only the Hub copy of the prior is present, the pipeline loads that one
    (`profile_weights`): a plain `verify` checks it and a plain `pull` does not fetch upstream's."""
    monkeypatch.delenv("DYNFACE_BACKGROUND_MODEL", raising=False)
    monkeypatch.delenv("DYNFACE_PROFILE", raising=False)
    hub = tmp_path / "OAOA-DifFace"
    hub.mkdir()
    (hub / "diffusion_pytorch_model.bin").write_bytes(b"unet")
    (hub / "config.json").write_bytes(b"{}" + b" " * 973)  # the pinned size
    assert _cli(["weights", "--dir", str(tmp_path), "verify"]) == 1  # the restorer etc. are missing
    states = dict(line.split()[:2] for line in capsys.readouterr().out.splitlines())
    assert states["hf_difface_unet"] == states["hf_difface_config"] == "unverified"
    assert "difface_prior" not in states and states["difface_swinir"] == "missing"
    assert _cli(["weights", "--dir", str(tmp_path), "pull", "--offline"]) == 1
    err = capsys.readouterr().err
    missing = missing_in(err)
    assert set(missing) == {"difface_swinir", "retinaface_resnet50"}


def test_cli_pull_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--force reaches `pull` (tested above); with --offline it is an error, not a traceback."""
    calls: list[tuple[list[str] | None, object]] = []

    def fake_pull(names: list[str] | None, directory: Path | None, **options: object) -> list[W.Status]:
        calls.append((names, options["force"]))
        return []

    with monkeypatch.context() as m:
        m.setattr(W, "pull", fake_pull)
        assert _cli(["weights", "--dir", str(tmp_path), "pull", "--force", "--only", "parsenet"]) == 0
        assert _cli(["weights", "--dir", str(tmp_path), "pull", "--only", "parsenet"]) == 0
    assert calls == [(["parsenet"], True), (["parsenet"], False)]
    argv = ["weights", "--dir", str(tmp_path), "pull", "--offline", "--force", "--only", "parsenet"]
    assert _cli(argv) == 1
    assert "offline" in capsys.readouterr().err


def test_offline_is_read_as_the_services_settings_read_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """`weights pull` and the worker's Settings read $DYNFACE_OFFLINE alike: `y` or `t` made the
    worker offline while `weights pull` still downloaded."""
    from app.settings import Settings

    for value in ("1", "true", "TRUE", "yes", "y", "on", "t", "0", "false", "no", "n", "off", "f", ""):
        monkeypatch.setenv("DYNFACE_OFFLINE", value)
        settings = Settings() if value else Settings(offline=False)
        assert W.offline_from_env() is settings.offline, value
    # A value Settings refuses: `2` left `weights pull` online while the worker would not start.
    for value in ("2", "maybe"):
        monkeypatch.setenv("DYNFACE_OFFLINE", value)
        with pytest.raises(ValidationError):
            Settings()
        with pytest.raises(ValueError, match=f"DYNFACE_OFFLINE='{value}' is neither true"):
            W.offline_from_env()


def test_weights_pull_refuses_an_offline_value_that_is_no_boolean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DYNFACE_OFFLINE", "2")
    assert _cli(["weights", "--dir", str(tmp_path), "pull", "--only", "parsenet"]) == 1
    assert "DYNFACE_OFFLINE='2' is neither true" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing fetched
