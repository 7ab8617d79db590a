"""Connections from the daemon to TCP ports inside sandboxes.

The authenticated proxy, host_port relays and published URLs all connect through here. A service
listening on the sandbox's address is reached directly (<sandbox ip>:<port>, ~0.6 ms); one that
listens on loopback only refuses that, and is reached through the agent, which dials 127.0.0.1
inside the sandbox. Every open connection is tracked, so a stop or a destroy can cut them before
the checkpoint instead of leaving them to be reset inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

from ..agent.client import AgentError
from ..engine.base import SandboxHandle
from ..store.db import SandboxRow
from .errors import BadGateway, BadRequest
from .lifecycle import SandboxService

CONNECT_TIMEOUT = 5.0


def parse_port(text: str | int) -> int:
    try:
        port = int(text)
    except (TypeError, ValueError):
        raise BadRequest("invalid port") from None
    if not 1 <= port <= 65535:
        raise BadRequest("invalid port")
    return port


class Upstreams:
    def __init__(self, sandboxes: SandboxService):
        self.sandboxes = sandboxes
        self.open_sockets: dict[str, set[socket.socket]] = {}

    async def dial(self, handle: SandboxHandle, port: int) -> socket.socket:
        """Connect to a port of a hot sandbox; BadGateway when nothing listens there."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (handle.ip, port)), CONNECT_TIMEOUT)
            return sock
        except ConnectionRefusedError:
            sock.close()
        except (TimeoutError, OSError) as e:
            sock.close()
            raise BadGateway(f"bad gateway: connect to port {port}: {e or 'timed out'}") from e
        try:
            return await handle.agent.forward(port, timeout=CONNECT_TIMEOUT)
        except AgentError as e:
            raise BadGateway(f"bad gateway: {e}") from e

    async def open(self, handle: SandboxHandle, port: int) -> socket.socket:
        """A tracked connection (cut on stop or destroy); give it back with release()."""
        sock = await self.dial(handle, port)
        self.open_sockets.setdefault(handle.id, set()).add(sock)
        return sock

    def release(self, sandbox_id: str, sock: socket.socket) -> None:
        tracked = self.open_sockets.get(sandbox_id, set())
        tracked.discard(sock)
        if not tracked:
            self.open_sockets.pop(sandbox_id, None)
        sock.close()

    @contextlib.asynccontextmanager
    async def connection(self, row: SandboxRow, port: int) -> AsyncIterator[socket.socket]:
        """A tracked connection for as long as the block runs; the sandbox stays hot meanwhile."""
        async with self.sandboxes.using(row) as handle:
            sock = await self.open(handle, port)
            try:
                yield sock
            finally:
                self.release(row.id, sock)

    def cut(self, sandbox_id: str) -> None:
        """End every open connection to a sandbox (it is being stopped or destroyed)."""
        for sock in self.open_sockets.pop(sandbox_id, set()):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
