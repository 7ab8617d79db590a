"""Routes: /sandboxes create, list, get, delete, start."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from pydantic.json_schema import SkipJsonSchema

from ..core.boot_files import FileRequest
from ..core.errors import BadRequest
from ..core.lifecycle import CreateRequest, SandboxService
from ..core.names import RESERVED_LABEL_PREFIXES
from ..core.volumes import PersistentVolume, VolumeRequest
from ..netpolicy import NetPolicy
from ..store.db import SandboxRow, User
from .auth import require_user
from .deps import services
from .models import SandboxOut, StatusOut

router = APIRouter()


class VolumeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr
    mount: StrictStr
    read_only: StrictBool = False


class PersistentVolumeBody(BaseModel):
    """bhatti's way to attach a named volume: an existing one, or made now when auto_create is set."""

    model_config = ConfigDict(extra="ignore")
    name: StrictStr
    mount: StrictStr
    size_mb: StrictInt | None = None
    auto_create: StrictBool = False
    read_only: StrictBool = False


class NewVolumeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr
    mount: StrictStr
    size_mb: StrictInt | None = None


class FileBody(BaseModel):
    """A file written (owned by uid 1000) before init runs: bhatti's `files`."""

    model_config = ConfigDict(extra="ignore")
    guest_path: StrictStr | None = None
    content: StrictStr = ""  # base64
    mode: StrictStr = "0644"


class NetPolicyBody(BaseModel):
    """Egress: `public` (every public address) or `deny` (only these hosts and CIDRs); private ranges
    are always denied. `*.example.com` is any subdomain, not example.com itself."""

    model_config = ConfigDict(extra="allow")  # an unknown key is refused by name, not dropped
    default: StrictStr | None = None
    allow_hosts: list[StrictStr] | None = None
    allow_cidrs: list[StrictStr] | None = None

    def given(self) -> dict:
        return self.model_dump(exclude_none=True)


class CreateBody(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: StrictStr | None = None
    image: StrictStr | None = None
    labels: dict[StrictStr, StrictStr] | None = None
    # bhatti fields kiln does not have (yet): refused by name when they ask for something (the CLI sends
    # them empty every time, and empty asks for nothing); left out of the OpenAPI schema, which documents
    # what kiln does
    from_: StrictStr | None = Field(None, alias="from", description="fork this sandbox (id or name)")
    net_policy: NetPolicyBody | None = None
    mounts: SkipJsonSchema[list | None] = None
    hugepages: SkipJsonSchema[StrictBool | None] = None
    persistent_volumes: list[PersistentVolumeBody] = []
    files: list[FileBody] = []
    template_id: StrictStr | None = None
    cpus: float | None = None
    memory_mb: int | None = None
    disk_size_mb: StrictInt | None = None
    env: dict[StrictStr, StrictStr] = {}
    init: StrictStr | None = None
    keep_hot: StrictBool | None = None
    secrets: list[StrictStr] = []
    volumes: list[VolumeBody] | None = None
    new_volumes: list[NewVolumeBody] = []

    def refuse_what_kiln_lacks(self) -> None:
        if self.mounts:
            raise BadRequest("mounts: kiln never binds host directories into sandboxes (use volumes)")
        if self.hugepages:
            raise BadRequest("hugepages: not supported by the gVisor engine")

    def request(self) -> CreateRequest:
        self.refuse_what_kiln_lacks()
        return CreateRequest(
            name=self.name or None,  # bhatti's CLI sends "" for "no name"
            image=self.image or None,
            labels=dict(self.labels or {}),
            template_id=self.template_id,
            cpus=self.cpus,
            memory_mb=self.memory_mb,
            disk_size_mb=self.disk_size_mb,
            env=dict(self.env),
            init=self.init,
            keep_hot=self.keep_hot,
            secrets=list(self.secrets),
            volumes=None
            if self.volumes is None
            else [VolumeRequest(v.name, v.mount, v.read_only) for v in self.volumes],
            new_volumes=[VolumeRequest(v.name, v.mount, False, v.size_mb) for v in self.new_volumes],
            persistent_volumes=[
                PersistentVolume(v.name, v.mount, v.read_only, v.size_mb, v.auto_create)
                for v in self.persistent_volumes
            ],
            files=[FileRequest(f.guest_path, f.content, f.mode) for f in self.files],
            net_policy=self.net_policy.given() if self.net_policy is not None else None,
        )


class StartBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    force: StrictBool = False


class PatchBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr | None = None
    keep_hot: StrictBool | None = None
    labels_add: dict[StrictStr, StrictStr] | None = None
    labels_remove: list[StrictStr] | None = None
    net_policy: NetPolicyBody | None = None


def sandbox_json(row: SandboxRow, engine: str, agent_restarts: int = 0, default_policy: str = "public") -> dict:
    d = {
        "id": row.id,
        "name": row.name,
        "template_id": "",
        "engine": engine,
        "status": row.status,
        "ip": row.ip,
        "created_by": row.owner_id,
        "created_at": row.created_at,
        "keep_hot": row.keep_hot,
        "cpus": row.cpus,
        "memory_mb": row.memory_mb,
        "disk_size_mb": row.disk_asked_mb,  # bhatti's meaning: what was asked, 0 for the default
        "disk_limit_mb": row.disk_mb,  # what the sandbox may write to its root disk
        "image": row.image,
        "net_policy": NetPolicy.from_json(row.net_policy, default_policy).to_json(),
    }
    if row.reason:
        d["reason"] = row.reason
    if row.stopped_at:
        d["stopped_at"] = row.stopped_at
    if row.labels:
        d["labels"] = row.labels
    if row.snapshot:
        d["snapshot"] = row.snapshot
    if row.template_id:
        d["template_id"] = row.template_id
    if agent_restarts:
        d["agent_restarts"] = agent_restarts  # its agent crashed (killed from inside) and was restarted
    return d


def service(request: Request) -> SandboxService:
    return services(request).sandboxes


@router.post("/sandboxes", status_code=201, response_model=SandboxOut, response_model_exclude_none=True)
async def create_sandbox(body: CreateBody, request: Request, response: Response, user: User = Depends(require_user)):
    """Create a sandbox, or with `from`, fork one (a copy of it at this instant, memory included)."""
    if body.from_:
        row, source_id, paused_ms = await services(request).forks.fork(user, body.from_, body.request())
        return {
            **sandbox_json(row, service(request).engine.name),
            "fork": {"source": source_id, "paused_ms": paused_ms},
        }
    req = body.request()
    if req.template_id:
        t = services(request).templates.get(user, req.template_id, message="template not found")
        if t.spec.get("snapshot"):  # resumed from its snapshot (or a warm-pool member) instead of booted
            row, from_pool = await services(request).pools.create_from_template(user, t, req)
            return {**sandbox_json(row, service(request).engine.name), **({"from_pool": True} if from_pool else {})}
    row, existed = await service(request).create(user, req)
    if existed:
        response.status_code = 200
        response.headers["X-Bhatti-Existing"] = "true"
    return sandbox_json(row, service(request).engine.name)


@router.get("/sandboxes", response_model=list[SandboxOut], response_model_exclude_none=True)
async def list_sandboxes(request: Request, user: User = Depends(require_user)):
    engine = service(request).engine.name
    sandboxes = service(request)
    wanted = label_filter(request.query_params.getlist("label"))
    publish = services(request).publish
    out = []
    for row in sandboxes.list(user):
        if any(row.labels.get(k) != v for k, v in wanted):
            continue
        d = sandbox_json(row, engine, sandboxes.agent_restarts(row.id))
        thermal = sandboxes.tier(row)
        if thermal:
            d["thermal"] = thermal
        urls = [publish.url(rule.alias) for rule in publish.rules(row)]
        if urls:
            d["urls"] = urls  # listings only, as bhatti (its CLI's URL column)
        out.append(d)
    return out


def label_filter(filters: list[str]) -> list[tuple[str, str]]:
    """`?label=k=v` (repeatable, AND: the same key twice with two values matches nothing): split on the
    first `=`; a missing `=`, an empty key or a reserved prefix is 400."""
    wanted: list[tuple[str, str]] = []
    for f in filters:
        key, sep, value = f.partition("=")
        if not sep or not key:
            raise BadRequest(f"invalid label filter {f!r}: want key=value")
        if key.rpartition("/")[0].startswith(RESERVED_LABEL_PREFIXES):
            raise BadRequest(f"invalid label filter {f!r}: the prefix is reserved")
        wanted.append((key, value))
    return wanted


@router.api_route("/sandboxes/", methods=["GET", "POST", "PATCH", "DELETE"], include_in_schema=False)
async def missing_id(user: User = Depends(require_user)):
    raise BadRequest("missing sandbox id")


@router.get("/sandboxes/{sandbox_id}", response_model=SandboxOut, response_model_exclude_none=True)
async def get_sandbox(sandbox_id: str, request: Request, user: User = Depends(require_user)):
    sandboxes = service(request)
    row = sandboxes.get(user, sandbox_id)
    return sandbox_json(row, service(request).engine.name, sandboxes.agent_restarts(row.id))


@router.delete("/sandboxes/{sandbox_id}", response_model=StatusOut, response_model_exclude_none=True)
async def delete_sandbox(sandbox_id: str, request: Request, user: User = Depends(require_user)):
    await service(request).destroy(user, sandbox_id)
    return {"status": "destroyed"}


@router.patch("/sandboxes/{sandbox_id}", response_model=SandboxOut, response_model_exclude_none=True)
async def patch_sandbox(sandbox_id: str, body: PatchBody, request: Request, user: User = Depends(require_user)):
    policy = body.net_policy.given() if body.net_policy is not None else None
    row = await service(request).update(
        user, sandbox_id, body.name, body.labels_add, body.labels_remove, body.keep_hot, policy
    )
    return sandbox_json(row, service(request).engine.name)


@router.post("/sandboxes/{sandbox_id}/start", response_model=SandboxOut, response_model_exclude_none=True)
async def start_sandbox(
    sandbox_id: str, request: Request, body: StartBody | None = None, user: User = Depends(require_user)
):
    row = await service(request).start(user, sandbox_id, force=bool(body and body.force))
    return sandbox_json(row, service(request).engine.name)


@router.post("/sandboxes/{sandbox_id}/stop", response_model=SandboxOut, response_model_exclude_none=True)
async def stop_sandbox(sandbox_id: str, request: Request, user: User = Depends(require_user)):
    row = await service(request).stop(user, sandbox_id)
    return sandbox_json(row, service(request).engine.name)
