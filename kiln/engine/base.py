"""The engine interface: what turns a sandbox spec into a running isolated environment.

Everything above this (API, core services, store) is engine-agnostic. Capabilities beyond the
basic lifecycle (pausing, checkpointing) are separate small protocols, so callers ask for the
one they need with isinstance().
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..agent.client import AgentClient


@dataclass(frozen=True)
class Mount:
    """A host directory bind-mounted into the sandbox (a volume)."""
    source: str
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class SandboxSpec:
    """What a user can ask for. Engine details (addresses, paths, flags) never appear here."""
    id: str
    hostname: str
    cpus: float = 1.0
    memory_mb: int = 512
    env: dict[str, str] = field(default_factory=dict)
    init: str = ""
    image: str = "default"
    disk_mb: int = 10240        # cap on what the sandbox can write to its root disk
    mounts: tuple[Mount, ...] = ()
    has_secrets: bool = False   # the secret environment is handed to the agent after every boot


class State(str, enum.Enum):
    RUNNING = "running"   # processes running, agent reachable
    PAUSED = "paused"     # processes frozen, memory kept
    STOPPED = "stopped"   # no processes; a snapshot or the disk is kept for start
    DEAD = "dead"         # exited on its own (crash, OOM); disk kept, start boots it again
    MISSING = "missing"   # the engine knows nothing of it


@dataclass
class Status:
    state: State
    reason: str = ""      # for DEAD: "oom" | "exited"


@dataclass
class SandboxHandle:
    """How the layers above reach a live sandbox."""
    id: str
    ip: str
    agent: AgentClient


class EngineError(Exception):
    """An engine operation failed; the message is for logs, not for API callers."""


class NoSpace(EngineError):
    """The host's disk cannot hold what the operation needs; the message says how much is free."""


@runtime_checkable
class Engine(Protocol):
    name: str

    async def start_engine(self) -> None: ...
    def check_room_for_create(self) -> None: ...
    async def close_engine(self) -> None: ...
    async def create(self, spec: SandboxSpec) -> SandboxHandle: ...
    async def destroy(self, sandbox_id: str) -> None: ...
    async def boot(self, sandbox_id: str) -> SandboxHandle: ...
    async def status(self, sandbox_id: str) -> Status: ...
    def handle(self, sandbox_id: str) -> SandboxHandle | None: ...
    async def list_ids(self) -> list[str]: ...


@runtime_checkable
class ThermalEngine(Protocol):
    """Freeze a sandbox's processes with its memory kept, and thaw them."""

    def is_paused(self, sandbox_id: str) -> bool: ...
    async def pause(self, sandbox_id: str) -> None: ...
    async def resume(self, sandbox_id: str) -> None: ...


@runtime_checkable
class SnapshotEngine(Protocol):
    """Stop a sandbox to disk with all its memory freed, and restore it exactly."""

    async def stop(self, sandbox_id: str): ...
    async def restore(self, sandbox_id: str) -> SandboxHandle: ...
