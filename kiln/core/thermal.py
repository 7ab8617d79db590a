"""The thermal manager: idle sandboxes go warm (frozen) and then cold (on disk).

Two clocks decide. The host clock (here, in memory) is touched by every waking request, by a
pause, and while a client is pinned (a running exec, an attached terminal, a proxied WebSocket).
The guest clock is the agent's: the last exec, keystroke or file access inside the sandbox.
hot -> warm needs both idle for `warm_after` and no attached session; warm -> cold needs the
host clock idle for `cold_after` since the pause (a frozen agent cannot be asked).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from ..agent.client import AgentError
from ..config import ThermalConfig
from ..engine.base import EngineError

if TYPE_CHECKING:
    from .sandboxes import SandboxService

log = logging.getLogger("kiln.thermal")

AGENT_FAILURES_BEFORE_FORCE_PAUSE = 10
SNAPSHOT_FAILURES_BEFORE_UNKNOWN = 3


class ThermalManager:
    def __init__(self, config: ThermalConfig):
        self.config = config
        self.sandboxes: SandboxService | None = None
        self.host_activity: dict[str, float] = {}
        self.pins: dict[str, int] = {}
        self.agent_failures: dict[str, int] = {}
        self.snapshot_failures: dict[str, int] = {}
        self.task: asyncio.Task | None = None

    # ------------------------------------------------------------ clocks and pins

    def touch(self, sandbox_id: str) -> None:
        self.host_activity[sandbox_id] = time.monotonic()
        self.agent_failures.pop(sandbox_id, None)

    def idle_for(self, sandbox_id: str) -> float:
        return time.monotonic() - self.host_activity.setdefault(sandbox_id, time.monotonic())

    @contextlib.contextmanager
    def pin(self, sandbox_id: str):
        """Keep a sandbox hot while a client is using it (a running exec, an attached shell)."""
        self.pins[sandbox_id] = self.pins.get(sandbox_id, 0) + 1
        self.touch(sandbox_id)
        try:
            yield
        finally:
            self.pins[sandbox_id] -= 1
            if not self.pins[sandbox_id]:
                del self.pins[sandbox_id]
            self.touch(sandbox_id)

    def forget(self, sandbox_id: str) -> None:
        for d in (self.host_activity, self.pins, self.agent_failures, self.snapshot_failures):
            d.pop(sandbox_id, None)

    # ------------------------------------------------------------ the loop

    def start(self, sandboxes: "SandboxService") -> None:
        self.sandboxes = sandboxes
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick)
            try:
                await self.tick()
            except Exception:
                log.exception("thermal tick failed")

    async def tick(self) -> None:
        assert self.sandboxes is not None
        for row in self.sandboxes.running_rows():
            if row.keep_hot:
                continue
            if self.pins.get(row.id):
                self.touch(row.id)
                continue
            if self.sandboxes.is_warm(row.id):
                if self.idle_for(row.id) > self.config.cold_after:
                    await self.cool(row)
            elif self.idle_for(row.id) > self.config.warm_after:
                await self.maybe_pause(row)

    async def maybe_pause(self, row) -> None:
        try:
            activity = await self.sandboxes.agent_activity(row)
        except AgentError as e:
            n = self.agent_failures[row.id] = self.agent_failures.get(row.id, 0) + 1
            if n < AGENT_FAILURES_BEFORE_FORCE_PAUSE:
                log.warning("agent of %s did not answer the activity poll (%d): %s", row.id, n, e)
                return
            log.warning("agent of %s unresponsive %d times: pausing it anyway", row.id, n)
            activity = None
        if activity is not None:
            self.sandboxes.note_agent_restarts(row.id, activity.get("agent_restarts", 0))
            guest_idle = time.time() - activity["last_activity_unix"]
            if guest_idle < self.config.warm_after or activity["attached_sessions"]:
                return
        await self.sandboxes.pause(row)
        self.touch(row.id)  # the cold timer starts at the pause
        log.info("sandbox %s is warm (paused)", row.id)

    async def cool(self, row) -> None:
        try:
            await self.sandboxes.snapshot(row, reason="thermal")
            self.snapshot_failures.pop(row.id, None)
            log.info("sandbox %s is cold (on disk)", row.id)
        except EngineError as e:
            n = self.snapshot_failures[row.id] = self.snapshot_failures.get(row.id, 0) + 1
            log.error("snapshot of %s failed (%d): %s", row.id, n, e)
            if n >= SNAPSHOT_FAILURES_BEFORE_UNKNOWN:
                self.snapshot_failures.pop(row.id, None)
                self.sandboxes.mark_unknown(row.id)
            # back to warm without touching the clock, so the next tick tries again
            with contextlib.suppress(EngineError):
                await self.sandboxes.pause(row)
