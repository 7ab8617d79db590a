"""The sandbox state machine: the status a sandbox has in the store, why, and which moves are allowed.

Every status write goes through Store.transition, which checks TRANSITIONS; docs/architecture.md
draws the same table. Thermal tiers (hot/warm/cold) are derived, never stored: hot and warm are
`running` (warm = frozen by the engine), cold is `stopped` with a memory snapshot.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    CREATING = "creating"  # the row reserves the name while the engine makes the sandbox
    RUNNING = "running"  # processes exist (hot or warm)
    STOPPED = "stopped"  # no processes: a memory snapshot (cold) or only the disk (after a death)
    UNKNOWN = "unknown"  # the engine lost track of it or cannot snapshot it; a wake tries again
    DESTROYING = "destroying"  # marked before the engine removes it; a restart finishes the job


class Reason(StrEnum):
    """Why a sandbox is in its status; NONE when nothing needs explaining."""

    NONE = ""
    OOM = "oom"  # killed for exceeding memory_mb
    EXITED = "exited"  # its init process exited
    SNAPSHOT_FAILED = (
        "snapshot_failed"  # a snapshot failed and the sandbox could not be resumed (or, unknown: failed 3x)
    )
    RESTORE_FAILED = "restore_failed"  # its snapshot cannot be restored: only start {"force": true} helps
    LOST = "lost"  # the engine has no state for it after a restart


class Tier(StrEnum):
    """The thermal tier shown in listings."""

    HOT = "hot"
    WARM = "warm"
    COLD = "cold"


# Rows a crash can leave mid-way: the next daemon start finishes or undoes them; never listed.
IN_FLIGHT = frozenset({Status.CREATING, Status.DESTROYING})
# A stopped sandbox with one of these has no memory to restore: it must be started explicitly.
DEATHS = frozenset({Reason.OOM, Reason.EXITED, Reason.SNAPSHOT_FAILED})

# (from, to): every status change the store accepts. A row is inserted as CREATING and deleted from
# CREATING (failed create) or DESTROYING (destroy finished) only.
TRANSITIONS: frozenset[tuple[Status, Status]] = frozenset(
    {
        (Status.CREATING, Status.RUNNING),  # create finished
        (Status.RUNNING, Status.RUNNING),  # woken again, new address
        (Status.RUNNING, Status.STOPPED),  # stop to disk, or died (oom, exited, snapshot_failed)
        (Status.RUNNING, Status.UNKNOWN),  # snapshots keep failing, or the engine lost it
        (Status.RUNNING, Status.DESTROYING),
        (Status.STOPPED, Status.RUNNING),  # restored or booted
        (Status.STOPPED, Status.STOPPED),  # a restore failed (reason changes)
        (Status.STOPPED, Status.UNKNOWN),  # the engine lost it
        (Status.STOPPED, Status.DESTROYING),
        (Status.UNKNOWN, Status.RUNNING),  # a wake found it alive
        (Status.UNKNOWN, Status.STOPPED),
        (Status.UNKNOWN, Status.UNKNOWN),
        (Status.UNKNOWN, Status.DESTROYING),
    }
)


class IllegalTransition(Exception):
    """A status write the table does not allow: a bug in the caller, never a user error."""


def check_transition(current: str, to: Status) -> None:
    if (Status(current), to) not in TRANSITIONS:
        raise IllegalTransition(f"sandbox status {current} -> {to} is not allowed")
