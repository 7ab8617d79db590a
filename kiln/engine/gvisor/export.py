"""A sandbox's root tree as a new image: its image with its own writes, copied at one instant.

The disk is cloned the way a fork clones it (the sandbox paused, the filesystem frozen, after the
sandbox's own cached writes are flushed), then read through a read-only overlay of the clone's
upper layer over the image, so the kernel applies whiteouts and opaque directories; rsync copies
that merged view, hard-linking every file the image already has (an image of an image costs only
what changed). The sandbox is paused only for the clone.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ... import diskimage
from ...images.runtime import GUEST_RUNTIME, python_request
from ..base import EngineError, State
from . import bundle
from .fork import clone_disk
from .proc import run

if TYPE_CHECKING:
    from .engine import GVisorEngine

SCRATCH = "export.tmp"
FLUSH = "import os; os.sync()"


async def flush_guest_writes(engine: GVisorEngine, sandbox_id: str) -> None:
    """Ask the sandbox to write out what its kernel still caches of its files (best effort)."""
    handle = engine.handle(sandbox_id)
    if handle is None:
        return
    with contextlib.suppress(Exception):
        async for _ in handle.agent.exec(python_request(FLUSH, 30)):
            pass


async def export_rootfs(engine: GVisorEngine, sandbox_id: str, target: Path) -> None:
    rec = engine.records.get(sandbox_id)
    if rec is None:
        raise EngineError(f"unknown sandbox {sandbox_id}")
    sandbox_dir = engine.dir(sandbox_id)
    if not (sandbox_dir / "disk.ext4").exists():
        raise EngineError(f"sandbox {sandbox_id} predates root disks and cannot be copied")
    scratch = sandbox_dir / SCRATCH
    await asyncio.to_thread(shutil.rmtree, scratch, True)
    scratch.mkdir()
    clone, disk, merged = scratch / "disk.ext4", scratch / "disk", scratch / "merged"
    try:
        state = (await engine.status(sandbox_id)).state
        if state == State.RUNNING and not engine.is_paused(sandbox_id):
            await flush_guest_writes(engine, sandbox_id)
            await engine.runsc.pause(sandbox_id)
            try:
                await clone_disk(engine, sandbox_id, clone)
            finally:
                await engine.runsc.resume(sandbox_id)
        else:  # paused (frozen already), stopped or dead: nothing in it writes
            await clone_disk(engine, sandbox_id, clone)
        await diskimage.mount(clone, disk, read_only=True)
        merged.mkdir()
        lower = f"{disk / 'upper'}:{engine.image_root(rec)}"
        await run(["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lower}", str(merged)])
        target.mkdir(parents=True, exist_ok=False)
        await copy_tree(merged, target, link_dest=engine.image_root(rec))
    finally:
        await diskimage.unmount(merged)
        await diskimage.unmount(disk)
        await asyncio.to_thread(shutil.rmtree, scratch, True)


async def copy_tree(source: Path, target: Path, link_dest: Path) -> None:
    """Copy every file, link, device, owner, mode, ACL and xattr; files unchanged from link_dest
    are hard links to it. kiln's own mount points stay as the image had them."""
    argv = ["rsync", "-aHAX", "--numeric-ids", f"--link-dest={link_dest}"]
    argv += [f"--exclude=/{p}/**" for p in (GUEST_RUNTIME.strip("/"), bundle.GUEST_AGENT_DIR.strip("/"))]
    await run([*argv, f"{source}/", f"{target}/"], timeout=3600)
