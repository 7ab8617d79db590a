"""Templates: saved create requests, owned by a user, in kiln's shape and bhatti's.

A create with `template_id` starts from the template; every field the request gives overrides it
(env and label maps are merged key by key, secrets are the union, volumes are replaced). bhatti's
fields: a client-chosen `id`, `image`, `disk_size_mb`, `labels` (the sandboxes' labels), `userdata`
(a file in the sandbox, USERDATA_PATH) and `mounts` (named volumes, auto-created, or a workspace volume
of the sandbox's own when `volume_name` is empty).
"""

from __future__ import annotations

import builtins
import math
import secrets
from dataclasses import dataclass, field

from ..netpolicy import InvalidPolicy, parse_policy
from ..store.db import NameTaken, Store, Template, User, now
from .errors import BadRequest, Conflict, NotFound
from .images import ImageService
from .names import NAME_PATTERN, NAME_RE, check_env_keys, check_labels, check_name, check_secret_names
from .volumes import PersistentVolume, VolumeRequest, validate_mount

USERDATA_PATH = "/etc/kiln/userdata"
ENGINES = ("", "gvisor")  # what a template may name: kiln runs gVisor only


@dataclass
class TemplateMount:
    """bhatti's template mount: a named volume at target (volume_name empty: the sandbox's workspace)."""

    volume_name: str
    target: str
    readonly: bool = False
    auto_create: bool = False

    def for_sandbox(self, sandbox_name: str) -> PersistentVolume:
        if not self.volume_name:
            return PersistentVolume(f"{sandbox_name}-workspace"[:63], self.target, self.readonly, None, True)
        return PersistentVolume(self.volume_name, self.target, self.readonly, None, self.auto_create)


@dataclass
class TemplateSpec:
    name: str | None = None  # bhatti needs none: the id is the name then
    cpus: float | None = None
    memory_mb: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    init: str = ""
    secrets: list[str] = field(default_factory=list)
    volumes: list[VolumeRequest] = field(default_factory=list)
    keep_hot: bool = False
    id: str | None = None
    image: str = ""
    disk_size_mb: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    userdata: str = ""
    mounts: list[TemplateMount] = field(default_factory=list)
    engine: str = ""
    net_policy: dict | None = None  # the sandboxes' egress policy (None: the daemon's default)
    snapshot: str = ""  # a named snapshot: its sandboxes are resumed from it instead of booted
    start: list[str] = field(default_factory=list)  # the start command (argv), instead of the image's
    warm_pool: int = 0  # sandboxes kept frozen from its snapshot (kiln/core/pools.py)

    def to_dict(self) -> dict:
        return {
            "engine": "gvisor",
            "cpus": self.cpus,
            "memory_mb": self.memory_mb,
            "image": self.image,
            "disk_size_mb": self.disk_size_mb,
            "env": self.env,
            "init": self.init,
            "secrets": self.secrets,
            "keep_hot": self.keep_hot,
            "labels": self.labels,
            "userdata": self.userdata,
            "volumes": [{"name": v.name, "mount": v.mount, "read_only": v.read_only} for v in self.volumes],
            "mounts": [vars(m) for m in self.mounts],
            "net_policy": self.net_policy,
            "snapshot": self.snapshot,
            "start": self.start,
            "warm_pool": self.warm_pool,
        }


class TemplateService:
    def __init__(self, store: Store, images: ImageService, max_warm_pool: int = 5):
        self.store = store
        self.images = images
        self.max_warm_pool = max_warm_pool

    def create(self, user: User, spec: TemplateSpec) -> Template:
        if spec.id is not None and not NAME_RE.match(spec.id):
            raise BadRequest(f"invalid template id: must match {NAME_PATTERN}")
        template_id = spec.id or secrets.token_hex(8)
        name = check_name("template", spec.name or template_id)  # bhatti needs no name: the id is one
        if spec.engine not in ENGINES:
            raise BadRequest(f'engine "{spec.engine}": this kiln runs gvisor')
        self.images.check_exists(user, spec.image)
        if spec.disk_size_mb < 0:
            raise BadRequest("disk_size_mb must not be negative")
        check_labels(spec.labels)
        if not 0 <= spec.warm_pool <= self.max_warm_pool:
            raise BadRequest(f"warm_pool must be between 0 and {self.max_warm_pool}")
        if spec.warm_pool and not spec.snapshot:
            raise BadRequest("warm_pool: only a template from a snapshot (snapshot or from_sandbox) keeps a warm pool")
        if spec.snapshot and spec.start:
            raise BadRequest("start: a template from a snapshot resumes its processes; it has no start command")
        if any("\x00" in a for a in spec.start):
            raise BadRequest("start must not contain NUL characters")
        if spec.snapshot and self.store.named_snapshot(user.id, spec.snapshot) is None:
            raise NotFound(f'snapshot "{spec.snapshot}" not found')
        if spec.net_policy is not None:
            try:
                spec.net_policy = parse_policy(spec.net_policy).to_json()
            except InvalidPolicy as e:
                raise BadRequest(f"invalid net_policy: {e}") from None
        for m in spec.mounts:
            validate_mount(m.target)
            if m.volume_name:
                check_name("volume", m.volume_name)
        if spec.cpus is not None and (not math.isfinite(spec.cpus) or spec.cpus <= 0):
            raise BadRequest("cpus must be a number greater than 0")
        if spec.memory_mb is not None and spec.memory_mb <= 0:
            raise BadRequest("memory_mb must be greater than 0")
        check_env_keys(list(spec.env))
        check_secret_names(spec.secrets)
        for v in spec.volumes:
            validate_mount(v.mount)
        t = Template(id=template_id, owner_id=user.id, name=name, spec=spec.to_dict(), created_at=now())
        try:
            self.store.insert_template(t)
        except NameTaken:
            if spec.id and self.store.get_template(user.id, name) is None:
                raise Conflict(f'template id "{template_id}" is taken') from None
            raise Conflict(f'template "{name}" already exists') from None
        return t

    def get(self, user: User, id_or_name: str, message: str | None = None) -> Template:
        t = self.store.get_template(user.id, id_or_name)
        if t is None:
            raise NotFound(message or f'template "{id_or_name}" not found')
        return t

    def list(self, user: User) -> builtins.list[Template]:
        return self.store.list_templates(user.id)

    def delete(self, user: User, id_or_name: str) -> None:
        self.store.delete_template(self.get(user, id_or_name).id)

    @staticmethod
    def volumes(t: Template) -> builtins.list[VolumeRequest]:
        return [VolumeRequest(v["name"], v["mount"], bool(v.get("read_only"))) for v in t.spec.get("volumes", [])]

    @staticmethod
    def mounts(t: Template, sandbox_name: str) -> builtins.list[PersistentVolume]:
        return [TemplateMount(**m).for_sandbox(sandbox_name) for m in t.spec.get("mounts", [])]


def template_json(t: Template) -> dict:
    # templates made before bhatti's fields existed lack them: the defaults fill in
    return {"id": t.id, "name": t.name, **TemplateSpec(name=t.name).to_dict(), **t.spec, "created_at": t.created_at}
