"""Reverse proxy into sandbox ports, HTTP and WebSocket, shared by the authenticated route
`ANY /sandboxes/:id/proxy/:port/*path` (here) and the public proxy of published URLs (public.py).

HTTP: the request is replayed to the app with `Host: localhost:<port>`, `X-Forwarded-*` added and
hop-by-hop headers dropped; the response streams back chunk by chunk as it arrives (SSE works).
WebSocket: the handshake is replayed to the app and messages are relayed both ways.
The authenticated route also strips the caller's credentials (Authorization, `?token=`).
"""
from __future__ import annotations

import asyncio
import contextlib
import select
import socket
from dataclasses import dataclass
from urllib.parse import unquote

import httpcore
import websockets
from fastapi import APIRouter, Depends, Request, Response, WebSocket
from fastapi.responses import JSONResponse
from websockets.asyncio.client import connect as ws_connect

from ..core.errors import BadGateway, KilnError
from ..core.upstream import Upstreams, parse_port
from ..store.db import SandboxRow, User
from .auth import require_user
from .terminal import deny_unless_allowed, ws_user

router = APIRouter()

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
MAX_BODY = 50 * 1024 * 1024
WS_IDLE_TIMEOUT = 600.0
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
              b"te", b"trailer", b"transfer-encoding", b"upgrade", b"host"}
WS_HANDSHAKE = {b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions",
                b"sec-websocket-protocol", b"sec-websocket-accept", b"user-agent"}


class ClientGone(Exception):
    pass


class BodyTooLarge(Exception):
    pass


@dataclass
class Target:
    """Where a proxied request goes and how it is rewritten."""
    row: SandboxRow
    port: int
    path: str                  # upstream path, always starting with /
    strip_credentials: bool    # authenticated route: the caller's API key never reaches the app

    def query(self, raw: bytes) -> str:
        text = raw.decode("latin-1")
        if self.strip_credentials and text:
            text = "&".join(p for p in text.split("&") if unquote(p.split("=", 1)[0]) != "token")
        return text

    def url_target(self, scope) -> str:
        query = self.query(scope.get("query_string", b""))
        return self.path + (f"?{query}" if query else "")

    def headers(self, scope, websocket: bool = False) -> list[tuple[bytes, bytes]]:
        raw = scope["headers"]
        named_by_connection = {t.strip().lower() for k, v in raw if k == b"connection" for t in v.split(b",")}
        drop = HOP_BY_HOP | named_by_connection | {b"x-forwarded-proto", b"x-forwarded-host"}
        if websocket:
            drop |= WS_HANDSHAKE
        if self.strip_credentials:
            drop.add(b"authorization")
        out, forwarded_for, host = [], b"", b""
        for k, v in raw:
            if k == b"host":
                host = v
            elif k == b"x-forwarded-for":
                forwarded_for = v + b", "
            elif k not in drop:
                out.append((k, v))
        client = (scope.get("client") or ("",))[0].encode()
        proto = b"https" if scope.get("scheme") in ("https", "wss") else b"http"
        out += [(b"x-forwarded-for", forwarded_for + client), (b"x-forwarded-proto", proto),
                (b"x-forwarded-host", host)]
        if not websocket:
            out.insert(0, (b"host", f"localhost:{self.port}".encode()))
        return out


def path_after_port(raw_path: bytes) -> str:
    """`/sandboxes/x/proxy/3000/a/b` -> `/a/b`; nothing after the port -> `/`."""
    parts = raw_path.decode("latin-1").split("/", 5)
    return "/" + (parts[5] if len(parts) > 5 else "")


# ---------------------------------------------------------------- HTTP

class SocketStream(httpcore.AsyncNetworkStream):
    """httpcore's view of a connection we opened ourselves (direct or through the agent).

    TCP_QUICKACK before every read: apps that write headers and body separately with Nagle on
    (Python's http.server, for one) otherwise wait ~40 ms per response for our delayed ACK on a
    reused connection.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sock: socket.socket, on_close):
        self.reader, self.writer, self.sock, self.on_close = reader, writer, sock, on_close

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return await asyncio.wait_for(self.reader.read(max_bytes), timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.writer.write(buffer)
        await asyncio.wait_for(self.writer.drain(), timeout)

    async def aclose(self) -> None:
        self.writer.close()
        self.on_close()

    def get_extra_info(self, info: str):
        if info == "is_readable":  # an idle keep-alive connection that is readable was closed by the app
            if self.sock.fileno() < 0:
                return True
            return bool(select.select([self.sock], [], [], 0)[0])
        return None


class SandboxBackend(httpcore.AsyncNetworkBackend):
    """Where httpcore's pool gets new connections for one sandbox: from Upstreams (tracked)."""

    def __init__(self, state, sandbox_id: str):
        self.state, self.sandbox_id = state, sandbox_id

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        row = self.state.store.sandbox_by_id(self.sandbox_id)
        if row is None:
            raise BadGateway("bad gateway: the sandbox is gone")
        upstreams: Upstreams = self.state.upstreams
        sock = await upstreams.open(row, port)
        reader, writer = await asyncio.open_connection(sock=sock)
        return SocketStream(reader, writer, sock, lambda: upstreams.release(self.sandbox_id, sock))

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class HttpPools:
    """Keep-alive connections to apps, one httpcore pool per sandbox: a request to a hot app then
    costs no TCP handshake (and no new thread in thread-per-connection servers). Idle connections
    never keep a sandbox hot, expire before common server idle timeouts, and are dropped when the
    sandbox is stopped or destroyed."""

    KEEPALIVE_EXPIRY = 4.0   # under Node's 5 s default keepAliveTimeout
    MAX_IDLE = 8

    def __init__(self, state):
        self.state = state
        self.pools: dict[str, httpcore.AsyncConnectionPool] = {}
        state.upstreams.on_cut.append(self.forget)

    def pool(self, sandbox_id: str) -> httpcore.AsyncConnectionPool:
        pool = self.pools.get(sandbox_id)
        if pool is None:
            pool = self.pools[sandbox_id] = httpcore.AsyncConnectionPool(
                network_backend=SandboxBackend(self.state, sandbox_id), max_connections=None,
                max_keepalive_connections=self.MAX_IDLE, keepalive_expiry=self.KEEPALIVE_EXPIRY)
        return pool

    def forget(self, sandbox_id: str) -> None:
        # Its sockets were just shut down by Upstreams.cut; the pool object is simply dropped.
        self.pools.pop(sandbox_id, None)


async def request_body(scope, receive):
    length = dict(scope["headers"]).get(b"content-length", b"")
    if length.isdigit() and int(length) > MAX_BODY:
        raise BodyTooLarge()
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > MAX_BODY:
            raise BodyTooLarge()
        if chunk:
            yield chunk
        if not message.get("more_body"):
            return


async def json_reply(send, status: int, body: dict, extra_headers: list | None = None) -> None:
    response = JSONResponse(body, status_code=status, headers=dict(extra_headers or []))
    await response({"type": "http"}, None, send)


async def proxy_http(state, target: Target, scope, receive, send, bad_gateway: str | None = None):
    """One HTTP exchange with the app, on a pooled keep-alive connection. Errors before the response
    starts are JSON replies; `bad_gateway` replaces the detailed 502 message (the public proxy says less)."""
    headers = target.headers(scope)
    if any(k == b"transfer-encoding" for k, _ in scope["headers"]):
        headers.append((b"transfer-encoding", b"chunked"))  # the body keeps its framing upstream
    sandboxes = state.sandboxes
    started = False
    try:
        with sandboxes.thermal.pin(target.row.id):  # hot for as long as the exchange lasts
            await sandboxes.ready_handle(target.row)  # pooled connections to a paused app need it awake
            request = httpcore.Request(scope["method"], httpcore.URL(
                scheme=b"http", host=b"localhost", port=target.port, target=target.url_target(scope).encode()),
                headers=headers, content=request_body(scope, receive))
            response = await state.http_pools.pool(target.row.id).handle_async_request(request)
            try:
                out_headers = [(k, v) for k, v in response.headers if k.lower() not in HOP_BY_HOP]
                await send({"type": "http.response.start", "status": response.status, "headers": out_headers})
                started = True
                if any(k.lower() == b"content-length" for k, _ in response.headers):
                    await send_body(response.stream, send)  # bounded: it ends on its own
                else:  # streamed (SSE, chunked): stop as soon as the client goes
                    await stream_until_client_leaves(response.stream, receive, send)
            finally:
                await response.aclose()
    except BodyTooLarge:
        if not started:
            await json_reply(send, 413, {"error": "request body too large (max 50 MiB)"})
    except ClientGone:
        pass
    except KilnError:
        if started:
            return
        if bad_gateway is None:
            raise  # the API's error handlers answer with the right status
        await json_reply(send, 502, {"error": bad_gateway})
    except (httpcore.ProtocolError, httpcore.NetworkError, httpcore.TimeoutException, OSError) as e:
        if not started:
            message = bad_gateway or f"bad gateway: port {target.port}: {e or type(e).__name__}"
            await json_reply(send, 502, {"error": message})


async def send_body(stream, send) -> None:
    """Copy the response body as it arrives, chunk by chunk (flushed at once: SSE works)."""
    async for chunk in stream:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def stream_until_client_leaves(stream, receive, send) -> None:
    """send_body, stopped as soon as the client disconnects."""
    async def pump():
        await send_body(stream, send)

    async def client_left():
        while (await receive())["type"] != "http.disconnect":
            pass

    tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(client_left())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            t.result()
    finally:
        for t in tasks:
            t.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks)


# ---------------------------------------------------------------- WebSocket

async def proxy_websocket(upstreams: Upstreams, target: Target, websocket: WebSocket,
                          bad_gateway: str | None = None) -> None:
    """Open the app's WebSocket first, then accept the client's with the subprotocol the app chose."""
    scope = websocket.scope
    try:
        async with upstreams.connection(target.row, target.port) as sock:
            try:
                upstream = await ws_connect(
                    f"ws://localhost:{target.port}{target.url_target(scope)}", sock=sock,
                    additional_headers=target.headers(scope, websocket=True),
                    subprotocols=scope.get("subprotocols") or None, user_agent_header=websocket.headers.get(
                        "user-agent"), compression=None, max_size=None, ping_interval=None, proxy=None,
                    open_timeout=10)
            except (websockets.exceptions.InvalidHandshake, OSError, asyncio.TimeoutError) as e:
                raise BadGateway(bad_gateway or f"bad gateway: websocket on port {target.port}: {e}") from e
            async with upstream:
                await websocket.accept(subprotocol=upstream.subprotocol)
                await relay_messages(websocket, upstream)
    except KilnError as e:
        if bad_gateway is not None:  # the public proxy says less
            e = BadGateway(bad_gateway)
        if websocket.application_state.name == "CONNECTING":
            await websocket.send_denial_response(JSONResponse({"error": e.message}, status_code=e.status))
        else:
            with contextlib.suppress(Exception):
                await websocket.close(1011)


async def relay_messages(websocket: WebSocket, upstream) -> None:
    async def from_client():
        while True:
            message = await asyncio.wait_for(websocket.receive(), WS_IDLE_TIMEOUT)
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await upstream.send(message["text"])
            elif message.get("bytes") is not None:
                await upstream.send(message["bytes"])

    async def from_app():
        with contextlib.suppress(websockets.exceptions.ConnectionClosed):
            while True:
                data = await asyncio.wait_for(upstream.recv(), WS_IDLE_TIMEOUT)
                if isinstance(data, str):
                    await websocket.send_text(data)
                else:
                    await websocket.send_bytes(data)

    tasks = [asyncio.ensure_future(from_client()), asyncio.ensure_future(from_app())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks)
        code = upstream.close_code or 1000
        with contextlib.suppress(Exception):
            await websocket.close(code if code not in (1005, 1006) else 1000)


# ---------------------------------------------------------------- the authenticated routes

class ProxyResponse(Response):
    """Runs the exchange as the route's response, so the request body is streamed, never buffered."""

    def __init__(self, state, target: Target):
        super().__init__()
        self.state, self.target = state, target

    async def __call__(self, scope, receive, send):
        await proxy_http(self.state, self.target, scope, receive, send)


def target_for(app_state, user: User, sandbox_id: str, port: str, raw_path: bytes) -> Target:
    port_number = parse_port(port)  # checked before the sandbox is looked up
    row = app_state.sandboxes.get(user, sandbox_id)
    return Target(row, port_number, path_after_port(raw_path), strip_credentials=True)


@router.api_route("/sandboxes/{sandbox_id}/proxy/{port}", methods=METHODS)
async def proxy_root(sandbox_id: str, port: str, request: Request, user: User = Depends(require_user)):
    """Reverse proxy to `/` of a port inside the sandbox (wakes it)."""
    target = target_for(request.app.state, user, sandbox_id, port, request.scope.get("raw_path") or b"")
    return ProxyResponse(request.app.state, target)


@router.api_route("/sandboxes/{sandbox_id}/proxy/{port}/{path:path}", methods=METHODS)
async def proxy_path(sandbox_id: str, port: str, path: str, request: Request, user: User = Depends(require_user)):
    """Reverse proxy to a port inside the sandbox (wakes it); the path after the port and the query
    go to the app as they are."""
    target = target_for(request.app.state, user, sandbox_id, port, request.scope.get("raw_path") or b"")
    return ProxyResponse(request.app.state, target)


@router.websocket("/sandboxes/{sandbox_id}/proxy/{port}")
@router.websocket("/sandboxes/{sandbox_id}/proxy/{port}/{path:path}")
async def proxy_ws(websocket: WebSocket, sandbox_id: str, port: str):
    user = ws_user(websocket, allow_query_token=False)
    if await deny_unless_allowed(websocket, user):
        return
    try:
        target = target_for(websocket.app.state, user, sandbox_id, port, websocket.scope.get("raw_path") or b"")
    except KilnError as e:
        return await websocket.send_denial_response(JSONResponse({"error": e.message}, status_code=e.status))
    await proxy_websocket(websocket.app.state.upstreams, target, websocket)
