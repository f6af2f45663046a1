"""What a webhook receiver's answer may cost us, and which IPv6 destinations are never ours to call.

Deliveries run on threads of the GPU worker and of the API: a receiver must not be able to make one
hold memory (an answer used to be read whole: one of 400 MiB raised a process's peak from 57 to 861 MiB) or
last forever (httpx's timeout bounds each read, so a byte every half second kept an attempt going).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import pytest

from app import webhooks
from app.security import _is_public, check_webhook_url
from app.settings import Settings
from tests.conftest import base_settings, http_server

MiB = 1 << 20
#: What the huge answer would weigh: far more than the socket buffers between us and the receiver.
HUGE = 256 * MiB
#: The budget of one attempt (DYNFACE_WEBHOOK_TIMEOUT_SECONDS) in these tests.
BUDGET = 1.0
#: One byte every this many seconds: well under the budget, so only a whole-attempt limit stops it.
TRICKLE = 0.5


def hook_settings(**overrides: Any) -> Settings:
    """The tests' permissive policy (loopback, http) with one attempt of ``BUDGET`` seconds."""
    values: dict[str, Any] = {"webhook_timeout_seconds": BUDGET, "webhook_retry_delays_seconds": []}
    return base_settings(uuid.uuid4().hex[:10], **{**values, **overrides})


class Receiver:
    """What the receiver saw: the bytes it got sent out, whether the client left, a stop signal."""

    def __init__(self) -> None:
        self.sent = 0
        self.disconnected = threading.Event()
        self.stop = threading.Event()
        self.requests = 0

    def handler(
        self, answer: Callable[[BaseHTTPRequestHandler, Receiver], None]
    ) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                receiver.requests += 1
                try:
                    answer(self, receiver)
                except OSError:  # the client closed the connection (broken pipe, reset)
                    receiver.disconnected.set()
                self.close_connection = True

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


def write(handler: BaseHTTPRequestHandler, receiver: Receiver, data: bytes) -> None:
    handler.wfile.write(data)
    handler.wfile.flush()
    receiver.sent += len(data)


def huge_answer(handler: BaseHTTPRequestHandler, receiver: Receiver) -> None:
    """200 with a ``HUGE`` body (stopping early only if the client leaves)."""
    head = f"HTTP/1.1 200 OK\r\ncontent-length: {HUGE}\r\n\r\n".encode()
    write(handler, receiver, head)
    chunk = b"x" * MiB
    for _ in range(HUGE // MiB):
        write(handler, receiver, chunk)


def endless_chunked_answer(handler: BaseHTTPRequestHandler, receiver: Receiver) -> None:
    """200 with a chunked body that goes on until the client leaves (bounded here at ``HUGE``, so
    that a client that reads it all ends too, its test failing instead of hanging)."""
    write(handler, receiver, b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n" % MiB + b"x" * MiB + b"\r\n"
    for _ in range(HUGE // MiB):
        write(handler, receiver, chunk)
    write(handler, receiver, b"0\r\n\r\n")


def trickled(slow: bytes, prompt: bytes = b"") -> Callable[[BaseHTTPRequestHandler, Receiver], None]:
    """An answer of ``prompt`` at once, then ``slow`` a byte every ``TRICKLE`` seconds until the
    client leaves or the test ends."""

    def answer(handler: BaseHTTPRequestHandler, receiver: Receiver) -> None:
        write(handler, receiver, prompt)
        for i in range(len(slow)):
            if receiver.stop.wait(TRICKLE):
                return
            write(handler, receiver, slow[i : i + 1])

    return answer


#: A status line and headers that take 50 s to arrive a byte at a time.
SLOW_HEAD = b"HTTP/1.1 200 OK\r\nx-padding: " + b"p" * 70 + b"\r\ncontent-length: 0\r\n\r\n"
#: A body of 100 bytes, 50 s at a byte every half second.
SLOW_BODY = b"x" * 100
OK_100 = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n"


@contextlib.contextmanager
def receiving(answer: Callable[[BaseHTTPRequestHandler, Receiver], None]) -> Iterator[tuple[str, Receiver]]:
    receiver = Receiver()
    with http_server(receiver.handler(answer)) as base:
        try:
            yield base, receiver
        finally:
            receiver.stop.set()  # before the server waits for its threads


def timed(call: Callable[[], Any], limit: float = 10.0) -> tuple[Any, float]:
    """``call()`` on a thread: its result and how long it took. Fails, instead of hanging, when it is
    still running after ``limit`` seconds."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as e:  # re-raised below, on the test's thread
            outcome["error"] = e

    start = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    took = time.monotonic() - start
    assert not thread.is_alive(), f"still delivering after {limit} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"], took


def by_name(url: str, settings: Settings | None = None) -> Callable[[], Any]:
    """One delivery as the tests' permissive policy sends it (connecting by name)."""
    return lambda: webhooks.deliver(
        url, "job-limits", b"{}", settings or hook_settings(), sleep=lambda _: None
    )


def pinned(url: str) -> Callable[[], Any]:
    """One attempt as the production policy sends it: to the checked address, the name as Host."""
    return lambda: webhooks._post(url, ["127.0.0.1"], b"{}", {"content-type": "application/json"}, BUDGET)


# --- the answer's body is never read ----------------------------------------------------------------


@pytest.mark.parametrize("answer", [huge_answer, endless_chunked_answer], ids=["content-length", "chunked"])
@pytest.mark.parametrize("how", ["by_name", "pinned"])
def test_a_huge_answer_is_not_read(answer: Callable[..., None], how: str) -> None:
    """A 2xx is all a delivery needs: the body after it is left unread and the connection closed, so
    a receiver answering 256 MiB (or an endless chunked body) costs neither memory nor time."""
    with receiving(answer) as (base, receiver):
        url = f"{base}/hook"
        result, took = timed(by_name(url) if how == "by_name" else pinned(url))
        assert result is True if how == "by_name" else result == 200
        assert took < BUDGET, took
        assert receiver.disconnected.wait(10), "the receiver never saw the client leave"
    # What it sent before its writes failed: whatever the socket buffers held, nowhere near all of it.
    assert receiver.sent < 32 * MiB, receiver.sent


def test_an_answer_whose_body_trickles_is_accepted_at_its_status() -> None:
    """The reviewer's case: a prompt 200, then a body at a byte every half second (under the per-read
    timeout), which used to keep the delivery thread busy as long as the receiver liked."""
    with receiving(trickled(SLOW_BODY, prompt=OK_100)) as (base, _):
        delivered, took = timed(by_name(f"{base}/hook"))
    assert delivered is True
    assert took < BUDGET, took


# --- one attempt, one budget ------------------------------------------------------------------------


def test_a_trickled_status_line_ends_the_attempt_at_its_budget() -> None:
    """Status line and headers at a byte every half second: each read is well within httpx's
    per-read timeout, so only a limit on the whole attempt ends it. Retries still happen, each with
    its own budget, and a delivery whose every attempt runs out fails."""
    s = hook_settings(webhook_retry_delays_seconds=[0.0])
    with receiving(trickled(SLOW_HEAD)) as (base, receiver):
        delivered, took = timed(by_name(f"{base}/hook", s))
    assert delivered is False
    assert receiver.requests == 2  # the first attempt and its retry
    assert 2 * BUDGET - 0.2 <= took < 2 * BUDGET + 1.0, took


def test_a_trickled_status_line_to_a_checked_address_ends_at_the_budget() -> None:
    with receiving(trickled(SLOW_HEAD)) as (base, _):
        start = time.monotonic()
        with pytest.raises(httpx.TimeoutException):
            timed(pinned(f"{base}/hook"))
    assert time.monotonic() - start < BUDGET + 1.0


@contextlib.contextmanager
def trickling_tls_server() -> Iterator[int]:
    """A TCP server that reads the ClientHello, then announces a 16 KiB handshake record and sends
    it a byte every half second: the TLS handshake never ends and no single read times out."""
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            try:
                conn.sendall(b"\x16\x03\x03\x40\x00")  # handshake record of 0x4000 bytes follows
                while not stop.wait(TRICKLE):
                    conn.sendall(b"\x00")
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        listener.close()


def test_a_trickled_tls_handshake_ends_the_attempt_at_its_budget() -> None:
    """The budget covers the TLS handshake too. CPython already limits a handshake as a whole by the
    socket timeout (so this held before the budget existed); it pins that the budget's shutdown
    reaches a connection mid-handshake, whose TCP socket object httpcore no longer holds."""
    with trickling_tls_server() as port:
        delivered, took = timed(by_name(f"https://127.0.0.1:{port}/hook"))
    assert delivered is False
    assert took < BUDGET + 1.0, took


# --- IPv6 ranges Python's is_global gets wrong (on some versions) -------------------------------------

NEVER_PUBLIC_V6 = [
    "fec0::1",  # deprecated site-local, fec0::/10 (RFC 3879)
    "feff:ffff::1",
    "3fff::1",  # documentation, 3fff::/20 (RFC 9637)
    "3fff:fff:ffff::1",
    "5f00::1",  # SRv6 segment identifiers, 5f00::/16 (RFC 9602)
    "5f00:ffff::1",
    "64:ff9b:1::7f00:1",  # local-use NAT64 (RFC 8215) of 127.0.0.1
    "64:ff9b:1::a9fe:a9fe",  # ... of the cloud metadata address
    "64:ff9b:1:ffff::a00:1",  # ... of 10.0.0.1, under a longer prefix
    "64:ff9b:1::",  # ... of 0.0.0.0
    "64:ff9b:1::808:808",  # ... even of a public address: where the IPv4 sits depends on the prefix
]

#: Well-known NAT64 of a public IPv4 address (8.8.8.8), an address just past 3fff::/20, a public one.
PUBLIC_V6 = ["64:ff9b::808:808", "3fff:1000::1", "2001:4860:4860::8888"]


def strict_settings() -> Settings:
    return base_settings(uuid.uuid4().hex[:10], webhook_allow_private=False, webhook_allow_http=False)


@pytest.mark.parametrize("address", NEVER_PUBLIC_V6)
def test_ipv6_ranges_python_may_call_global_are_refused(address: str) -> None:
    assert not _is_public(ipaddress.IPv6Address(address))
    with pytest.raises(ValueError, match="private or loopback"):
        check_webhook_url(f"https://[{address}]/hook", strict_settings())


@pytest.mark.parametrize("address", PUBLIC_V6)
def test_public_neighbours_of_those_ranges_are_allowed(address: str) -> None:
    assert check_webhook_url(f"https://[{address}]/hook", strict_settings()) == [address]
