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
import re
from dataclasses import dataclass
from urllib.parse import unquote

import httpcore
import websockets
from fastapi import APIRouter, Depends, Request, Response, WebSocket
from fastapi.responses import JSONResponse
from websockets.asyncio.client import connect as ws_connect

from ..core.errors import BadGateway, KilnError
from ..core.upstream import parse_port
from ..store.db import SandboxRow, User
from ..tasks import first_completed
from .auth import require_user
from .deps import Services, services
from .terminal import deny_unless_allowed, ws_user

router = APIRouter()

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
MAX_BODY = 50 * 1024 * 1024
WS_IDLE_TIMEOUT = 600.0
WS_CLOSE_GRACE = 2.0  # seconds an app has to answer our close frame
HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"host",
}
WS_HANDSHAKE = {
    b"sec-websocket-key",
    b"sec-websocket-version",
    b"sec-websocket-extensions",
    b"sec-websocket-protocol",
    b"sec-websocket-accept",
    b"user-agent",
}


class ClientGone(Exception):
    pass


class BodyTooLarge(Exception):
    pass


@dataclass
class Target:
    """Where a proxied request goes and how it is rewritten."""

    row: SandboxRow
    port: int
    path: str  # upstream path, always starting with /
    strip_credentials: bool  # authenticated route: the caller's API key never reaches the app
    public: bool = False  # a published URL: cookies stay per alias, kiln keys never reach the app

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
        if self.public:  # a kiln key a visitor's client sends by mistake is not the tenant's to see
            raw = [(k, v) for k, v in raw if not (k == b"authorization" and v.startswith(b"Bearer kiln_"))]
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
        out += [
            (b"x-forwarded-for", forwarded_for + client),
            (b"x-forwarded-proto", proto),
            (b"x-forwarded-host", host),
        ]
        if not websocket:
            out.insert(0, (b"host", f"localhost:{self.port}".encode()))
        return out


COOKIE_DOMAIN = re.compile(rb";\s*domain=[^;]*", re.IGNORECASE)


def host_only_cookie(value: bytes) -> bytes:
    """Drop a Set-Cookie's Domain: an app behind one alias must not set cookies for every alias
    (cookie tossing between tenants); without Domain the cookie belongs to that alias alone."""
    return COOKIE_DOMAIN.sub(b"", value)


def path_after_port(raw_path: bytes) -> str:
    """`/sandboxes/x/proxy/3000/a/b` -> `/a/b`; nothing after the port -> `/`."""
    parts = raw_path.decode("latin-1").split("/", 5)
    return "/" + (parts[5] if len(parts) > 5 else "")


# ---------------------------------------------------------------- HTTP


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
    await response({"type": "http"}, no_receive, send)


async def no_receive() -> dict:
    raise RuntimeError("a JSON reply does not read the request")


async def proxy_http(svc: Services, target: Target, scope, receive, send, bad_gateway: str | None = None):
    """One HTTP exchange with the app, on a pooled keep-alive connection. Errors before the response
    starts are JSON replies; `bad_gateway` replaces the detailed 502 message (the public proxy says less)."""
    headers = target.headers(scope)
    if any(k == b"transfer-encoding" for k, _ in scope["headers"]):
        headers.append((b"transfer-encoding", b"chunked"))  # the body keeps its framing upstream
    started = False
    try:
        async with svc.sandboxes.using(target.row):  # awake and hot for as long as the exchange lasts
            request = httpcore.Request(
                scope["method"],
                httpcore.URL(
                    scheme=b"http", host=b"localhost", port=target.port, target=target.url_target(scope).encode()
                ),
                headers=headers,
                content=request_body(scope, receive),
            )
            response = await svc.http_pools.pool(target.row.id).handle_async_request(request)
            try:
                out_headers = [(k, v) for k, v in response.headers if k.lower() not in HOP_BY_HOP]
                if target.public:
                    out_headers = [
                        (k, host_only_cookie(v) if k.lower() == b"set-cookie" else v) for k, v in out_headers
                    ]
                await send({"type": "http.response.start", "status": response.status, "headers": out_headers})
                started = True
                # stop as soon as the client goes, even mid-way through a declared length: nobody
                # else would read the rest, and an app could stream gigabytes into the void
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

    async def client_left():
        while (await receive())["type"] != "http.disconnect":
            pass

    await first_completed(send_body(stream, send), client_left())


# ---------------------------------------------------------------- WebSocket


async def proxy_websocket(svc: Services, target: Target, websocket: WebSocket, bad_gateway: str | None = None) -> None:
    """Open the app's WebSocket first, then accept the client's with the subprotocol the app chose."""
    scope = websocket.scope
    try:
        async with svc.upstreams.connection(target.row, target.port) as sock:
            try:
                upstream = await ws_connect(
                    f"ws://localhost:{target.port}{target.url_target(scope)}",
                    sock=sock,
                    additional_headers=[
                        (k.decode("latin-1"), v.decode("latin-1")) for k, v in target.headers(scope, websocket=True)
                    ],
                    subprotocols=scope.get("subprotocols") or None,
                    user_agent_header=websocket.headers.get("user-agent"),
                    compression=None,
                    max_size=svc.server.ws_max_message_bytes,  # larger: closed with 1009, never buffered
                    ping_interval=None,
                    close_timeout=WS_CLOSE_GRACE,  # an app that keeps its end open after closing holds no fd
                    proxy=None,
                    open_timeout=10,
                )
            except (TimeoutError, websockets.exceptions.InvalidHandshake, OSError) as e:
                raise BadGateway(bad_gateway or f"bad gateway: websocket on port {target.port}: {e}") from e
            async with upstream:
                await websocket.accept(subprotocol=upstream.subprotocol)
                await relay_messages(websocket, upstream)
    except KilnError as e:
        err = BadGateway(bad_gateway) if bad_gateway is not None else e  # the public proxy says less
        if websocket.application_state.name == "CONNECTING":
            await websocket.send_denial_response(JSONResponse({"error": err.message}, status_code=err.status))
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

    async def app_stuck_closing():
        # websockets fails a connection (a message over max_size, a protocol error) by sending a close
        # frame and then waits for the app's reply; an app that never reads would hold it for ever
        while upstream.protocol.close_sent is None:  # noqa: ASYNC110 (websockets has no event for it)
            await asyncio.sleep(0.25)
        await asyncio.sleep(WS_CLOSE_GRACE)
        upstream.transport.abort()

    try:
        await first_completed(from_client(), from_app(), app_stuck_closing(), reraise=False)
    finally:
        code = upstream.close_code or 1000
        sent = upstream.protocol.close_sent
        if sent is not None and sent.code == 1009:
            code = 1009  # the app's message passed server.ws_max_message_bytes: say so to the client
        with contextlib.suppress(Exception):
            await websocket.close(code if code not in (1005, 1006) else 1000)


# ---------------------------------------------------------------- the authenticated routes


class ProxyResponse(Response):
    """Runs the exchange as the route's response, so the request body is streamed, never buffered."""

    def __init__(self, svc: Services, target: Target):
        super().__init__()
        self.svc, self.target = svc, target

    async def __call__(self, scope, receive, send):
        with contextlib.suppress(TimeoutError):  # server.proxy_deadline: no exchange lasts for ever
            await asyncio.wait_for(
                proxy_http(self.svc, self.target, scope, receive, send), self.svc.server.proxy_deadline
            )


def target_for(svc: Services, user: User, sandbox_id: str, port: str, raw_path: bytes) -> Target:
    port_number = parse_port(port)  # checked before the sandbox is looked up
    row = svc.sandboxes.get(user, sandbox_id)
    return Target(row, port_number, path_after_port(raw_path), strip_credentials=True)


@router.api_route("/sandboxes/{sandbox_id}/proxy/{port}", methods=METHODS)
async def proxy_root(sandbox_id: str, port: str, request: Request, user: User = Depends(require_user)):
    """Reverse proxy to `/` of a port inside the sandbox (wakes it)."""
    target = target_for(services(request), user, sandbox_id, port, request.scope.get("raw_path") or b"")
    return ProxyResponse(services(request), target)


@router.api_route("/sandboxes/{sandbox_id}/proxy/{port}/{path:path}", methods=METHODS)
async def proxy_path(sandbox_id: str, port: str, path: str, request: Request, user: User = Depends(require_user)):
    """Reverse proxy to a port inside the sandbox (wakes it); the path after the port and the query
    go to the app as they are."""
    target = target_for(services(request), user, sandbox_id, port, request.scope.get("raw_path") or b"")
    return ProxyResponse(services(request), target)


@router.websocket("/sandboxes/{sandbox_id}/proxy/{port}")
@router.websocket("/sandboxes/{sandbox_id}/proxy/{port}/{path:path}")
async def proxy_ws(websocket: WebSocket, sandbox_id: str, port: str):
    user = ws_user(websocket, allow_query_token=False)
    if await deny_unless_allowed(websocket, user):
        return
    assert user is not None
    try:
        target = target_for(services(websocket), user, sandbox_id, port, websocket.scope.get("raw_path") or b"")
    except KilnError as e:
        return await websocket.send_denial_response(JSONResponse({"error": e.message}, status_code=e.status))
    await proxy_websocket(services(websocket), target, websocket)
