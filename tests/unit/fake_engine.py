"""An in-memory engine for unit tests of core logic (never used by integration tests): it keeps
states in a dict and counts calls, so tests can see how often core asks the engine."""

from __future__ import annotations

import asyncio
from collections import Counter

from kiln.agent.client import AgentClient
from kiln.engine.base import EngineError, ExitListener, SandboxHandle, SandboxSpec, SnapshotSummary, State, Status


class FakeEngine:
    name = "fake"

    def __init__(self) -> None:
        self.states: dict[str, State] = {}
        self.calls: Counter[str] = Counter()
        self.fail_status: set[str] = set()
        self.listener: ExitListener | None = None

    def set_exit_listener(self, listener: ExitListener) -> None:
        self.listener = listener

    async def start_engine(self) -> None: ...
    async def close_engine(self) -> None: ...
    def check_room_for_create(self) -> None: ...

    async def create(self, spec: SandboxSpec) -> SandboxHandle:
        self.states[spec.id] = State.RUNNING
        return self._handle(spec.id)

    async def boot(self, sandbox_id: str) -> SandboxHandle:
        self.calls["boot"] += 1
        self.states[sandbox_id] = State.RUNNING
        return self._handle(sandbox_id)

    async def set_net_policy(self, sandbox_id: str, policy) -> None:
        self.calls["set_net_policy"] += 1

    async def destroy(self, sandbox_id: str) -> None:
        self.calls["destroy"] += 1
        self.states.pop(sandbox_id, None)

    async def status(self, sandbox_id: str) -> Status:
        self.calls["status"] += 1
        await asyncio.sleep(0)
        if sandbox_id in self.fail_status:
            raise EngineError("runsc state: cannot talk to the sandbox")
        return Status(self.states.get(sandbox_id, State.MISSING))

    def handle(self, sandbox_id: str) -> SandboxHandle | None:
        return self._handle(sandbox_id) if sandbox_id in self.states else None

    def _handle(self, sandbox_id: str) -> SandboxHandle:
        return SandboxHandle(sandbox_id, "10.0.0.2", AgentClient("127.0.0.1", 9, "token"))

    async def list_ids(self) -> list[str]:
        return list(self.states)

    def usage(self, sandbox_id: str):
        return None

    def leftovers(self, keep: frozenset[str] = frozenset()) -> dict[str, list[str]]:
        return {"sandboxes": [i for i in self.states if i not in keep]}

    def scrub(self) -> None:
        self.states.clear()

    # Pausable
    def is_paused(self, sandbox_id: str) -> bool:
        return self.states.get(sandbox_id) == State.PAUSED

    async def pause(self, sandbox_id: str) -> None:
        self.states[sandbox_id] = State.PAUSED

    async def resume(self, sandbox_id: str) -> None:
        self.calls["resume"] += 1
        self.states[sandbox_id] = State.RUNNING

    # Snapshottable
    async def stop(self, sandbox_id: str) -> SnapshotSummary:
        self.states[sandbox_id] = State.STOPPED
        return SnapshotSummary("full", 1, 1, "2026-01-01T00:00:00Z")

    async def restore(self, sandbox_id: str) -> SandboxHandle:
        self.calls["restore"] += 1
        await asyncio.sleep(0.05)  # long enough for every waiter to queue on the lock
        self.states[sandbox_id] = State.RUNNING
        return self._handle(sandbox_id)
