"""Routes: POST/GET /volumes, GET/DELETE /volumes/:name."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr

from ..store.db import User
from .auth import require_user
from .deps import services
from .models import StatusOut, VolumeOut

router = APIRouter()


class VolumeCreateBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr = ""
    size_mb: StrictInt | None = None


@router.post("/volumes", status_code=201, response_model=VolumeOut)
async def create_volume(body: VolumeCreateBody, request: Request, user: User = Depends(require_user)):
    volumes = services(request).volumes
    return volumes.volume_json(await volumes.create(user, body.name, body.size_mb))


@router.get("/volumes", response_model=list[VolumeOut])
async def list_volumes(request: Request, user: User = Depends(require_user)):
    volumes = services(request).volumes
    return [volumes.volume_json(v) for v in volumes.list(user)]


@router.get("/volumes/{name}", response_model=VolumeOut)
async def get_volume(name: str, request: Request, user: User = Depends(require_user)):
    volumes = services(request).volumes
    return volumes.volume_json(volumes.get(user, name))


@router.delete("/volumes/{name}", response_model=StatusOut, response_model_exclude_none=True)
async def delete_volume(name: str, request: Request, user: User = Depends(require_user)):
    await services(request).volumes.delete(user, name)
    return {"status": "deleted"}
