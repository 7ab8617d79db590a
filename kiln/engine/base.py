"""The engine contract: what turns a sandbox spec into a running isolated environment.

Everything above this (API, core services, store) is engine-agnostic and speaks only the types
here. An engine implements `Engine` (the basic lifecycle, host-object inspection) and may add the
capabilities `Pausable` (freeze with memory kept) and `Snapshottable` (stop to disk with memory
freed, restore exactly). Core resolves them once with `capabilities()`; an engine that lacks one is
never asked for it. tests/conformance checks every engine kiln ships against this contract.

Rules every method follows:
- Sandbox ids come from core; the engine never invents one.
- Methods are awaited one at a time per sandbox (core holds the sandbox's lock around each call),
  but calls for different sandboxes run concurrently.
- An EngineError leaves the sandbox as it was before the call unless the method says otherwise.
- The exit listener hears a sandbox that died on its own (OOM, its init exited), never an exit the
  engine caused itself (stop, destroy, a relaunch).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..agent.client import AgentClient
from ..netpolicy import NetPolicy


@dataclass(frozen=True)
class VolumeAttachment:
    """A volume for the sandbox: an ext4 image file the engine attaches at `mount` in the guest."""

    image: str  # path of the volume's image file on the host
    mount: str  # absolute path inside the sandbox
    read_only: bool = False


@dataclass(frozen=True)
class ImageSpec:
    """The image a sandbox runs: its root tree on the host and the defaults its processes get."""

    rootfs: str  # host path of the image's read-only root tree
    user: str = ""  # default user of exec, shells and the start command ("": uid 1000)
    workdir: str = ""  # default working directory ("": / for exec, /workspace or / for shells)
    start: tuple[str, ...] = ()  # argv the agent runs as session "start" at every boot


@dataclass(frozen=True)
class SandboxSpec:
    """What a user can ask for. Engine details (addresses, flags) never appear here; the only host
    paths are those of what core owns and hands over (the image's tree, volume images)."""

    id: str
    hostname: str
    image: ImageSpec
    cpus: float = 1.0
    memory_mb: int = 512
    env: dict[str, str] = field(default_factory=dict)
    init: str = ""
    disk_mb: int = 10240  # cap on what the sandbox can write to its root disk
    volumes: tuple[VolumeAttachment, ...] = ()
    # the host hands the agent its secrets after every boot (and its create-time files after the
    # first); init waits for that
    setup_pending: bool = False
    net_policy: NetPolicy = field(default_factory=NetPolicy)  # what it may reach on the internet


class State(enum.StrEnum):
    """What the engine sees of a sandbox right now."""

    RUNNING = "running"  # processes running, agent reachable
    PAUSED = "paused"  # processes frozen, memory kept
    STOPPED = "stopped"  # no processes; a memory snapshot is kept for restore
    DEAD = "dead"  # exited on its own (crash, OOM); disk kept, boot starts it again
    MISSING = "missing"  # the engine knows nothing of it


class DeathCause(enum.StrEnum):
    OOM = "oom"
    EXITED = "exited"


@dataclass
class Status:
    state: State
    cause: DeathCause | None = None  # for DEAD only


@dataclass(frozen=True)
class SandboxHandle:
    """How the layers above reach a live sandbox."""

    id: str
    ip: str
    agent: AgentClient


@dataclass(frozen=True)
class SnapshotSummary:
    """What a stop to disk wrote: `full` (every page) or `diff` (only pages new since the last)."""

    kind: str
    bytes_written: int
    bytes_total: int
    taken_at: str

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "bytes_written": self.bytes_written,
            "bytes_total": self.bytes_total,
            "taken_at": self.taken_at,
        }


@dataclass(frozen=True)
class Usage:
    """Resources a sandbox has used, as the host accounts them."""

    cpu_seconds: float
    memory_bytes: int
    disk_used_bytes: int = 0  # of its root disk, when the engine can tell
    disk_total_bytes: int = 0


class EngineError(Exception):
    """An engine operation failed; the message is for logs, not for API callers."""


class NoSpace(EngineError):
    """The host's disk cannot hold what the operation needs; the message says how much is free."""


ExitListener = Callable[[str], Coroutine[Any, Any, None]]


@runtime_checkable
class Engine(Protocol):
    name: str

    def set_exit_listener(self, listener: ExitListener) -> None:
        """Called with a sandbox id, as a task on the event loop, when that sandbox dies on its own."""

    async def start_engine(self) -> None:
        """Load what survived a daemon restart; remove half-made sandboxes and host objects no record
        claims; finish or undo operations a crash interrupted (a snapshot mid-write is kept if whole).
        Raises EngineError only if the engine cannot run at all."""

    async def close_engine(self) -> None:
        """Finish background work; sandboxes keep running. Host-wide objects go if none is left."""

    def check_room_for_create(self) -> None:
        """Raise NoSpace if the host cannot hold one more sandbox now."""

    async def create(self, spec: SandboxSpec) -> SandboxHandle:
        """Make and boot a sandbox; returns once its agent answers. On failure nothing is left."""

    async def boot(self, sandbox_id: str) -> SandboxHandle:
        """Boot a DEAD (or snapshot-less) sandbox again, fresh, on the disk it had. Any memory
        snapshot it had is dropped (it no longer matches the disk)."""

    async def export_rootfs(self, sandbox_id: str, target: Path) -> None:
        """Write the sandbox's root tree (its image and what it wrote since) into target, a new
        directory, as it was at one instant; a running sandbox keeps running (paused briefly)."""

    async def destroy(self, sandbox_id: str) -> None:
        """Remove the sandbox and everything the engine made for it, in any state. Idempotent:
        destroying a MISSING sandbox is a no-op."""

    async def set_net_policy(self, sandbox_id: str, policy: NetPolicy) -> None:
        """Apply a new egress policy to a sandbox in any state: new connections follow it at once
        (open ones carry on); it lasts across stops, restarts and wakes."""

    async def status(self, sandbox_id: str) -> Status:
        """The engine's view now. Right after an unexpected exit a sandbox may read RUNNING briefly."""

    def handle(self, sandbox_id: str) -> SandboxHandle | None:
        """The address and agent client of a known sandbox (None if unknown); cheap, no I/O."""

    async def list_ids(self) -> list[str]:
        """Every sandbox the engine has a record of."""

    def usage(self, sandbox_id: str) -> Usage | None:
        """CPU and memory used so far, or None if the engine cannot tell."""

    def leftovers(self, keep: frozenset[str] = frozenset()) -> dict[str, list[str]]:
        """Every host object this engine instance made and still holds, by kind, except those of the
        sandboxes and kept copies (named snapshots) in `keep` (for a clean-state check: after destroying
        every sandbox and copy, each list is empty)."""

    def scrub(self) -> None:
        """Forcibly remove every host object `leftovers` reports (tests' clean-up after a failure);
        synchronous, safe to call when the daemon is gone."""


@runtime_checkable
class Pausable(Protocol):
    """Freeze a sandbox's processes with its memory kept, and thaw them (~1 ms each way)."""

    def is_paused(self, sandbox_id: str) -> bool:
        """Cheap (asked on every request): no subprocess, no agent call."""

    async def pause(self, sandbox_id: str) -> None:
        """RUNNING -> PAUSED. On failure the sandbox is left RUNNING."""

    async def resume(self, sandbox_id: str) -> None:
        """PAUSED -> RUNNING; a no-op on a RUNNING sandbox."""


@runtime_checkable
class Snapshottable(Protocol):
    """Stop a sandbox to disk with all its memory freed, and restore it exactly."""

    async def stop(self, sandbox_id: str) -> SnapshotSummary:
        """RUNNING or PAUSED -> STOPPED with a snapshot of its memory. Whatever fails, the sandbox
        is left running (EngineError), or, if even that failed, DEAD with its disk (EngineError
        saying so). The previous snapshot is replaced only once the new one is complete.
        Raises NoSpace up front when the disk cannot hold the memory."""

    async def restore(self, sandbox_id: str) -> SandboxHandle:
        """STOPPED -> RUNNING with the same processes, memory and address; returns once the agent
        answers. EngineError leaves it STOPPED with its snapshot."""


@dataclass
class ForkResult:
    handle: SandboxHandle
    paused_ms: int  # how long the source was paused (0: it was stopped and never touched)


@runtime_checkable
class Forkable(Protocol):
    async def fork(self, source_id: str, spec: SandboxSpec) -> ForkResult:
        """A new sandbox (spec.id) with the source's processes, memory and files at one instant, on
        its own address, cgroup and disk. A running (or paused) source keeps running, paused only
        while its memory is imaged and its disk cloned; a stopped one is left as it is. On failure
        the source is as it was and nothing of the fork is left."""

    async def checkpoint_named(self, sandbox_id: str, copy_id: str, owner: str) -> tuple[int, int]:
        """Keep a copy of the sandbox as a fork would take it (memory and disk), under copy_id; the
        sandbox carries on as after a fork. Copies of one owner may share what they hold in common.
        Returns (bytes the copy added to the disk, ms the sandbox was paused)."""

    async def resume_named(self, copy_id: str, spec: SandboxSpec) -> SandboxHandle:
        """A new sandbox (spec.id) from a kept copy; the copy stays, for any number of resumes."""

    async def delete_named(self, copy_id: str) -> None:
        """Remove a kept copy (idempotent)."""

    async def prune_named(self, keep: set[str]) -> None:
        """At start: remove kept copies not in keep (a crash came before their owner recorded them)."""


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do beyond the basic lifecycle, resolved once (isinstance on a Protocol is slow)."""

    pause: bool
    snapshot: bool
    fork: bool

    @classmethod
    def of(cls, engine: Engine) -> Capabilities:
        return cls(
            pause=isinstance(engine, Pausable),
            snapshot=isinstance(engine, Snapshottable),
            fork=isinstance(engine, Forkable),
        )
