"""Access to the per-app services from a request (kept apart from main.py to avoid import cycles)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

if TYPE_CHECKING:
    from app.main import Services


#: Set in the scope of a HEAD request answered as its GET (app.main `_as_get`).
HEAD_AS_GET = "dynface.head_as_get"


def services(request: Request) -> Services:
    return request.app.state.services


def is_head(request: Request) -> bool:
    """Whether this GET answers a HEAD: only its headers go out, so its body need not be read."""
    return bool(request.scope.get(HEAD_AS_GET))
