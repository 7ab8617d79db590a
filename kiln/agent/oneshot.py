"""One-shot exec: spawn, stream stdout/stderr, feed stdin, enforce the timeout, kill the group.

Part of the guest agent: standard library only, imported as kiln.agent.oneshot on the host (tests) and
as a plain module inside the sandbox."""

from __future__ import annotations

import errno
import os
import selectors
import time
from typing import TYPE_CHECKING

try:  # imported as kiln.agent.* on the host, run as plain modules in the sandbox
    from . import protocol as P
    from .spawn import Child, kill_process_group, spawn
    from .wire import READ_CHUNK, Conn, RequestError
except ImportError:  # pragma: no cover
    import protocol as P  # type: ignore[no-redef,import-not-found]
    from spawn import Child, kill_process_group, spawn  # type: ignore[no-redef,import-not-found]
    from wire import READ_CHUNK, Conn, RequestError  # type: ignore[no-redef,import-not-found]

if TYPE_CHECKING:
    from .server import Agent


def run_exec(agent: Agent, conn: Conn, req: dict) -> None:
    """Run argv to completion, streaming stdout/stderr frames, then EXIT.

    The child gets its own process group; timeout, a KILL frame or the host going away kill
    the whole group, so nothing of the command outlives its request.
    """
    argv = req.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise RequestError("cmd required")
    launch = agent.launch_spec(req)
    timeout = req.get("timeout_sec")
    deadline = time.monotonic() + float(timeout) if timeout else None
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe() if req.get("stdin") else (os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), -1)
    try:
        proc = Child(spawn(argv, launch, in_r, out_w, err_w))
    except OSError as e:
        for fd in (out_r, err_r, in_w):
            if fd >= 0:
                os.close(fd)
        known = {errno.ENOENT: (127, "command not found"), errno.EACCES: (126, "permission denied")}
        code, why = known.get(e.errno or 0, (126, e.strerror or str(e)))
        conn.send(P.STDERR, f"exec: {argv[0]}: {why}\n".encode())
        conn.send_json(P.EXIT, {"exit_code": code})
        return
    finally:
        for fd in (in_r, out_w, err_w):
            os.close(fd)

    def kill_group() -> None:
        kill_process_group(proc.pid)

    conn.send_json(P.STARTED, {"pid": proc.pid})
    stdin = StdinFeeder(in_w) if in_w >= 0 else None
    sel = selectors.DefaultSelector()
    streams = {out_r: P.STDOUT, err_r: P.STDERR}
    for fd in streams:
        sel.register(fd, selectors.EVENT_READ)
    sel.register(conn.sock, selectors.EVENT_READ)
    inbuf = bytearray()
    timed_out = host_gone = False
    try:
        while streams and not host_gone:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if wait == 0.0:
                timed_out = True
                break
            if stdin:
                stdin.register(sel)
            for key, _events in sel.select(wait):
                if key.fileobj is conn.sock:
                    data = conn.sock.recv(READ_CHUNK)  # readable: does not block
                    inbuf += data
                    if not data or not apply_host_frames(inbuf, stdin):
                        host_gone = True
                        break
                elif stdin and key.fd == stdin.fd:
                    stdin.write()
                else:
                    data = os.read(key.fd, READ_CHUNK)
                    if data:
                        conn.send(streams[key.fd], data)
                    else:
                        sel.unregister(key.fd)
                        del streams[key.fd]
                        os.close(key.fd)
        if timed_out or host_gone:
            kill_group()
            proc.wait()
        else:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                proc.wait(remaining)
            except TimeoutError:
                timed_out = True
                kill_group()
                proc.wait()
    finally:
        sel.close()
        for fd in streams:
            os.close(fd)
        if stdin:
            stdin.close()
    if host_gone:
        return
    if timed_out:
        conn.send_json(P.EXIT, {"exit_code": 124, "timed_out": True})
    else:
        rc = proc.returncode or 0
        conn.send_json(P.EXIT, {"exit_code": 128 - rc if rc < 0 else rc})


class StdinFeeder:
    """Feeds host STDIN frames to the child without blocking, so a child that writes a lot
    before reading everything (e.g. `cat` of a big input) never deadlocks against us."""

    def __init__(self, fd: int):
        self.fd = fd
        os.set_blocking(self.fd, False)
        self.pending = bytearray()
        self.eof = False
        self.closed = False
        self.registered = False

    def feed(self, data: bytes) -> None:
        if data:
            self.pending += data
        else:
            self.eof = True

    def register(self, sel: selectors.BaseSelector) -> None:
        want = bool(self.pending) and not self.closed
        if want and not self.registered:
            sel.register(self.fd, selectors.EVENT_WRITE)
        elif not want and self.registered:
            sel.unregister(self.fd)
        self.registered = want
        if self.eof and not self.pending and not self.closed:
            self.close()

    def write(self) -> None:
        try:
            n = os.write(self.fd, self.pending[:READ_CHUNK])
            del self.pending[:n]
        except BlockingIOError:
            pass
        except OSError:  # the child closed its stdin: drop the rest
            self.pending.clear()
            self.eof = True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)


def apply_host_frames(buf: bytearray, stdin: StdinFeeder | None) -> bool:
    """Apply complete frames from the host to a running exec; False means kill it."""
    while len(buf) >= P.HEADER.size:
        ftype, n = P.parse_header(bytes(buf[: P.HEADER.size]))
        if len(buf) < P.HEADER.size + n:
            break
        payload = bytes(buf[P.HEADER.size : P.HEADER.size + n])
        del buf[: P.HEADER.size + n]
        if ftype == P.KILL:
            return False
        if ftype == P.STDIN and stdin:
            stdin.feed(payload)
    return True
