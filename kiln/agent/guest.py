"""kiln guest agent: PID 1 inside every sandbox. Standard library only (any image with python3 runs it).

    python3 guest.py CONFIG_JSON

CONFIG_JSON holds {"token", "env", "init"} and optionally "port" and "bind" (tests run it on the host).
PID 1 only reaps orphans; it forks the server,
which listens on the sandbox's address and serves one authenticated request per connection
(see protocol.py): one-shot exec (buffered or streamed by the host), PTY sessions with scrollback
(the `init` session among them), the activity clock. The server is re-forked if it ever dies.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hmac
import json
import os
import pwd
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from dataclasses import dataclass

try:  # imported as kiln.agent.guest on the host (tests), run as a plain script in the sandbox
    from . import files, ports, protocol as P
except ImportError:  # pragma: no cover
    import files  # type: ignore[no-redef,import-not-found]
    import ports  # type: ignore[no-redef,import-not-found]
    import protocol as P  # type: ignore[no-redef,import-not-found]

DEFAULT_UID = 1000
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
AUTH_DEADLINE = 5.0
MAX_CONNECTIONS = 50
MAX_SESSIONS = 20
SCROLLBACK = 64 * 1024
EXITED_SESSION_TTL = 30.0
READ_CHUNK = 64 * 1024
INIT_MARKER = "/var/lib/kiln-agent/init-started"
# Secrets arrive from the host after boot (they are never in a file on the host); kept on the
# sandbox's own tmpfs, root-only, so a re-forked agent server still has them.
SECRETS_FILE = "/run/kiln-agent/secrets.json"
SECRETS_WAIT = 60.0


class RequestError(Exception):
    """A request the agent refuses; kind is protocol.INVALID (caller's fault) or protocol.FAILED."""

    def __init__(self, message: str, kind: str = P.INVALID):
        super().__init__(message)
        self.kind = kind


# ---------------------------------------------------------------- framing over a blocking socket


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


# ---------------------------------------------------------------- starting processes fast


@dataclass
class Launch:
    uid: int
    gid: int
    cwd: str
    env: dict


SPAWN_LOCK = threading.Lock()


def spawn(argv: list[str], launch: Launch, stdin: int, stdout: int, stderr: int) -> int:
    """Start argv in a new session as launch.uid and return its pid.

    Under gVisor's systrap platform a fork of the (large, threaded) agent costs ~30 ms, a vfork
    ~6 ms. Python only vforks when no user change is asked, so: posix_spawn (a vfork) with
    RESETIDS, while the agent's *real* ids are briefly the target's (its effective ids stay 0);
    the child's ids are reset to those real ids, and it never runs as root. The lock keeps the
    process-wide cwd and real ids consistent across threads.
    """
    path = argv[0]
    if "/" not in path:
        found = shutil.which(path, path=launch.env.get("PATH", DEFAULT_PATH))
        if found is None:
            raise FileNotFoundError(errno.ENOENT, "command not found", argv[0])
        path = found
    actions = [(os.POSIX_SPAWN_DUP2, stdin, 0), (os.POSIX_SPAWN_DUP2, stdout, 1), (os.POSIX_SPAWN_DUP2, stderr, 2)]
    switch = (launch.uid, launch.gid) != (os.geteuid(), os.getegid())
    with SPAWN_LOCK:
        os.chdir(launch.cwd)
        try:
            if switch:
                os.setresgid(launch.gid, -1, -1)
                os.setresuid(launch.uid, -1, -1)
            return os.posix_spawn(path, argv, launch.env, file_actions=actions, setsid=True, resetids=switch)
        finally:
            if switch:
                os.setresuid(0, -1, -1)
                os.setresgid(0, -1, -1)
            os.chdir("/")


class Child:
    """A spawned process, waited for by pid."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            if self.returncode is None:
                self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            return self.returncode
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() >= deadline:
                raise TimeoutError
            time.sleep(0.002)
        assert self.returncode is not None
        return self.returncode


# ---------------------------------------------------------------- the agent state


class Agent:
    def __init__(self, config: dict):
        self.token = config["token"].encode()
        self.port = int(config.get("port", P.AGENT_PORT))
        self.bind = config.get("bind", "0.0.0.0")
        self.sandbox_env = {str(k): str(v) for k, v in (config.get("env") or {}).items()}
        self.init_script = config.get("init") or ""
        self.secrets_file = config.get("secrets_file", SECRETS_FILE)
        self.secret_env: dict[str, str] = {}
        self.secrets_ready = threading.Event()
        try:
            with open(self.secrets_file) as f:
                self.secret_env = json.load(f)
            self.secrets_ready.set()
        except (OSError, ValueError):
            if not config.get("secrets_pending"):
                self.secrets_ready.set()
        self.last_activity = time.time()
        self.started = 0  # agent servers started by PID 1 so far (more than 1: the server crashed)
        self.sessions: dict[str, Session] = {}
        self.sessions_lock = threading.Lock()
        self.session_counter = 0
        self.connections = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def touch(self) -> None:
        self.last_activity = time.time()

    # -- identity and environment

    def identity(self, user) -> pwd.struct_passwd | None:
        """Resolve `user` (None = uid 1000, a name, or a uid) to a passwd entry, or None if uid is unnamed."""
        if user is None or user == "":
            user = DEFAULT_UID
        if isinstance(user, str) and user.isdigit():
            user = int(user)
        try:
            return pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
        except (OverflowError, ValueError, TypeError):
            raise RequestError(f"invalid user: {user!r}")
        except KeyError:
            if isinstance(user, int) and 0 <= user < 2**31:
                return None
            raise RequestError(f"unknown user: {user}")

    def build_env(self, pw, uid: int, extra: dict | None) -> dict:
        env = {
            "PATH": DEFAULT_PATH,
            "TERM": "xterm-256color",
            "LANG": "C.UTF-8",
            "HOME": pw.pw_dir if pw else "/",
            "USER": pw.pw_name if pw else str(uid),
        }
        env.update(self.sandbox_env)
        env.update(self.secret_env)
        env.update({str(k): str(v) for k, v in (extra or {}).items()})
        return env

    def launch_spec(self, req: dict) -> Launch:
        """Who, where and with what environment a requested process runs."""
        pw = self.identity(req.get("user"))
        uid = pw.pw_uid if pw else int(req["user"])
        gid = pw.pw_gid if pw else uid
        cwd = req.get("cwd") or "/"
        if not os.path.isdir(cwd):
            raise RequestError(f"cwd: no such directory: {cwd}")
        return Launch(uid, gid, cwd, self.build_env(pw, uid, req.get("env")))

    def popen_identity(self, req: dict) -> dict:
        """Keyword arguments for Popen that run the child as the requested user."""
        launch = self.launch_spec(req)
        kw: dict = {"env": launch.env, "cwd": launch.cwd}
        if launch.uid != os.getuid():
            kw.update(user=launch.uid, group=launch.gid, extra_groups=[])
        return kw

    # -- sessions

    def new_session_id(self, wanted: str | None) -> str:
        with self.sessions_lock:
            if wanted:
                if wanted in self.sessions:
                    raise RequestError(f"session {wanted} already exists")
                return wanted
            self.session_counter += 1
            return f"s{self.session_counter}"

    def add_session(self, session: Session) -> None:
        with self.sessions_lock:
            self.reap_sessions_locked()
            if len(self.sessions) >= MAX_SESSIONS:
                raise RequestError("session limit exceeded", P.FAILED)
            self.sessions[session.id] = session

    def reap_sessions_locked(self) -> None:
        now = time.time()
        for sid, s in list(self.sessions.items()):
            if s.exited_at and sid != "init" and now - s.exited_at > EXITED_SESSION_TTL:
                del self.sessions[sid]

    def remove_session(self, sid: str) -> None:
        with self.sessions_lock:
            self.sessions.pop(sid, None)

    def get_session(self, sid: str) -> Session:
        with self.sessions_lock:
            self.reap_sessions_locked()
            s = self.sessions.get(sid)
        if s is None:
            raise RequestError(f"no such session: {sid}", P.NOT_FOUND)
        return s

    def session_list(self) -> list[dict]:
        with self.sessions_lock:
            self.reap_sessions_locked()
            return [s.info() for s in self.sessions.values()]

    def activity(self) -> dict:
        with self.sessions_lock:
            sessions = list(self.sessions.values())
        return {
            "last_activity_unix": self.last_activity,
            "agent_restarts": max(0, self.started - 1),
            "active_sessions": sum(1 for s in sessions if s.running),
            "attached_sessions": sum(1 for s in sessions if s.client is not None),
        }

    def start_init(self) -> None:
        """Run the create-time `init` script once per sandbox (not again after a reboot)."""
        if not self.init_script or os.path.exists(INIT_MARKER):
            return
        self.secrets_ready.wait(SECRETS_WAIT)  # init sees the secrets like every other process
        os.makedirs(os.path.dirname(INIT_MARKER), exist_ok=True)
        with open(INIT_MARKER, "w"):
            pass
        req = {"argv": ["/bin/sh", "-c", self.init_script], "cwd": "/workspace", "max_idle_sec": 0}
        if not os.path.isdir("/workspace"):
            req["cwd"] = "/"
        try:
            Session.start(self, "init", req)
        except Exception as e:  # the agent must keep serving even if init cannot start
            print(f"kiln-agent: init failed to start: {e}", file=sys.stderr, flush=True)

    # -- serving

    def serve(self) -> None:
        if os.geteuid() == 0:
            os.setgroups([])  # spawned children inherit the agent's supplementary groups: none
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((self.bind, self.port))
        lsock.listen(128)
        threading.Thread(target=self.start_init, daemon=True).start()
        while True:
            sock, _ = lsock.accept()
            if not self.connections.acquire(blocking=False):
                Conn(sock).send_json(P.ERROR, {"error": "connection limit exceeded", "kind": P.FAILED})
                sock.close()
                continue
            try:
                threading.Thread(target=self.handle_connection, args=(sock,), daemon=True).start()
            except RuntimeError:  # no thread to be had (a fork bomb holds every pid): refuse, keep serving
                self.connections.release()
                Conn(sock).send_json(P.ERROR, {"error": "the sandbox is out of processes", "kind": P.FAILED})
                sock.close()

    def handle_connection(self, sock: socket.socket) -> None:
        conn = Conn(sock)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(AUTH_DEADLINE)
            first = recv_frame(sock)
            if first is None or first[0] != P.AUTH or not hmac.compare_digest(first[1], self.token):
                conn.send_json(P.ERROR, {"error": "auth required", "kind": P.FAILED})
                return
            request = recv_frame(sock)
            sock.settimeout(None)
            if request is None:
                return
            self.dispatch(conn, *request)
        except RequestError as e:
            conn.send_json(P.ERROR, {"error": str(e), "kind": e.kind})
        except (OSError, ValueError) as e:
            conn.send_json(P.ERROR, {"error": f"agent: {e}", "kind": P.FAILED})
        finally:
            conn.close()
            self.connections.release()

    def dispatch(self, conn: Conn, ftype: int, payload: bytes) -> None:
        if ftype == P.ACTIVITY_REQ:
            conn.send_json(P.ACTIVITY_RESP, self.activity())
        elif ftype == P.EXEC_LIST_REQ:
            conn.send_json(P.EXEC_LIST_RESP, self.session_list())
        elif ftype == P.EXEC_REQ:
            req = json.loads(payload)
            self.touch()
            if req.get("session"):
                self.get_session(req["session"]).attach(conn, force=not req.get("if_detached"))
            elif req.get("tty"):
                if req.get("cwd") == "/workspace":
                    files.make_dirs("/workspace")
                session = Session.start(self, self.new_session_id(req.get("session_id")), req)
                session.attach(conn, force=True)
            else:
                run_exec(self, conn, req)
        elif ftype in (P.FILE_READ, P.FILE_WRITE, P.FILE_STAT, P.FILE_LS):
            self.file_request(conn, ftype, json.loads(payload))
        elif ftype == P.PORTS_REQ:
            conn.send_json(P.PORTS_RESP, ports.listening_ports(exclude={self.port}))
        elif ftype == P.FORWARD_REQ:
            self.forward(conn, json.loads(payload))
        elif ftype == P.SECRETS_SET:
            self.set_secrets(json.loads(payload).get("env") or {})
            conn.send_json(P.EXIT, {"exit_code": 0})
        elif ftype == P.EXEC_KILL:
            self.get_session(json.loads(payload)["session_id"]).kill(signal.SIGKILL)
            conn.send_json(P.EXIT, {"exit_code": 0})
        else:
            raise RequestError(f"unknown request type 0x{ftype:02x}")

    def set_secrets(self, env: dict) -> None:
        env = {str(k): str(v) for k, v in env.items()}
        os.makedirs(os.path.dirname(self.secrets_file), mode=0o700, exist_ok=True)
        tmp = self.secrets_file + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(env, f)
        os.replace(tmp, self.secrets_file)
        self.secret_env = env
        self.secrets_ready.set()

    def forward(self, conn: Conn, req: dict) -> None:
        """Tunnel this connection to a port inside the sandbox. Proxy traffic is not guest activity."""
        port = req.get("port")
        try:
            if not isinstance(port, int):
                raise ValueError(f"invalid port: {port!r}")
            upstream = ports.dial_local(port)
        except ValueError as e:
            raise RequestError(str(e))
        except OSError as e:
            raise RequestError(f"connect to port {port}: {e.strerror or e}", P.FAILED)
        with upstream:
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if conn.send(P.FORWARD_OK):
                ports.relay(conn.sock, upstream)

    def file_request(self, conn: Conn, ftype: int, req: dict) -> None:
        def send(t: int, obj) -> None:
            if isinstance(obj, (bytes, bytearray)):
                conn.send(t, bytes(obj))
            else:
                conn.send_json(t, obj)

        def receive() -> bytes | None:
            while True:
                frame = recv_frame(conn.sock)
                if frame is None:
                    return None
                if frame[0] == P.STDIN:
                    return frame[1]

        try:
            if ftype == P.FILE_STAT:
                send(P.FILE_INFO, files.stat_path(req))
            elif ftype == P.FILE_LS:
                send(P.FILE_LS_RESP, files.list_dir(req))
            elif ftype == P.FILE_READ:
                self.touch()
                files.read_file(req, send)
            else:
                self.touch()
                send(P.EXIT, files.write_file(req, receive))
        except files.FileError as e:
            raise RequestError(str(e), e.kind)


# ---------------------------------------------------------------- one-shot exec


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


def kill_process_group(pgid: int, patience: float = 3.0) -> None:
    """SIGKILL a process group until no live member is left: members forking while the first
    signal lands (a fork bomb) would otherwise live on in the group."""
    deadline = time.monotonic() + patience
    while True:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline or not live_members(pgid):
            return
        time.sleep(0.01)


def live_members(pgid: int) -> bool:
    """Whether any process of the group is still alive (zombies wait for their reaper, harmless)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


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


# ---------------------------------------------------------------- PTY sessions


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
        kw = agent.popen_identity(req)
        master, slave = os.openpty()
        set_winsize(slave, int(req.get("rows") or 24), int(req.get("cols") or 80))

        def make_controlling_tty() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

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
            if self.id != "init":
                self.agent.remove_session(self.id)

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


# ---------------------------------------------------------------- PID 1


def reap_forever(server_pid: int, start_server) -> None:
    """PID 1 duty: reap every orphan; restart the server if it dies."""
    while True:
        try:
            pid, _ = os.wait()
        except ChildProcessError:
            time.sleep(0.5)
            continue
        except InterruptedError:
            continue
        if pid == server_pid:
            time.sleep(0.2)
            print("kiln-agent: the server died; starting it again", file=sys.stderr, flush=True)
            while True:
                try:
                    server_pid = start_server()
                    break
                except OSError:  # no pid free (a fork bomb): PID 1 must not die, wait and retry
                    time.sleep(0.5)


def main() -> None:
    with open(sys.argv[1]) as f:
        config = json.load(f)
    agent = Agent(config)

    def start_server() -> int:
        agent.started += 1  # the child inherits the count: how many servers this sandbox has had
        pid = os.fork()
        if pid == 0:
            try:
                agent.serve()
            finally:
                os._exit(1)
        return pid

    if os.getpid() == 1:
        reap_forever(start_server(), start_server)
    else:  # run directly (tests on the host): no orphans of ours to reap
        agent.serve()


if __name__ == "__main__":
    main()
