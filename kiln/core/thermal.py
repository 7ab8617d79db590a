"""The thermal policy: idle sandboxes go warm (frozen) and then cold (on disk).

Two clocks decide. The host clock (SandboxRuntime.last_activity) is touched by every request that
uses a sandbox, by a pause, and while a client is pinned (a running exec, an attached terminal, a
proxied WebSocket). The guest clock is the agent's: the last exec, keystroke or file access inside.
hot -> warm needs both idle for `warm_after` and no attached session; warm -> cold needs the host
clock idle for `cold_after` since the pause (a frozen agent cannot be asked). A tier the engine
cannot do is skipped. One sandbox's failure never stops the loop for the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from ..agent.client import AgentError
from ..config import ThermalConfig
from ..engine.base import EngineError
from ..store.db import SandboxRow
from ..tasks import cancel_and_wait
from .lifecycle import SandboxService

log = logging.getLogger("kiln.thermal")

AGENT_FAILURES_BEFORE_FORCE_PAUSE = 10
SNAPSHOT_FAILURES_BEFORE_UNKNOWN = 3
ACTIVITY_TIMEOUT = 2.0  # one slow agent must not stretch every tick


def guest_idle_for(activity: dict) -> tuple[float, int] | None:
    """(seconds idle, attached sessions) from an agent's ACTIVITY reply, or None if it is malformed."""
    last, attached = activity.get("last_activity_unix"), activity.get("attached_sessions")
    if not isinstance(last, int | float) or isinstance(last, bool) or not isinstance(attached, int):
        return None
    return time.time() - last, attached


class ThermalPolicy:
    def __init__(self, config: ThermalConfig, sandboxes: SandboxService):
        self.config = config
        self.sandboxes = sandboxes
        self.runtimes = sandboxes.runtimes
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        await cancel_and_wait(self.task)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick)
            await self.tick()

    async def tick(self) -> None:
        caps = self.sandboxes.caps
        if not caps.pause:
            return
        for row in self.sandboxes.running_rows():
            try:
                await self.step(row)
            except Exception:
                log.exception("thermal step of sandbox %s failed", row.id)

    async def step(self, row: SandboxRow) -> None:
        if row.keep_hot:
            return
        rt = self.runtimes[row.id]
        if rt.pins:
            rt.touch()
            return
        if self.sandboxes.waker.is_warm(row.id):
            if self.sandboxes.caps.snapshot and rt.idle_for() > self.config.cold_after:
                await self.cool(row)
        elif rt.idle_for() > self.config.warm_after:
            await self.maybe_pause(row)

    async def maybe_pause(self, row: SandboxRow) -> None:
        rt = self.runtimes[row.id]
        handle = self.sandboxes.engine.handle(row.id)
        if handle is None:
            return
        try:
            activity = await asyncio.wait_for(handle.agent.activity(timeout=ACTIVITY_TIMEOUT), ACTIVITY_TIMEOUT)
            idle = guest_idle_for(activity) if isinstance(activity, dict) else None
            if idle is None:
                raise AgentError(f"malformed activity reply: {str(activity)[:200]}")
        except (AgentError, TimeoutError) as e:
            rt.agent_failures += 1
            if rt.agent_failures < AGENT_FAILURES_BEFORE_FORCE_PAUSE:
                log.warning("agent of %s did not answer the activity poll (%d): %s", row.id, rt.agent_failures, e)
                return
            log.warning("agent of %s unresponsive %d times: pausing it anyway", row.id, rt.agent_failures)
        else:
            self.runtimes.note_agent_restarts(row.id, activity.get("agent_restarts", 0))
            guest_idle, attached = idle
            if guest_idle < self.config.warm_after or attached:
                return
        await self.sandboxes.pause(row)
        rt.touch()  # the cold timer starts at the pause
        log.info("sandbox %s is warm (paused)", row.id)

    async def cool(self, row: SandboxRow) -> None:
        rt = self.runtimes[row.id]
        try:
            await self.sandboxes.snapshot(row, reason="thermal")
            rt.snapshot_failures = 0
            log.info("sandbox %s is cold (on disk)", row.id)
        except EngineError as e:
            rt.snapshot_failures += 1
            log.error("snapshot of %s failed (%d): %s", row.id, rt.snapshot_failures, e)
            if rt.snapshot_failures >= SNAPSHOT_FAILURES_BEFORE_UNKNOWN:
                rt.snapshot_failures = 0
                self.sandboxes.mark_unknown(row.id)
            # back to warm without touching the clock, so the next tick tries again
            with contextlib.suppress(EngineError):
                await self.sandboxes.pause(row)
