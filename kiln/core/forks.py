"""Forks: `POST /sandboxes {"from": "<id or name>"}` makes a sandbox that is a copy of another at one
instant: processes, memory, files, env (and the secrets in its memory). It gets its own id, name,
address, netns, cgroup and disk; the source keeps running, paused only while its memory is imaged
and its disk cloned (`fork.paused_ms` in the answer), and loses only its open TCP connections. A
stopped source stays stopped. Counted against the user's quotas like a create.

A fork is a clone: same hostname, same PIDs, same user-space PRNG state (reseed what must differ).
It inherits image, cpus, memory, disk cap, env, init (already run) and the net policy (which the
request may override); name, labels and keep_hot are the request's.
"""

from __future__ import annotations

import logging
import secrets

from ..engine.base import Forkable, SandboxSpec
from ..states import DEATHS, Status
from ..store.db import NameTaken, SandboxRow, User, now
from .errors import BadRequest, Conflict, KilnError, NotFound, NotImplementedYet, TooManyRequests
from .lifecycle import CreateRequest, SandboxService
from .names import check_labels, check_name

log = logging.getLogger("kiln.forks")

# what a fork takes from its source: asking for any of these with "from" is refused by name
INHERITED = ("template_id", "image", "cpus", "memory_mb", "disk_size_mb", "env", "init", "secrets", "files")


class ForkService:
    def __init__(self, sandboxes: SandboxService):
        self.sandboxes = sandboxes
        self.store = sandboxes.store
        self.engine = sandboxes.engine if isinstance(sandboxes.engine, Forkable) else None

    def check_request(self, req: CreateRequest, src: SandboxRow) -> None:
        """A fork takes these from its source: empty (bhatti's CLI sends every field, 0 or "" for none)
        or the source's own value is fine, anything else is refused by name."""
        same = {
            "template_id": src.template_id,
            "image": src.image,
            "cpus": src.cpus,
            "memory_mb": src.memory_mb,
            "disk_size_mb": src.disk_asked_mb,
        }
        given = [
            f for f in INHERITED if getattr(req, f) not in (None, "", 0, [], {}) and getattr(req, f) != same.get(f)
        ]
        if req.volumes or req.new_volumes or req.persistent_volumes:
            given.append("volumes")
        if given:
            raise BadRequest(f"{given[0]}: a fork takes it from its source (only name, labels, keep_hot, net_policy)")

    async def fork(self, user: User, source_ref: str, req: CreateRequest) -> tuple[SandboxRow, str, int]:
        """Returns the new sandbox, its source's id and how long the source was paused (ms)."""
        if self.engine is None:
            raise NotImplementedYet(f"this engine ({self.sandboxes.engine.name}) cannot fork")
        sandboxes = self.sandboxes
        sandboxes.check_quota(user)
        src = self.store.get_sandbox(user.id, source_ref)
        if src is None:
            raise NotFound(f'source sandbox "{source_ref}" not found')
        self.check_request(req, src)
        name = check_name("sandbox", req.name if req.name is not None else f"{src.name}-{secrets.token_hex(3)}")
        check_labels(req.labels)
        policy = sandboxes.net_policy(req.net_policy) if req.net_policy is not None else sandboxes.policy_of(src)
        if self.store.attachments(sandbox_id=src.id):
            raise Conflict(f'sandbox "{source_ref}" has volumes attached: it cannot be forked')
        reserved = self.store.disk_mb_reserved(user.id)
        limit = sandboxes.config.limits.max_disk_mb_per_user
        if reserved + src.disk_mb > limit:
            raise TooManyRequests(
                f"disk quota exceeded: {reserved} MB reserved, {src.disk_mb} MB more, {limit} MB allowed"
            )
        fork_id = secrets.token_hex(8)
        env = sandboxes.secrets.open_env(src.id, src.sealed_env)
        row = SandboxRow(
            id=fork_id,
            owner_id=user.id,
            name=name,
            status=Status.CREATING,
            cpus=src.cpus,
            memory_mb=src.memory_mb,
            image=src.image,
            labels=dict(req.labels),
            created_at=now(),
            env=dict(src.env),
            init=src.init,
            keep_hot=bool(req.keep_hot),
            template_id=src.template_id,
            sealed_env=sandboxes.secrets.seal_env(fork_id, env),  # bound to the fork's own id
            disk_mb=src.disk_mb,
            disk_asked_mb=src.disk_asked_mb,
            net_policy=policy.to_json(),
        )
        try:
            self.store.insert_sandbox(row)
        except NameTaken:
            raise Conflict(f'name "{name}" is already in use') from None
        spec = SandboxSpec(
            id=fork_id,
            hostname=src.name,  # (a fork keeps its source's hostname: it comes from the memory image)
            cpus=src.cpus,
            memory_mb=src.memory_mb,
            env=row.env,
            init=row.init,
            image=row.image,
            disk_mb=row.disk_mb,
            setup_pending=False,  # the agent in the image has its secrets already
            net_policy=policy,
        )
        paused_ms = 0
        engine, source_id = self.engine, src.id

        async def start():
            nonlocal paused_ms
            result = await engine.fork(source_id, spec)
            paused_ms = result.paused_ms
            return result.handle

        # the source's lock: no pause, stop, wake or destroy of it meanwhile
        async with sandboxes.runtimes.lock(src.id):
            try:  # the source as it is now, under its lock
                src = sandboxes.get(user, src.id)
                if src.status != Status.RUNNING and not (src.status == Status.STOPPED and src.reason not in DEATHS):
                    raise Conflict(f'sandbox "{source_ref}" is {src.status} ({src.reason}): start it before forking')
            except KilnError:
                self.store.delete_sandbox(fork_id)
                raise
            sandboxes.events.before_stop(src.id)  # host connections into it are reset by the checkpoint
            await sandboxes.bring_up(row, f"fork of {src.id}", start)
        log.info("forked %s (%s) as %s (%s); the source paused %d ms", src.id, src.name, fork_id, name, paused_ms)
        return row, src.id, paused_ms
