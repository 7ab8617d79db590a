"""Sandbox lifecycle and exec: the decisions between the API and the engine."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
from dataclasses import dataclass, field
from typing import AsyncIterator

from ..agent.client import AgentError, AgentRequestError, ExecEvent
from ..config import Config
from ..engine.base import Engine, EngineError, SandboxHandle, SandboxSpec, State
from ..store.db import NameTaken, SandboxRow, Store, User, now
from .errors import BadRequest, Conflict, Internal, NotFound, TooManyRequests

log = logging.getLogger("kiln.sandboxes")

NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MIN_MEMORY_MB = 64
DEFAULT_TIMEOUT = 300
MAX_TIMEOUT = 86400

# status values in the store
CREATING, RUNNING, STOPPED = "creating", "running", "stopped"
REASON_TEXT = {"oom": "it ran out of memory (the whole sandbox is killed when it exceeds memory_mb)",
               "exited": "its init process exited"}


@dataclass
class CreateRequest:
    name: str | None = None
    cpus: float | None = None
    memory_mb: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    init: str = ""
    keep_hot: bool = False


@dataclass
class ExecRequest:
    cmd: list[str]
    timeout_sec: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    user: str | int | None = None
    stdin: str | None = None


@dataclass
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool = False


class SandboxService:
    def __init__(self, store: Store, engine: Engine, config: Config):
        self.store = store
        self.engine = engine
        self.config = config
        self.locks: dict[str, asyncio.Lock] = {}
        engine.on_exit = self.on_engine_exit

    def lock(self, sandbox_id: str) -> asyncio.Lock:
        return self.locks.setdefault(sandbox_id, asyncio.Lock())

    # ------------------------------------------------------------ lookups

    def get(self, user: User, id_or_name: str) -> SandboxRow:
        row = self.store.get_sandbox(user.id, id_or_name)
        if row is None or row.status == CREATING:
            raise NotFound(f'sandbox "{id_or_name}" not found')
        return row

    def list(self, user: User) -> list[SandboxRow]:
        return [r for r in self.store.list_sandboxes(user.id) if r.status != CREATING]

    def count(self) -> int:
        return self.store.count_sandboxes()

    # ------------------------------------------------------------ create / destroy

    def validate_create(self, user: User, req: CreateRequest) -> tuple[str, float, int]:
        """Check a create request in the documented order; returns (name, cpus, memory_mb)."""
        lim = self.config.limits
        max_count = min(user.max_sandboxes, lim.max_sandboxes)
        count = self.store.count_sandboxes(user.id)
        if count >= max_count:
            raise TooManyRequests(f"sandbox limit reached ({count}/{max_count})")
        cpus = 1.0 if req.cpus is None else float(req.cpus)
        memory_mb = 512 if req.memory_mb is None else int(req.memory_mb)
        max_cpus = min(user.max_cpus_per_sandbox, lim.max_cpus_per_sandbox)
        max_mem = min(user.max_memory_mb_per_sandbox, lim.max_memory_mb_per_sandbox)
        if cpus > max_cpus:
            raise BadRequest(f"max {max_cpus:g} CPUs per sandbox")
        if cpus <= 0:
            raise BadRequest("cpus must be greater than 0")
        if memory_mb > max_mem:
            raise BadRequest(f"max {max_mem} MB memory per sandbox")
        if memory_mb < MIN_MEMORY_MB:
            raise BadRequest(f"memory_mb must be at least {MIN_MEMORY_MB}")
        name = req.name if req.name is not None else f"sandbox-{secrets.token_hex(3)}"
        if not NAME_RE.match(name):
            raise BadRequest("invalid sandbox name: must match [a-zA-Z0-9][a-zA-Z0-9._-]{0,62}")
        for key in req.env:
            if not ENV_KEY_RE.match(key):
                raise BadRequest(f"invalid env var name: {key!r}")
        return name, cpus, memory_mb

    async def create(self, user: User, req: CreateRequest) -> tuple[SandboxRow, bool]:
        """Create and boot a sandbox; returns (sandbox, existed). Same name again returns the existing one."""
        name, cpus, memory_mb = self.validate_create(user, req)
        existing = self.store.get_sandbox(user.id, name)
        if existing is not None and existing.name == name and existing.status != CREATING:
            return existing, True
        row = SandboxRow(id=secrets.token_hex(8), owner_id=user.id, name=name, status=CREATING, cpus=cpus,
                         memory_mb=memory_mb, image="default", created_at=now(), env=dict(req.env),
                         init=req.init, keep_hot=req.keep_hot)
        try:
            # The "creating" row reserves the name; a crash from here on is cleaned up at restart.
            self.store.insert_sandbox(row)
        except NameTaken:
            raise Conflict(f'sandbox "{name}" is being created by another request')
        spec = SandboxSpec(id=row.id, hostname=name, cpus=cpus, memory_mb=memory_mb, env=row.env,
                           init=row.init, image=row.image)
        try:
            async with self.lock(row.id):
                handle = await self.engine.create(spec)
        except BaseException as e:
            self.store.delete_sandbox(row.id)
            self.locks.pop(row.id, None)
            if isinstance(e, EngineError):
                raise Internal(f"create sandbox {row.id}: {e}") from e
            raise
        self.store.update_sandbox(row.id, status=RUNNING, ip=handle.ip)
        row.status, row.ip = RUNNING, handle.ip
        log.info("created sandbox %s (%s) at %s", row.id, name, handle.ip)
        return row, False

    async def destroy(self, user: User, id_or_name: str) -> None:
        row = self.get(user, id_or_name)
        async with self.lock(row.id):
            try:
                await self.engine.destroy(row.id)
            except EngineError as e:
                log.error("destroy sandbox %s: %s", row.id, e)
            self.store.delete_sandbox(row.id)
        self.locks.pop(row.id, None)
        log.info("destroyed sandbox %s (%s)", row.id, row.name)

    async def start(self, user: User, id_or_name: str) -> SandboxRow:
        """Start a stopped sandbox again with its disk; a no-op on a running one."""
        row = self.get(user, id_or_name)
        async with self.lock(row.id):
            row = self.get(user, row.id)
            if row.status == RUNNING:
                return row
            try:
                handle = await self.engine.boot(row.id)
            except EngineError as e:
                raise Internal(f"start sandbox {row.id}: {e}") from e
            self.store.update_sandbox(row.id, status=RUNNING, reason="", ip=handle.ip)
        log.info("started sandbox %s again", row.id)
        return self.get(user, row.id)

    # ------------------------------------------------------------ engine events

    async def settled_status(self, sandbox_id: str, wait: float = 3.0):
        """The engine's status once a sandbox that just failed us has settled.

        runsc reports a sandbox whose process has just died as running for a moment.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            status = await self.engine.status(sandbox_id)
            if status.state != State.RUNNING or loop.time() > deadline:
                return status
            await asyncio.sleep(0.1)

    async def on_engine_exit(self, sandbox_id: str) -> None:
        """The sandbox's runsc process exited without us asking: record why."""
        status = await self.settled_status(sandbox_id)
        async with self.lock(sandbox_id):
            if status.state != State.DEAD:
                return
            self.store.update_sandbox(sandbox_id, status=STOPPED, reason=status.reason, stopped_at=now())
        log.warning("sandbox %s stopped on its own: %s", sandbox_id, status.reason)

    async def reconcile(self) -> None:
        """Make the store and the engine agree after a (possibly unclean) daemon restart."""
        rows = {r.id: r for r in self.store.list_sandboxes()}
        for row in rows.values():
            if row.status == CREATING:
                log.warning("removing sandbox %s left half-made by a crash", row.id)
                await self.engine.destroy(row.id)
                self.store.delete_sandbox(row.id)
                continue
            status = await self.engine.status(row.id)
            if status.state == State.MISSING:
                log.warning("sandbox %s has no engine state left; marking it stopped", row.id)
                self.store.update_sandbox(row.id, status="unknown", reason="lost")
            elif status.state == State.DEAD and row.status == RUNNING:
                self.store.update_sandbox(row.id, status=STOPPED, reason=status.reason, stopped_at=now())
        for sandbox_id in await self.engine.list_ids():
            if sandbox_id not in rows:
                log.warning("removing engine sandbox %s that the store does not know", sandbox_id)
                await self.engine.destroy(sandbox_id)

    # ------------------------------------------------------------ exec

    async def ready_handle(self, row: SandboxRow) -> SandboxHandle:
        """The handle of a sandbox that can take requests now."""
        if row.status != RUNNING:
            why = REASON_TEXT.get(row.reason, "it is stopped")
            raise Conflict(f'sandbox "{row.name}" is stopped: {why}; start it with POST /sandboxes/{row.id}/start')
        handle = self.engine.handle(row.id)
        if handle is None:
            raise Internal(f"sandbox {row.id} is running in the store but unknown to the engine")
        return handle

    async def sessions(self, user: User, id_or_name: str) -> list[dict]:
        row = self.get(user, id_or_name)
        handle = await self.ready_handle(row)
        try:
            return await handle.agent.sessions()
        except AgentError as e:
            await self.raise_for_dead(row, e)

    @staticmethod
    def validate_exec(req: ExecRequest) -> dict:
        if not req.cmd or not all(isinstance(a, str) for a in req.cmd) or req.cmd[0] == "":
            raise BadRequest("cmd required")
        for key in req.env:
            if not ENV_KEY_RE.match(key):
                raise BadRequest(f"invalid env var name: {key!r}")
        if req.cwd is not None and not req.cwd.startswith("/"):
            raise BadRequest("cwd must be an absolute path")
        timeout = req.timeout_sec if req.timeout_sec and 1 <= req.timeout_sec <= MAX_TIMEOUT else DEFAULT_TIMEOUT
        agent_req = {"argv": req.cmd, "env": req.env, "timeout_sec": timeout}
        if req.cwd:
            agent_req["cwd"] = req.cwd
        if req.user is not None and req.user != "":
            agent_req["user"] = req.user
        return agent_req

    async def exec_events(self, user: User, id_or_name: str, req: ExecRequest) -> AsyncIterator[ExecEvent]:
        """Validate, then return the event stream of the command (stdout/stderr chunks, then exit)."""
        agent_req = self.validate_exec(req)
        row = self.get(user, id_or_name)
        handle = await self.ready_handle(row)
        stdin = req.stdin.encode() if req.stdin is not None else None
        events = handle.agent.exec(agent_req, stdin)
        # Fail before the first byte for what can be known early (bad user or cwd, agent down).
        try:
            first = await events.__anext__()
        except AgentRequestError as e:
            raise BadRequest(str(e)) from e
        except (AgentError, StopAsyncIteration) as e:
            await self.raise_for_dead(row, e)
        return self._chain(row, first, events)

    async def _chain(self, row: SandboxRow, first: ExecEvent, rest: AsyncIterator[ExecEvent]):
        try:
            yield first
            if first.kind == "exit":
                return
            async for ev in rest:
                yield ev
        except AgentError as e:
            await self.raise_for_dead(row, e)
        finally:
            await rest.aclose()

    async def raise_for_dead(self, row: SandboxRow, err: Exception):
        """An agent failure: if the sandbox died (e.g. OOM), say so; otherwise it is internal."""
        status = await self.settled_status(row.id)
        if status.state == State.DEAD:
            await self.on_engine_exit(row.id)
            why = REASON_TEXT.get(status.reason, "it stopped")
            raise Conflict(f'sandbox "{row.name}" stopped: {why}; start it with POST /sandboxes/{row.id}/start')
        raise Internal(f"exec in sandbox {row.id}: {err}")

    async def exec_buffered(self, user: User, id_or_name: str, req: ExecRequest) -> ExecResult:
        cap = self.config.limits.exec_output_cap_bytes
        out, err = bytearray(), bytearray()
        truncated = False
        events = await self.exec_events(user, id_or_name, req)
        async with contextlib.aclosing(events):
            async for ev in events:
                if ev.kind == "exit":
                    stderr = err.decode(errors="replace")
                    if truncated:
                        stderr += f"\n[output truncated at {cap // (1024 * 1024)}MB]"
                    return ExecResult(ev.exit_code, out.decode(errors="replace"), stderr, ev.timed_out)
                room = cap - len(out) - len(err)
                if len(ev.data) > room:
                    truncated = True
                (out if ev.kind == "stdout" else err).extend(ev.data[:max(0, room)])
        raise Internal("exec stream ended without an exit status")
