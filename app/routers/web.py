"""The browser page at ``/``: static HTML, CSS and JS from ``app/static`` (no build step).

Only the files in that folder are served, by name, from a fixed table built at import (no path is ever
joined from the request). Every response carries ``nosniff`` and a Content-Security-Policy that allows
our own scripts and styles only: the page never inserts server text as HTML, and results are shown
from ``blob:`` URLs (fetched with the API key header when keys are on). Hidden from the OpenAPI document.

The files are sent with ``Cache-Control: no-cache`` (a new release is picked up at once) and an ETag of
their content: a browser's revalidation (``If-None-Match``) is answered 304 Not Modified, without the
file. The page is only at ``/``: its URLs are relative to it (so that it works under a proxy's path
prefix), which from ``/static/index.html`` would name ``/static/static/...``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi import APIRouter, Request, Response

from app.errors import ApiError

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob: data:",
        "connect-src 'self'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ]
)

#: Headers on every page response.
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}

#: name → (path, media type) of every servable file.
_FILES = {
    p.name: (p, _MEDIA_TYPES[p.suffix])
    for p in (sorted(STATIC_DIR.iterdir()) if STATIC_DIR.is_dir() else [])
    if p.is_file() and p.suffix in _MEDIA_TYPES
}

router = APIRouter(include_in_schema=False)


def _etag_matches(if_none_match: str, etag: str) -> bool:
    """Whether an If-None-Match header names ``etag`` (RFC 9110 §13.1.2): ``*``, or a list of entity
    tags compared weakly (a ``W/`` prefix on either side is ignored)."""
    if if_none_match.strip() == "*":
        return True
    ours = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == ours for tag in if_none_match.split(","))


def _file(name: str, request: Request) -> Response:
    entry = _FILES.get(name)
    if entry is None:
        raise ApiError(404, "not_found", f"No static file {name!r}.")
    path, media_type = entry
    body = path.read_bytes()  # a few tens of KB: read and hashed per request, so an edit shows at once
    # Of the content, not of mtime and size (FileResponse's): a release built with fixed timestamps
    # and a same-size change to a file would be answered 304 and the old file kept.
    headers = {**SECURITY_HEADERS, "ETag": f'"{hashlib.sha256(body).hexdigest()[:32]}"'}
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None and _etag_matches(if_none_match, headers["ETag"]):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=media_type, headers=headers)


@router.get("/")
def index(request: Request) -> Response:
    return _file("index.html", request)


@router.get("/static/{name}")
def static_file(name: str, request: Request) -> Response:
    if name == "index.html":
        raise ApiError(404, "not_found", "The page is at /, not under /static/.")
    return _file(name, request)
