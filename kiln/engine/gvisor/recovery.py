"""What a daemon start finds after a crash, and puts right before any sandbox is used.

- A sandbox directory without engine.json was being made: removed.
- Netns, veths and runsc containers no record claims: removed.
- A stop cut short (checkpoint.tmp left): runsc's checkpoint outlives the daemon, so wait for it; if
  it completed (the sandbox is gone, the image is whole) keep it as the snapshot; if the sandbox still
  runs, the stop never happened. Memory is never dropped in between.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..base import State
from .snapshots import PageStore, remove_scratch, remove_trash

if TYPE_CHECKING:
    from .engine import GVisorEngine

log = logging.getLogger("kiln.engine.gvisor")


async def remove_strays(engine: GVisorEngine) -> None:
    known = {engine.link(r).netns for r in engine.records.values()}
    known_ifs = {engine.link(r).host_if for r in engine.records.values()}
    netns, ifs = engine.network.leftovers()
    for ns in netns:
        if ns not in known:
            await engine.network.remove_netns(ns)
    for i in ifs:
        if i not in known_ifs:
            await engine.network.remove_host_if(i)
    for sandbox_id in engine.runsc.list_ids():
        if sandbox_id not in engine.records:
            await engine.delete_container(sandbox_id)


async def recover_interrupted_stop(engine: GVisorEngine, sandbox_id: str) -> None:
    sandbox_dir = engine.dir(sandbox_id)
    await asyncio.to_thread(remove_scratch, sandbox_dir / "restore.tmp")
    await asyncio.to_thread(remove_trash, sandbox_dir)  # scratch images set aside, not deleted yet
    image_dir = sandbox_dir / "checkpoint.tmp"
    if not image_dir.exists():  # (or a link to a memory scratch that a reboot emptied)
        await asyncio.to_thread(remove_scratch, image_dir)
        return
    for _ in range(1200):
        if not engine.runsc.checkpoint_running(sandbox_id):
            break
        await asyncio.sleep(0.1)
    taken = (image_dir / "checkpoint.img").exists()
    state = (await engine.status(sandbox_id)).state
    for _ in range(50):  # a checkpointed sandbox exits just after; runsc may report it running meanwhile
        if not taken or state not in (State.RUNNING, State.PAUSED):
            break
        await asyncio.sleep(0.1)
        state = (await engine.status(sandbox_id)).state
    if state not in (State.RUNNING, State.PAUSED) and taken:
        try:
            info = await asyncio.to_thread(PageStore(sandbox_dir).save_interrupted, image_dir)
            log.warning(
                "sandbox %s: finished the snapshot a crash interrupted (%s, %d bytes)",
                sandbox_id,
                info.kind,
                info.bytes_written,
            )
        except OSError as e:
            log.error("sandbox %s: the snapshot a crash interrupted cannot be kept: %s", sandbox_id, e)
        await engine.delete_container(sandbox_id)
    await asyncio.to_thread(remove_scratch, image_dir)
