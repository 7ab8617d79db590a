"""Host side of the agent protocol: asyncio; answered connections are kept for the next request.

A new TCP connection into the sandbox's netstack plus AUTH costs ~1-2 ms under gVisor, on every
request: connections whose request was answered in full go back to a small pool (KEEP_IDLE,
MAX_IDLE) when the agent says it takes more than one request per connection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

from . import protocol as P


class AgentError(Exception):
    """The agent could not be reached or failed a request."""


class AgentRequestError(AgentError):
    """The agent refused a request as invalid (the caller's fault)."""


class AgentNotFound(AgentRequestError):
    """The path (or session) the request names does not exist in the sandbox."""


class AgentExists(AgentRequestError):
    """What the request would make is there already."""


class AgentLimit(AgentError):
    """A limit of the agent (sessions, connections per sandbox) is reached."""


class StaleConnection(AgentError):
    """A pooled connection was gone before it answered (the agent closed it): ask again on a new one."""


KEEP_IDLE = 20.0  # seconds a pooled connection may wait for reuse (the agent waits 60)
MAX_IDLE = 8  # pooled connections per sandbox (each holds one of the agent's threads)


@dataclass
class ExecEvent:
    kind: str  # "started" | "stdout" | "stderr" | "exit"
    data: bytes = b""
    exit_code: int = 0
    timed_out: bool = False
    signal: int = 0  # the signal that ended the command, if one did


def error_from(payload: bytes) -> AgentError:
    err = json.loads(payload)
    cls = {P.INVALID: AgentRequestError, P.NOT_FOUND: AgentNotFound, P.EXISTS: AgentExists, P.LIMIT: AgentLimit}.get(
        err.get("kind"), AgentError
    )
    return cls(err.get("error", "agent error"))


def exit_event(info: dict) -> ExecEvent:
    return ExecEvent(
        "exit", exit_code=info["exit_code"], timed_out=bool(info.get("timed_out")), signal=int(info.get("signal") or 0)
    )


class AgentConnection:
    """One authenticated connection, carrying one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: AgentClient):
        self.reader = reader
        self.writer = writer
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.reused = False  # taken from the pool for this request
        self.answered = False  # a frame of this request's answer has arrived

    async def read_frame(self) -> tuple[int, bytes]:
        try:
            header = await self.reader.readexactly(P.HEADER.size)
            ftype, n = P.parse_header(header)
            payload = await self.reader.readexactly(n) if n else b""
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            if self.reused and not self.answered:
                raise StaleConnection("a pooled agent connection was closed") from e
            raise AgentError("agent closed the connection") from e
        self.answered = True
        if ftype == P.ERROR:
            raise error_from(payload)
        return ftype, payload

    async def send(self, ftype: int, payload: bytes = b"") -> None:
        self.writer.write(P.encode(ftype, payload))
        await self.writer.drain()

    # -- a live command's connection (AgentClient.start / attach)

    async def read_event(self) -> ExecEvent | None:
        """The next output or exit of the command (None: a frame of another kind)."""
        ftype, payload = await self.read_frame()
        if ftype in (P.STDOUT, P.STDERR):
            return ExecEvent("stdout" if ftype == P.STDOUT else "stderr", payload)
        if ftype == P.EXIT:
            return exit_event(json.loads(payload))
        return None

    async def send_stdin(self, data: bytes) -> None:
        for i in range(0, len(data), P.MAX_FRAME):
            await self.send(P.STDIN, data[i : i + P.MAX_FRAME])

    async def close_stdin(self) -> None:
        await self.send(P.STDIN, b"")  # an empty STDIN frame closes the command's stdin

    async def kill(self) -> None:
        """SIGKILL to a one-shot command's process group (a terminal session: AgentClient.kill_session)."""
        await self.send(P.KILL)

    async def resize(self, rows: int, cols: int) -> None:
        await self.send(P.RESIZE, json.dumps({"rows": rows, "cols": cols}).encode())

    async def read_watch_event(self) -> dict | None:
        """The next change a watch (AgentClient.watch) reports: {"name", "type"}."""
        ftype, payload = await self.read_frame()
        return json.loads(payload) if ftype == P.WATCH_EVENT else None

    async def close(self) -> None:
        self.client.open.discard(self)
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()

    async def done(self) -> None:
        """Its request was answered in full: back to the pool for the next one, or closed."""
        client = self.client
        if client.keepalive and len(client.idle) < MAX_IDLE and not self.reader.at_eof() and self in client.open:
            client.idle.append((self, asyncio.get_running_loop().time()))
        else:
            await self.close()


class AgentClient:
    def __init__(self, host: str, port: int, token: str):
        self.host = host
        self.port = port
        self.token = token.encode()
        self.open: set[AgentConnection] = set()
        self.idle: list[tuple[AgentConnection, float]] = []  # answered connections, the newest last
        self.keepalive = False  # the agent takes requests one after another on a connection

    def abort(self) -> None:
        """Cut every open connection: a dead sandbox sends no RST, so readers would wait forever."""
        for conn in list(self.open):
            conn.writer.transport.abort()
        self.open.clear()
        self.idle.clear()

    def pooled(self) -> AgentConnection | None:
        """The newest pooled connection young enough to be open on the agent's side too."""
        loop = asyncio.get_running_loop()
        while self.idle:
            conn, since = self.idle.pop()
            fresh = loop.time() - since < KEEP_IDLE and conn.loop is loop  # (tests run several loops)
            if fresh and conn in self.open and not conn.reader.at_eof():
                return conn
            self.drop(conn)
        return None

    def drop(self, conn: AgentConnection) -> None:
        self.open.discard(conn)
        with contextlib.suppress(RuntimeError):  # its loop is closed: so is the connection
            conn.writer.transport.abort()

    async def connect(
        self, ftype: int, payload: bytes = b"", timeout: float = 5.0, reuse: bool = False
    ) -> AgentConnection:
        """Send the request on a pooled connection (reuse), else open one and send AUTH + the request
        in one write."""
        conn = self.pooled() if reuse else None
        if conn is not None:
            conn.reused, conn.answered = True, False
            conn.writer.write(P.encode(ftype, payload))
            return conn
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), timeout)
        except (TimeoutError, OSError) as e:
            raise AgentError(f"connect to agent at {self.host}:{self.port}: {e or 'timed out'}") from e
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # Replies are several small frames: without NODELAY they wait for delayed ACKs.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(P.encode(P.AUTH, self.token) + P.encode(ftype, payload))
        conn = AgentConnection(reader, writer, self)
        self.open.add(conn)
        return conn

    async def first_frame(
        self, ftype: int, payload: bytes, timeout: float | None = None
    ) -> tuple[AgentConnection, int, bytes]:
        """Send a request on a pooled or new connection and read its answer's first frame: a pooled
        connection found closed is replaced by a new one (the agent never saw the request)."""
        conn = await self.connect(ftype, payload, timeout or 5.0, reuse=True)
        try:
            try:
                return conn, *(await asyncio.wait_for(conn.read_frame(), timeout))
            except StaleConnection:
                await conn.close()
                conn = await self.connect(ftype, payload, timeout or 5.0)
                return conn, *(await asyncio.wait_for(conn.read_frame(), timeout))
        except BaseException:
            await conn.close()
            raise

    async def answer(self, ftype: int, expect: int, payload: bytes, timeout: float) -> tuple[AgentConnection, dict]:
        """A request's JSON answer (a frame of type `expect`), and its connection to release."""
        try:
            conn, rtype, data = await self.first_frame(ftype, payload, timeout)
        except TimeoutError as e:
            raise AgentError("agent did not answer in time") from e
        try:
            while rtype != expect:
                rtype, data = await asyncio.wait_for(conn.read_frame(), timeout)
            return conn, json.loads(data)
        except BaseException as e:
            await conn.close()
            if isinstance(e, TimeoutError):
                raise AgentError("agent did not answer in time") from e
            raise

    async def request_json(self, ftype: int, expect: int, payload: bytes = b"", timeout: float = 5.0):
        conn, answer = await self.answer(ftype, expect, payload, timeout)
        await conn.done()
        return answer

    async def activity(self, timeout: float = 5.0) -> dict:
        conn, info = await self.answer(P.ACTIVITY_REQ, P.ACTIVITY_RESP, b"", timeout)
        self.keepalive = bool(info.get("keepalive"))  # before its connection is released: it may be pooled
        await conn.done()
        return info

    async def sessions(self) -> list[dict]:
        return await self.request_json(P.EXEC_LIST_REQ, P.EXEC_LIST_RESP)

    async def set_secrets(self, env: dict[str, str]) -> None:
        await self.request_json(P.SECRETS_SET, P.EXIT, json.dumps({"env": env}).encode())

    async def set_token(self, token: str) -> None:
        """Hand the agent a new token; this client uses it from now on."""
        await self.request_json(P.TOKEN_SET, P.EXIT, token.encode())
        self.token = token.encode()
        for conn, _ in self.idle:  # opened with the old token: none outlives it
            self.drop(conn)
        self.idle.clear()

    async def ports(self) -> list[dict]:
        """Listening TCP ports inside the sandbox: [{"port", "loopback_only"}]."""
        return await self.request_json(P.PORTS_REQ, P.PORTS_RESP)

    async def forward(self, port: int, timeout: float = 5.0) -> socket.socket:
        """A socket tunnelled through the agent to 127.0.0.1:<port> inside the sandbox.

        The handshake reads exactly its own frames off a bare socket, so bytes the service sends
        first are never swallowed by a stream buffer: the caller gets them all.
        """
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        async def recv_exactly(n: int) -> bytes:
            buf = b""
            while len(buf) < n:
                chunk = await loop.sock_recv(sock, n - len(buf))
                if not chunk:
                    raise AgentError("agent closed the connection")
                buf += chunk
            return buf

        async def handshake() -> None:
            await loop.sock_connect(sock, (self.host, self.port))
            await loop.sock_sendall(
                sock, P.encode(P.AUTH, self.token) + P.encode(P.FORWARD_REQ, json.dumps({"port": port}).encode())
            )
            ftype, n = P.parse_header(await recv_exactly(P.HEADER.size))
            payload = await recv_exactly(n) if n else b""
            if ftype == P.ERROR:
                raise error_from(payload)
            if ftype != P.FORWARD_OK:
                raise AgentError(f"unexpected agent frame 0x{ftype:02x}")

        try:
            await asyncio.wait_for(handshake(), timeout)
        except BaseException as e:
            sock.close()
            if isinstance(e, (OSError, asyncio.TimeoutError)):
                raise AgentError(f"forward to port {port}: {e or 'timed out'}") from e
            raise
        return sock

    async def wait_ready(self, deadline: float, alive=None) -> None:
        """Poll until the agent answers; the first SYN can be lost while runsc takes the NIC."""
        loop = asyncio.get_running_loop()
        last: Exception | None = None
        while loop.time() < deadline:
            if alive is not None and not await alive():
                raise AgentError(f"sandbox exited before its agent answered ({last})")
            try:
                await self.activity(timeout=0.2)
                return
            except AgentError as e:
                last = e
                await asyncio.sleep(0.02)
        raise AgentError(f"agent did not answer in time: {last}")

    async def exec(self, request: dict, stdin: bytes | None = None) -> AsyncIterator[ExecEvent]:
        """Run a one-shot command; yields "started" (unless it could not be spawned), stdout/stderr
        chunks, then one exit event.

        Closing the iterator early (client gone) closes the connection, which makes the agent
        kill the command's process group.
        """
        req = json.dumps(dict(request, stdin=stdin is not None)).encode()
        if stdin is None:  # the connection carries the request alone: pooled, and back to the pool
            conn, ftype, payload = await self.first_frame(P.EXEC_REQ, req)
        else:
            conn = await self.connect(P.EXEC_REQ, req)
        finished = False
        try:
            if stdin is not None:
                for i in range(0, len(stdin), P.MAX_FRAME):
                    conn.writer.write(P.encode(P.STDIN, stdin[i : i + P.MAX_FRAME]))
                await conn.send(P.STDIN, b"")
                ftype, payload = await conn.read_frame()
            while True:
                if ftype == P.STARTED:
                    yield ExecEvent("started")
                elif ftype == P.STDOUT:
                    yield ExecEvent("stdout", payload)
                elif ftype == P.STDERR:
                    yield ExecEvent("stderr", payload)
                elif ftype == P.EXIT:
                    finished = stdin is None
                    yield exit_event(json.loads(payload))
                    return
                ftype, payload = await conn.read_frame()
        finally:
            if finished:
                await conn.done()
            else:
                await conn.close()

    async def start(self, request: dict, stdin: bool) -> tuple[int, AgentConnection]:
        """Start a one-shot command and hand over its connection once it runs: (pid, connection).
        The caller reads its frames and sends STDIN / KILL; closing the connection kills the command."""
        conn = await self.connect(P.EXEC_REQ, json.dumps(dict(request, stdin=stdin)).encode())
        try:
            while True:
                ftype, payload = await asyncio.wait_for(conn.read_frame(), 30)
                if ftype == P.STARTED:
                    return int(json.loads(payload)["pid"]), conn
                if ftype in (P.STDERR, P.EXIT):  # not spawned: its reason, then its exit status
                    raise AgentRequestError(payload.decode(errors="replace").strip() or "the command did not start")
        except BaseException:
            await conn.close()
            raise

    async def detach(self, request: dict, timeout: float = 30.0) -> dict:
        """Start a command that outlives the request: {"pid", "output_file", "detached"} once it runs."""
        payload = json.dumps(dict(request, detach=True)).encode()
        return await self.request_json(P.EXEC_REQ, P.STARTED, payload, timeout=timeout)

    # ------------------------------------------------------------ files

    async def stat(self, path: str) -> dict:
        return await self.request_json(P.FILE_STAT, P.FILE_INFO, json.dumps({"path": path}).encode())

    async def ls(self, path: str) -> list[dict]:
        return await self.request_json(P.FILE_LS, P.FILE_LS_RESP, json.dumps({"path": path}).encode(), timeout=60)

    async def entries(self, path: str, depth: int) -> list[dict]:
        """Rich entries: the path's own (depth 0) or what is under it, `depth` levels deep."""
        payload = json.dumps({"path": path, "depth": depth}).encode()
        return await self.request_json(P.FILE_ENTRIES, P.FILE_ENTRIES_RESP, payload, timeout=60)

    async def make_dir(self, path: str, user: str) -> bool:
        """mkdir -p owned by `user`; False when the directory was there already."""
        payload = json.dumps({"path": path, "user": user}).encode()
        return bool((await self.request_json(P.FILE_MKDIR, P.EXIT, payload, timeout=60)).get("created"))

    async def move(self, source: str, destination: str) -> None:
        payload = json.dumps({"source": source, "destination": destination}).encode()
        await self.request_json(P.FILE_MOVE, P.EXIT, payload, timeout=60)

    async def remove(self, path: str) -> None:
        """A file, or a directory with everything in it."""
        await self.request_json(P.FILE_REMOVE, P.EXIT, json.dumps({"path": path}).encode(), timeout=60)

    async def kill_session(self, session_id: str) -> None:
        """SIGKILL to a terminal session's process group."""
        await self.request_json(P.EXEC_KILL, P.EXIT, json.dumps({"session_id": session_id}).encode())

    async def read(self, path: str, offset: int = 0, limit: int = 0, max_bytes: int = 0):
        """Open a file for reading: returns (its stat info, an async iterator of content chunks)."""
        req = {"path": path, "offset": offset, "limit": limit, "max_bytes": max_bytes}
        conn = await self.connect(P.FILE_READ, json.dumps(req).encode())
        try:
            ftype, payload = await conn.read_frame()
            while ftype != P.FILE_INFO:
                ftype, payload = await conn.read_frame()
        except BaseException:
            await conn.close()
            raise

        async def chunks():
            try:
                while True:
                    ftype, data = await conn.read_frame()
                    if ftype == P.STDOUT:
                        yield data
                    elif ftype == P.EXIT:
                        return
            finally:
                await conn.close()

        return json.loads(payload), chunks()

    async def write(self, path: str, size: int, mode: int, chunks) -> None:
        """Stream `size` bytes from an async iterator of chunks into path (atomically, in the agent)."""
        conn = await self.connect(P.FILE_WRITE, json.dumps({"path": path, "size": size, "mode": mode}).encode())
        try:
            try:
                async for chunk in chunks:
                    for i in range(0, len(chunk), P.MAX_FRAME):
                        await conn.send(P.STDIN, chunk[i : i + P.MAX_FRAME])  # drain: memory stays bounded
            except (ConnectionError, OSError):
                pass  # the agent refused and hung up: its ERROR frame says why
            while True:
                ftype, _ = await conn.read_frame()
                if ftype == P.EXIT:
                    return
        finally:
            await conn.close()

    async def watch(self, path: str, recursive: bool) -> AgentConnection:
        """A directory watch: once it is set, the connection carries WATCH_EVENT frames until closed."""
        conn = await self.connect(P.WATCH_REQ, json.dumps({"path": path, "recursive": recursive}).encode())
        try:
            while (await asyncio.wait_for(conn.read_frame(), 10))[0] != P.WATCH_OK:
                pass
        except BaseException:
            await conn.close()
            raise
        return conn

    # ------------------------------------------------------------ PTY sessions

    async def attach(self, request: dict) -> tuple[dict, AgentConnection]:
        """Start (`tty`) or attach to (`session`) a PTY session; returns its info and the live
        connection, on which scrollback then live output arrive as STDOUT frames."""
        conn = await self.connect(P.EXEC_REQ, json.dumps(request).encode())
        try:
            while True:
                ftype, payload = await asyncio.wait_for(conn.read_frame(), 10)
                if ftype == P.SESSION_INFO:
                    return json.loads(payload), conn
        except BaseException:
            await conn.close()
            raise
