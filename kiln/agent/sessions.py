"""PTY sessions: a shell (or init) on a pseudo-terminal with scrollback, attached and detached by clients.

Part of the guest agent: standard library only, imported as kiln.agent.sessions on the host (tests) and
as a plain module inside the sandbox."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import selectors
import signal
import struct
import termios
import threading
import time

try:  # imported as kiln.agent.* on the host, run as plain modules in the sandbox
    from . import protocol as P
    from .wire import READ_CHUNK, Conn, RequestError, recv_frame
except ImportError:  # pragma: no cover
    import protocol as P  # type: ignore[no-redef,import-not-found]
    from wire import READ_CHUNK, Conn, RequestError, recv_frame  # type: ignore[no-redef,import-not-found]

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (boot time)
if TYPE_CHECKING:
    import subprocess

    from .server import Agent

SCROLLBACK = 64 * 1024
EXITED_SESSION_TTL = 30.0


class Session:
    """A process on a PTY with a 64 KiB scrollback ring; one attached client at a time."""

    def __init__(self, agent: Agent, sid: str, argv: list[str], proc: subprocess.Popen, master: int, max_idle: float):
        self.agent = agent
        self.id = sid
        self.argv = argv
        self.proc = proc
        self.master = master
        self.max_idle = max_idle
        self.scrollback = bytearray()
        self.lock = threading.Lock()
        self.client: Conn | None = None
        self.running = True
        self.exit_code: int | None = None
        self.exited_at: float | None = None
        self.created_at = int(time.time())
        self.detached_at = time.monotonic()

    @classmethod
    def start(cls, agent: Agent, sid: str, req: dict) -> Session:
        # a new shell: bash as a login shell where the image has it
        argv = req.get("argv") or (["/bin/bash", "-li"] if os.path.exists("/bin/bash") else ["/bin/sh", "-l"])
        kw = agent.popen_identity({**req, "cwd": req.get("cwd") or agent.shell_cwd()})
        master, slave = os.openpty()
        set_winsize(slave, int(req.get("rows") or 24), int(req.get("cols") or 80))

        def make_controlling_tty() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        import subprocess  # here, not at boot: most sandboxes never open a terminal

        try:
            proc = subprocess.Popen(
                argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                start_new_session=True,
                preexec_fn=make_controlling_tty,
                close_fds=True,
                **kw,
            )
        except OSError as e:
            os.close(master)
            raise RequestError(f"start {argv[0]}: {e.strerror}")
        finally:
            os.close(slave)
        max_idle = req.get("max_idle_sec")
        session = cls(agent, sid, argv, proc, master, 3600.0 if max_idle is None else float(max_idle))
        agent.add_session(session)
        threading.Thread(target=session.pump, daemon=True).start()
        return session

    def info(self) -> dict:
        d = {
            "session_id": self.id,
            "pid": self.proc.pid,
            "argv": " ".join(self.argv),
            "tty": True,
            "running": self.running,
            "attached": self.client is not None,
            "created_at": self.created_at,
        }
        if not self.running:
            d["exit_code"] = self.exit_code
        return d

    def pump(self) -> None:
        """Move PTY output to the scrollback and the attached client until the child exits.

        A PTY master does not report EOF when the child exits under gVisor: poll and waitpid.
        """
        while True:
            try:
                ready = select_read(self.master, 0.2)
                data = os.read(self.master, READ_CHUNK) if ready else b""
            except OSError:
                data = None
            if data:
                self.output(data)
                continue
            if self.proc.poll() is not None or data is None:
                # drain what is left, then report the exit
                try:
                    while select_read(self.master, 0):
                        more = os.read(self.master, READ_CHUNK)
                        if not more:
                            break
                        self.output(more)
                except OSError:
                    pass
                self.finish(self.proc.wait())
                return
            if self.max_idle and self.client is None and time.monotonic() - self.detached_at > self.max_idle:
                self.kill(signal.SIGKILL)

    def output(self, data: bytes) -> None:
        with self.lock:
            self.scrollback += data
            if len(self.scrollback) > SCROLLBACK:
                del self.scrollback[: len(self.scrollback) - SCROLLBACK]
            if self.client and not self.client.send(P.STDOUT, data):
                self.client = None
                self.detached_at = time.monotonic()

    def finish(self, rc: int) -> None:
        os.close(self.master)
        with self.lock:
            self.running = False
            self.exit_code = 128 - rc if rc < 0 else rc
            self.exited_at = time.time()
            client, self.client = self.client, None
        if client:
            client.send_json(P.EXIT, {"exit_code": self.exit_code})
            client.close()

    def kill(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def attach(self, conn: Conn, force: bool) -> None:
        """Replay the scrollback, then relay live output and the client's keystrokes."""
        with self.lock:
            if self.client is not None and not force:
                raise RequestError("session is attached")
            old, self.client = self.client, conn
            if old:
                old.send_json(P.EXIT, {"exit_code": 0})
                old.close()
            conn.send_json(P.SESSION_INFO, self.info())
            if self.scrollback:
                conn.send_chunks(P.STDOUT, bytes(self.scrollback))
            if not self.running:
                self.client = None
                conn.send_json(P.EXIT, {"exit_code": self.exit_code})
                return
        try:
            while True:
                frame = recv_frame(conn.sock)
                if frame is None:
                    break
                ftype, payload = frame
                if ftype == P.STDIN and payload:
                    self.agent.touch()
                    os.write(self.master, payload)
                elif ftype == P.RESIZE:
                    size = json.loads(payload)
                    set_winsize(self.master, int(size["rows"]), int(size["cols"]))
                elif ftype == P.KILL:
                    self.kill(signal.SIGTERM)
        except OSError:
            pass
        finally:
            with self.lock:
                if self.client is conn:
                    self.client = None
                    self.detached_at = time.monotonic()


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def select_read(fd: int, timeout: float) -> bool:
    sel = selectors.DefaultSelector()
    try:
        sel.register(fd, selectors.EVENT_READ)
        return bool(sel.select(timeout))
    finally:
        sel.close()
