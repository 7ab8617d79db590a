"""Routes: POST/GET /volumes, GET/DELETE /volumes/:name, POST /volumes/:name/resize and /snapshot."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr

from ..core.errors import NotImplementedYet
from ..store.db import User
from .auth import require_user
from .deps import services
from .models import ResizedOut, StatusOut, VolumeOut

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


class ResizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    size_mb: StrictInt | None = None


class VolumeSnapshotBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr = ""


@router.post("/volumes/{name}/resize", response_model=ResizedOut)
async def resize_volume(name: str, body: ResizeBody, request: Request, user: User = Depends(require_user)):
    """Grow a detached volume (409 while attached; shrinking is 400)."""
    v = await services(request).volumes.resize(user, name, body.size_mb)
    return {"status": "resized", "size_mb": v.size_mb}


@router.post("/volumes/{name}/snapshot", status_code=201, response_model=VolumeOut)
async def snapshot_volume(name: str, body: VolumeSnapshotBody, request: Request, user: User = Depends(require_user)):
    """A new volume named `name` with this detached volume's content (409 while attached)."""
    volumes = services(request).volumes
    return volumes.volume_json(await volumes.clone(user, name, body.name))


@router.api_route("/volumes/{name}/backups", methods=["GET", "POST"], include_in_schema=False)
@router.api_route("/volumes/{name}/backups/{rest:path}", methods=["GET", "POST", "DELETE"], include_in_schema=False)
async def volume_backups(name: str, user: User = Depends(require_user), rest: str = ""):
    """bhatti's volume backups need object storage; kiln says so instead of a 404."""
    raise NotImplementedYet("backup not configured: volume backups need object storage, which this kiln lacks")
