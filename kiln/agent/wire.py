"""Framing over the agent's blocking sockets, and the error a refused request raises.

Part of the guest agent: standard library only, imported as kiln.agent.wire on the host (tests) and
as a plain module inside the sandbox."""

from __future__ import annotations

import contextlib
import json
import socket
import threading

try:  # imported as kiln.agent.* on the host, run as plain modules in the sandbox
    from . import protocol as P
except ImportError:  # pragma: no cover
    import protocol as P  # type: ignore[no-redef,import-not-found]

READ_CHUNK = 64 * 1024


class RequestError(Exception):
    """A request the agent refuses; kind is protocol.INVALID (caller's fault) or protocol.FAILED."""

    def __init__(self, message: str, kind: str = P.INVALID):
        super().__init__(message)
        self.kind = kind


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket) -> tuple[int, bytes] | None:
    header = recv_exact(sock, P.HEADER.size)
    if header is None:
        return None
    ftype, n = P.parse_header(header)
    payload = recv_exact(sock, n) if n else b""
    if payload is None:
        return None
    return ftype, payload


class Conn:
    """A host connection; sends are serialised so frames never interleave."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.lock = threading.Lock()
        self.closed = False

    def send(self, ftype: int, payload: bytes = b"") -> bool:
        data = P.encode(ftype, payload)
        with self.lock:
            if self.closed:
                return False
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                self.closed = True
                return False

    def send_json(self, ftype: int, obj) -> bool:
        return self.send(ftype, json.dumps(obj, separators=(",", ":")).encode())

    def send_chunks(self, ftype: int, data: bytes) -> bool:
        return all(self.send(ftype, data[i : i + P.MAX_FRAME]) for i in range(0, len(data), P.MAX_FRAME))

    def close(self) -> None:
        with self.lock:
            self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
