"""What the daemon knows about a live sandbox that is not in the store: one SandboxRuntime per
sandbox, in one registry, dropped in one place when the sandbox is destroyed.

The lock serialises every change of a sandbox's state (create, wake, pause, stop, destroy, port
scans); pins and the activity clock keep it hot while clients use it; `transitioning` makes
requests queue on the lock instead of slipping in while it is being paused or stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

log = logging.getLogger("kiln.runtime")


@dataclass
class SandboxRuntime:
    id: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    pins: int = 0  # clients using it now (exec stream, terminal, proxied exchange, file call)
    last_activity: float = field(default_factory=time.monotonic)  # host clock: the last request or pause
    transitioning: bool = False  # being paused or stopped: requests must wait on the lock
    agent_failures: int = 0  # activity polls in a row the agent did not answer
    snapshot_failures: int = 0  # thermal snapshots in a row that failed
    agent_restarts: int = 0  # agent servers that crashed and were restarted by PID 1 (as it reports)

    def touch(self) -> None:
        self.last_activity = time.monotonic()
        self.agent_failures = 0

    def idle_for(self) -> float:
        return time.monotonic() - self.last_activity

    @contextlib.contextmanager
    def transition(self) -> Iterator[None]:
        """Mark a pause or stop under way (call with the lock held): requests queue on the lock."""
        self.transitioning = True
        try:
            yield
        finally:
            self.transitioning = False


class Runtimes:
    def __init__(self) -> None:
        self._by_id: dict[str, SandboxRuntime] = {}

    def __getitem__(self, sandbox_id: str) -> SandboxRuntime:
        rt = self._by_id.get(sandbox_id)
        if rt is None:
            rt = self._by_id[sandbox_id] = SandboxRuntime(sandbox_id)
        return rt

    def peek(self, sandbox_id: str) -> SandboxRuntime | None:
        """The runtime if one exists (listings must not create one per row)."""
        return self._by_id.get(sandbox_id)

    def drop(self, sandbox_id: str) -> None:
        self._by_id.pop(sandbox_id, None)

    def lock(self, sandbox_id: str) -> asyncio.Lock:
        return self[sandbox_id].lock

    def touch(self, sandbox_id: str) -> None:
        self[sandbox_id].touch()

    @contextlib.contextmanager
    def pin(self, sandbox_id: str) -> Iterator[SandboxRuntime]:
        """Keep a sandbox hot while a client is using it."""
        rt = self[sandbox_id]
        rt.pins += 1
        rt.touch()
        try:
            yield rt
        finally:
            rt.pins -= 1
            rt.touch()

    def note_agent_restarts(self, sandbox_id: str, restarts: object) -> bool:
        """Record the agent's restart count as it reports it; True if it went up."""
        if not isinstance(restarts, int):
            return False  # a confused (or forged) agent reply changes nothing
        rt = self[sandbox_id]
        if restarts > rt.agent_restarts:
            rt.agent_restarts = restarts
            log.warning("the agent of sandbox %s crashed and was restarted (%d so far)", sandbox_id, restarts)
            return True
        return False
