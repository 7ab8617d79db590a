"""Keep-alive HTTP connections from the daemon to apps in sandboxes: one httpcore pool per sandbox.

A request to a hot app then costs no TCP handshake (and no new thread in thread-per-connection
servers). Connections come from Upstreams (tracked, so a stop or destroy cuts them). Idle ones never
keep a sandbox hot, expire before common server idle timeouts, and are dropped with the sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket

import httpcore

from .errors import BadGateway
from .lifecycle import SandboxService
from .upstream import Upstreams


class SocketStream(httpcore.AsyncNetworkStream):
    """httpcore's view of a connection we opened ourselves (direct or through the agent).

    TCP_QUICKACK before every read: apps that write headers and body separately with Nagle on
    (Python's http.server, for one) otherwise wait ~40 ms per response for our delayed ACK on a
    reused connection.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sock: socket.socket, on_close):
        self.reader, self.writer, self.sock, self.on_close = reader, writer, sock, on_close

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return await asyncio.wait_for(self.reader.read(max_bytes), timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.writer.write(buffer)
        await asyncio.wait_for(self.writer.drain(), timeout)

    async def aclose(self) -> None:
        self.writer.close()
        self.on_close()

    def get_extra_info(self, info: str):
        if info == "is_readable":  # an idle keep-alive connection that is readable was closed by the app
            return readable_now(self.sock)
        return None


def readable_now(sock: socket.socket) -> bool:
    """Whether a read would not block (poll, not select: select fails for fds >= 1024)."""
    fd = sock.fileno()
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))


class SandboxBackend(httpcore.AsyncNetworkBackend):
    """Where httpcore's pool gets new connections for one sandbox: from Upstreams (tracked)."""

    def __init__(self, sandboxes: SandboxService, upstreams: Upstreams, sandbox_id: str):
        self.sandboxes, self.upstreams, self.sandbox_id = sandboxes, upstreams, sandbox_id

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        row = self.sandboxes.store.sandbox_by_id(self.sandbox_id)
        if row is None:
            raise BadGateway("bad gateway: the sandbox is gone")
        handle = await self.sandboxes.waker.ready_handle(row)  # the caller holds it in use
        sock = await self.upstreams.open(handle, port)
        reader, writer = await asyncio.open_connection(sock=sock)
        return SocketStream(reader, writer, sock, lambda: self.upstreams.release(self.sandbox_id, sock))

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class HttpPools:
    KEEPALIVE_EXPIRY = 4.0  # under Node's 5 s default keepAliveTimeout
    MAX_IDLE = 8

    def __init__(self, sandboxes: SandboxService, upstreams: Upstreams):
        self.sandboxes = sandboxes
        self.upstreams = upstreams
        self.pools: dict[str, httpcore.AsyncConnectionPool] = {}

    def pool(self, sandbox_id: str) -> httpcore.AsyncConnectionPool:
        pool = self.pools.get(sandbox_id)
        if pool is None:
            pool = self.pools[sandbox_id] = httpcore.AsyncConnectionPool(
                network_backend=SandboxBackend(self.sandboxes, self.upstreams, sandbox_id),
                max_connections=None,
                max_keepalive_connections=self.MAX_IDLE,
                keepalive_expiry=self.KEEPALIVE_EXPIRY,
            )
        return pool

    def forget(self, sandbox_id: str) -> None:
        """Subscribed to before_stop after Upstreams.cut: its sockets are shut down; drop the pool."""
        self.pools.pop(sandbox_id, None)
