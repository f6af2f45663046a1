"""The browser page at ``/``: static HTML, CSS and JS from ``app/static`` (no build step).

Only the files in that folder are served, by name, from a fixed table built at import (no path is ever
joined from the request). Every response carries ``nosniff`` and a Content-Security-Policy that allows
our own scripts and styles only: the page never inserts server text as HTML, and results are shown
from ``blob:`` URLs (fetched with the API key header when keys are on). Hidden from the OpenAPI document.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

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


def _file(name: str) -> FileResponse:
    entry = _FILES.get(name)
    if entry is None:
        raise ApiError(404, "not_found", f"No static file {name!r}.")
    path, media_type = entry
    return FileResponse(path, media_type=media_type, headers=SECURITY_HEADERS)


@router.get("/")
def index() -> FileResponse:
    return _file("index.html")


@router.get("/static/{name}")
def static_file(name: str) -> FileResponse:
    return _file(name)
