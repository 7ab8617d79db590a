"""Routes: GET /sandboxes/:id/ports (scans now, wakes) and GET /ports (last scans, never wakes)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from ..store.db import User
from .auth import require_user
from .deps import services
from .models import PortOut

router = APIRouter()


def port_json(sandbox_ref: str, container_port: int, host_port: int) -> dict:
    return {
        "container_port": container_port,
        "proxy_url": f"/sandboxes/{sandbox_ref}/proxy/{container_port}/",
        "host_port": host_port,
    }


@router.get("/sandboxes/{sandbox_id}/ports", response_model=list[PortOut], response_model_exclude_none=True)
async def sandbox_ports(sandbox_id: str, request: Request, user: User = Depends(require_user)):
    tracker = services(request).ports
    row = await tracker.refresh(user, sandbox_id)
    return [port_json(sandbox_id, p, h) for p, h in tracker.listing(row.id)]


@router.get("/ports", response_model=list[PortOut], response_model_exclude_none=True)
async def all_ports(request: Request, user: User = Depends(require_user)):
    tracker = services(request).ports
    out = []
    for row in services(request).sandboxes.list(user):
        for p, h in tracker.listing(row.id):
            out.append({"sandbox_id": row.id, **port_json(row.id, p, h)})
    return out
