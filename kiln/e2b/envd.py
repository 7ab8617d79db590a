"""envd, E2B's per-sandbox daemon, served by kiln's daemon for each E2B sandbox.

The SDKs speak Connect RPC to it (the `process.Process` and `filesystem.Filesystem` services, JSON
or proto, through the `connectrpc` runtime and the stubs vendored in envd_schema/) plus plain HTTP
for `/files` and `/health`. Each call is translated into requests to the sandbox's own agent; the
gateway has already checked the envd access token and left the call's sandbox and user in `CALL`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import logging
import posixpath
import tempfile
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from protobuf import Oneof as OneofValue
from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..agent.client import AgentConnection, AgentError, AgentExists, AgentNotFound, AgentRequestError
from ..core.errors import KilnError
from ..core.lifecycle import SandboxService
from ..engine.base import SandboxHandle
from .control import error
from .envd_schema import filesystem_pb as fs_pb, process_pb as proc_pb
from .envd_schema.filesystem_connect import Filesystem, FilesystemASGIApplication
from .envd_schema.process_connect import Process, ProcessASGIApplication
from .processes import EnvdProcess, Event, ProcessTable, Watchers
from .sandboxes import E2bSandbox

log = logging.getLogger("kiln.e2b")

DEFAULT_KEEPALIVE = 50.0  # seconds, when the client does not say (Keepalive-Ping-Interval)
SIGNALS = {9: "killed", 15: "terminated", 2: "interrupt", 1: "hangup", 6: "aborted"}


@dataclass
class EnvdCall:
    sandbox: E2bSandbox
    user: str | None  # from Basic auth; None: the image's default user (uid 1000, `user` in `base`)

    @property
    def home(self) -> str:
        name = self.user or "user"
        return "/root" if name == "root" else f"/home/{name}"

    def path(self, path: str) -> str:
        """A path of the request: relative ones are the user's home's, as envd resolves them."""
        if not path or "\x00" in path:
            raise ConnectError(Code.INVALID_ARGUMENT, "path must be a non-empty path without NUL characters")
        return posixpath.normpath(posixpath.join(self.home, path))


def oneof(field: str, value: Any) -> Any:
    """A oneof value (typed loosely: the stubs want a Literal field name per member)."""
    return OneofValue(field, value)


CALL: contextvars.ContextVar[EnvdCall] = contextvars.ContextVar("kiln_e2b_envd_call")


def basic_user(header: str) -> str | None:
    """The user of `Authorization: Basic base64(user:)`; None when absent or empty."""
    if not header.startswith("Basic "):
        return None
    try:
        name = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")[0]
    except (ValueError, UnicodeDecodeError):
        raise ConnectError(Code.INVALID_ARGUMENT, "malformed Basic authorization")
    return name or None


def connect_error(e: Exception) -> ConnectError:
    if isinstance(e, ConnectError):
        return e
    if isinstance(e, AgentNotFound):
        return ConnectError(Code.NOT_FOUND, str(e))
    if isinstance(e, AgentExists):
        return ConnectError(Code.ALREADY_EXISTS, str(e))
    if isinstance(e, AgentRequestError):
        return ConnectError(Code.INVALID_ARGUMENT, str(e))
    if isinstance(e, KilnError):
        return ConnectError(Code.UNAVAILABLE, e.message)
    return ConnectError(Code.UNAVAILABLE, f"the sandbox's agent: {e}")


class Envd:
    """What both services share: the sandbox of the call, and its agent."""

    def __init__(self, sandboxes: SandboxService, processes: ProcessTable, watchers: Watchers | None = None):
        self.sandboxes = sandboxes
        self.processes = processes
        self.watchers = watchers or Watchers()

    @contextlib.asynccontextmanager
    async def agent(self) -> AsyncIterator[SandboxHandle]:
        """The call's sandbox, woken and in use. What its agent refuses in the block is a Connect error
        (caught here, before `using` makes it an API error), and so is a sandbox that cannot be reached."""
        call = CALL.get()
        try:
            async with self.sandboxes.using(call.sandbox.row) as handle:
                try:
                    yield handle
                except AgentError as e:
                    raise connect_error(e) from e
        except (AgentError, KilnError) as e:
            raise connect_error(e) from e


# ---------------------------------------------------------------- process.Process


def end_message(ev: Event) -> proc_pb.ProcessEvent.EndEvent:
    """envd's end event: Go's ExitCode() (-1 when signalled) and its status text."""
    if ev.error:
        return proc_pb.ProcessEvent.EndEvent(exit_code=-1, exited=False, status=ev.error, error=ev.error)
    if ev.signal or ev.timed_out:
        status = f"signal: {SIGNALS.get(ev.signal or 9, str(ev.signal))}"
        return proc_pb.ProcessEvent.EndEvent(exit_code=-1, exited=False, status=status, error=status)
    status = f"exit status {ev.exit_code}"
    error = status if ev.exit_code else None
    return proc_pb.ProcessEvent.EndEvent(exit_code=ev.exit_code, exited=True, status=status, error=error)


def process_event(ev: Event) -> proc_pb.ProcessEvent:
    if ev.kind == "end":
        return proc_pb.ProcessEvent(event=oneof("end", end_message(ev)))
    return proc_pb.ProcessEvent(event=oneof("data", proc_pb.ProcessEvent.DataEvent(output=oneof(ev.kind, ev.data))))


def keepalive_interval(ctx: Any) -> float:
    raw = ctx.request_headers.get("keepalive-ping-interval") or ""
    try:
        return max(1.0, float(raw))
    except ValueError:
        return DEFAULT_KEEPALIVE


async def process_events(proc: EnvdProcess, q: asyncio.Queue[Event], keepalive: float) -> AsyncIterator[Any]:
    """A subscriber's events: start, then output and keepalives, then the end."""
    try:
        yield proc_pb.ProcessEvent(event=oneof("start", proc_pb.ProcessEvent.StartEvent(pid=proc.pid)))
        while True:
            try:
                ev = await asyncio.wait_for(q.get(), keepalive)
            except TimeoutError:
                yield proc_pb.ProcessEvent(event=oneof("keepalive", proc_pb.ProcessEvent.KeepAlive()))
                continue
            yield process_event(ev)
            if ev.kind == "end":
                return
    finally:
        proc.unsubscribe(q)


class ProcessService(Envd, Process):
    def find(self, selector: proc_pb.ProcessSelector | None) -> EnvdProcess:
        sandbox_id = CALL.get().sandbox.row.id
        match selector.selector if selector else None:
            case OneofValue(field="pid", value=pid):
                proc = self.processes.get(sandbox_id, int(pid))
            case OneofValue(field="tag", value=tag):
                proc = self.processes.by_tag(sandbox_id, str(tag))
            case _:
                raise ConnectError(Code.INVALID_ARGUMENT, "a process (pid or tag) is required")
        if proc is None:
            raise ConnectError(Code.NOT_FOUND, "process not found")
        return proc

    async def start(self, request: proc_pb.StartRequest, ctx: Any) -> AsyncIterator[proc_pb.StartResponse]:
        call = CALL.get()
        cfg = request.process
        if cfg is None or not cfg.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd is required")
        agent_req: dict[str, Any] = {
            "argv": [cfg.cmd, *cfg.args],
            "env": dict(cfg.envs),
            "cwd": call.path(cfg.cwd) if cfg.cwd else call.home,
        }
        if call.user:
            agent_req["user"] = call.user
        timeout_ms = ctx.timeout_ms
        if timeout_ms:
            agent_req["timeout_sec"] = timeout_ms / 1000
        stdin = request.stdin is not False
        keep = contextlib.AsyncExitStack()
        try:
            handle = await keep.enter_async_context(self.agent())
            if request.pty is not None:
                size = request.pty.size or proc_pb.PTY.Size(cols=80, rows=24)
                info, conn = await handle.agent.attach({**agent_req, "tty": True, "rows": size.rows, "cols": size.cols})
                pid, session_id, stdin = int(info["pid"]), str(info["session_id"]), True
                if timeout_ms:  # a terminal session has no deadline of its own
                    asyncio.get_running_loop().call_later(timeout_ms / 1000, self.kill_later, call, pid)
            else:
                pid, conn = await handle.agent.start(agent_req, stdin)
                session_id = ""
        except BaseException as e:
            await keep.aclose()
            raise connect_error(e) if isinstance(e, Exception) else e
        proc = EnvdProcess(
            pid, cfg.cmd, list(cfg.args), dict(cfg.envs), agent_req["cwd"], request.tag or "", conn, stdin, session_id
        )
        proc.keep = keep  # the sandbox stays in use (hot) while the process runs
        q = proc.subscribe()
        self.processes.add(call.sandbox.row.id, proc)
        async for ev in process_events(proc, q, keepalive_interval(ctx)):
            yield proc_pb.StartResponse(event=ev)

    def kill_later(self, call: EnvdCall, pid: int) -> None:
        proc = self.processes.get(call.sandbox.row.id, pid)
        if proc is not None:
            task = asyncio.create_task(proc.kill())
            self.processes.background.add(task)
            task.add_done_callback(self.processes.background.discard)

    async def connect(self, request: proc_pb.ConnectRequest, ctx: Any) -> AsyncIterator[proc_pb.ConnectResponse]:
        proc = self.find(request.process)
        async for ev in process_events(proc, proc.subscribe(), keepalive_interval(ctx)):
            yield proc_pb.ConnectResponse(event=ev)

    async def list(self, request: proc_pb.ListRequest, ctx: Any) -> proc_pb.ListResponse:
        procs = self.processes.of(CALL.get().sandbox.row.id).values()
        return proc_pb.ListResponse(
            processes=[
                proc_pb.ProcessInfo(
                    config=proc_pb.ProcessConfig(cmd=p.cmd, args=p.args, envs=p.envs, cwd=p.cwd),
                    pid=p.pid,
                    tag=p.tag or None,
                )
                for p in procs
            ]
        )

    async def write_input(self, proc: EnvdProcess, given: proc_pb.ProcessInput | None) -> None:
        match given.input if given else None:
            case OneofValue(field="stdin", value=data):
                if not proc.stdin:
                    raise ConnectError(Code.FAILED_PRECONDITION, "the process was started without stdin")
                await proc.send_stdin(bytes(data))
            case OneofValue(field="pty", value=data):
                if not proc.session_id:
                    raise ConnectError(Code.FAILED_PRECONDITION, "the process has no PTY")
                await proc.send_stdin(bytes(data))

    async def send_input(self, request: proc_pb.SendInputRequest, ctx: Any) -> proc_pb.SendInputResponse:
        await self.write_input(self.find(request.process), request.input)
        return proc_pb.SendInputResponse()

    async def stream_input(self, requests: AsyncIterator[proc_pb.StreamInputRequest], ctx: Any) -> Any:
        proc: EnvdProcess | None = None
        async for message in requests:
            value = message.event.value if message.event else None
            if isinstance(value, proc_pb.StreamInputRequest.StartEvent):
                proc = self.find(value.process)
            elif isinstance(value, proc_pb.StreamInputRequest.DataEvent):
                if proc is None:
                    raise ConnectError(Code.INVALID_ARGUMENT, "start must come before data")
                await self.write_input(proc, value.input)
        return proc_pb.StreamInputResponse()

    async def close_stdin(self, request: proc_pb.CloseStdinRequest, ctx: Any) -> proc_pb.CloseStdinResponse:
        proc = self.find(request.process)
        if proc.stdin:
            await proc.close_stdin()
        return proc_pb.CloseStdinResponse()

    async def send_signal(self, request: proc_pb.SendSignalRequest, ctx: Any) -> proc_pb.SendSignalResponse:
        proc = self.find(request.process)
        if request.signal == proc_pb.Signal.SIGKILL:
            await proc.kill()
        elif request.signal == proc_pb.Signal.SIGTERM:
            async with self.agent() as handle:
                argv = ["kill", "-TERM", "--", f"-{proc.pid}"]  # its process group, as SIGKILL is sent
                async for _ev in handle.agent.exec({"argv": argv, "env": {}, "user": 0, "timeout_sec": 10}):
                    pass
        else:
            raise ConnectError(Code.INVALID_ARGUMENT, "signal must be SIGKILL or SIGTERM")
        return proc_pb.SendSignalResponse()

    async def update(self, request: proc_pb.UpdateRequest, ctx: Any) -> proc_pb.UpdateResponse:
        proc = self.find(request.process)
        if request.pty is not None and request.pty.size is not None:
            if not proc.session_id:
                raise ConnectError(Code.FAILED_PRECONDITION, "the process has no PTY")
            await proc.resize(request.pty.size.rows, request.pty.size.cols)
        return proc_pb.UpdateResponse()


# ---------------------------------------------------------------- filesystem.Filesystem

ENTRY_TYPES = {"file": fs_pb.FileType.FILE, "dir": fs_pb.FileType.DIRECTORY}


def entry_info(e: dict) -> fs_pb.EntryInfo:
    ns = int(e["mtime_ns"])
    return fs_pb.EntryInfo(
        name=e["name"],
        type=ENTRY_TYPES.get(e["type"], fs_pb.FileType.UNSPECIFIED),
        path=e["path"],
        size=int(e["size"]),
        mode=int(e["mode"]),
        permissions=e["permissions"],
        owner=e["owner"],
        group=e["group"],
        modified_time=Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000),
        symlink_target=e["symlink_target"],
        is_symlink=e["symlink_target"] is not None,
    )


class FilesystemService(Envd, Filesystem):
    async def entries(self, path: str, depth: int) -> list[dict]:
        async with self.agent() as handle:
            return await handle.agent.entries(path, depth)

    async def entry(self, path: str) -> fs_pb.EntryInfo:
        return entry_info((await self.entries(path, 0))[0])

    async def stat(self, request: fs_pb.StatRequest, ctx: Any) -> fs_pb.StatResponse:
        return fs_pb.StatResponse(entry=await self.entry(CALL.get().path(request.path)))

    async def list_dir(self, request: fs_pb.ListDirRequest, ctx: Any) -> fs_pb.ListDirResponse:
        path = CALL.get().path(request.path)
        entries = await self.entries(path, max(1, request.depth))
        return fs_pb.ListDirResponse(entries=[entry_info(e) for e in entries])

    async def make_dir(self, request: fs_pb.MakeDirRequest, ctx: Any) -> fs_pb.MakeDirResponse:
        call = CALL.get()
        path = call.path(request.path)
        async with self.agent() as handle:
            created = await handle.agent.make_dir(path, call.user or "user")
        if not created:
            raise ConnectError(Code.ALREADY_EXISTS, f"directory {path} already exists")
        return fs_pb.MakeDirResponse(entry=await self.entry(path))

    async def move(self, request: fs_pb.MoveRequest, ctx: Any) -> fs_pb.MoveResponse:
        call = CALL.get()
        source, destination = call.path(request.source), call.path(request.destination)
        async with self.agent() as handle:
            await handle.agent.move(source, destination)
        return fs_pb.MoveResponse(entry=await self.entry(destination))

    async def remove(self, request: fs_pb.RemoveRequest, ctx: Any) -> fs_pb.RemoveResponse:
        async with self.agent() as handle:
            await handle.agent.remove(CALL.get().path(request.path))
        return fs_pb.RemoveResponse()

    async def open_watch(self, path: str, recursive: bool) -> AgentConnection:
        try:
            async with self.agent() as handle:
                return await handle.agent.watch(CALL.get().path(path), recursive)
        except TimeoutError as e:
            raise connect_error(e) from e

    async def watch_dir(self, request: fs_pb.WatchDirRequest, ctx: Any) -> AsyncIterator[fs_pb.WatchDirResponse]:
        conn = await self.open_watch(request.path, request.recursive)
        keepalive = keepalive_interval(ctx)
        try:
            yield fs_pb.WatchDirResponse(event=oneof("start", fs_pb.WatchDirResponse.StartEvent()))
            while True:
                try:
                    ev = await asyncio.wait_for(conn.read_watch_event(), keepalive)
                except TimeoutError:
                    yield fs_pb.WatchDirResponse(event=oneof("keepalive", fs_pb.WatchDirResponse.KeepAlive()))
                    continue
                except AgentError as e:
                    raise connect_error(e) from e
                if ev is not None:
                    yield fs_pb.WatchDirResponse(event=oneof("filesystem", fs_event(ev)))
        finally:
            await conn.close()

    async def create_watcher(self, request: fs_pb.CreateWatcherRequest, ctx: Any) -> fs_pb.CreateWatcherResponse:
        conn = await self.open_watch(request.path, request.recursive)
        watcher_id = self.watchers.add(CALL.get().sandbox.row.id, conn)
        return fs_pb.CreateWatcherResponse(watcher_id=watcher_id)

    async def get_watcher_events(
        self, request: fs_pb.GetWatcherEventsRequest, ctx: Any
    ) -> fs_pb.GetWatcherEventsResponse:
        events = self.watchers.take(CALL.get().sandbox.row.id, request.watcher_id)
        if events is None:
            raise ConnectError(Code.NOT_FOUND, f"watcher {request.watcher_id} not found")
        return fs_pb.GetWatcherEventsResponse(events=[fs_event(e) for e in events])

    async def remove_watcher(self, request: fs_pb.RemoveWatcherRequest, ctx: Any) -> fs_pb.RemoveWatcherResponse:
        if not await self.watchers.remove(CALL.get().sandbox.row.id, request.watcher_id):
            raise ConnectError(Code.NOT_FOUND, f"watcher {request.watcher_id} not found")
        return fs_pb.RemoveWatcherResponse()


EVENT_TYPES = {
    "create": fs_pb.EventType.CREATE,
    "write": fs_pb.EventType.WRITE,
    "remove": fs_pb.EventType.REMOVE,
    "rename": fs_pb.EventType.RENAME,
    "chmod": fs_pb.EventType.CHMOD,
}


def fs_event(e: dict) -> fs_pb.FilesystemEvent:
    return fs_pb.FilesystemEvent(name=e["name"], type=EVENT_TYPES[e["type"]])


# ---------------------------------------------------------------- /files and /health


def file_status(e: ConnectError) -> int:
    """The HTTP status of a /files reply for what the agent answered."""
    return {Code.INVALID_ARGUMENT: 400, Code.NOT_FOUND: 404}.get(e.code, 502)


class Files(Envd):
    """envd's plain-HTTP file routes: GET downloads one file, POST uploads one or several."""

    def __init__(self, sandboxes: SandboxService, processes: ProcessTable, max_upload_bytes: int):
        super().__init__(sandboxes, processes)
        self.max_upload = max_upload_bytes

    async def download(self, request: Request) -> Response:
        call = CALL.get()
        path = call.path(request.query_params.get("path") or "")
        stack = contextlib.AsyncExitStack()
        try:
            handle = await stack.enter_async_context(self.agent())
            info, chunks = await handle.agent.read(path)
        except (ConnectError, AgentError) as e:
            await stack.aclose()
            err = connect_error(e)
            status = file_status(err)
            return error(status, err.message if status != 404 else f"path '{path}' does not exist")

        gzipped = "gzip" in request.headers.get("accept-encoding", "").lower()

        async def body() -> AsyncIterator[bytes]:
            packer = zlib.compressobj(wbits=31) if gzipped else None
            async with stack:
                async for chunk in chunks:
                    yield packer.compress(chunk) if packer else chunk
            if packer:
                yield packer.flush()

        headers = {"Content-Encoding": "gzip"} if gzipped else {"Content-Length": str(info["size"])}
        return StreamingResponse(body(), media_type="application/octet-stream", headers=headers)

    async def upload(self, request: Request) -> Response:
        call = CALL.get()
        target = request.query_params.get("path") or ""
        content_type = request.headers.get("content-type", "")
        written: list[dict] = []
        try:
            if content_type.startswith("multipart/form-data"):
                form = await request.form(max_files=1000, max_fields=1000)
                try:
                    for _name, part in form.multi_items():
                        if not isinstance(part, UploadFile):
                            continue
                        path = call.path(target or part.filename or "")
                        await self.write(path, part.file)
                        written.append({"name": posixpath.basename(path), "type": "file", "path": path})
                finally:
                    await form.close()
            else:
                path = call.path(target)
                with tempfile.TemporaryFile() as spool:
                    await self.spool(request, spool)
                    await self.write(path, spool)
                written.append({"name": posixpath.basename(path), "type": "file", "path": path})
        except UploadTooLarge:
            return error(413, f"upload larger than {self.max_upload} bytes")
        except ConnectError as e:
            status = 507 if "No space" in e.message else file_status(e)
            return error(status, e.message)
        return JSONResponse(written)

    async def spool(self, request: Request, spool) -> None:
        """The body into a temp file (its size must be known before the agent's write), un-gzipped if
        it came gzipped, never past the upload cap."""
        gunzip = zlib.decompressobj(wbits=31) if request.headers.get("content-encoding", "").lower() == "gzip" else None
        size = 0
        async for chunk in request.stream():
            data = gunzip.decompress(chunk, self.max_upload + 1 - size) if gunzip else chunk
            size += len(data)
            if size > self.max_upload:
                raise UploadTooLarge()
            await asyncio.to_thread(spool.write, data)
        spool.seek(0)

    async def write(self, path: str, f) -> None:
        f.seek(0, 2)
        size = f.tell()
        f.seek(0)

        async def chunks() -> AsyncIterator[bytes]:
            while data := await asyncio.to_thread(f.read, 1 << 20):
                yield data

        async with self.agent() as handle:
            await handle.agent.write(path, size, 0o644, chunks())


class UploadTooLarge(Exception):
    pass


def capped(receive, cap: int):
    """A request body past `cap` bytes (before any gunzip) ends the request with 413."""
    seen = 0

    async def counted():
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > cap:
            raise UploadTooLarge()
        return message

    return counted


def build_envd(sandboxes: SandboxService, processes: ProcessTable, watchers: Watchers, max_upload_bytes: int):
    """The envd ASGI app: Connect services by path, `/files` and `/health` (the gateway authenticated)."""
    process_app = ProcessASGIApplication(ProcessService(sandboxes, processes))
    filesystem_app = FilesystemASGIApplication(FilesystemService(sandboxes, processes, watchers))
    files = Files(sandboxes, processes, max_upload_bytes)

    async def app(scope, receive, send):
        path = scope["path"]
        if path.startswith("/process.Process/"):
            return await process_app(scope, receive, send)
        if path.startswith("/filesystem.Filesystem/"):
            return await filesystem_app(scope, receive, send)
        request = Request(scope, capped(receive, max_upload_bytes))
        if path == "/health":
            response: Response = Response(status_code=204)
        elif path == "/files" and request.method == "GET":
            response = await files.download(request)
        elif path == "/files" and request.method == "POST":
            response = await files.upload(request)
        else:
            response = error(404, f"envd has no {request.method} {path}")
        await response(scope, receive, send)

    return app
