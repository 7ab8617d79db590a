"""Listening ports and port forwarding inside the sandbox (standard library only).

Ports come from /proc/net/tcp and tcp6 (gVisor implements both): every socket in LISTEN state.
A forward connects to 127.0.0.1:<port> from inside, so services bound to loopback only are
reachable too, then relays bytes both ways until both sides are done.
"""

from __future__ import annotations

import contextlib
import socket
import threading

LISTEN = "0A"
LOOPBACK_V4 = "0100007F"
LOOPBACK_V6 = "00000000000000000000000001000000"
CONNECT_TIMEOUT = 5.0
CHUNK = 64 * 1024


def parse_proc_net_tcp(text: str) -> list[tuple[int, bool]]:
    """(port, bound to loopback only) for each LISTEN line of a /proc/net/tcp{,6} table."""
    found = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != LISTEN:
            continue
        addr, _, port_hex = fields[1].partition(":")
        found.append((int(port_hex, 16), addr in (LOOPBACK_V4, LOOPBACK_V6)))
    return found


def listening_ports(exclude: set[int]) -> list[dict]:
    """[{"port", "loopback_only"}] sorted by port; a port is loopback-only if no listener on it is wider."""
    ports: dict[int, bool] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                text = f.read()
        except OSError:
            continue
        for port, loopback in parse_proc_net_tcp(text):
            if port not in exclude:
                ports[port] = ports.get(port, True) and loopback
    return [{"port": p, "loopback_only": ports[p]} for p in sorted(ports)]


def dial_local(port: int) -> socket.socket:
    """Connect to a port of this sandbox, over loopback."""
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError("invalid port")
    return socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT)


def relay(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until both directions reach EOF (half-closes are passed on)."""
    a.settimeout(None)
    b.settimeout(None)
    other = threading.Thread(target=_pump, args=(b, a), daemon=True)
    other.start()
    _pump(a, b)
    other.join()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(CHUNK)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        # One side broke: tear both down so the other pump ends too.
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        return
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)
