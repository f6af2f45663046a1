"""API-key auth, per-key rate limiting (in Redis) and webhook destination checks.

Keys are compared (as SHA-256 digests) with `hmac.compare_digest` against every configured key (no
early exit), so response timing reveals neither which key nor how much of one matched. Rate limits
count in Redis so they hold across API processes and hosts.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
import time
from collections.abc import Callable
from typing import Annotated

import httpx
from fastapi import Depends, Request

from app.deps import services
from app.errors import ApiError
from app.jobs import JobStore
from app.settings import Settings

#: Owner id of requests on an open (no keys configured) API.
ANONYMOUS = "anonymous"
#: The clock of the rate limit's one-minute windows (tests pin it: a window ending mid-test would
#: start its count again).
rate_clock: Callable[[], float] = time.time


def key_id(key: str) -> str:
    """A stable, non-secret id of an API key, for Redis keys and job ownership (never the key)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def presented_key(request: Request) -> str | None:
    """The key from ``Authorization: Bearer <key>`` or ``X-API-Key``."""
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or None


def authenticate(request: Request, settings: Settings) -> str:
    """Return the caller's key id, or raise 401. Open (anonymous) only when no keys are configured."""
    if not settings.auth_enabled:
        return ANONYMOUS
    given = presented_key(request)
    if given is None:
        raise ApiError(
            401,
            "unauthorized",
            "Missing API key (Authorization: Bearer or X-API-Key).",
            {"WWW-Authenticate": "Bearer"},
        )
    # Digests make every comparison the same length: compare_digest on raw keys of different
    # lengths returns early and would leak the configured keys' lengths.
    given_digest = hashlib.sha256(given.encode()).digest()
    matched = False
    for key in settings.api_keys:
        matched |= hmac.compare_digest(given_digest, hashlib.sha256(key.get_secret_value().encode()).digest())
    if not matched:
        raise ApiError(401, "unauthorized", "Invalid API key.", {"WWW-Authenticate": "Bearer"})
    return key_id(given)


async def caller(request: Request) -> str:
    """`authenticate` as a route dependency: FastAPI solves it before it validates the route's own
    parameters, so a request without a valid key is a 401 whatever its path holds. Async: it does
    no I/O, so it needs no worker thread."""
    return authenticate(request, services(request).settings)


#: A route parameter holding the caller's key id (see `caller`).
Caller = Annotated[str, Depends(caller)]


def is_authenticated(request: Request, settings: Settings) -> bool:
    """Whether the caller may see details kept from the anonymous (always, on an open API)."""
    try:
        authenticate(request, settings)
    except ApiError:
        return False
    return True


def check_rate_limit(store: JobStore, owner: str, per_minute: int) -> None:
    """Fixed one-minute window per key; 429 with Retry-After = seconds to the next window. 0 = off."""
    if per_minute <= 0:
        return
    now = rate_clock()
    window = int(now // 60)
    k = store.key("rate", owner, str(window))
    with store.redis.pipeline() as pipe:
        pipe.incr(k)
        pipe.expire(k, 60)
        count, _ = pipe.execute()
    if count > per_minute:
        retry = max(1, 60 - int(now) % 60)
        raise ApiError(
            429,
            "rate_limited",
            f"Rate limit of {per_minute} submissions per minute exceeded.",
            {"Retry-After": str(retry)},
        )


#: IPv6 ranges whose last 32 bits are an IPv4 address that the network delivers to: the NAT64
#: well-known prefix (RFC 6052) and the deprecated IPv4-compatible addresses. ``64:ff9b::7f00:1``
#: reaches 127.0.0.1 behind NAT64.
_IPV4_SUFFIX_NETS = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("::/96"))

#: Never a webhook destination, whatever `is_global` says (Python 3.11 calls them global; which
#: version knows which range varies): deprecated site-local (RFC 3879), SRv6 segment identifiers
#: (RFC 9602), documentation (RFC 9637), and local-use NAT64 (RFC 8215) whole: where its translator
#: puts the IPv4 address depends on the operator's prefix length (/48 to /96), so no address in it
#: can be judged by the IPv4 address it may reach.
_NOT_PUBLIC_V6 = tuple(
    ipaddress.IPv6Network(n) for n in ("fec0::/10", "5f00::/16", "3fff::/20", "64:ff9b:1::/48")
)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address tunnels or translates to (mapped, 6to4, Teredo, NAT64)."""
    found = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if any(ip in net for net in _IPV4_SUFFIX_NETS):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally routable unicast, and so is any IPv4 address embedded in an IPv6 one: Python
    counts e.g. 6to4 ``2002:7f00:1::`` and NAT64 ``64:ff9b::7f00:1`` as global although they
    lead to 127.0.0.1. The explicit ranges above overrule `is_global`, which differs between
    Python versions."""
    if isinstance(ip, ipaddress.IPv6Address) and any(ip in net for net in _NOT_PUBLIC_V6):
        return False
    if not ip.is_global or ip.is_multicast:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        return all(_is_public(v4) for v4 in _embedded_ipv4(ip))
    return True


class UnresolvableHost(ValueError):
    """The webhook's host did not resolve. Refused at submission like any bad URL, but a delivery
    retries it: a lookup can fail for a moment (EAI_AGAIN, a resolver restarting)."""


def check_webhook_url(url: str, settings: Settings) -> list[str]:
    """Refuse webhook targets that could reach our own network (SSRF): non-https, or a host that
    resolves to a loopback/private/link-local address. Called at submission and again before each
    delivery (DNS can change in between). The allow settings exist for tests and local development.

    The URL is parsed by httpx, as the delivery parses it (app/webhooks.py): a URL httpx refuses
    (control characters, say) is refused here, and the name looked up is the one it connects to
    (IDNA 2008; the resolver's own encoding is IDNA 2003: `faß.de` is `xn--fa-hia.de`, not `fass.de`).

    Returns the checked addresses in resolver order: delivery must connect to one of these, not
    resolve the name again, or a rebinding DNS answer (TTL 0) could swap in a private address after
    the check. Empty when ``webhook_allow_private`` skips the lookup.

    Raises ValueError with a human-readable reason; UnresolvableHost when the name did not resolve.
    """
    try:
        target = httpx.URL(url)
    except httpx.InvalidURL as e:
        raise ValueError(f"webhook URL is invalid: {e}") from e
    allowed_schemes = {"https", "http"} if settings.webhook_allow_http else {"https"}
    if target.scheme not in allowed_schemes or not target.raw_host:
        raise ValueError("webhook must be an https URL")
    if target.port is not None and not 0 < target.port < 65536:
        raise ValueError(f"webhook port {target.port} is out of range")
    if target.userinfo:
        raise ValueError("webhook URL must not contain credentials")
    if settings.webhook_allow_private:
        return []
    host = target.raw_host.decode("ascii")  # IPv6 without brackets, as getaddrinfo wants it
    try:
        infos = socket.getaddrinfo(host, target.port or 443, proto=socket.IPPROTO_TCP)
    except UnicodeError as e:  # a label empty or over 63 characters: never a name
        raise ValueError(f"webhook host {host!r} is not a valid host name") from e
    except socket.gaierror as e:
        raise UnresolvableHost(f"webhook host {host!r} does not resolve") from e
    addresses: list[str] = []
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        if not _is_public(ip):
            raise ValueError("webhook host resolves to a private or loopback address")
        if str(ip) not in addresses:
            addresses.append(str(ip))
    return addresses
