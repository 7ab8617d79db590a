"""Routes: POST/GET /templates, GET/DELETE /templates/:id (by id or name, the caller's own)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr

from ..core.errors import BadRequest
from ..core.templates import TemplateMount, TemplateSpec, template_json
from ..core.volumes import VolumeRequest
from ..store.db import Template, User
from .auth import require_user
from .deps import Services, services
from .models import StatusOut, TemplateOut
from .sandboxes import NetPolicyBody, VolumeBody

router = APIRouter()


class TemplateMountBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    volume_name: StrictStr = ""  # empty: a workspace volume of each sandbox's own
    target: StrictStr
    readonly: StrictBool = False
    auto_create: StrictBool = False


class TemplateBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: StrictStr | None = None
    name: StrictStr | None = None
    engine: StrictStr = ""
    image: StrictStr = ""
    cpus: float | None = None
    memory_mb: int | None = None
    disk_size_mb: StrictInt = 0
    env: dict[StrictStr, StrictStr] = {}
    init: StrictStr = ""
    secrets: list[StrictStr] = []
    labels: dict[StrictStr, StrictStr] = {}
    userdata: StrictStr = ""
    volumes: list[VolumeBody] = []
    mounts: list[TemplateMountBody] = []
    keep_hot: StrictBool = False
    net_policy: NetPolicyBody | None = None
    snapshot: StrictStr = ""  # a named snapshot to resume its sandboxes from
    start: StrictStr | list[StrictStr] = ""  # run at every boot as session "start" (instead of the image's)
    warm_pool: StrictInt = 0  # sandboxes kept resumed from the snapshot and frozen: creates are a thaw
    from_sandbox: StrictStr = ""  # snapshot this sandbox now (as "<template name>-template") and use that


@router.post("/templates", status_code=201, response_model=TemplateOut)
async def create_template(body: TemplateBody, request: Request, user: User = Depends(require_user)):
    spec = TemplateSpec(
        id=body.id or None,
        name=body.name or None,
        engine=body.engine,
        image=body.image,
        disk_size_mb=body.disk_size_mb,
        labels=dict(body.labels),
        userdata=body.userdata,
        mounts=[TemplateMount(m.volume_name, m.target, m.readonly, m.auto_create) for m in body.mounts],
        net_policy=body.net_policy.given() if body.net_policy is not None else None,
        cpus=body.cpus,
        memory_mb=body.memory_mb,
        env=dict(body.env),
        init=body.init,
        secrets=list(body.secrets),
        keep_hot=body.keep_hot,
        volumes=[VolumeRequest(v.name, v.mount, v.read_only) for v in body.volumes],
        snapshot=body.snapshot,
        start=["/bin/sh", "-c", body.start] if isinstance(body.start, str) and body.start else list(body.start or []),
        warm_pool=body.warm_pool,
    )
    svc = services(request)
    if body.snapshot and body.from_sandbox:
        raise BadRequest("snapshot and from_sandbox: give one")
    if not body.from_sandbox:
        return with_pool(svc, svc.templates.create(user, spec))
    # a template made from a sandbox as it is now: its snapshot first, then the template naming it
    spec.snapshot = f"{body.name or body.id or body.from_sandbox}-template"
    await svc.checkpoints.checkpoint(user, body.from_sandbox, spec.snapshot)
    try:
        return with_pool(svc, svc.templates.create(user, spec))
    except BaseException:
        await svc.checkpoints.delete(user, spec.snapshot)
        raise


def with_pool(svc: Services, t: Template) -> dict:
    """The template as JSON, with its warm pool's state; a new or changed pool starts filling."""
    svc.pools.refill(t)
    return {**template_json(t), **({"pool": svc.pools.status(t)} if svc.pools.size(t) else {})}


@router.get("/templates", response_model=list[TemplateOut])
async def list_templates(request: Request, user: User = Depends(require_user)):
    return [with_pool(services(request), t) for t in services(request).templates.list(user)]


@router.get("/templates/{template_id}", response_model=TemplateOut)
async def get_template(template_id: str, request: Request, user: User = Depends(require_user)):
    return with_pool(services(request), services(request).templates.get(user, template_id, message="not found"))


@router.delete("/templates/{template_id}", response_model=StatusOut, response_model_exclude_none=True)
async def delete_template(template_id: str, request: Request, user: User = Depends(require_user)):
    svc = services(request)
    t = svc.templates.get(user, template_id)
    await svc.pools.drain(t.id)  # its warm pool's members go first
    svc.templates.delete(user, t.id)
    return {"status": "deleted"}
