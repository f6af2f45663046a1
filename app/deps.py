"""Access to the per-app services from a request (kept apart from main.py to avoid import cycles)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

if TYPE_CHECKING:
    from app.main import Services


def services(request: Request) -> Services:
    return request.app.state.services
