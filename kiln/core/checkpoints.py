"""Named snapshots (bhatti's checkpoints): `POST /sandboxes/:id/checkpoint {"name"}` keeps a copy of a
sandbox as a fork would take it (memory and disk; the sandbox keeps running), and
`POST /snapshots/:name/resume` makes a new sandbox from it, any number of times. A snapshot belongs to
its user, survives its source's destroy and counts against `limits.max_snapshots`.
"""

from __future__ import annotations

import builtins
import logging
import secrets
from dataclasses import dataclass

from ..engine.base import EngineError, Forkable
from ..netpolicy import NetPolicy
from ..states import DEATHS, Status
from ..store.db import NamedSnapshot, NameTaken, SandboxRow, Template, User, now
from .errors import BadRequest, Conflict, Internal, NotFound, NotImplementedYet, TooManyRequests
from .forks import run_on_fork_hook
from .lifecycle import INHERITED, CreateRequest, SandboxService, inherited, spec_of
from .names import check_labels, check_name

log = logging.getLogger("kiln.checkpoints")


@dataclass
class TemplateResume:
    snapshot: NamedSnapshot
    name: str
    labels: dict[str, str]
    keep_hot: bool
    extra_env: dict[str, str]
    net_policy: object


class CheckpointService:
    def __init__(self, sandboxes: SandboxService):
        self.sandboxes = sandboxes
        self.store = sandboxes.store
        self.engine = sandboxes.engine if isinstance(sandboxes.engine, Forkable) else None

    def forkable(self) -> Forkable:
        if self.engine is None:
            raise NotImplementedYet(f"this engine ({self.sandboxes.engine.name}) cannot keep snapshots")
        return self.engine

    async def start(self) -> None:
        """Copies the engine kept that the store has no record of (a crash in between) are removed."""
        if self.engine is not None:
            await self.engine.prune_named(self.store.named_snapshot_ids())

    def sealing_id(self, snapshot_id: str) -> str:
        return f"snapshot.{snapshot_id}"

    async def checkpoint(
        self, user: User, id_or_name: str, name: object, kind: object = None
    ) -> tuple[NamedSnapshot, int]:
        engine = self.forkable()
        if kind not in (None, "", "memory"):
            if kind == "filesystem":
                raise NotImplementedYet("type filesystem: not supported (a snapshot keeps memory and disk)")
            raise BadRequest(f'type must be "memory", not {kind!r}')
        name = check_name("snapshot", name)
        row = self.sandboxes.get(user, id_or_name)
        if self.store.named_snapshot(user.id, name) is not None:
            raise Conflict(f'snapshot "{name}" already exists')
        have, limit = len(self.store.named_snapshots(user.id)), self.sandboxes.config.limits.max_snapshots
        if have >= limit:
            raise TooManyRequests(f"snapshot limit reached ({have}/{limit})")
        if self.store.attachments(sandbox_id=row.id):
            raise Conflict(f'sandbox "{id_or_name}" has volumes attached: it cannot be snapshotted')
        snapshot_id = secrets.token_hex(8)
        async with self.sandboxes.runtimes.lock(row.id):
            row = self.sandboxes.get(user, row.id)
            if row.status != Status.RUNNING and not (row.status == Status.STOPPED and row.reason not in DEATHS):
                raise Conflict(f'sandbox "{id_or_name}" is {row.status} ({row.reason}): start it first')
            self.sandboxes.events.before_stop(row.id)
            try:
                size, paused_ms = await engine.checkpoint_named(row.id, snapshot_id, user.id)
            except EngineError as e:
                raise Internal(f"snapshot of {row.id}: {e}") from e
        env = self.sandboxes.secrets.open_env(row.id, row.sealed_env)
        spec = {**inherited(row), "net_policy": self.sandboxes.policy_of(row).to_json()}
        snap = NamedSnapshot(
            snapshot_id, user.id, name, row.id, -(-size // (1 << 20)), now(), spec,
            self.sandboxes.secrets.seal_env(self.sealing_id(snapshot_id), env),
        )  # fmt: skip
        try:
            self.store.insert_named_snapshot(snap)
        except NameTaken:
            await engine.delete_named(snapshot_id)
            raise Conflict(f'snapshot "{name}" already exists') from None
        log.info(
            "snapshot %s (%s) of %s: %d MB, the sandbox paused %d ms",
            snapshot_id,
            name,
            row.id,
            snap.size_mb,
            paused_ms,
        )
        return snap, paused_ms

    def get(self, user: User, name: str) -> NamedSnapshot:
        snap = self.store.named_snapshot(user.id, name)
        if snap is None:
            raise NotFound(f'snapshot "{name}" not found')
        return snap

    def list(self, user: User) -> builtins.list[NamedSnapshot]:
        return self.store.named_snapshots(user.id)

    async def delete(self, user: User, name: str) -> None:
        snap = self.get(user, name)
        used = [t.name for t in self.store.list_templates(user.id) if t.spec.get("snapshot") == snap.name]
        if used:
            raise Conflict(f'snapshot "{name}" is used by template "{used[0]}"')
        self.store.delete_named_snapshot(snap.id)
        await self.forkable().delete_named(snap.id)

    def plan_from_template(self, user: User, t: Template, req: CreateRequest) -> TemplateResume:
        """What a create from a snapshot template makes, checked; what a resume cannot change is
        refused by name."""
        for field in ("image", "cpus", "memory_mb", "disk_size_mb", "init"):
            if getattr(req, field) not in (None, ""):
                raise BadRequest(f"{field}: a sandbox from a snapshot template takes it from the snapshot")
        if req.files or req.volumes or req.new_volumes or req.persistent_volumes:
            raise BadRequest("files and volumes: a sandbox from a snapshot template takes them from the snapshot")
        sandboxes = self.sandboxes
        secret_names = list(dict.fromkeys([*t.spec.get("secrets", []), *req.secrets]))
        labels = {**t.spec.get("labels", {}), **req.labels}
        check_labels(labels)
        return TemplateResume(
            snapshot=self.get(user, t.spec["snapshot"]),
            name=check_name("sandbox", req.name if req.name is not None else f"{t.name}-{secrets.token_hex(3)}"),
            labels=labels,
            keep_hot=req.keep_hot if req.keep_hot is not None else bool(t.spec.get("keep_hot")),
            extra_env={**t.spec.get("env", {}), **req.env, **sandboxes.secrets.resolve(user, secret_names)},
            net_policy=req.net_policy if req.net_policy is not None else t.spec.get("net_policy"),
        )

    def policy_of(self, snap: NamedSnapshot, raw: object) -> NetPolicy:
        if raw is not None:
            return self.sandboxes.net_policy(raw)
        return NetPolicy.from_json(snap.spec.get("net_policy"), self.sandboxes.config.network.egress_default)

    def env_of(self, snap: NamedSnapshot, extra: dict[str, str] | None) -> dict[str, str]:
        """A resumed sandbox's secret environment: the snapshot's, then what its create added."""
        return {**self.sandboxes.secrets.open_env(self.sealing_id(snap.id), snap.sealed_env), **(extra or {})}

    async def create_from_template(self, user: User, t: Template, req: CreateRequest) -> SandboxRow:
        """A create from a template made from a snapshot: resumed, not booted (its init already ran,
        its servers already listen). The request's env and secrets reach the resumed agent (they
        apply to new processes)."""
        plan = self.plan_from_template(user, t, req)
        return await self.resume(
            user,
            plan.snapshot.name,
            plan.name,
            labels=plan.labels,
            keep_hot=plan.keep_hot,
            extra_env=plan.extra_env,
            net_policy=plan.net_policy,
            template_id=t.id,
        )

    async def resume(
        self,
        user: User,
        name: str,
        new_name: object = None,
        labels: dict[str, str] | None = None,
        keep_hot: bool = False,
        extra_env: dict[str, str] | None = None,
        net_policy: object = None,
        template_id: str | None = None,
        pool: str = "",
    ) -> SandboxRow:
        """A new sandbox from the snapshot, named `new_name` or `<snapshot>-<6 hex>`; with `pool` (a
        template id), a warm-pool member of it instead: unlisted, named so no user name can collide."""
        engine = self.forkable()
        snap = self.get(user, name)
        sandboxes = self.sandboxes
        counted = not pool or sandboxes.config.limits.warm_pools_count
        if counted:
            sandboxes.check_quota(user)
        if pool:
            sandbox_name = f"~pool-{secrets.token_hex(6)}"
        else:
            sandbox_name = check_name("sandbox", new_name if new_name else f"{snap.name}-{secrets.token_hex(3)}")
        check_labels(labels or {})
        spec = snap.spec
        policy = self.policy_of(snap, net_policy)
        base = {f: spec[f] for f in INHERITED if f in spec}  # (an older snapshot's missing ones: the defaults)
        if template_id is not None:
            base["template_id"] = template_id
        if counted:
            sandboxes.check_disk_quota(user, base["disk_mb"])
        image = sandboxes.images.resolve(user, base.get("image") or "")
        env = self.env_of(snap, extra_env)
        row = sandboxes.copy_row(user, sandbox_name, base, env, policy, labels or {}, keep_hot)
        row.pool = pool
        sandboxes.insert_copy(row)
        engine_spec = spec_of(row, policy, image)

        async def start():
            handle = await engine.resume_named(snap.id, engine_spec)
            await run_on_fork_hook(handle, row.id)
            if extra_env:  # for new processes, as secrets are after every boot
                await handle.agent.set_secrets(env)
            return handle

        await sandboxes.bring_up(row, f"resume of snapshot {snap.name}", start)
        log.info("resumed snapshot %s as %s (%s)", snap.name, row.id, sandbox_name)
        return row


def snapshot_json(s: NamedSnapshot) -> dict:
    return {
        "id": s.id,
        "user_id": s.owner_id,
        "name": s.name,
        "source_sandbox": s.source_sandbox,
        "size_mb": s.size_mb,
        "created_at": s.created_at,
    }
