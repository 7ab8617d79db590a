"""The engine conformance suite: every engine kiln ships, driven through the contract in
kiln/engine/base.py only (in this process, on its own event loop thread), checked by behaviour."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from kiln.config import Config
from kiln.engine import make_engine
from kiln.engine.base import Engine, SandboxHandle, SandboxSpec
from tests.daemon import builtin_image

ENGINES = ["gvisor"]  # every engine kiln ships


class Loop:
    """An event loop on a thread of its own: tests are plain functions, the engine lives on one loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class EngineUnderTest:
    def __init__(self, engine: Engine, loop: Loop):
        self.engine, self.loop = engine, loop
        self.made: list[str] = []

    def create(self, **spec: Any) -> SandboxHandle:
        sandbox_id = secrets.token_hex(8)
        self.made.append(sandbox_id)
        return self.loop.run(
            self.engine.create(SandboxSpec(id=sandbox_id, hostname="conformance", image=builtin_image(), **spec))
        )

    def exec(self, handle: SandboxHandle, *argv: str) -> tuple[int, str]:
        async def go() -> tuple[int, str]:
            out = bytearray()
            async for ev in handle.agent.exec({"argv": list(argv), "env": {}, "timeout_sec": 60}):
                if ev.kind == "stdout":
                    out += ev.data
                elif ev.kind == "exit":
                    return ev.exit_code, out.decode()
            raise AssertionError("no exit event")

        return self.loop.run(go())


@pytest.fixture(scope="module", params=ENGINES)
def engine(request, default_image):
    data_dir = Path(tempfile.mkdtemp(prefix="kiln-conformance-"))
    config = Config(
        data_dir=data_dir,
        network={"subnet": f"10.{250 + os.getpid() % 5}.{os.getpid() % 250}.0/24"},
    )
    engine = make_engine(config)
    assert engine.name == request.param
    loop = Loop()
    under_test = EngineUnderTest(engine, loop)
    try:
        loop.run(engine.start_engine())
        yield under_test
        for sandbox_id in under_test.made:
            loop.run(engine.destroy(sandbox_id))
        loop.run(engine.close_engine())
    finally:
        loop.close()
        engine.scrub()
        shutil.rmtree(data_dir, ignore_errors=True)
