"""Forking a sandbox: a new sandbox with the source's processes, memory and files at one instant.

Hot or warm source (the only order measured to be both correct and gentle on the source):
1. thaw it if frozen (a checkpoint of a frozen sandbox never finishes) and drop kiln's own agent
   connections to it (the checkpoint resets them anyway);
2. `runsc pause` (gVisor's own pause: its control server keeps answering);
3. `runsc checkpoint --leave-running`: the memory image; the source stays paused;
4. fsfreeze the source's disk, clone it (reflink where the data dir's filesystem can, else a sparse
   copy), thaw: the disk is exactly as of the image (cloning it later would give a disk newer than the
   memory, which gVisor trusts: silent corruption);
5. `runsc resume`, and freeze it again if it was warm. The source was paused for steps 2-5 only.
A stopped source is not touched at all: its disk is quiescent, its snapshot is assembled as for a
restore. Then the fork is built like a create (own slot, netns, IP, cgroup, disk, resolver) and
restored from the image. Whatever fails, the source is resumed as it was and nothing of the fork stays.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ... import diskimage
from ...fileio import write_atomic
from ...tasks import all_of
from ..base import EngineError, ForkResult, SandboxHandle, SandboxSpec, State
from . import bundle
from .proc import run
from .records import RECORD_FILE, RESOLVED_FILE, Record
from .snapshots import PageStore, remove_scratch

if TYPE_CHECKING:
    from .engine import GVisorEngine


async def fork(engine: GVisorEngine, source_id: str, spec: SandboxSpec) -> ForkResult:
    src = source_record(engine, source_id)
    fork_dir = engine.dir(spec.id)
    scratch = fork_dir / "fork.tmp"
    # the fork's agent is the source's, memory and all: it knows the source's token (until handed its own)
    rec = await new_record(engine, spec, src.token, src.image, src.memory_mb)
    try:
        fork_dir.mkdir(parents=True)
        paused_ms = await capture(engine, source_id, scratch, fork_dir / "disk.ext4")
        resolved = None
        if src.net_policy == rec.net_policy:  # what the source resolved stays reachable from its copy
            engine.save_resolved(source_id)  # (written half a second after each answer otherwise)
            resolved = engine.dir(source_id) / RESOLVED_FILE
        handle = await restore_copy(engine, rec, spec, scratch, resolved)
        return ForkResult(handle, paused_ms)
    except BaseException:
        await engine.destroy(spec.id)
        raise
    finally:
        await asyncio.to_thread(remove_scratch, scratch)


async def checkpoint(engine: GVisorEngine, source_id: str, snapshot_id: str, owner: str) -> tuple[int, int]:
    """A named snapshot, taken as for a fork: its memory pages into the owner's shared page store,
    its disk cloned. Returns (bytes it added, ms the source was paused); on failure nothing is left."""
    src = source_record(engine, source_id)
    d = engine.kept.path(snapshot_id)
    try:
        d.mkdir(parents=True)
        paused_ms = await capture(engine, source_id, d / "image", d / "disk.ext4")
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, d, True)
        raise
    meta = {"token": src.token, "image": src.image, "memory_mb": src.memory_mb}
    return await engine.kept.save(snapshot_id, owner, meta), paused_ms


async def resume(engine: GVisorEngine, snapshot_id: str, spec: SandboxSpec) -> SandboxHandle:
    """A new sandbox from a named snapshot (any number of times: the snapshot is only read)."""
    meta = engine.kept.meta(snapshot_id)
    if meta is None:
        raise EngineError(f"snapshot {snapshot_id} is missing or unreadable")
    rec = await new_record(engine, spec, meta["token"], meta["image"], spec.memory_mb)
    try:
        engine.dir(spec.id).mkdir(parents=True)
        async with engine.kept.opened(snapshot_id, engine.dir(spec.id)) as image:
            return await restore_copy(engine, rec, spec, image, None)
    except BaseException:
        await engine.destroy(spec.id)
        raise


def source_record(engine: GVisorEngine, source_id: str) -> Record:
    src = engine.records.get(source_id)
    if src is None:
        raise EngineError(f"unknown sandbox {source_id}")
    if not (engine.dir(source_id) / "disk.ext4").exists():
        raise EngineError(f"sandbox {source_id} was made before per-sandbox disks and cannot be copied")
    return src


async def new_record(engine: GVisorEngine, spec: SandboxSpec, token: str, image: str, memory_mb: int) -> Record:
    async with engine.slot_lock:
        used = {r.slot for r in engine.records.values()}
        slot = next((s for s in range(engine.network.max_slots) if s not in used), None)
        if slot is None:
            raise EngineError(f"no free address left in {engine.network.subnet}")
        rec = Record(spec.id, slot, token, image, memory_mb, [], spec.net_policy.to_json())
        engine.records[spec.id] = rec
    return rec


async def capture(engine: GVisorEngine, source_id: str, image_dir: Path, disk_copy: Path) -> int:
    """The source's memory image into image_dir and its disk into disk_copy, consistent with each
    other; returns how long it was paused (ms; 0 for a stopped source, which is not touched)."""
    state = (await engine.status(source_id)).state
    if state in (State.RUNNING, State.PAUSED):
        return await checkpoint_and_clone(engine, source_id, image_dir, disk_copy)
    if state == State.STOPPED and PageStore(engine.dir(source_id)).restorable():
        await engine.index_done(source_id, stop_repack=True)  # (a repack would replace the packs assemble reads)
        await clone_disk(engine, source_id, disk_copy)
        await asyncio.to_thread(PageStore(engine.dir(source_id)).assemble, image_dir)
        return 0
    raise EngineError(f"sandbox {source_id} is {state} and cannot be copied")


async def restore_copy(
    engine: GVisorEngine, rec: Record, spec: SandboxSpec, image_dir: Path, resolved: Path | None
) -> SandboxHandle:
    """Build the new sandbox around its disk (already in its directory) like a create, and restore it
    from image_dir: its own slot, netns, address, cgroup and resolver."""
    new_dir = engine.dir(rec.id)
    link = engine.link(rec)
    path = engine.cgroups.path_for_runsc(rec.id)
    own_token = secrets.token_hex(16)  # its origin's (in the restored memory) stops opening it below
    bundle.write_bundle(spec, new_dir, link, path, own_token, [], engine.network.resolver_ip, engine.runtime())
    if resolved is not None and resolved.exists():
        shutil.copyfile(resolved, new_dir / RESOLVED_FILE)

    async def network() -> None:
        await engine.network.create(link, spec.net_policy)
        await engine.attach_resolver(rec)

    await all_of(network(), bundle.mount_rootfs(engine.image_root(rec), new_dir))  # independent: together
    write_atomic(new_dir / RECORD_FILE, rec.to_json())  # last: a directory without it is half-made
    await engine.restore_detached(rec.id, new_dir, new_dir / "console.log", image_dir)
    handle = await engine.until_ready(rec)
    await handle.agent.set_token(own_token)
    rec.token = own_token
    write_atomic(new_dir / RECORD_FILE, rec.to_json())
    return handle


async def checkpoint_and_clone(engine: GVisorEngine, source_id: str, image_dir: Path, disk_copy: Path) -> int:
    """Steps 1-5 above; returns how long the source was paused, in ms."""
    warm = engine.is_paused(source_id)
    if warm:
        await engine.resume(source_id)
    agent = engine.agents.get(source_id)
    if agent is not None:
        agent.abort()
    started = time.monotonic()
    await engine.runsc.pause(source_id)
    try:
        await engine.runsc.checkpoint(source_id, image_dir, leave_running=True)
        await clone_disk(engine, source_id, disk_copy)
    finally:
        await engine.runsc.resume(source_id)
        paused_ms = int((time.monotonic() - started) * 1000)
        if warm:
            await engine.pause(source_id)
    return paused_ms


async def clone_disk(engine: GVisorEngine, source_id: str, target: Path) -> None:
    """Copy the source's disk image as it is on its filesystem: frozen meanwhile (which also writes
    out what the host still caches of it, and leaves a clean journal), when it is mounted."""
    disk = engine.dir(source_id) / "disk"
    mounted = diskimage.is_mounted(disk)
    if mounted:
        await run(["fsfreeze", "-f", str(disk)])
    try:
        await diskimage.copy_sparse(engine.dir(source_id) / "disk.ext4", target)
    finally:
        if mounted:
            await run(["fsfreeze", "-u", str(disk)], check=False)


FICLONE = 0x40049409


def reflink_supported(directory) -> bool:
    """Whether files in directory can be cloned by reference (FICLONE: XFS with reflink, btrfs)."""
    import fcntl
    import tempfile

    with tempfile.NamedTemporaryFile(dir=directory) as a, tempfile.NamedTemporaryFile(dir=directory) as b:
        a.write(b"x" * 4096)
        a.flush()
        try:
            fcntl.ioctl(b.fileno(), FICLONE, a.fileno())
            return True
        except OSError:
            return False
