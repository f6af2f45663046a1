"""Webhook signing (Standard Webhooks) and delivery with retries.

Signature: ``webhook-signature: v1,<base64(HMAC-SHA256(secret, f"{id}.{timestamp}.{body}"))>``
with ``webhook-id`` (the job id, the same on every retry so receivers can de-duplicate) and
``webhook-timestamp`` (Unix seconds, lets receivers reject replays). A ``whsec_``-prefixed secret is
base64 after the prefix, as in the Standard Webhooks libraries; any other secret is used as UTF-8.

Delivery runs in a background thread (of the worker, so a slow receiver never holds the GPU; of the
API for the jobs it ends itself, app/queued.py); both processes `drain` them before they exit.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import socket
import threading
import time
from collections.abc import Callable

import httpx

from app.security import UnresolvableHost, check_webhook_url
from app.settings import Settings

log = logging.getLogger(__name__)


def secret_bytes(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one message."""
    mac = hmac.new(secret_bytes(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def verify(secret: str, headers: dict[str, str], body: bytes, tolerance_seconds: int = 300) -> bool:
    """Receiver-side check (also what our tests use): any listed v1 signature may match."""
    msg_id, ts = headers["webhook-id"], int(headers["webhook-timestamp"])
    if abs(time.time() - ts) > tolerance_seconds:
        return False
    expected = sign(secret, msg_id, ts, body).encode()
    return any(hmac.compare_digest(expected, s.encode()) for s in headers["webhook-signature"].split())


class _Deadline:
    """One attempt's whole budget (connect, TLS, send, the answer's status line and headers).

    httpx's timeouts bound each socket operation, not the sum: a receiver sending a byte a little
    faster than the read timeout keeps an attempt going forever (and holds the delivery thread). A
    timer shuts the attempt's connections down once the budget is spent, which ends whatever read
    or write is blocked on them. It shuts down a duplicate of each socket, taken as httpcore connects
    (its ``trace`` extension): a shutdown acts on the connection, not on one descriptor, and our
    duplicate stays ours to close, so the timer never touches a descriptor the system gave to
    something else meanwhile; it also reaches a connection whose TLS handshake is under way (the
    TCP socket object httpcore holds is detached by then).
    """

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._expired = False
        self._closed = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    @property
    def expired(self) -> bool:
        return self._expired or time.monotonic() >= self.end

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def trace(self, event: str, info: dict) -> None:
        """httpcore's ``trace`` callback: keep a duplicate of each connection's socket."""
        if event != "connection.connect_tcp.complete":
            return
        stream = info["return_value"]
        try:
            dup = stream.get_extra_info("socket").dup()
        except OSError as e:  # out of descriptors, say: no connection we could not stop
            stream.close()
            raise httpx.ConnectError(f"cannot guard the connection: {e}") from e
        with self._lock:
            if self._closed:  # pragma: no cover (the attempt ended; httpcore connects no more)
                dup.close()
                return
            self._sockets.append(dup)
            if self._expired:
                _shut(dup)

    def _expire(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._expired = True
            for sock in self._sockets:
                _shut(sock)

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._closed = True
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already gone
        sock.shutdown(socket.SHUT_RDWR)


def _post(url: str, addresses: list[str], body: bytes, headers: dict[str, str], timeout: float) -> int:
    """POST to the first of the checked ``addresses`` that takes the connection (by name when none
    were checked, i.e. ``webhook_allow_private``), never following redirects; returns the status.

    The URL's host is replaced by the address; ``Host`` and, for https, the TLS server name (SNI
    and certificate check, httpcore's ``sni_hostname``) stay the original name.

    ``timeout`` bounds the whole attempt, every address tried included (`_Deadline`); running out
    raises httpx.TimeoutException. Only the status is looked at: the answer's body is never read
    (a receiver's body of any size costs no memory and no time), and the connection is closed.
    """
    target = httpx.URL(url)
    name = target.raw_host.decode("ascii")  # IDNA-encoded; IPv6 without brackets, as TLS wants it

    def request(host: str | None) -> httpx.Request:
        if deadline.expired:
            raise httpx.ConnectTimeout(f"no answer within the attempt's {timeout:g} s")
        extensions: dict[str, object] = {"trace": deadline.trace}
        pinned: dict[str, str] = {}
        if host is not None:
            pinned = {"host": target.netloc.decode("ascii")}
            if target.scheme == "https":
                extensions["sni_hostname"] = name
        return client.build_request(
            "POST",
            target if host is None else target.copy_with(host=host),
            content=body,
            headers={**headers, **pinned},
            extensions=extensions,
            timeout=httpx.Timeout(max(deadline.remaining(), 0.001)),
        )

    def status(req: httpx.Request) -> int:
        try:
            r = client.send(req, stream=True)
        except httpx.HTTPError as e:
            if deadline.expired and not isinstance(e, httpx.TimeoutException):
                raise httpx.ReadTimeout(f"no answer within the attempt's {timeout:g} s") from e
            raise
        r.close()  # unread: closing drops the connection, whatever the receiver still sends
        return r.status_code

    deadline = _Deadline(timeout)
    # An explicit transport keeps environment proxies out: a proxy would resolve the name again.
    try:
        with httpx.Client(transport=httpx.HTTPTransport(), follow_redirects=False) as client:
            if not addresses:
                return status(request(None))
            for ip in addresses[:-1]:
                try:
                    return status(request(ip))
                except (httpx.ConnectError, httpx.ConnectTimeout):
                    if deadline.expired:
                        raise
                    # as a connect by name does: the next address (e.g. IPv4 when IPv6 has no route)
            return status(request(addresses[-1]))
    finally:
        deadline.close()


def deliver(
    url: str, msg_id: str, body: bytes, settings: Settings, sleep: Callable[[float], None] = time.sleep
) -> bool:
    """POST ``body`` until a 2xx answer, sleeping the configured delays between attempts.

    Each attempt is freshly timestamped and signed and the destination is re-checked (DNS may
    have changed), then sent to exactly the addresses that check saw. A name that does not resolve
    is retried like a failed POST (the lookup may fail only for a moment); a destination the policy
    refuses ends the delivery. Returns whether the receiver accepted it.
    """
    delays = [0.0, *settings.webhook_retry_delays_seconds]
    for attempt, delay in enumerate(delays, start=1):
        sleep(delay)
        try:
            addresses = check_webhook_url(url, settings)
        except UnresolvableHost as e:
            log.warning("webhook %s attempt %d: %s", msg_id, attempt, e)
            continue
        except ValueError as e:
            log.warning("webhook %s to %s refused: %s", msg_id, url, e)
            return False
        ts = int(time.time())
        headers = {"content-type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(ts)}
        if settings.webhook_secret is not None:
            headers["webhook-signature"] = sign(settings.webhook_secret.get_secret_value(), msg_id, ts, body)
        try:
            code = _post(url, addresses, body, headers, settings.webhook_timeout_seconds)
            if 200 <= code < 300:
                return True
            log.warning("webhook %s attempt %d: HTTP %d", msg_id, attempt, code)
        except httpx.HTTPError as e:
            log.warning("webhook %s attempt %d: %s", msg_id, attempt, e)
    return False


def _deliver_logged(url: str, msg_id: str, body: bytes, settings: Settings) -> None:
    """`deliver`, with any unexpected error logged: uncaught, it would only end the thread, with
    a bare traceback on stderr (threading.excepthook) and no log record naming the job."""
    try:
        deliver(url, msg_id, body, settings)
    except Exception:
        log.exception("webhook %s to %s: delivery failed", msg_id, url)


def deliver_in_background(url: str, msg_id: str, body: bytes, settings: Settings) -> threading.Thread:
    """Start `deliver` on a daemon thread (retries can take minutes)."""
    t = threading.Thread(
        target=_deliver_logged, args=(url, msg_id, body, settings), name=f"webhook-{msg_id}", daemon=True
    )
    t.start()
    return t


#: How long a stopping process waits for its in-flight deliveries: a bound, since retries can take minutes.
DRAIN_SECONDS = 10.0


def drain(timeout: float = DRAIN_SECONDS) -> None:
    """Give in-flight webhook deliveries a bounded chance to finish before the process exits (their
    threads are daemons: the interpreter would otherwise end them mid-delivery)."""
    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
        if t.name.startswith("webhook-"):
            t.join(max(0.0, deadline - time.monotonic()))


def notify(record: dict, settings: Settings) -> threading.Thread | None:
    """Send the final job JSON to the job's webhook, if it has one (in the background)."""
    from app.schemas import restoration_view

    url = (record.get("options") or {}).get("webhook")
    if not url:
        return None
    body = restoration_view(record).model_dump_json().encode()
    return deliver_in_background(url, record["id"], body, settings)
