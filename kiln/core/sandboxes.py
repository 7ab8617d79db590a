"""Sandbox lifecycle and exec: the decisions between the API and the engine."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from ..agent.client import AgentError, AgentNotFound, AgentRequestError, ExecEvent
from ..config import Config
from ..engine.base import Engine, EngineError, NoSpace, SandboxHandle, SandboxSpec, State, ThermalEngine
from ..store.db import NameTaken, SandboxRow, Store, Template, User, now
from .errors import (BadGateway, BadRequest, Conflict, InsufficientStorage, Internal, KilnError, NotFound,
                     TooManyRequests)
from .secrets import SecretService
from .templates import TemplateService
from .thermal import ThermalManager
from .volumes import VolumeRequest, VolumeService

log = logging.getLogger("kiln.sandboxes")

NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MIN_MEMORY_MB = 64
MIN_DISK_MB = 64
DEFAULT_TIMEOUT = 300
MAX_TIMEOUT = 86400

# status values in the store
CREATING, RUNNING, STOPPED, UNKNOWN, DESTROYING = "creating", "running", "stopped", "unknown", "destroying"
IN_FLIGHT = {CREATING, DESTROYING}  # rows a crash can leave; the next start finishes or undoes them
# reasons a stopped sandbox has no memory snapshot: it died and must be started explicitly
DEATH_REASONS = {"oom", "exited", "snapshot_failed"}
RESTORE_FAILED = "restore_failed"
LABEL_PART_RE = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9._-]{0,61}[a-zA-Z0-9])?$")
LABEL_VALUE_RE = re.compile(r"^[a-zA-Z0-9._-]*$")
REASON_TEXT = {"oom": "it ran out of memory (the whole sandbox is killed when it exceeds memory_mb)",
               "exited": "its init process exited",
               "snapshot_failed": "taking its snapshot failed and it could not be resumed"}


def validate_labels(labels: dict) -> None:
    if len(labels) > 16:
        raise BadRequest("at most 16 labels")
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise BadRequest("labels must map strings to strings")
        prefix, _, name = key.rpartition("/")
        if prefix.startswith("bhatti.sh") or prefix.startswith("kiln.dev"):
            raise BadRequest(f"label prefix {prefix!r} is reserved")
        if not LABEL_PART_RE.match(name) or (prefix and not LABEL_PART_RE.match(prefix)):
            raise BadRequest(f"invalid label key: {key!r}")
        if len(value) > 256 or not LABEL_VALUE_RE.match(value):
            raise BadRequest(f"invalid label value for {key!r}")


@dataclass
class CreateRequest:
    """A create request; None means "not given" (the template's value or the default applies)."""
    name: str | None = None
    cpus: float | None = None
    memory_mb: int | None = None
    disk_size_mb: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    init: str | None = None
    keep_hot: bool | None = None
    template_id: str | None = None
    secrets: list[str] = field(default_factory=list)
    volumes: list[VolumeRequest] | None = None
    new_volumes: list[VolumeRequest] = field(default_factory=list)

    def with_template(self, t: Template) -> "CreateRequest":
        spec = t.spec
        return CreateRequest(
            name=self.name if self.name is not None else f"{t.name}-{secrets.token_hex(3)}",
            cpus=self.cpus if self.cpus is not None else spec.get("cpus"),
            memory_mb=self.memory_mb if self.memory_mb is not None else spec.get("memory_mb"),
            disk_size_mb=self.disk_size_mb,
            env={**spec.get("env", {}), **self.env},
            init=self.init if self.init is not None else spec.get("init", ""),
            keep_hot=self.keep_hot if self.keep_hot is not None else spec.get("keep_hot", False),
            template_id=t.id,
            secrets=list(dict.fromkeys(spec.get("secrets", []) + self.secrets)),
            volumes=self.volumes if self.volumes is not None else TemplateService.volumes(t),
            new_volumes=self.new_volumes)


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
    def __init__(self, store: Store, engine: Engine, config: Config, secrets: SecretService,
                 volumes: VolumeService, templates: TemplateService):
        self.store = store
        self.engine = engine
        self.config = config
        self.secrets = secrets
        self.volumes = volumes
        self.templates = templates
        self.locks: dict[str, asyncio.Lock] = {}
        self.thermal = ThermalManager(config.thermal)
        self.can_pause = isinstance(engine, ThermalEngine)  # once: a Protocol isinstance check is slow
        self.agent_restarts: dict[str, int] = {}  # agent servers that crashed and were restarted, per sandbox
        # sandboxes being paused or stopped right now: requests must wait on the lock, not slip in
        self.transitioning: set[str] = set()
        # Other services' reactions: before_stop(id) ends host connections into a sandbox before a
        # checkpoint or destroy; after_destroy(id) releases what they hold for it.
        self.before_stop: list[Callable[[str], None]] = []
        self.after_destroy: list[Callable[[str], Awaitable[None]]] = []
        engine.on_exit = self.on_engine_exit

    def lock(self, sandbox_id: str) -> asyncio.Lock:
        return self.locks.setdefault(sandbox_id, asyncio.Lock())

    # ------------------------------------------------------------ lookups

    def get(self, user: User, id_or_name: str) -> SandboxRow:
        row = self.store.get_sandbox(user.id, id_or_name)
        if row is None or row.status in IN_FLIGHT:
            raise NotFound(f'sandbox "{id_or_name}" not found')
        return row

    def list(self, user: User) -> list[SandboxRow]:
        return [r for r in self.store.list_sandboxes(user.id) if r.status not in IN_FLIGHT]

    def count(self) -> int:
        return self.store.count_sandboxes()

    # ------------------------------------------------------------ create / destroy

    def check_quota(self, user: User) -> None:
        max_count = min(user.max_sandboxes, self.config.limits.max_sandboxes)
        count = self.store.count_sandboxes(user.id)
        if count >= max_count:
            raise TooManyRequests(f"sandbox limit reached ({count}/{max_count})")

    def validate_create(self, user: User, req: CreateRequest) -> tuple[str, float, int]:
        """Check a create request's size and names; returns (name, cpus, memory_mb)."""
        lim = self.config.limits
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
        if req.disk_size_mb is not None and not MIN_DISK_MB <= req.disk_size_mb <= lim.max_disk_mb_per_sandbox:
            raise BadRequest(f"disk_size_mb must be between {MIN_DISK_MB} and {lim.max_disk_mb_per_sandbox}")
        name = req.name if req.name is not None else f"sandbox-{secrets.token_hex(3)}"
        if not NAME_RE.match(name):
            raise BadRequest("invalid sandbox name: must match [a-zA-Z0-9][a-zA-Z0-9._-]{0,62}")
        for key in req.env:
            if not ENV_KEY_RE.match(key):
                raise BadRequest(f"invalid env var name: {key!r}")
        return name, cpus, memory_mb

    async def create(self, user: User, req: CreateRequest) -> tuple[SandboxRow, bool]:
        """Create and boot a sandbox; returns (sandbox, existed). Same name again returns the existing one.

        Checks run in bhatti's order (quota, size, name, template, secrets, then the idempotent name,
        then volumes), all before anything is made, so a refused request changes nothing.
        """
        self.check_quota(user)
        if req.template_id:
            req = req.with_template(self.templates.get(user, req.template_id, message="template not found"))
        name, cpus, memory_mb = self.validate_create(user, req)
        secret_env = self.secrets.resolve(user, req.secrets)
        existing = self.store.get_sandbox(user.id, name)
        if existing is not None and existing.name == name and existing.status not in IN_FLIGHT:
            return existing, True
        self.volumes.resolve(user, req.volumes or [], req.new_volumes)
        try:
            self.engine.check_room_for_create()
        except NoSpace as e:
            raise InsufficientStorage(str(e)) from e
        sandbox_id = secrets.token_hex(8)
        row = SandboxRow(id=sandbox_id, owner_id=user.id, name=name, status=CREATING, cpus=cpus,
                         memory_mb=memory_mb, image="default", created_at=now(), env=dict(req.env),
                         init=req.init or "", keep_hot=bool(req.keep_hot), template_id=req.template_id or "",
                         sealed_env=self.secrets.seal_env(sandbox_id, secret_env),
                         disk_mb=req.disk_size_mb or self.config.limits.default_disk_mb)
        try:
            # The "creating" row reserves the name; a crash from here on is cleaned up at restart.
            self.store.insert_sandbox(row)
        except NameTaken:
            raise Conflict(f'sandbox "{name}" is being created or destroyed by another request')
        try:
            async with self.lock(row.id):
                mounts = await self.volumes.attach(user, row.id, req.volumes or [], req.new_volumes)
                spec = SandboxSpec(id=row.id, hostname=name, cpus=cpus, memory_mb=memory_mb, env=row.env,
                                   init=row.init, image=row.image, disk_mb=row.disk_mb, mounts=mounts,
                                   has_secrets=bool(secret_env))
                handle = await self.engine.create(spec)
                if secret_env:
                    await handle.agent.set_secrets(secret_env)
        except BaseException as e:
            with contextlib.suppress(EngineError):
                await self.engine.destroy(row.id)
            self.store.delete_sandbox(row.id)
            await self.volumes.release(row.id)
            self.locks.pop(row.id, None)
            if isinstance(e, (EngineError, AgentError)):
                raise Internal(f"create sandbox {row.id}: {e}") from e
            raise
        self.store.update_sandbox(row.id, status=RUNNING, ip=handle.ip)
        row.status, row.ip = RUNNING, handle.ip
        log.info("created sandbox %s (%s) at %s", row.id, name, handle.ip)
        return row, False

    async def destroy(self, user: User, id_or_name: str) -> None:
        row = self.get(user, id_or_name)
        async with self.lock(row.id):
            # marked first: a crash from here on is finished at the next start, never half-left
            self.store.update_sandbox(row.id, status=DESTROYING)
            for hook in self.before_stop:
                hook(row.id)
            try:
                await self.engine.destroy(row.id)
            except EngineError as e:
                log.error("destroy sandbox %s: %s", row.id, e)
            self.store.delete_sandbox(row.id)
        self.locks.pop(row.id, None)
        self.thermal.forget(row.id)
        self.agent_restarts.pop(row.id, None)
        for after in self.after_destroy:
            await after(row.id)
        log.info("destroyed sandbox %s (%s)", row.id, row.name)

    async def start(self, user: User, id_or_name: str, force: bool = False) -> SandboxRow:
        """Bring a stopped sandbox back: from its snapshot, or booted on its disk if it died.

        A no-op on a running one. After a failed restore only `force` tries again, and if the
        snapshot still cannot be restored, boots the sandbox fresh on its disk.
        """
        row = self.get(user, id_or_name)
        async with self.lock(row.id):
            row = self.get(user, row.id)
            if row.status == RUNNING:
                if self.is_warm(row.id):
                    await self.engine.resume(row.id)
                return row
            if row.reason == RESTORE_FAILED and not force:
                raise self.restore_failed_error(row)
            await self.wake_locked(row, force=force)
        log.info("started sandbox %s", row.id)
        return self.get(user, row.id)

    async def stop(self, user: User, id_or_name: str) -> SandboxRow:
        """Snapshot a sandbox to disk and free its memory; a no-op on a stopped one."""
        row = self.get(user, id_or_name)
        if row.status != STOPPED:
            try:
                await self.snapshot(row, reason="stop")
            except EngineError as e:
                log.error("stop of %s failed: %s", row.id, e)
                still_running = self.get(user, row.id).status == RUNNING
                if isinstance(e, NoSpace) and still_running:
                    raise InsufficientStorage(f"stop sandbox: {e}; the sandbox is still running") from e
                if still_running:
                    raise KilnError("stop sandbox: taking the snapshot failed; the sandbox is still running") from e
                raise KilnError("stop sandbox: taking the snapshot failed and the sandbox could not be resumed; "
                                f"start it again (on its disk) with POST /sandboxes/{row.id}/start") from e
        return self.get(user, row.id)

    async def update(self, user: User, id_or_name: str, name: str | None, labels_add: dict | None,
                     labels_remove: list | None, keep_hot: bool | None) -> SandboxRow:
        """PATCH: rename, then labels, then keep_hot (which wakes the sandbox when set)."""
        row = self.get(user, id_or_name)
        if name is not None and name != row.name:
            if not NAME_RE.match(name):
                raise BadRequest("invalid sandbox name: must match [a-zA-Z0-9][a-zA-Z0-9._-]{0,62}")
            try:
                self.store.update_sandbox(row.id, name=name)
            except NameTaken:
                raise Conflict(f'name "{name}" is already in use')
        if labels_add or labels_remove:
            validate_labels(labels_add or {})
            labels = {**row.labels, **(labels_add or {})}
            for key in labels_remove or []:
                labels.pop(key, None)
            self.store.update_sandbox(row.id, labels=labels)
        if keep_hot is not None:
            self.store.update_sandbox(row.id, keep_hot=keep_hot)
            if keep_hot:
                await self.ensure_hot(self.store.sandbox_by_id(row.id))
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
            if row.status in IN_FLIGHT:
                log.warning("removing sandbox %s left half-%s by a crash", row.id,
                            "made" if row.status == CREATING else "destroyed")
                await self.engine.destroy(row.id)
                self.store.delete_sandbox(row.id)
                continue
            status = await self.engine.status(row.id)
            if status.state == State.MISSING:
                log.warning("sandbox %s has no engine state left; marking it stopped", row.id)
                self.store.update_sandbox(row.id, status="unknown", reason="lost")
            elif status.state == State.DEAD and row.status == RUNNING:
                self.store.update_sandbox(row.id, status=STOPPED, reason=status.reason, stopped_at=now())
            elif status.state == State.STOPPED and row.status == RUNNING:
                self.store.update_sandbox(row.id, status=STOPPED, reason="", stopped_at=now())
            elif status.state in (State.RUNNING, State.PAUSED) and row.status == STOPPED:
                self.store.update_sandbox(row.id, status=RUNNING, reason="")
        for sandbox_id in await self.engine.list_ids():
            if sandbox_id not in rows:
                log.warning("removing engine sandbox %s that the store does not know", sandbox_id)
                await self.engine.destroy(sandbox_id)

    # ------------------------------------------------------------ thermal

    def running_rows(self) -> list[SandboxRow]:
        return [r for r in self.store.list_sandboxes() if r.status == RUNNING]

    def is_warm(self, sandbox_id: str) -> bool:
        return self.can_pause and self.engine.is_paused(sandbox_id)

    def thermal_state(self, row: SandboxRow) -> str | None:
        if row.status == RUNNING:
            return "warm" if self.is_warm(row.id) else "hot"
        if row.status == STOPPED and row.reason not in DEATH_REASONS | {RESTORE_FAILED}:
            return "cold"
        return None

    async def agent_activity(self, row: SandboxRow) -> dict:
        handle = self.engine.handle(row.id)
        if handle is None:
            raise AgentError("no engine handle")
        return await handle.agent.activity(timeout=5.0)

    async def pause(self, row: SandboxRow) -> None:
        async with self.lock(row.id):
            fresh = self.store.sandbox_by_id(row.id)
            if fresh and fresh.status == RUNNING and not fresh.keep_hot and not self.thermal.pins.get(row.id):
                self.transitioning.add(row.id)
                try:
                    await self.engine.pause(row.id)
                finally:
                    self.transitioning.discard(row.id)

    async def snapshot(self, row: SandboxRow, reason: str) -> None:
        """Stop to disk (explicit stop or thermal cold). EngineError leaves the sandbox running."""
        async with self.lock(row.id):
            fresh = self.store.sandbox_by_id(row.id)
            if fresh is None or fresh.status == STOPPED:
                return
            if reason == "thermal" and (fresh.keep_hot or self.thermal.pins.get(row.id)):
                return
            for hook in self.before_stop:
                hook(row.id)
            self.transitioning.add(row.id)
            try:
                try:
                    info = await self.engine.stop(row.id)
                except EngineError:
                    status = await self.settled_status(row.id)
                    if status.state not in (State.RUNNING, State.PAUSED):
                        self.store.update_sandbox(row.id, status=STOPPED, reason="snapshot_failed",
                                                  stopped_at=now())
                    raise
                self.store.update_sandbox(row.id, status=STOPPED, reason="", stopped_at=now(),
                                          snapshot=info.to_dict())
            finally:
                self.transitioning.discard(row.id)
        log.info("sandbox %s stopped to disk (%s): %s snapshot, %d of %d bytes written",
                 row.id, reason, info.kind, info.bytes_written, info.bytes_total)

    def mark_unknown(self, sandbox_id: str) -> None:
        self.store.update_sandbox(sandbox_id, status=UNKNOWN, reason="snapshot failed")

    async def ensure_hot(self, row: SandboxRow) -> SandboxHandle:
        """Every request that touches a sandbox's insides comes through here: wake it if needed.

        Concurrent wakes of one sandbox queue on its lock, so they share one resume or restore.
        """
        self.thermal.touch(row.id)
        if row.id not in self.transitioning and not self.is_warm(row.id):
            fresh = self.store.sandbox_by_id(row.id)  # `row` may predate a stop that has finished since
            handle = self.engine.handle(row.id)
            if fresh is not None and fresh.status == RUNNING and handle is not None:
                return handle
        async with self.lock(row.id):
            fresh = self.store.sandbox_by_id(row.id)
            if fresh is None:
                raise NotFound(f'sandbox "{row.name}" not found')
            return await self.wake_locked(fresh)

    async def wake_locked(self, row: SandboxRow, force: bool = False) -> SandboxHandle:
        if row.status == RUNNING and self.is_warm(row.id):
            await self.engine.resume(row.id)
            return self.engine.handle(row.id)
        status = await self.engine.status(row.id)
        if status.state == State.PAUSED:
            await self.engine.resume(row.id)
        elif status.state == State.STOPPED:
            started = time.monotonic()
            try:
                await self.engine.restore(row.id)
                log.info("sandbox %s restored from its snapshot in %.0f ms", row.id,
                         (time.monotonic() - started) * 1000)
            except EngineError as e:
                if not force:
                    self.store.update_sandbox(row.id, status=STOPPED, reason=RESTORE_FAILED)
                    log.error("restore of %s failed: %s", row.id, e)
                    raise self.restore_failed_error(row) from e
                log.error("forced start of %s: restore failed (%s); booting it on its disk", row.id, e)
                await self.boot(row)
        elif status.state == State.DEAD:
            await self.boot(row)
        elif status.state == State.MISSING:
            raise Internal(f"sandbox {row.id} is unknown to the engine")
        handle = self.engine.handle(row.id)
        self.store.update_sandbox(row.id, status=RUNNING, reason="", ip=handle.ip)
        self.thermal.touch(row.id)
        return handle

    async def boot(self, row: SandboxRow) -> None:
        """Boot on the disk (after a death or a lost snapshot); a fresh agent needs the secrets again."""
        handle = await self.engine.boot(row.id)
        if row.sealed_env:
            try:
                await handle.agent.set_secrets(self.secrets.open_env(row.id, row.sealed_env))
            except AgentError as e:
                raise EngineError(f"hand secrets to the agent: {e}") from e

    @staticmethod
    def restore_failed_error(row: SandboxRow) -> KilnError:
        return KilnError(f"wake sandbox: restoring its snapshot failed; "
                         f'start it with POST /sandboxes/{row.id}/start {{"force": true}}')

    async def shutdown(self) -> None:
        """On daemon exit: stop running sandboxes to disk; leave any that cannot be snapshotted running."""
        for row in self.running_rows():
            try:
                await self.snapshot(row, reason="shutdown")
            except Exception as e:  # never kill a sandbox we could not snapshot
                log.error("could not snapshot %s at shutdown, leaving it running: %s", row.id, e)

    # ------------------------------------------------------------ exec

    async def ready_handle(self, row: SandboxRow) -> SandboxHandle:
        """The handle of a sandbox that can take requests now: wakes it, unless it died."""
        if row.status == STOPPED and row.reason in DEATH_REASONS:
            why = REASON_TEXT[row.reason]
            raise Conflict(f'sandbox "{row.name}" is stopped: {why}; start it with POST /sandboxes/{row.id}/start')
        if row.reason == RESTORE_FAILED:
            raise self.restore_failed_error(row)
        try:
            return await self.ensure_hot(row)
        except EngineError as e:
            raise Internal(f"wake sandbox {row.id}: {e}") from e

    async def with_agent(self, user: User, id_or_name: str, op):
        """Wake the sandbox and run op(agent), mapping agent failures to API errors: a missing
        path or session is 404, a refused request 400, a sandbox that died says so."""
        row = self.get(user, id_or_name)
        with self.thermal.pin(row.id):  # never paused or stopped under a request in flight
            handle = await self.ready_handle(row)
            try:
                return await op(handle.agent)
            except AgentNotFound as e:
                raise NotFound(str(e)) from e
            except AgentRequestError as e:
                raise BadRequest(str(e)) from e
            except AgentError as e:
                await self.raise_for_dead(row, e)

    async def sessions(self, user: User, id_or_name: str) -> list[dict]:
        return await self.with_agent(user, id_or_name, lambda agent: agent.sessions())

    @staticmethod
    def validate_exec(req: ExecRequest) -> dict:
        if not req.cmd or not all(isinstance(a, str) for a in req.cmd) or req.cmd[0] == "":
            raise BadRequest("cmd required")
        for key in req.env:
            if not ENV_KEY_RE.match(key):
                raise BadRequest(f"invalid env var name: {key!r}")
        if req.cwd is not None and not req.cwd.startswith("/"):
            raise BadRequest("cwd must be an absolute path")
        texts = [*req.cmd, *req.env.values(), req.cwd or "", req.user if isinstance(req.user, str) else ""]
        if any("\x00" in t for t in texts):
            raise BadRequest("cmd, env, cwd and user must not contain NUL characters")
        if isinstance(req.user, int) and not 0 <= req.user < 2**31:
            raise BadRequest(f"invalid user id: {req.user}")
        timeout = req.timeout_sec if req.timeout_sec and 1 <= req.timeout_sec <= MAX_TIMEOUT else DEFAULT_TIMEOUT
        agent_req = {"argv": req.cmd, "env": req.env, "timeout_sec": timeout}
        if req.cwd:
            agent_req["cwd"] = req.cwd
        if req.user is not None and req.user != "":
            agent_req["user"] = req.user
        return agent_req

    async def exec_events(self, user: User, id_or_name: str, req: ExecRequest) -> AsyncIterator[ExecEvent]:
        """Validate, then return the event stream of the command (stdout/stderr chunks, then exit).

        The sandbox stays pinned hot from the request until the stream is closed.
        """
        agent_req = self.validate_exec(req)
        row = self.get(user, id_or_name)
        pin = contextlib.ExitStack()
        pin.enter_context(self.thermal.pin(row.id))
        try:
            handle = await self.ready_handle(row)
            stdin = req.stdin.encode() if req.stdin is not None else None
            events = handle.agent.exec(agent_req, stdin)
            # Fail before the first byte for what can be known early (bad user or cwd, agent down):
            # the agent answers "started" as soon as the command runs.
            try:
                first = await events.__anext__()
            except AgentRequestError as e:
                raise BadRequest(str(e)) from e
            except (AgentError, StopAsyncIteration) as e:
                await self.raise_for_dead(row, e)
        except BaseException:
            pin.close()
            raise
        return self._chain(row, first, events, pin)

    async def _chain(self, row: SandboxRow, first: ExecEvent, rest: AsyncIterator[ExecEvent],
                     pin: contextlib.ExitStack):
        try:
            if first.kind != "started":
                yield first
                if first.kind == "exit":
                    return
            async for ev in rest:
                yield ev
        except AgentError as e:
            await self.raise_for_dead(row, e)
        finally:
            pin.close()
            await rest.aclose()

    def note_agent_restarts(self, sandbox_id: str, restarts: int) -> bool:
        """Record the agent's restart count as it reports it; True if it went up."""
        if restarts > self.agent_restarts.get(sandbox_id, 0):
            self.agent_restarts[sandbox_id] = restarts
            log.warning("the agent of sandbox %s crashed and was restarted (%d so far)", sandbox_id, restarts)
            return True
        return False

    async def raise_for_dead(self, row: SandboxRow, err: Exception):
        """An agent failure: if the sandbox died (e.g. OOM), say so; if its agent crashed (something in
        the sandbox killed it; PID 1 starts it again), record that and say so; otherwise it is internal."""
        status = await self.settled_status(row.id)
        if status.state == State.DEAD:
            await self.on_engine_exit(row.id)
            why = REASON_TEXT.get(status.reason, "it stopped")
            raise Conflict(f'sandbox "{row.name}" stopped: {why}; start it with POST /sandboxes/{row.id}/start')
        handle = self.engine.handle(row.id)
        if status.state == State.RUNNING and handle is not None:
            await asyncio.sleep(0.3)  # PID 1 re-forks a dead agent server after 0.2 s
            try:
                restarts = (await handle.agent.activity(timeout=2.0)).get("agent_restarts", 0)
            except AgentError:
                restarts = 0
            if self.note_agent_restarts(row.id, restarts):
                raise BadGateway(f'the agent of sandbox "{row.name}" crashed during the request (something in '
                                 "the sandbox killed it) and has been restarted; the request can be retried")
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
