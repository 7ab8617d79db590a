"""Telling why a sandbox failed a request: it died (OOM, init exited), its agent crashed and was
restarted by PID 1, or something else went wrong; and recording deaths the engine reports."""

from __future__ import annotations

import asyncio
import logging
from typing import NoReturn

from ..agent.client import AgentError
from ..engine.base import DeathCause, Engine, State, Status
from ..states import Reason
from ..store.db import SandboxRow, Store
from .errors import BadGateway, Conflict, Internal
from .runtime import Runtimes

log = logging.getLogger("kiln.sandboxes")

REASON_TEXT = {
    Reason.OOM: "it ran out of memory (the whole sandbox is killed when it exceeds memory_mb)",
    Reason.EXITED: "its init process exited",
    Reason.SNAPSHOT_FAILED: "taking its snapshot failed and it could not be resumed",
}
AGENT_RESPAWN_WAIT = 0.3  # PID 1 re-forks a dead agent server after 0.2 s


def death_reason(cause: DeathCause | None) -> Reason:
    return Reason.OOM if cause == DeathCause.OOM else Reason.EXITED


def stopped_error(row: SandboxRow, reason: Reason, verb: str = "stopped") -> Conflict:
    why = REASON_TEXT.get(reason, "it stopped")
    return Conflict(f'sandbox "{row.name}" {verb}: {why}; start it with POST /sandboxes/{row.id}/start')


class Diagnosis:
    def __init__(self, store: Store, engine: Engine, runtimes: Runtimes):
        self.store = store
        self.engine = engine
        self.runtimes = runtimes

    async def settled_status(self, sandbox_id: str, wait: float = 3.0) -> Status:
        """The engine's status once a sandbox that just failed us has settled (runsc reports a
        sandbox whose process has just died as running for a moment)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            status = await self.engine.status(sandbox_id)
            if status.state != State.RUNNING or loop.time() > deadline:
                return status
            await asyncio.sleep(0.1)

    async def on_engine_exit(self, sandbox_id: str) -> None:
        """The engine says the sandbox exited without being asked to: record why."""
        await self.settled_status(sandbox_id)
        await self.record_death(sandbox_id)

    async def record_death(self, sandbox_id: str) -> None:
        """Mark the sandbox stopped if the engine says it is dead. The engine is asked under the lock: a
        status read before it may be stale (a start can have booted the sandbox again meanwhile)."""
        async with self.runtimes.lock(sandbox_id):
            status = await self.engine.status(sandbox_id)
            if status.state != State.DEAD:
                return
            self.store.mark_stopped(sandbox_id, death_reason(status.cause))
        log.warning("sandbox %s stopped on its own: %s", sandbox_id, status.cause)

    async def raise_for_agent_failure(self, row: SandboxRow, err: Exception) -> NoReturn:
        """An agent call failed: 409 if the sandbox died, 502 if its agent crashed (and was restarted),
        500 otherwise."""
        status = await self.settled_status(row.id)
        if status.state == State.DEAD:
            await self.record_death(row.id)
            raise stopped_error(row, death_reason(status.cause))
        handle = self.engine.handle(row.id)
        if status.state == State.RUNNING and handle is not None:
            await asyncio.sleep(AGENT_RESPAWN_WAIT)
            try:
                restarts = (await handle.agent.activity(timeout=2.0)).get("agent_restarts", 0)
            except AgentError:
                restarts = 0
            if self.runtimes.note_agent_restarts(row.id, restarts):
                raise BadGateway(
                    f'the agent of sandbox "{row.name}" crashed during the request (something in '
                    "the sandbox killed it) and has been restarted; the request can be retried"
                )
        raise Internal(f"exec in sandbox {row.id}: {err}")
