"""One-shot exec: spawn, stream stdout/stderr, feed stdin, enforce the timeout, kill the group.

Part of the guest agent: standard library only, imported as kiln.agent.oneshot on the host (tests) and
as a plain module inside the sandbox."""

from __future__ import annotations

import errno
import os
import select
import selectors
import threading
import time

try:  # imported as kiln.agent.* on the host, run as plain modules in the sandbox
    from . import protocol as P
    from .spawn import Child, kill_process_group, spawn
    from .wire import READ_CHUNK, Conn, RequestError
except ImportError:  # pragma: no cover
    import protocol as P  # type: ignore[no-redef,import-not-found]
    from spawn import Child, kill_process_group, spawn  # type: ignore[no-redef,import-not-found]
    from wire import READ_CHUNK, Conn, RequestError  # type: ignore[no-redef,import-not-found]

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (boot time)
if TYPE_CHECKING:
    from .server import Agent


EXIT_POLL = 0.1  # how often a running command is checked for having exited with its pipes still held
DRAIN_QUIET = 0.05  # after it exits: output is drained until the pipes are quiet this long ...
DRAIN_MAX = 1.0  # ... or for this long at most


def run_exec(agent: Agent, conn: Conn, req: dict) -> bool:
    """Run argv until it exits, streaming stdout/stderr frames, then EXIT. True when the connection
    may carry another request: the host sent nothing while the command ran (no stdin, no KILL).

    The child gets its own process group; timeout, a KILL frame or the host going away kill
    the whole group. When the command exits, its output is drained briefly and EXIT sent, even if
    children it left in the background still hold its stdout/stderr (`sh -c 'server &'`): they keep
    running, and what they write from then on is discarded (see OrphanedPipes).
    """
    argv = checked_argv(req)
    if req.get("detach"):
        run_detached(agent, conn, req, argv)
        return True
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
        return in_w < 0
    finally:
        for fd in (in_r, out_w, err_w):
            os.close(fd)

    conn.send_json(P.STARTED, {"pid": proc.pid})
    stdin = StdinFeeder(in_w) if in_w >= 0 else None
    sel = selectors.DefaultSelector()
    streams = {out_r: P.STDOUT, err_r: P.STDERR}
    for fd in streams:
        sel.register(fd, selectors.EVENT_READ)
    sel.register(conn.sock, selectors.EVENT_READ)
    inbuf = bytearray()
    timed_out = host_gone = heard_from_host = False
    exited_at: float | None = None  # when the command itself exited (its pipes may still be held)
    next_poll = time.monotonic() + EXIT_POLL
    try:
        while streams and not host_gone:
            now = time.monotonic()
            if exited_at is None and now >= next_poll:
                next_poll = now + EXIT_POLL
                if proc.poll() is not None:
                    exited_at = now
            if deadline is not None and now >= deadline and exited_at is None:
                timed_out = True
                break
            if exited_at is not None:
                if now - exited_at >= DRAIN_MAX:
                    break
                wait: float | None = DRAIN_QUIET
            else:
                wait = next_poll - now if deadline is None else min(next_poll, deadline) - now
            if stdin:
                stdin.register(sel)
            ready = sel.select(wait)
            if not ready and exited_at is not None:
                break  # quiet since the command exited: what it wrote is all sent
            for key, _events in ready:
                if key.fileobj is conn.sock:
                    data = conn.sock.recv(READ_CHUNK)  # readable: does not block
                    inbuf += data
                    heard_from_host = True
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
            kill_process_group(proc.pid)
            proc.wait()
        else:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                proc.wait(remaining)
            except TimeoutError:
                timed_out = True
                kill_process_group(proc.pid)
                proc.wait()
    finally:
        sel.close()
        ORPHANED_PIPES.adopt(list(streams))  # still held by background children
        if stdin:
            stdin.close()
    if host_gone:
        return False
    if timed_out:
        conn.send_json(P.EXIT, {"exit_code": 124, "timed_out": True})
    else:
        rc = proc.returncode or 0
        conn.send_json(P.EXIT, {"exit_code": 128 - rc, "signal": -rc} if rc < 0 else {"exit_code": rc})
    return stdin is None and not heard_from_host


def checked_argv(req: dict) -> list[str]:
    argv = req.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise RequestError("cmd required")
    return argv


def run_detached(agent: Agent, conn: Conn, req: dict, argv: list[str]) -> None:
    """Start argv in its own session writing to an output file, answer STARTED at once, and leave it
    running: it outlives the request, the connection and any timeout."""
    path = req.get("output_file") or f"/tmp/kiln-exec-{os.urandom(4).hex()}.log"
    if not isinstance(path, str) or not path.startswith("/"):
        raise RequestError("output_file must be an absolute path")
    launch = agent.launch_spec(req)
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        pid = spawn(argv, launch, null, null, null, output_file=path)
    except OSError as e:
        raise RequestError(f"detach: cannot start {argv[0]} writing to {path}: {e.strerror or e}") from e
    finally:
        os.close(null)
    threading.Thread(target=os.waitpid, args=(pid, 0), daemon=True).start()  # its zombie is ours to reap
    conn.send_json(P.STARTED, {"pid": pid, "output_file": path, "detached": True})


class OrphanedPipes:
    """Read ends of exec pipes that background children still hold after the command exited.

    Closing them would kill those children with SIGPIPE on their next write, so one thread
    reads and discards until each reaches EOF. Past MAX_PIPES the oldest are closed after all.
    """

    MAX_PIPES = 256

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.fds: list[int] = []
        self.wake_r, self.wake_w = -1, -1

    def adopt(self, fds: list[int]) -> None:
        if not fds:
            return
        with self.lock:
            if self.wake_r < 0:
                self.wake_r, self.wake_w = os.pipe()
                threading.Thread(target=self.drain, daemon=True).start()
            self.fds += fds
            while len(self.fds) > self.MAX_PIPES:
                os.close(self.fds.pop(0))
        os.write(self.wake_w, b"x")

    def drain(self) -> None:
        while True:
            poller = select.poll()
            with self.lock:
                for fd in (self.wake_r, *self.fds):
                    poller.register(fd, select.POLLIN)
            for fd, _event in poller.poll():
                if fd == self.wake_r:
                    os.read(fd, 4096)
                    continue
                with self.lock:
                    if fd not in self.fds:
                        continue  # closed meanwhile (over MAX_PIPES)
                    if not os.read(fd, READ_CHUNK):
                        self.fds.remove(fd)
                        os.close(fd)


ORPHANED_PIPES = OrphanedPipes()


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
