"""The raw side of the benchmarks: an engine that only prepares bundles, netns and overlays, on its
own data dir, prefix and subnet (no daemon); the benchmark then drives runsc itself."""

from __future__ import annotations

import contextlib

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
