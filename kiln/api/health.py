"""Route: GET /health (no auth)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from .auth import bearer_key
from .deps import services
from .models import HealthOut

router = APIRouter()


def go_duration(seconds: float) -> str:
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


@router.api_route(
    "/health",
    methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
    response_model=HealthOut,
    response_model_exclude_none=True,
)
async def health(request: Request):
    """Liveness for anyone; the sandbox count only for a caller with a key, and only their own
    (an anonymous visitor learns nothing about the tenants)."""
    svc = services(request)
    out: dict = {"status": "ok", "uptime": go_duration(time.monotonic() - svc.started)}
    key = bearer_key(request)
    user = svc.store.user_by_key(key) if key else None
    if user is not None:
        out["sandboxes"] = len(svc.sandboxes.list(user))
    return out
