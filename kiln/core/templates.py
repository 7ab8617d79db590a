"""Templates: saved create requests (size, env, init, secrets, volumes, keep_hot), owned by a user.

A create with `template_id` starts from the template; every field the request gives overrides it
(env maps are merged key by key, secrets are the union, volumes are replaced).
"""

from __future__ import annotations

import builtins
import math
import secrets
from dataclasses import dataclass, field

from ..store.db import NameTaken, Store, Template, User, now
from .errors import BadRequest, Conflict, NotFound
from .names import check_env_keys, check_name, check_secret_names
from .volumes import VolumeRequest, validate_mount


@dataclass
class TemplateSpec:
    name: str
    cpus: float | None = None
    memory_mb: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    init: str = ""
    secrets: list[str] = field(default_factory=list)
    volumes: list[VolumeRequest] = field(default_factory=list)
    keep_hot: bool = False

    def to_dict(self) -> dict:
        return {
            "cpus": self.cpus,
            "memory_mb": self.memory_mb,
            "env": self.env,
            "init": self.init,
            "secrets": self.secrets,
            "keep_hot": self.keep_hot,
            "volumes": [{"name": v.name, "mount": v.mount, "read_only": v.read_only} for v in self.volumes],
        }


class TemplateService:
    def __init__(self, store: Store):
        self.store = store

    def create(self, user: User, spec: TemplateSpec) -> Template:
        check_name("template", spec.name or "")
        if spec.cpus is not None and (not math.isfinite(spec.cpus) or spec.cpus <= 0):
            raise BadRequest("cpus must be a number greater than 0")
        if spec.memory_mb is not None and spec.memory_mb <= 0:
            raise BadRequest("memory_mb must be greater than 0")
        check_env_keys(list(spec.env))
        check_secret_names(spec.secrets)
        for v in spec.volumes:
            validate_mount(v.mount)
        t = Template(id=secrets.token_hex(8), owner_id=user.id, name=spec.name, spec=spec.to_dict(), created_at=now())
        try:
            self.store.insert_template(t)
        except NameTaken:
            raise Conflict(f'template "{spec.name}" already exists')
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


def template_json(t: Template) -> dict:
    return {"id": t.id, "name": t.name, **t.spec, "created_at": t.created_at}
