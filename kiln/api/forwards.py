"""Routes: POST/GET/DELETE /sandboxes/:id/forward (host ports forwarded into a sandbox)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict

from ..store.db import User
from .auth import require_user
from .deps import services
from .models import ClosedOut, ForwardOut

router = APIRouter()


class ForwardBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    guest_port: object = None  # checked by the service, with its own messages
    host_port: object = 0


@router.post("/sandboxes/{sandbox_id}/forward", response_model=ForwardOut)
async def add_forward(sandbox_id: str, body: ForwardBody, request: Request, user: User = Depends(require_user)):
    """Listen on a host port (0: any free one) and relay each connection to guest_port, waking the sandbox."""
    forwards = services(request).forwards
    relay = await forwards.add(user, sandbox_id, body.guest_port, body.host_port)
    return {"guest_port": relay.container_port, "host_port": relay.host_port, "host_addr": forwards.host_addr(relay)}


@router.get("/sandboxes/{sandbox_id}/forward", response_model=list[ForwardOut])
async def list_forwards(sandbox_id: str, request: Request, user: User = Depends(require_user)):
    forwards = services(request).forwards
    return [
        {"guest_port": r.container_port, "host_port": r.host_port, "host_addr": forwards.host_addr(r)}
        for r in forwards.listing(user, sandbox_id)
    ]


@router.delete("/sandboxes/{sandbox_id}/forward", response_model=ClosedOut)
async def close_forwards(sandbox_id: str, request: Request, user: User = Depends(require_user)):
    """Close every forward of the sandbox."""
    return {"closed": await services(request).forwards.close(user, sandbox_id)}
