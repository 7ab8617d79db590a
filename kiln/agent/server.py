"""The agent's server: authenticated connections carrying requests one after another, sessions,
secrets, activity.

Part of the guest agent: standard library only, imported as kiln.agent.server on the host (tests) and
as a plain module inside the sandbox."""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import sys
import threading
import time
from _operator import _compare_digest as compare_digest  # hmac's, without loading OpenSSL
from _queue import Empty, SimpleQueue

try:  # imported as kiln.agent.* on the host, run as plain modules in the sandbox
    from . import files, ports, protocol as P
    from .oneshot import run_exec
    from .sessions import EXITED_SESSION_TTL, Session
    from .spawn import DEFAULT_PATH, Launch
    from .wire import Conn, RequestError, recv_frame
except ImportError:  # pragma: no cover
    import files  # type: ignore[no-redef,import-not-found]
    import ports  # type: ignore[no-redef,import-not-found]
    import protocol as P  # type: ignore[no-redef,import-not-found]
    from oneshot import run_exec  # type: ignore[no-redef,import-not-found]
    from sessions import EXITED_SESSION_TTL, Session  # type: ignore[no-redef,import-not-found]
    from spawn import DEFAULT_PATH, Launch  # type: ignore[no-redef,import-not-found]
    from wire import Conn, RequestError, recv_frame  # type: ignore[no-redef,import-not-found]


def watch_dir(conn: Conn, req: dict) -> None:
    """inotify, imported here rather than at boot: few sandboxes are ever watched."""
    try:
        from .watch import watch
    except ImportError:  # pragma: no cover
        from watch import watch  # type: ignore[no-redef,import-not-found]
    watch(conn, req)


DEFAULT_UID = 1000
AUTH_DEADLINE = 5.0
KEEP_IDLE = 60.0  # an answered connection waits this long for the host's next request (the host's pool: 20 s)
MAX_CONNECTIONS = 50
WORKER_IDLE = 30.0  # an idle worker beyond the last one ends after this long without a connection
# a thread's stack: 512 KiB is ample for the agent's threads (no deep recursion), and under gVisor an
# idle thread with glibc's 8 MiB default cost ~1.4 MB of the sandbox's memory, ~0.6 MB with this
THREAD_STACK = 512 * 1024
MAX_SESSIONS = 20  # running at once
MAX_EXITED = 50  # exited ones still listed
INIT_MARKER = "/var/lib/kiln-agent/init-started"
START_MARKER = "/run/kiln-agent/start-started"  # on the sandbox's tmpfs: gone at the next boot
# Secrets arrive from the host after boot (they are never in a file on the host); kept on the
# sandbox's own tmpfs, root-only, so a re-forked agent server still has them.
SECRETS_FILE = "/run/kiln-agent/secrets.json"
SECRETS_WAIT = 60.0


def write_private(path: str, data: bytes) -> None:
    """Replace a root-only file on the sandbox's tmpfs at once (temp file, then rename)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class Workers:
    """Threads that serve one connection each and then wait for the next: starting a thread costs
    ~1.6 ms under gVisor, on every request. Up to `keep` wait; more end after their connection,
    and all but one end after `idle_for` seconds without a connection (each costs the sandbox
    ~0.6 MB: a burst of parallel execs must not leave it larger for good)."""

    def __init__(self, handle, keep: int = 8, idle_for: float = WORKER_IDLE):
        self.handle = handle
        self.keep = keep
        self.idle_for = idle_for
        self.jobs: SimpleQueue[socket.socket] = SimpleQueue()
        self.idle = 0  # workers waiting on jobs (or about to): each job put is one of them taken
        self.lock = threading.Lock()

    def submit(self, sock: socket.socket) -> None:
        with self.lock:
            if self.idle:
                self.idle -= 1
                self.jobs.put(sock)
                return
        threading.Thread(target=self.work, args=(sock,), daemon=True).start()

    def work(self, sock: socket.socket) -> None:
        while True:
            self.handle(sock)
            with self.lock:
                if self.idle >= self.keep:
                    return
                self.idle += 1
            job = self.next_job()
            if job is None:
                return
            sock = job

    def next_job(self) -> socket.socket | None:
        """The next connection for an idle worker, or None when it should end: `idle_for` seconds
        without one while another worker waits too."""
        while True:
            try:
                return self.jobs.get(timeout=self.idle_for)
            except Empty:
                with self.lock:  # (submit puts under the lock: a job counted for us is there now)
                    try:
                        return self.jobs.get_nowait()
                    except Empty:
                        if self.idle > 1:
                            self.idle -= 1
                            return None


class Agent:
    def __init__(self, config: dict):
        self.token = config["token"].encode()
        self.port = int(config.get("port", P.AGENT_PORT))
        self.bind = config.get("bind", "0.0.0.0")
        self.sandbox_env = {str(k): str(v) for k, v in (config.get("env") or {}).items()}
        self.init_script = config.get("init") or ""
        # the image's defaults: who and where processes run, and the command every boot starts
        self.default_user = config.get("user") or DEFAULT_UID
        self.workdir = config.get("workdir") or ""
        self.start_argv = [str(a) for a in config.get("start") or []]
        self.secrets_file = config.get("secrets_file", SECRETS_FILE)
        self.secret_env: dict[str, str] = {}
        self.secrets_ready = threading.Event()
        try:
            with open(self.secrets_file) as f:
                self.secret_env = json.load(f)
            self.secrets_ready.set()
        except (OSError, ValueError):
            if not config.get("setup_pending", config.get("secrets_pending")):  # (the key's older name)
                self.secrets_ready.set()
        self.last_activity = time.time()
        self.started = 0  # agent servers started by PID 1 so far (more than 1: the server crashed)
        self.sessions: dict[str, Session] = {}
        self.sessions_lock = threading.Lock()
        self.session_counter = 0
        self.connections = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.workers = Workers(self.handle_connection, idle_for=float(config.get("worker_idle_sec", WORKER_IDLE)))

    def touch(self) -> None:
        self.last_activity = time.time()

    # -- identity and environment

    def identity(self, user) -> pwd.struct_passwd | None:
        """Resolve `user` (None = the image's user or uid 1000, a name, or a uid) to a passwd entry, or
        None if the uid is unnamed."""
        if user is None or user == "":
            user = self.default_user
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
            "LOGNAME": pw.pw_name if pw else str(uid),
        }
        env.update(self.sandbox_env)
        env.update(self.secret_env)
        env.update({str(k): str(v) for k, v in (extra or {}).items()})
        return env

    def launch_spec(self, req: dict) -> Launch:
        """Who, where and with what environment a requested process runs."""
        user = req.get("user")
        pw = self.identity(user)
        uid = pw.pw_uid if pw else int(user if user not in (None, "") else self.default_user)
        gid = pw.pw_gid if pw else uid
        cwd = req.get("cwd") or self.workdir or "/"
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
            if sum(1 for s in self.sessions.values() if s.running) >= MAX_SESSIONS:
                raise RequestError(f"session limit reached ({MAX_SESSIONS} sessions per sandbox)", P.LIMIT)
            self.sessions[session.id] = session

    def reap_sessions_locked(self) -> None:
        """Exited sessions stay listed EXITED_SESSION_TTL seconds (init for good), at most MAX_EXITED."""
        now = time.time()
        exited = sorted((s.exited_at, sid) for sid, s in self.sessions.items() if s.exited_at and sid != "init")
        for n, (at, sid) in enumerate(exited):
            if now - at > EXITED_SESSION_TTL or n < len(exited) - MAX_EXITED:
                del self.sessions[sid]

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
        self.secrets_ready.wait(SECRETS_WAIT)  # init sees the secrets (and create-time files) like every process
        os.makedirs(os.path.dirname(INIT_MARKER), exist_ok=True)
        with open(INIT_MARKER, "w"):
            pass
        req = {"argv": ["/bin/sh", "-c", self.init_script], "cwd": self.shell_cwd(), "max_idle_sec": 0}
        try:
            Session.start(self, "init", req)
        except Exception as e:  # the agent must keep serving even if init cannot start
            print(f"kiln-agent: init failed to start: {e}", file=sys.stderr, flush=True)

    def shell_cwd(self) -> str:
        """Where shells start: the image's working directory, else /workspace, else /."""
        return self.workdir or ("/workspace" if os.path.isdir("/workspace") else "/")

    def start_boot_command(self) -> None:
        """Run the image's start command as session `start` on every boot (after the host's setup)."""
        if not self.start_argv or os.path.exists(START_MARKER):
            return
        self.secrets_ready.wait(SECRETS_WAIT)
        os.makedirs(os.path.dirname(START_MARKER), mode=0o700, exist_ok=True)
        with open(START_MARKER, "w"):
            pass
        try:
            Session.start(self, "start", {"argv": self.start_argv, "cwd": self.workdir or "/", "max_idle_sec": 0})
        except Exception as e:
            print(f"kiln-agent: the start command failed to start: {e}", file=sys.stderr, flush=True)

    # -- serving

    def serve(self) -> None:
        threading.stack_size(THREAD_STACK)
        try:
            with open(self.token_file(), "rb") as f:  # the token handed over since boot, if any
                self.token = f.read() or self.token
        except OSError:
            pass
        if os.geteuid() == 0:
            os.setgroups([])  # spawned children inherit the agent's supplementary groups: none
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((self.bind, self.port))
        lsock.listen(128)
        threading.Thread(target=self.start_init, daemon=True).start()
        threading.Thread(target=self.start_boot_command, daemon=True).start()
        while True:
            sock, _ = lsock.accept()
            if not self.connections.acquire(blocking=False):
                Conn(sock).send_json(P.ERROR, {"error": "connection limit exceeded", "kind": P.LIMIT})
                sock.close()
                continue
            try:
                self.workers.submit(sock)
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
            if first is None or first[0] != P.AUTH or not compare_digest(first[1], self.token):
                conn.send_json(P.ERROR, {"error": "auth required", "kind": P.FAILED})
                return
            while True:  # the host may send another request once one is answered (KEEP_IDLE)
                request = recv_frame(sock)
                sock.settimeout(None)
                if request is None or not self.dispatch(conn, *request):
                    return
                sock.settimeout(KEEP_IDLE)
        except TimeoutError:
            return  # the host sent no request in time (or left an idle connection): close quietly
        except RequestError as e:
            conn.send_json(P.ERROR, {"error": str(e), "kind": e.kind})
        except (OSError, ValueError) as e:
            conn.send_json(P.ERROR, {"error": f"agent: {e}", "kind": P.FAILED})
        finally:
            conn.close()
            self.connections.release()

    def dispatch(self, conn: Conn, ftype: int, payload: bytes) -> bool:
        """Serve one request; True when it has been answered in full and the connection may carry
        the next (requests and replies only: no stream the host could have cut short)."""
        if ftype == P.ACTIVITY_REQ:
            conn.send_json(P.ACTIVITY_RESP, dict(self.activity(), keepalive=True))
        elif ftype == P.EXEC_LIST_REQ:
            conn.send_json(P.EXEC_LIST_RESP, self.session_list())
        elif ftype == P.EXEC_REQ:
            req = json.loads(payload)
            self.touch()
            if req.get("session"):
                self.get_session(req["session"]).attach(conn, force=not req.get("if_detached"))
            elif req.get("tty"):
                session = Session.start(self, self.new_session_id(req.get("session_id")), req)
                session.attach(conn, force=True)
            else:
                return run_exec(self, conn, req)
            return False
        elif ftype in P.FILE_REQUESTS:
            self.file_request(conn, ftype, json.loads(payload))
            return ftype != P.FILE_WRITE
        elif ftype == P.WATCH_REQ:
            watch_dir(conn, json.loads(payload))
            return False
        elif ftype == P.PORTS_REQ:
            conn.send_json(P.PORTS_RESP, ports.listening_ports(exclude={self.port}))
        elif ftype == P.FORWARD_REQ:
            self.forward(conn, json.loads(payload))
            return False
        elif ftype == P.TOKEN_SET:
            self.set_token(payload)
            conn.send_json(P.EXIT, {"exit_code": 0})
        elif ftype == P.SECRETS_SET:
            self.set_secrets(json.loads(payload).get("env") or {})
            conn.send_json(P.EXIT, {"exit_code": 0})
        elif ftype == P.EXEC_KILL:
            self.get_session(json.loads(payload)["session_id"]).kill(signal.SIGKILL)
            conn.send_json(P.EXIT, {"exit_code": 0})
        else:
            raise RequestError(f"unknown request type 0x{ftype:02x}")
        return True

    def token_file(self) -> str:
        return os.path.join(os.path.dirname(self.secrets_file), "token")

    def set_token(self, token: bytes) -> None:
        """A copy of a sandbox (fork, resume) is handed a token of its own; kept on the sandbox's tmpfs
        like the secrets, so a re-forked agent server still has it."""
        if len(token) < 16:
            raise RequestError("a token has 16 bytes at least")
        write_private(self.token_file(), token)
        self.token = token

    def set_secrets(self, env: dict) -> None:
        env = {str(k): str(v) for k, v in env.items()}
        write_private(self.secrets_file, json.dumps(env).encode())
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

    def file_request(self, conn: Conn, ftype: int, req: dict) -> None:  # one of FILE_REQUESTS
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
            elif ftype == P.FILE_ENTRIES:
                send(P.FILE_ENTRIES_RESP, files.entries(req))
            elif ftype == P.FILE_READ:
                self.touch()
                files.read_file(req, send)
            elif ftype in (P.FILE_MKDIR, P.FILE_MOVE, P.FILE_REMOVE):
                self.touch()
                op = {P.FILE_MKDIR: files.make_dir, P.FILE_MOVE: files.move, P.FILE_REMOVE: files.remove}[ftype]
                send(P.EXIT, op(req))
            else:
                self.touch()
                send(P.EXIT, files.write_file(req, receive))
        except files.FileError as e:
            raise RequestError(str(e), e.kind)
