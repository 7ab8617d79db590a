"""Sandbox lifecycle: create, destroy, start, stop, pause, update, and agreeing with the engine
after a restart. Every status change goes through the store's intent methods (kiln/states.py)."""

from __future__ import annotations

import base64
import builtins
import contextlib
import logging
import math
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace

from ..agent.client import AgentError, AgentRequestError
from ..config import Config
from ..engine.base import Capabilities, Engine, EngineError, NoSpace, SandboxHandle, SandboxSpec, State
from ..netpolicy import InvalidPolicy, NetPolicy, parse_policy
from ..states import DEATHS, IN_FLIGHT, Reason, Status, Tier
from ..store.db import NameTaken, SandboxRow, Store, Template, User, now
from .boot_files import BootFile, FileRequest, check_boot_files
from .diagnosis import Diagnosis, death_reason
from .errors import BadRequest, Conflict, InsufficientStorage, Internal, KilnError, NotFound, TooManyRequests
from .events import SandboxEvents
from .images import ImageService, ResolvedImage
from .names import check_env_keys, check_labels, check_name
from .runtime import Runtimes
from .secrets import SecretService
from .templates import USERDATA_PATH, TemplateService
from .volumes import PersistentVolume, VolumeRequest, VolumeService
from .waking import Waker, restore_failed_error

log = logging.getLogger("kiln.sandboxes")

MIN_MEMORY_MB = 64
MIN_DISK_MB = 64
MIN_CPUS = 0.01  # below this a CFS quota rounds to nothing (no limit at all) or is refused


class SnapshotsUnsupported(KilnError):
    status = 409


@dataclass
class CreateRequest:
    """A create request; None means "not given" (the template's value or the default applies)."""

    name: str | None = None
    image: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
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
    persistent_volumes: list[PersistentVolume] = field(default_factory=list)
    files: list[FileRequest] = field(default_factory=list)
    net_policy: object = None  # as the request gave it: checked by the service
    start: list[str] | None = None  # a template's start command, instead of the image's

    def with_template(self, t: Template) -> CreateRequest:
        spec = t.spec
        name = self.name if self.name is not None else f"{t.name}-{secrets.token_hex(3)}"
        userdata = spec.get("userdata") or ""
        files = [FileRequest(USERDATA_PATH, base64.b64encode(userdata.encode()).decode(), "0600")] if userdata else []
        return CreateRequest(
            name=name,
            image=self.image or spec.get("image") or None,
            labels={**spec.get("labels", {}), **self.labels},
            cpus=self.cpus if self.cpus is not None else spec.get("cpus"),
            memory_mb=self.memory_mb if self.memory_mb is not None else spec.get("memory_mb"),
            disk_size_mb=self.disk_size_mb if self.disk_size_mb is not None else spec.get("disk_size_mb") or None,
            env={**spec.get("env", {}), **self.env},
            init=self.init if self.init is not None else spec.get("init", ""),
            keep_hot=self.keep_hot if self.keep_hot is not None else spec.get("keep_hot", False),
            template_id=t.id,
            secrets=list(dict.fromkeys(spec.get("secrets", []) + self.secrets)),
            volumes=self.volumes if self.volumes is not None else TemplateService.volumes(t),
            new_volumes=self.new_volumes,
            persistent_volumes=[*TemplateService.mounts(t, name), *self.persistent_volumes],
            files=[*files, *self.files],
            net_policy=self.net_policy if self.net_policy is not None else spec.get("net_policy"),
            start=spec.get("start") or None,
        )


INHERITED = ("cpus", "memory_mb", "image", "env", "init", "disk_mb", "disk_asked_mb", "template_id")


def inherited(row: SandboxRow) -> dict:
    """What a copy of a sandbox (a fork, a snapshot's sandboxes) takes from it."""
    return {f: getattr(row, f) for f in INHERITED}


def spec_of(
    row: SandboxRow, policy: NetPolicy, image: ResolvedImage, hostname: str | None = None, **extra
) -> SandboxSpec:
    """The engine's spec for a row (hostname: the row's name unless given); the image's env is under
    the sandbox's own."""
    return SandboxSpec(
        id=row.id,
        hostname=hostname or row.name,
        cpus=row.cpus,
        memory_mb=row.memory_mb,
        env={**image.env, **row.env},
        init=row.init,
        image=image.spec,
        disk_mb=row.disk_mb,
        net_policy=policy,
        **extra,
    )


async def write_boot_files(handle: SandboxHandle, files: list[BootFile]) -> None:
    for f in files:

        async def content(data: bytes = f.content):
            yield data

        try:
            await handle.agent.write(f.path, len(f.content), f.mode, content())
        except AgentRequestError as e:
            raise BadRequest(f'file "{f.path}": {e}') from e


def check_cpus(cpus: float, max_cpus: float) -> None:
    if not math.isfinite(cpus) or cpus <= 0:
        raise BadRequest("cpus must be greater than 0")
    if cpus < MIN_CPUS:
        raise BadRequest(f"cpus must be at least {MIN_CPUS:g}")
    if cpus > max_cpus:
        raise BadRequest(f"max {max_cpus:g} CPUs per sandbox")


class SandboxService:
    def __init__(
        self,
        store: Store,
        engine: Engine,
        config: Config,
        secrets: SecretService,
        volumes: VolumeService,
        templates: TemplateService,
        runtimes: Runtimes,
        events: SandboxEvents,
        images: ImageService,
    ):
        self.store = store
        self.engine = engine
        self.config = config
        self.secrets = secrets
        self.volumes = volumes
        self.templates = templates
        self.runtimes = runtimes
        self.events = events
        self.images = images
        self.caps = Capabilities.of(engine)  # once: a Protocol isinstance check is slow
        self.diagnosis = Diagnosis(store, engine, runtimes)
        self.waker = Waker(store, engine, self.caps, runtimes, self.diagnosis, secrets)
        engine.set_exit_listener(self.diagnosis.on_engine_exit)

    # ------------------------------------------------------------ lookups

    def get(self, user: User, id_or_name: str) -> SandboxRow:
        row = self.store.get_sandbox(user.id, id_or_name)
        if row is None or row.status in IN_FLIGHT or row.pool:
            raise NotFound(f'sandbox "{id_or_name}" not found')
        return row

    def list(self, user: User) -> builtins.list[SandboxRow]:
        return [r for r in self.store.list_sandboxes(user.id) if r.status not in IN_FLIGHT and not r.pool]

    def running_rows(self) -> builtins.list[SandboxRow]:
        """Running sandboxes of users (warm-pool members stay frozen: no thermal policy, no port scans)."""
        return self.store.running_sandboxes()

    def tier(self, row: SandboxRow) -> Tier | None:
        if row.status == Status.RUNNING:
            return Tier.WARM if self.waker.is_warm(row.id) else Tier.HOT
        if row.status == Status.STOPPED and row.reason not in DEATHS | {Reason.RESTORE_FAILED}:
            return Tier.COLD
        return None

    def agent_restarts(self, sandbox_id: str) -> int:
        rt = self.runtimes.peek(sandbox_id)
        return rt.agent_restarts if rt else 0

    def using(self, row: SandboxRow) -> contextlib.AbstractAsyncContextManager[SandboxHandle]:
        return self.waker.using(row)

    @contextlib.asynccontextmanager
    async def using_named(self, user: User, id_or_name: str) -> AsyncIterator[SandboxHandle]:
        async with self.using(self.get(user, id_or_name)) as handle:
            yield handle

    # ------------------------------------------------------------ create / destroy

    def check_quota(self, user: User) -> None:
        max_count = min(user.max_sandboxes, self.config.limits.max_sandboxes)
        count = self.store.count_sandboxes(user.id, with_pools=self.config.limits.warm_pools_count)
        if count >= max_count:
            raise TooManyRequests(f"sandbox limit reached ({count}/{max_count})")

    def check_disk_quota(self, user: User, disk_mb: int) -> None:
        limit = self.config.limits.max_disk_mb_per_user
        reserved = self.store.disk_mb_reserved(user.id, with_pools=self.config.limits.warm_pools_count)
        if reserved + disk_mb > limit:
            raise TooManyRequests(
                f"disk quota exceeded: {reserved} MB of root disk already reserved, {disk_mb} MB more asked, "
                f"{limit} MB allowed per user"
            )

    # ------------------------------------------------------------ sandboxes made from another (fork, resume)

    def copy_row(
        self,
        user: User,
        name: str,
        base: dict,
        env: dict[str, str],
        policy: NetPolicy,
        labels: dict[str, str],
        keep_hot: bool,
    ) -> SandboxRow:
        """A creating row for a sandbox that is a copy: `base` is what it takes from its origin
        (inherited(row) of a source, or a snapshot's), env its secret environment (sealed to its id)."""
        sandbox_id = secrets.token_hex(8)
        return SandboxRow(
            id=sandbox_id,
            owner_id=user.id,
            name=name,
            status=Status.CREATING,
            created_at=now(),
            labels=dict(labels),
            keep_hot=keep_hot,
            sealed_env=self.secrets.seal_env(sandbox_id, env),
            net_policy=policy.to_json(),
            **base,
        )

    def insert_copy(self, row: SandboxRow) -> None:
        try:
            self.store.insert_sandbox(row)
        except NameTaken:
            raise Conflict(f'name "{row.name}" is already in use') from None

    def validate_create(self, user: User, req: CreateRequest) -> tuple[str, float, int, int]:
        """Check a create request's size and names; returns (name, cpus, memory_mb, disk_mb)."""
        lim = self.config.limits
        cpus = 1.0 if req.cpus is None else float(req.cpus)
        memory_mb = 512 if req.memory_mb is None else int(req.memory_mb)
        max_mem = min(user.max_memory_mb_per_sandbox, lim.max_memory_mb_per_sandbox)
        check_cpus(cpus, min(user.max_cpus_per_sandbox, lim.max_cpus_per_sandbox))
        if memory_mb > max_mem:
            raise BadRequest(f"max {max_mem} MB memory per sandbox")
        if memory_mb < MIN_MEMORY_MB:
            raise BadRequest(f"memory_mb must be at least {MIN_MEMORY_MB}")
        if req.disk_size_mb is not None and not MIN_DISK_MB <= req.disk_size_mb <= lim.max_disk_mb_per_sandbox:
            raise BadRequest(f"disk_size_mb must be between {MIN_DISK_MB} and {lim.max_disk_mb_per_sandbox}")
        disk_mb = req.disk_size_mb or lim.default_disk_mb
        self.check_disk_quota(user, disk_mb)
        name = check_name("sandbox", req.name if req.name is not None else f"sandbox-{secrets.token_hex(3)}")
        check_labels(req.labels)
        self.net_policy(req.net_policy)
        check_env_keys(req.env)
        return name, cpus, memory_mb, disk_mb

    async def create(
        self, user: User, req: CreateRequest, image: ResolvedImage | None = None
    ) -> tuple[SandboxRow, bool]:
        """Create and boot a sandbox; returns (sandbox, existed). Same name again returns the existing one.
        `image` overrides req.image with a tree of kiln's own (a build's intermediate step).

        Checks run in bhatti's order (quota, size, name, template, secrets, then the idempotent name,
        then volumes), all before anything is made, so a refused request changes nothing.
        """
        self.check_quota(user)
        if req.template_id:
            req = req.with_template(self.templates.get(user, req.template_id, message="template not found"))
        name, cpus, memory_mb, disk_mb = self.validate_create(user, req)
        policy = self.net_policy(req.net_policy)
        secret_env = self.secrets.resolve(user, req.secrets)
        files = check_boot_files(req.files)
        existing = self.store.get_sandbox(user.id, name)
        if existing is not None and existing.name == name and existing.status not in IN_FLIGHT:
            return existing, True
        image = image or self.images.resolve(user, req.image)
        if req.start:
            image = replace(image, spec=replace(image.spec, start=tuple(req.start)))
        attach, make = self.volumes.split_persistent(user, req.persistent_volumes)
        wanted, new = [*(req.volumes or []), *attach], [*req.new_volumes, *make]
        self.volumes.resolve(user, wanted, new)
        try:
            self.engine.check_room_for_create()
        except NoSpace as e:
            raise InsufficientStorage(str(e)) from e
        sandbox_id = secrets.token_hex(8)
        row = SandboxRow(
            id=sandbox_id,
            owner_id=user.id,
            name=name,
            status=Status.CREATING,
            cpus=cpus,
            memory_mb=memory_mb,
            image=image.name,
            labels=dict(req.labels),
            created_at=now(),
            env=dict(req.env),
            init=req.init or "",
            keep_hot=bool(req.keep_hot),
            template_id=req.template_id or "",
            sealed_env=self.secrets.seal_env(sandbox_id, secret_env),
            disk_mb=disk_mb,
            disk_asked_mb=req.disk_size_mb or 0,
            net_policy=policy.to_json(),
        )
        try:
            # The "creating" row reserves the name; a crash from here on is cleaned up at restart.
            self.store.insert_sandbox(row)
        except NameTaken:
            raise Conflict(f'sandbox "{name}" is being created or destroyed by another request') from None

        async def start() -> SandboxHandle:
            volumes = await self.volumes.attach(user, row.id, wanted, new)
            spec = spec_of(row, policy, image, volumes=volumes, setup_pending=bool(secret_env or files))
            handle = await self.engine.create(spec)
            await write_boot_files(handle, files)
            if secret_env or files:
                await handle.agent.set_secrets(secret_env)  # init starts now
            return handle

        await self.bring_up(row, f"create sandbox {row.id}", start)
        log.info("created sandbox %s (%s) at %s", row.id, name, row.ip)
        return row, False

    async def bring_up(self, row: SandboxRow, what: str, start: Callable[[], Awaitable[SandboxHandle]]) -> None:
        """Make the engine's sandbox for a row just stored as creating (create, fork, resume): start()
        runs under the row's lock; if anything fails, the engine's sandbox and the row go, else the row
        is running."""
        try:
            async with self.runtimes.lock(row.id):
                handle = await start()
        except BaseException as e:
            with contextlib.suppress(EngineError):
                await self.engine.destroy(row.id)
            self.store.delete_sandbox(row.id)
            self.runtimes.drop(row.id)
            if isinstance(e, (EngineError, AgentError)):
                raise Internal(f"{what}: {e}") from e
            raise
        self.store.mark_running(row.id, handle.ip)
        row.status, row.ip = Status.RUNNING, handle.ip

    async def destroy(self, user: User, id_or_name: str) -> None:
        await self.destroy_row(self.get(user, id_or_name))

    async def destroy_row(self, row: SandboxRow) -> None:
        """Destroy a sandbox found by its row (a user's, or a warm-pool member no user can name)."""
        async with self.runtimes.lock(row.id):
            # marked first: a crash from here on is finished at the next start, never half-left
            self.store.mark_destroying(row.id)
            self.events.before_stop(row.id)
            try:
                await self.engine.destroy(row.id)
            except EngineError as e:
                log.error("destroy sandbox %s: %s", row.id, e)
            self.store.delete_sandbox(row.id)
        self.runtimes.drop(row.id)
        await self.events.destroyed(row.id)
        log.info("destroyed sandbox %s (%s)", row.id, row.name)

    # ------------------------------------------------------------ start / stop / pause

    async def start(self, user: User, id_or_name: str, force: bool = False) -> SandboxRow:
        """Bring a stopped sandbox back: from its snapshot, or booted on its disk if it died.

        A no-op on a running one. After a failed restore only `force` tries again, and if the
        snapshot still cannot be restored, boots the sandbox fresh on its disk.
        """
        row = self.get(user, id_or_name)
        async with self.runtimes.lock(row.id):
            row = self.get(user, row.id)
            if row.status == Status.RUNNING:
                if self.waker.pausable is not None and self.waker.is_warm(row.id):
                    await self.waker.pausable.resume(row.id)
                return row
            if row.reason == Reason.RESTORE_FAILED and not force:
                raise restore_failed_error(row)
            await self.waker.wake_locked(row, force=force)
        log.info("started sandbox %s", row.id)
        return self.get(user, row.id)

    async def stop(self, user: User, id_or_name: str) -> SandboxRow:
        """Snapshot a sandbox to disk and free its memory; a no-op on a stopped one."""
        row = self.get(user, id_or_name)
        if not self.caps.snapshot:
            raise SnapshotsUnsupported(f"this engine ({self.engine.name}) cannot snapshot")
        if row.status != Status.STOPPED:
            try:
                await self.snapshot(row, reason="stop")
            except EngineError as e:
                log.error("stop of %s failed: %s", row.id, e)
                still_running = self.get(user, row.id).status == Status.RUNNING
                if isinstance(e, NoSpace) and still_running:
                    raise InsufficientStorage(f"stop sandbox: {e}; the sandbox is still running") from e
                if still_running:
                    raise KilnError("stop sandbox: taking the snapshot failed; the sandbox is still running") from e
                raise KilnError(
                    "stop sandbox: taking the snapshot failed and the sandbox could not be resumed; "
                    f"start it again (on its disk) with POST /sandboxes/{row.id}/start"
                ) from e
        return self.get(user, row.id)

    async def pause(self, row: SandboxRow) -> None:
        """Freeze an idle sandbox (thermal warm), unless someone pinned it or it must stay hot."""
        pausable = self.waker.pausable
        if pausable is None:
            return
        rt = self.runtimes[row.id]
        async with rt.lock:
            fresh = self.store.sandbox_by_id(row.id)
            if fresh and fresh.status == Status.RUNNING and not fresh.keep_hot and not rt.pins:
                with rt.transition():
                    await pausable.pause(row.id)

    async def snapshot(self, row: SandboxRow, reason: str) -> None:
        """Stop to disk (explicit stop, thermal cold, shutdown). EngineError leaves the sandbox running."""
        snapshottable = self.waker.snapshottable
        if snapshottable is None:
            return
        rt = self.runtimes[row.id]
        async with rt.lock:
            fresh = self.store.sandbox_by_id(row.id)
            if fresh is None or fresh.status == Status.STOPPED:
                return
            if reason == "thermal" and (fresh.keep_hot or rt.pins):
                return
            self.events.before_stop(row.id)
            with rt.transition():
                try:
                    info = await snapshottable.stop(row.id)
                except EngineError:
                    status = await self.diagnosis.settled_status(row.id)
                    if status.state not in (State.RUNNING, State.PAUSED):
                        self.store.mark_stopped(row.id, Reason.SNAPSHOT_FAILED)
                    raise
                self.store.mark_stopped(row.id, Reason.NONE, snapshot=info.to_dict())
        log.info(
            "sandbox %s stopped to disk (%s): %s snapshot, %d of %d bytes written",
            row.id,
            reason,
            info.kind,
            info.bytes_written,
            info.bytes_total,
        )

    def mark_unknown(self, sandbox_id: str) -> None:
        self.store.mark_unknown(sandbox_id, Reason.SNAPSHOT_FAILED)

    async def shutdown(self) -> None:
        """On daemon exit: stop running sandboxes to disk; leave any that cannot be snapshotted running."""
        for row in self.running_rows():
            try:
                await self.snapshot(row, reason="shutdown")
            except Exception as e:  # never kill a sandbox we could not snapshot
                log.error("could not snapshot %s at shutdown, leaving it running: %s", row.id, e)

    # ------------------------------------------------------------ update

    def net_policy(self, raw: object) -> NetPolicy:
        """A request's policy, checked (400 `invalid net_policy: ...`); none given: the default."""
        default = self.config.network.egress_default
        if raw is None:
            return NetPolicy(default)
        try:
            return parse_policy(raw, default)
        except InvalidPolicy as e:
            raise BadRequest(f"invalid net_policy: {e}") from None

    def policy_of(self, row: SandboxRow) -> NetPolicy:
        return NetPolicy.from_json(row.net_policy, self.config.network.egress_default)

    async def update(
        self,
        user: User,
        id_or_name: str,
        name: str | None,
        labels_add: dict[str, str] | None,
        labels_remove: builtins.list[str] | None,
        keep_hot: bool | None,
        net_policy: object = None,
    ) -> SandboxRow:
        """PATCH: rename, then labels, then the egress policy, then keep_hot (which wakes the sandbox
        when set). Everything is checked before anything changes."""
        row = self.get(user, id_or_name)
        if name is not None and name != row.name:
            check_name("sandbox", name)
        check_labels(labels_add or {})
        policy = self.net_policy(net_policy) if net_policy is not None else None
        if name is not None and name != row.name:
            try:
                self.store.rename_sandbox(row.id, name)
            except NameTaken:
                raise Conflict(f'name "{name}" is already in use') from None
        if labels_add or labels_remove:
            labels = {**row.labels, **(labels_add or {})}
            for key in labels_remove or []:
                labels.pop(key, None)
            self.store.set_sandbox_labels(row.id, labels)
        if policy is not None:
            async with self.runtimes.lock(row.id):
                try:
                    await self.engine.set_net_policy(row.id, policy)
                except EngineError as e:
                    raise Internal(f"set the network policy of {row.id}: {e}") from e
                self.store.set_sandbox_net_policy(row.id, policy.to_json())
        if keep_hot is not None:
            self.store.set_keep_hot(row.id, keep_hot)
            if keep_hot:
                await self.waker.ready_handle(self.get(user, row.id))
        return self.get(user, row.id)

    # ------------------------------------------------------------ after a restart

    async def reconcile(self) -> None:
        """Make the store and the engine agree after a (possibly unclean) daemon restart. A sandbox
        the engine cannot account for is marked, never a reason not to start."""
        rows = {r.id: r for r in self.store.list_sandboxes()}
        for row in rows.values():
            try:
                await self.reconcile_one(row)
            except EngineError as e:
                log.error("sandbox %s: cannot reconcile with the engine (%s); marking it unknown", row.id, e)
                if row.status not in IN_FLIGHT:
                    self.store.mark_unknown(row.id, Reason.LOST)
        for sandbox_id in await self.engine.list_ids():
            if sandbox_id not in rows:
                log.warning("removing engine sandbox %s that the store does not know", sandbox_id)
                try:
                    await self.engine.destroy(sandbox_id)
                except EngineError as e:
                    log.error("removing engine sandbox %s failed: %s", sandbox_id, e)

    async def reconcile_one(self, row: SandboxRow) -> None:
        if row.status in IN_FLIGHT:
            what = "made" if row.status == Status.CREATING else "destroyed"
            log.warning("removing sandbox %s left half-%s by a crash", row.id, what)
            await self.engine.destroy(row.id)
            self.store.delete_sandbox(row.id)
            return
        status = await self.engine.status(row.id)
        if status.state == State.MISSING:
            log.warning("sandbox %s has no engine state left; marking it unknown", row.id)
            self.store.mark_unknown(row.id, Reason.LOST)
        elif status.state == State.DEAD and row.status == Status.RUNNING:
            self.store.mark_stopped(row.id, death_reason(status.cause))
        elif status.state == State.STOPPED and row.status == Status.RUNNING:
            self.store.mark_stopped(row.id, Reason.NONE)
        elif status.state in (State.RUNNING, State.PAUSED) and row.status == Status.STOPPED:
            self.store.mark_running(row.id, row.ip)
