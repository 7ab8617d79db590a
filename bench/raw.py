"""The raw side of the benchmarks: an engine that only prepares bundles, netns and overlays, on its
own data dir, prefix and subnet (no daemon); the benchmark then drives runsc itself."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from pathlib import Path

from kiln.engine.gvisor.engine import GVisorEngine
from tests.daemon import IMAGES, Daemon


@contextlib.asynccontextmanager
async def raw_engine():
    d = Daemon()  # for a private data dir, prefix and subnet; never started
    engine = GVisorEngine(d.data_dir, IMAGES, d.subnet)
    await engine.start_engine()
    try:
        yield engine
    finally:
        for sid in list(engine.records):
            await engine.destroy(sid)
        await engine.close_engine()
        d.scrub()


async def raw_checkpoint(engine: GVisorEngine, sid: str) -> tuple[float, Path]:
    """`runsc checkpoint` of a sandbox to disk (then `delete`): seconds it took, and the image."""
    image = engine.dir(sid) / "raw-image"
    shutil.rmtree(image, ignore_errors=True)
    image.mkdir()
    engine.expect_exit(sid)
    t = time.perf_counter()
    await engine.runsc.checkpoint(sid, image)
    took = time.perf_counter() - t
    await engine.runsc.delete(sid)
    return took, image


async def raw_restore(engine: GVisorEngine, sid: str, handle, image: Path) -> float:
    """`runsc restore -detach` until the agent answers: seconds."""
    await engine.network.prepare_for_boot(engine.link(engine.records[sid]))
    t = time.perf_counter()
    await engine.runsc.restore_detached(sid, engine.dir(sid), engine.dir(sid) / "console.log", image)
    await handle.agent.wait_ready(asyncio.get_running_loop().time() + 30)
    return time.perf_counter() - t
