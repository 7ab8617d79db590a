"""Waking sandboxes, and `using`: the one way a request reaches a sandbox's insides.

`async with waker.using(row) as handle:` pins the sandbox hot for the block (never paused or
stopped under a request in flight), wakes it (resume from warm, restore from cold; concurrent wakes
queue on its lock and share one resume or restore), and maps agent failures to API errors: a
missing path or session is 404, a refused request 400, a dead sandbox 409, a crashed agent 502.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

from ..agent.client import AgentError, AgentLimit, AgentNotFound, AgentRequestError
from ..engine.base import Capabilities, Engine, EngineError, Pausable, SandboxHandle, Snapshottable, State
from ..states import DEATHS, Reason, Status
from ..store.db import SandboxRow, Store
from .diagnosis import Diagnosis, stopped_error
from .errors import BadRequest, Internal, KilnError, NotFound, TooManyRequests
from .runtime import Runtimes
from .secrets import SecretService

log = logging.getLogger("kiln.sandboxes")


def restore_failed_error(row: SandboxRow) -> KilnError:
    return KilnError(
        f'wake sandbox: restoring its snapshot failed; start it with POST /sandboxes/{row.id}/start {{"force": true}}'
    )


class Waker:
    def __init__(
        self,
        store: Store,
        engine: Engine,
        caps: Capabilities,
        runtimes: Runtimes,
        diagnosis: Diagnosis,
        secrets: SecretService,
    ):
        self.store = store
        self.engine = engine
        self.caps = caps
        self.runtimes = runtimes
        self.diagnosis = diagnosis
        self.secrets = secrets
        # the capabilities, as the types that have them (None when the engine lacks one)
        self.pausable: Pausable | None = engine if caps.pause else None  # type: ignore[assignment]
        self.snapshottable: Snapshottable | None = engine if caps.snapshot else None  # type: ignore[assignment]

    def is_warm(self, sandbox_id: str) -> bool:
        return self.pausable is not None and self.pausable.is_paused(sandbox_id)

    def hot_handle(self, fresh: SandboxRow | None) -> SandboxHandle | None:
        """The handle if the sandbox (as the store has it now) can take a request without any wake."""
        if fresh is None or fresh.status != Status.RUNNING:
            return None
        if self.runtimes[fresh.id].transitioning or self.is_warm(fresh.id):
            return None
        return self.engine.handle(fresh.id)

    def known_handle(self, sandbox_id: str) -> SandboxHandle:
        handle = self.engine.handle(sandbox_id)
        if handle is None:
            raise Internal(f"sandbox {sandbox_id} is unknown to the engine")
        return handle

    async def ensure_hot(self, row: SandboxRow) -> SandboxHandle:
        self.runtimes.touch(row.id)
        handle = self.hot_handle(self.store.sandbox_by_id(row.id))  # `row` may predate a stop since
        if handle is not None:
            return handle
        async with self.runtimes.lock(row.id):
            fresh = self.store.sandbox_by_id(row.id)
            if fresh is None:
                raise NotFound(f'sandbox "{row.name}" not found')
            # a wake storm: the first waiter woke it; the rest find it hot without asking the engine
            return self.hot_handle(fresh) or await self.wake_locked(fresh)

    async def wake_locked(self, row: SandboxRow, force: bool = False) -> SandboxHandle:
        """Bring the sandbox to running, under its lock: resume, restore, or boot after a death."""
        if row.status == Status.RUNNING and self.is_warm(row.id):
            assert self.pausable is not None
            await self.pausable.resume(row.id)
            return self.known_handle(row.id)
        status = await self.engine.status(row.id)
        if status.state == State.PAUSED and self.pausable is not None:
            await self.pausable.resume(row.id)
        elif status.state == State.STOPPED and self.snapshottable is not None:
            started = time.monotonic()
            try:
                await self.snapshottable.restore(row.id)
                log.info(
                    "sandbox %s restored from its snapshot in %.0f ms", row.id, (time.monotonic() - started) * 1000
                )
            except EngineError as e:
                if not force:
                    self.store.mark_restore_failed(row.id)
                    log.error("restore of %s failed: %s", row.id, e)
                    raise restore_failed_error(row) from e
                log.error("forced start of %s: restore failed (%s); booting it on its disk", row.id, e)
                await self.boot(row)
        elif status.state == State.DEAD:
            await self.boot(row)
        elif status.state == State.MISSING:
            raise Internal(f"sandbox {row.id} is unknown to the engine")
        handle = self.known_handle(row.id)
        self.store.mark_running(row.id, handle.ip)
        self.runtimes.touch(row.id)
        return handle

    async def boot(self, row: SandboxRow) -> None:
        """Boot on the disk (after a death or a lost snapshot); a fresh agent needs the secrets again."""
        handle = await self.engine.boot(row.id)
        if row.sealed_env:
            try:
                await handle.agent.set_secrets(self.secrets.open_env(row.id, row.sealed_env))
            except AgentError as e:
                raise EngineError(f"hand secrets to the agent: {e}") from e

    async def ready_handle(self, row: SandboxRow) -> SandboxHandle:
        """The handle of a sandbox that can take requests now: wakes it, unless it died."""
        if row.status == Status.STOPPED and row.reason in DEATHS:
            raise stopped_error(row, row.reason, verb="is stopped")
        if row.reason == Reason.RESTORE_FAILED:
            raise restore_failed_error(row)
        try:
            return await self.ensure_hot(row)
        except EngineError as e:
            raise Internal(f"wake sandbox {row.id}: {e}") from e

    @contextlib.asynccontextmanager
    async def using(self, row: SandboxRow) -> AsyncIterator[SandboxHandle]:
        with self.runtimes.pin(row.id):
            handle = await self.ready_handle(row)
            try:
                yield handle
            except AgentNotFound as e:
                raise NotFound(str(e)) from e
            except AgentLimit as e:
                raise TooManyRequests(str(e)) from e
            except AgentRequestError as e:
                raise BadRequest(str(e)) from e
            except AgentError as e:
                await self.diagnosis.raise_for_agent_failure(row, e)
