"""Typed sandbox events. Services subscribe in app.py; the lifecycle emits them.

- before_stop(id): synchronous, under the sandbox's lock, before a checkpoint or destroy: end host
  connections into it (they would be reset inside the checkpoint otherwise).
- destroyed(id): after the sandbox is gone from the engine and the store: release what is held for it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("kiln.events")

BeforeStop = Callable[[str], None]
Destroyed = Callable[[str], Awaitable[None]]


class SandboxEvents:
    def __init__(self) -> None:
        self._before_stop: list[BeforeStop] = []
        self._destroyed: list[Destroyed] = []

    def on_before_stop(self, listener: BeforeStop) -> None:
        self._before_stop.append(listener)

    def on_destroyed(self, listener: Destroyed) -> None:
        self._destroyed.append(listener)

    def before_stop(self, sandbox_id: str) -> None:
        for listener in self._before_stop:
            listener(sandbox_id)

    async def destroyed(self, sandbox_id: str) -> None:
        for listener in self._destroyed:
            try:
                await listener(sandbox_id)
            except Exception:  # one listener's failure must not keep the others from cleaning up
                log.exception("destroyed(%s) listener failed", sandbox_id)
