"""Bearer-token authentication, and the headers and limits every API response shares."""

from __future__ import annotations

import json
import re
from email.utils import formatdate

from fastapi import Request, WebSocket

from .. import BHATTI_API_VERSION, __version__
from ..config import ServerConfig
from ..core.errors import TooManyRequests, Unauthorized
from ..store.db import User
from .deps import services, services_of

# Where CommonHeaders leaves the caller it authenticated (before reading a body) for require_user.
AUTHENTICATED = "kiln.user"
# Routes whose bodies are raw bytes for the sandbox, not API JSON: file uploads and proxied requests.
# bodies streamed to the route after its own auth: file uploads, proxied requests, image archives
RAW_BODY_PATH = re.compile(r"^(/sandboxes/[^/]+/(files|proxy)(/|$)|/images/(import|build)$)")


def route_template(conn: Request | WebSocket) -> str:
    """The matched route's path template (`/sandboxes/{sandbox_id}/exec`), not the request's path."""
    route = conn.scope.get("route")
    return getattr(route, "path", "") or conn.url.path


def bearer_key(conn: Request | WebSocket) -> str:
    """The API key of `Authorization: Bearer <key>`, or "" when the header is missing or malformed."""
    return bearer_key_of({b"authorization": conn.headers.get("authorization", "").encode("latin-1")})


async def require_user(request: Request) -> User:
    """The caller, from `Authorization: Bearer <key>`; query-string tokens are refused.

    async on purpose: FastAPI runs plain-def dependencies in a thread pool, a thread hop per request
    (and per-thread malloc arenas that swell the daemon's memory under load)."""
    user = request.scope.get(AUTHENTICATED)  # looked up already if the request had a body
    if user is None:
        key = bearer_key(request)
        if not key:
            raise Unauthorized("authorization required")
        user = services(request).store.user_by_key(key)
    if user is None:
        raise Unauthorized("invalid api key")
    if not services(request).rate_limits.allow(user.id, request.method, route_template(request)):
        raise TooManyRequests("rate limit exceeded")
    return user


class CommonHeaders:
    """ASGI middleware for every API request: version and Date headers on responses; API bodies (JSON,
    chunked or not) only from a caller with a valid key and at most `server.max_json_body_bytes` (read
    here, before any route runs: an anonymous or oversized body is refused without being read), and
    always parsed as JSON.

    Plain ASGI (not BaseHTTPMiddleware) so streamed responses flush immediately and client
    disconnects reach the handler.
    """

    def __init__(self, app, limits: ServerConfig | None = None):
        self.app = app
        self.max_body = (limits or ServerConfig()).max_json_body_bytes
        self.headers = [(b"x-kiln-version", __version__.encode()), (b"x-bhatti-version", BHATTI_API_VERSION.encode())]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"date" for k, _ in headers):
                    headers.append((b"date", formatdate(usegmt=True).encode()))
                message["headers"] = headers + self.headers
            await send(message)

        if RAW_BODY_PATH.match(scope["path"]) is not None:
            return await self.app(scope, receive, send_with_headers)  # streamed after the route's auth
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if length not in (b"", b"0") or b"transfer-encoding" in headers:
            if scope["path"] != "/health":
                key = bearer_key_of(headers)
                user = services_of(scope["app"]).store.user_by_key(key) if key else None
                if user is None:
                    return await reply(send_with_headers, 401, "invalid api key" if key else "authorization required")
                scope = dict(scope, **{AUTHENTICATED: user})
            if length.isdigit() and int(length) > self.max_body:
                return await reply(send_with_headers, 413, f"request body too large (max {self.max_body} bytes)")
            body = await read_at_most(receive, self.max_body)
            if body is None:
                return await reply(send_with_headers, 413, f"request body too large (max {self.max_body} bytes)")
            receive = replay(body, receive)
        # Every API body is JSON whatever Content-Type says (`curl -d` sends a form type).
        plain = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
        scope = dict(scope, headers=[*plain, (b"content-type", b"application/json")])
        await self.app(scope, receive, send_with_headers)


def bearer_key_of(headers: dict[bytes, bytes]) -> str:
    header = headers.get(b"authorization", b"").decode("latin-1")
    return header[7:].strip() if header.startswith("Bearer ") else ""


async def read_at_most(receive, cap: int) -> bytes | None:
    """The whole request body, or None as soon as it passes `cap` bytes (the rest is never read)."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return bytes(body)
        body += message.get("body", b"")
        if len(body) > cap:
            return None
        if not message.get("more_body"):
            return bytes(body)


def replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def reply(send, status: int, error: str) -> None:
    body = json.dumps({"error": error}).encode() + b"\n"
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
