"""Routes: POST /sandboxes/:id/checkpoint, GET /snapshots, GET/DELETE /snapshots/:name,
POST /snapshots/:name/resume (named snapshots, bhatti's shape)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, StrictStr

from ..core.checkpoints import snapshot_json
from ..store.db import User
from .auth import require_user
from .deps import services
from .models import NamedSnapshotOut, SandboxOut, StatusOut
from .sandboxes import sandbox_json

router = APIRouter()


class CheckpointBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr = ""
    type: StrictStr | None = None  # "memory" (the only kind: memory and disk)


class ResumeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr | None = None


@router.post("/sandboxes/{sandbox_id}/checkpoint", status_code=201, response_model=NamedSnapshotOut)
async def checkpoint(sandbox_id: str, body: CheckpointBody, request: Request, user: User = Depends(require_user)):
    """Keep a copy of the sandbox (memory and disk) under a name; the sandbox keeps running."""
    snap, paused_ms = await services(request).checkpoints.checkpoint(user, sandbox_id, body.name, body.type)
    return {**snapshot_json(snap), "paused_ms": paused_ms}


@router.get("/snapshots", response_model=list[NamedSnapshotOut], response_model_exclude_none=True)
async def list_snapshots(request: Request, user: User = Depends(require_user)):
    return [snapshot_json(s) for s in services(request).checkpoints.list(user)]


@router.get("/snapshots/{name}", response_model=NamedSnapshotOut, response_model_exclude_none=True)
async def get_snapshot(name: str, request: Request, user: User = Depends(require_user)):
    return snapshot_json(services(request).checkpoints.get(user, name))


@router.delete("/snapshots/{name}", response_model=StatusOut)
async def delete_snapshot(name: str, request: Request, user: User = Depends(require_user)):
    await services(request).checkpoints.delete(user, name)
    return {"status": "deleted"}


@router.post("/snapshots/{name}/resume", status_code=201, response_model=SandboxOut, response_model_exclude_none=True)
async def resume_snapshot(
    name: str, request: Request, body: ResumeBody | None = None, user: User = Depends(require_user)
):
    """A new sandbox from the snapshot (any number of times)."""
    row = await services(request).checkpoints.resume(user, name, body.name if body else None)
    return sandbox_json(row, services(request).sandboxes.engine.name)
