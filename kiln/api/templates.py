"""Routes: POST/GET /templates, GET/DELETE /templates/:id (by id or name, the caller's own)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr

from ..core.templates import TemplateSpec, template_json
from ..core.volumes import VolumeRequest
from ..store.db import User
from .auth import require_user
from .deps import services
from .models import StatusOut, TemplateOut
from .sandboxes import VolumeBody

router = APIRouter()


class TemplateBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr
    cpus: float | None = None
    memory_mb: int | None = None
    env: dict[StrictStr, StrictStr] = {}
    init: StrictStr = ""
    secrets: list[StrictStr] = []
    volumes: list[VolumeBody] = []
    keep_hot: StrictBool = False


@router.post("/templates", status_code=201, response_model=TemplateOut)
async def create_template(body: TemplateBody, request: Request, user: User = Depends(require_user)):
    spec = TemplateSpec(
        name=body.name,
        cpus=body.cpus,
        memory_mb=body.memory_mb,
        env=dict(body.env),
        init=body.init,
        secrets=list(body.secrets),
        keep_hot=body.keep_hot,
        volumes=[VolumeRequest(v.name, v.mount, v.read_only) for v in body.volumes],
    )
    return template_json(services(request).templates.create(user, spec))


@router.get("/templates", response_model=list[TemplateOut])
async def list_templates(request: Request, user: User = Depends(require_user)):
    return [template_json(t) for t in services(request).templates.list(user)]


@router.get("/templates/{template_id}", response_model=TemplateOut)
async def get_template(template_id: str, request: Request, user: User = Depends(require_user)):
    return template_json(services(request).templates.get(user, template_id, message="not found"))


@router.delete("/templates/{template_id}", response_model=StatusOut, response_model_exclude_none=True)
async def delete_template(template_id: str, request: Request, user: User = Depends(require_user)):
    services(request).templates.delete(user, template_id)
    return {"status": "deleted"}
