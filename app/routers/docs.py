"""The API docs pages: /docs (Swagger UI) and /redoc (ReDoc), as FastAPI renders them, but loading
their files from this origin (fastapi-offline's pinned copies, mounted at ``DOCS_ASSETS_URL`` by
app.main) and under a Content-Security-Policy that lets them reach nothing else: FastAPI's own pages
load floating-version CDN scripts, with no integrity check, into the origin whose tab may hold an API
key, and ReDoc fetches a logo from its vendor's CDN (refused here: it hides the image).

The only inline script (Swagger UI's start-up call) is allowed by its hash. Both UIs set inline
styles, ReDoc searches in a ``blob:`` worker, and Swagger UI shows an image answer from a ``blob:`` URL.
"""

from __future__ import annotations

import base64
import hashlib
import re

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse

#: Where Swagger UI's and ReDoc's own files are served.
DOCS_ASSETS_URL = "/docs-assets"
_TITLE = "dynface API"
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)

router = APIRouter(include_in_schema=False)


def content_security_policy(html: str) -> str:
    """The pages' CSP: their own origin, plus the page's inline scripts by hash (CSP Level 2)."""
    hashes = [
        "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
        for script in _INLINE_SCRIPT.findall(html)
    ]
    return "; ".join(
        [
            "default-src 'none'",
            " ".join(["script-src 'self'", *hashes]),
            "style-src 'self' 'unsafe-inline'",
            "img-src 'self' data: blob:",  # Swagger UI shows an image answer from a blob: URL
            "font-src 'self' data:",
            "connect-src 'self'",
            "worker-src blob:",
            "form-action 'none'",
            "frame-ancestors 'none'",
            "base-uri 'none'",
        ]
    )


def _secured(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = content_security_policy(bytes(page.body).decode())
    page.headers["Referrer-Policy"] = "no-referrer"
    page.headers["X-Frame-Options"] = "DENY"
    return page


def _urls(request: Request) -> tuple[str, str]:
    """The OpenAPI document's URL and the assets' folder, behind the app's root_path (a prefix a
    proxy strips; joined once, never as `//`, which a browser reads as another host)."""
    root = request.scope.get("root_path", "").rstrip("/")
    return f"{root}{request.app.openapi_url}", f"{root}{DOCS_ASSETS_URL}"


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    openapi_url, assets = _urls(request)
    return _secured(
        get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{_TITLE} - Swagger UI",
            swagger_js_url=f"{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets}/swagger-ui.css",
            swagger_favicon_url=f"{assets}/favicon.png",
        )
    )


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    openapi_url, assets = _urls(request)
    return _secured(
        get_redoc_html(
            openapi_url=openapi_url,
            title=f"{_TITLE} - ReDoc",
            redoc_js_url=f"{assets}/redoc.standalone.js",
            redoc_favicon_url=f"{assets}/favicon.png",
            with_google_fonts=False,
        )
    )
