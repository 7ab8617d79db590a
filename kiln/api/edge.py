"""The HTTP server's own limits, applied per connection before any ASGI code runs.

uvicorn's httptools protocol accepts headers of any size (one 96 MB header costs ~13 s of CPU) and
waits forever for a slow client's headers. GuardedHttpTools closes a connection whose request line and
headers pass `server.max_header_bytes` (431), that has not sent its headers within
`server.header_timeout` (408), or that would be one too many from its client address
(`server.max_connections_per_ip`, 429).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from typing import ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..config import ServerConfig

log = logging.getLogger("kiln.edge")


def refusal(status: int, reason: str, message: str) -> bytes:
    body = ('{"error":"' + message + '"}\n').encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


class GuardedHttpTools(HttpToolsProtocol):
    limits: ClassVar[ServerConfig] = ServerConfig()
    per_ip: ClassVar[Counter[str]] = Counter()  # open connections by client address, all protocols of this daemon

    @classmethod
    def configure(cls, limits: ServerConfig) -> type[GuardedHttpTools]:
        return type("GuardedHttpTools", (cls,), {"limits": limits, "per_ip": Counter()})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._ip = self.client[0] if self.client else ""
        self._counted = True
        self.per_ip[self._ip] += 1
        self._in_head = True
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        if self.per_ip[self._ip] > self.limits.max_connections_per_ip:
            self._refuse(429, "Too Many Requests", "too many connections from this address")
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._uncount()
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            self.per_ip[self._ip] -= 1
            if self.per_ip[self._ip] <= 0:
                del self.per_ip[self._ip]

    def handle_websocket_upgrade(self) -> None:
        # the WebSocket protocol takes the transport over (our connection_lost is never called): the
        # connection still counts against its address until that protocol loses it
        self._cancel_head_timer()
        super().handle_websocket_upgrade()
        ws = self.transport.get_protocol()
        lost = ws.connection_lost

        def connection_lost(exc: Exception | None) -> None:
            self._uncount()
            lost(exc)

        ws.connection_lost = connection_lost  # type: ignore[method-assign]

    # -- the request head

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > self.limits.max_header_bytes and not self.transport.is_closing():
            self._refuse(431, "Request Header Fields Too Large", "request headers too large")

    def on_message_begin(self) -> None:
        # (the counter was reset when the last head completed; what this chunk brought is counted)
        super().on_message_begin()
        self._in_head = True
        self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._cancel_head_timer()
        super().on_headers_complete()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()  # type: ignore[union-attr]
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            if self._head_bytes:
                self._refuse(408, "Request Timeout", "request headers not received in time")
            else:
                self.transport.close()  # a connection that never said anything

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self.transport.write(refusal(status, reason, message))
        self.transport.close()


TOKEN_IN_TEXT = re.compile(r"(token=)[^&\s\"']+")


class RedactTokens(logging.Filter):
    """uvicorn logs WebSocket handshakes with their query string: `?token=<API key>` must not reach a log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.msg = record.getMessage()
            record.args = None
        if isinstance(record.msg, str) and "token=" in record.msg:
            record.msg = TOKEN_IN_TEXT.sub(r"\1[redacted]", record.msg)
        return True
