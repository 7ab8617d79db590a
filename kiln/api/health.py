"""Route: GET /health (no auth)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

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
    return {
        "status": "ok",
        "sandboxes": services(request).sandboxes.count(),
        "uptime": go_duration(time.monotonic() - services(request).started),
    }
