"""Warm pools: a snapshot template with `warm_pool: N` keeps N sandboxes resumed from its snapshot
and frozen (each with its own address, netns, cgroup and disk), so a create from the template is a
thaw, not a restore.

A member is a sandbox row with `pool` set to its template's id: never listed, never reachable by
its user, left alone by the thermal policy and the port scanner, and (unless
`limits.warm_pools_count`) not counted against quotas. A create claims the oldest ready member under
its lock: thaw, the create's env and secrets to its agent, its net policy if the create asks for
another, then the row becomes the user's (name, labels, keep_hot) and the pool refills in the
background. With no member ready the create falls back to a plain resume. Members survive a daemon
restart (frozen, like any warm sandbox), and the pool is checked and topped up at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..engine.base import EngineError, Pausable, State
from ..store.db import NameTaken, SandboxRow, Template, User
from .checkpoints import CheckpointService, TemplateResume
from .errors import Conflict, KilnError
from .lifecycle import CreateRequest

log = logging.getLogger("kiln.pools")

REFILL_BACKOFF = 5.0  # seconds before a pool tries again after a member failed to start


class PoolService:
    def __init__(self, checkpoints: CheckpointService):
        self.checkpoints = checkpoints
        self.sandboxes = checkpoints.sandboxes
        self.store = self.sandboxes.store
        self.engine = self.sandboxes.engine
        self.ready: dict[str, list[str]] = {}  # template id -> frozen members, oldest first
        self.refills: dict[str, asyncio.Task] = {}
        self.claim_lock = asyncio.Lock()

    # ------------------------------------------------------------ start, stop, sizes

    async def start(self) -> None:
        """Members that came through a restart frozen (or running) are kept; any other goes. Then
        every pool is topped up."""
        for row in self.store.pool_members():
            t = self.store.get_template(row.owner_id, row.pool)
            state = (await self.engine.status(row.id)).state
            if t is None or not t.spec.get("warm_pool") or state not in (State.PAUSED, State.RUNNING):
                await self.discard(row)
                continue
            if state == State.RUNNING:
                await self.freeze(row.id)
            self.ready.setdefault(row.pool, []).append(row.id)
        for t in self.store.list_templates():
            self.refill(t)

    async def close(self) -> None:
        tasks = list(self.refills.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    @staticmethod
    def size(t: Template) -> int:
        return int(t.spec.get("warm_pool") or 0) if t.spec.get("snapshot") else 0

    def status(self, t: Template) -> dict:
        return {"size": self.size(t), "ready": len(self.ready.get(t.id, []))}

    # ------------------------------------------------------------ filling

    def refill(self, t: Template) -> None:
        """Top the template's pool up in the background (one refill per pool at a time)."""
        if self.size(t) <= len(self.ready.get(t.id, [])) or t.id in self.refills:
            return
        task = asyncio.create_task(self.fill(t.owner_id, t.id))
        self.refills[t.id] = task
        task.add_done_callback(lambda _: self.refills.pop(t.id, None))

    async def fill(self, owner_id: str, template_id: str) -> None:
        while True:
            t = self.store.get_template(owner_id, template_id)
            user = self.store.user_by_id(owner_id)
            if t is None or user is None or len(self.ready.get(t.id, [])) >= self.size(t):
                return
            try:
                row = await self.checkpoints.resume(
                    user, t.spec["snapshot"], net_policy=t.spec.get("net_policy"), template_id=t.id, pool=t.id
                )
                await self.warm_up(row.id)
                await self.freeze(row.id)
            except (KilnError, EngineError) as e:
                log.warning("warm pool of template %s: a member did not start: %s", t.id, getattr(e, "message", e))
                await asyncio.sleep(REFILL_BACKOFF)
                continue
            self.ready.setdefault(t.id, []).append(row.id)
            log.info("warm pool of template %s: %d/%d ready", t.id, len(self.ready[t.id]), self.size(t))

    async def warm_up(self, sandbox_id: str) -> None:
        """One exec before freezing: a just-restored sandbox faults in what spawning a process needs
        on its first one (~100 ms here), which would otherwise be its claimer's first exec."""
        handle = self.engine.handle(sandbox_id)
        if handle is None:
            return
        with contextlib.suppress(Exception):  # an image without `true` only stays a little colder
            async for _ in handle.agent.exec({"argv": ["true"], "env": {}, "timeout_sec": 10}):
                pass

    async def freeze(self, sandbox_id: str) -> None:
        if isinstance(self.engine, Pausable):
            async with self.sandboxes.runtimes.lock(sandbox_id):
                await self.engine.pause(sandbox_id)

    async def discard(self, row: SandboxRow) -> None:
        with contextlib.suppress(ValueError):
            self.ready.get(row.pool, []).remove(row.id)
        await self.sandboxes.destroy_row(row)

    async def drain(self, template_id: str) -> None:
        """The template is gone (or its pool shrank to nothing): its members go."""
        task = self.refills.pop(template_id, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.ready.pop(template_id, None)
        for row in self.store.pool_members(template_id):
            await self.discard(row)

    # ------------------------------------------------------------ claiming

    async def create_from_template(self, user: User, t: Template, req: CreateRequest) -> tuple[SandboxRow, bool]:
        """(the sandbox, whether it came from the pool). With no member ready: a plain resume."""
        plan = self.checkpoints.plan_from_template(user, t, req)
        if self.size(t):
            row = await self.claim(user, t, plan)
            self.refill(t)
            if row is not None:
                return row, True
        return await self.checkpoints.create_from_template(user, t, req), False

    async def claim(self, user: User, t: Template, plan: TemplateResume) -> SandboxRow | None:
        sandboxes = self.sandboxes
        sandboxes.check_quota(user)  # from now on it is one of the user's sandboxes
        if self.store.get_sandbox(user.id, plan.name) is not None:
            raise Conflict(f'name "{plan.name}" is already in use')
        async with self.claim_lock:
            members = self.ready.get(t.id, [])
            if not members:
                return None
            member_id = members.pop(0)
        row = self.store.sandbox_by_id(member_id)
        if row is None or not row.pool:
            return None
        if not sandboxes.config.limits.warm_pools_count:
            sandboxes.check_disk_quota(user, row.disk_mb)
        policy = self.checkpoints.policy_of(plan.snapshot, plan.net_policy)
        env = self.checkpoints.env_of(plan.snapshot, plan.extra_env)
        try:
            async with sandboxes.runtimes.lock(member_id):
                if isinstance(self.engine, Pausable):
                    await self.engine.resume(member_id)
                handle = self.engine.handle(member_id)
                if handle is None:
                    raise EngineError(f"warm-pool member {member_id} is gone")
                if policy.to_json() != row.net_policy:
                    await self.engine.set_net_policy(member_id, policy)
                await handle.agent.set_secrets(env)
                sealed = sandboxes.secrets.seal_env(member_id, env)
                self.store.claim_pool_member(member_id, plan.name, plan.labels, plan.keep_hot, sealed, policy.to_json())
        except NameTaken:
            await self.discard(row)
            raise Conflict(f'name "{plan.name}" is already in use') from None
        except Exception as e:
            log.warning("claiming warm-pool member %s failed (%s); resuming instead", member_id, e)
            await self.discard(row)
            return None
        sandboxes.runtimes.touch(member_id)
        log.info("create from template %s: claimed warm-pool member %s as %s", t.id, member_id, plan.name)
        return self.store.sandbox_by_id(member_id)
