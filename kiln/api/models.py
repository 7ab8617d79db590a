"""Response models: what each JSON route answers, so /openapi.json documents responses. Fields that
bhatti's API omits when empty are optional here and left out of the JSON when unset."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Open(BaseModel):
    """Objects whose fields come from the agent (file entries, sessions): documented, passed through."""

    model_config = ConfigDict(extra="allow")


class StatusOut(Out):
    status: str


class ShellTokenOut(Out):
    token: str
    url: str


class ForwardOut(Out):
    guest_port: int
    host_port: int
    host_addr: str


class ClosedOut(Out):
    closed: int


class ResizedOut(Out):
    status: str
    size_mb: int


class HealthOut(Out):
    status: str
    uptime: str
    sandboxes: int | None = None  # the caller's own, with a key


class SnapshotOut(Out):
    kind: str
    bytes_written: int
    bytes_total: int
    taken_at: str


class NetPolicyOut(Out):
    default: str
    allow_hosts: list[str]
    allow_cidrs: list[str]


class NamedSnapshotOut(Out):
    id: str
    user_id: str
    name: str
    source_sandbox: str
    size_mb: int
    created_at: str
    paused_ms: int | None = None  # on create: how long the sandbox was paused


class ImageConfigOut(Out):
    env: dict[str, str]
    workdir: str
    user: str
    entrypoint: list[str]
    cmd: list[str]
    exposed_ports: list[int]
    labels: dict[str, str]


class ImageOut(Out):
    id: str
    name: str
    owner: str  # "global" for the built-in images, else the owner's user id
    source: str  # builtin, import, build or save
    status: str  # ready; for built-in images also building or failed
    size_mb: int
    created_at: str
    config: ImageConfigOut
    description: str | None = None
    progress: str | None = None  # while a built-in image is being built: its current step
    error: str | None = None


class ForkOut(Out):
    source: str
    paused_ms: int


class SandboxOut(Out):
    id: str
    name: str
    template_id: str
    engine: str
    status: str
    ip: str
    created_by: str
    created_at: str
    keep_hot: bool
    cpus: float
    memory_mb: int
    disk_size_mb: int
    disk_limit_mb: int
    image: str
    net_policy: NetPolicyOut
    reason: str | None = None
    stopped_at: str | None = None
    labels: dict[str, str] | None = None
    snapshot: SnapshotOut | None = None
    agent_restarts: int | None = None
    thermal: str | None = None  # hot | warm | cold (listings only)
    urls: list[str] | None = None  # published URLs (listings only)
    fork: ForkOut | None = None  # a fork's answer: its source and how long the source was paused
    from_pool: bool | None = None  # a create from a template that got a warm-pool member


class ExecOut(Out):
    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool | None = None


class DetachedOut(Out):
    pid: int
    output_file: str
    detached: bool


class FileEntryOut(Open):
    name: str


class SessionOut(Open):
    session_id: str
    argv: str
    tty: bool
    running: bool
    attached: bool


class PortOut(Out):
    container_port: int
    proxy_url: str
    host_port: int
    sandbox_id: str | None = None  # in GET /ports


class PublishOut(Out):
    id: str
    sandbox_id: str
    user_id: str
    port: int
    alias: str
    url: str
    created_at: str


class SecretOut(Out):
    name: str
    created_at: str
    updated_at: str


class AttachmentOut(Out):
    sandbox_id: str
    mount: str
    read_only: bool


class VolumeOut(Out):
    id: str
    user_id: str
    name: str
    size_mb: int
    status: str
    attachments: list[AttachmentOut] | None = None
    created_at: str


class TemplateVolumeOut(Out):
    name: str
    mount: str
    read_only: bool


class TemplateMountOut(Out):
    volume_name: str
    target: str
    readonly: bool
    auto_create: bool


class PoolOut(Out):
    size: int
    ready: int


class TemplateOut(Out):
    id: str
    name: str
    engine: str
    image: str
    cpus: float | None = None
    memory_mb: int | None = None
    disk_size_mb: int
    env: dict[str, str]
    init: str
    secrets: list[str]
    keep_hot: bool
    labels: dict[str, str]
    userdata: str
    volumes: list[TemplateVolumeOut]
    mounts: list[TemplateMountOut]
    net_policy: NetPolicyOut | None = None
    snapshot: str | None = None  # its sandboxes are resumed from this named snapshot
    start: list[str] = []  # its sandboxes run this at every boot (session "start"); [] = the image's
    warm_pool: int = 0  # sandboxes kept resumed from its snapshot and frozen, for instant creates
    pool: PoolOut | None = None
    created_at: str
