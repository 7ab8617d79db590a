"""Bearer-token authentication, and the headers and limits every API response shares."""

from __future__ import annotations

import json
import re
from email.utils import formatdate

from fastapi import Request, WebSocket

from .. import __version__
from ..core.errors import TooManyRequests, Unauthorized
from ..store.db import User
from .deps import services

MAX_JSON_BODY = 1 << 20
# Routes whose bodies are raw bytes for the sandbox, not API JSON: file uploads and proxied requests.
RAW_BODY_PATH = re.compile(r"^/sandboxes/[^/]+/(files|proxy)(/|$)")


def route_template(conn: Request | WebSocket) -> str:
    """The matched route's path template (`/sandboxes/{sandbox_id}/exec`), not the request's path."""
    route = conn.scope.get("route")
    return getattr(route, "path", "") or conn.url.path


def bearer_key(conn: Request | WebSocket) -> str:
    """The API key of `Authorization: Bearer <key>`, or "" when the header is missing or malformed."""
    header = conn.headers.get("authorization", "")
    return header[7:].strip() if header.startswith("Bearer ") else ""


async def require_user(request: Request) -> User:
    """The caller, from `Authorization: Bearer <key>`; query-string tokens are refused.

    async on purpose: FastAPI runs plain-def dependencies in a thread pool, a thread hop per request
    (and per-thread malloc arenas that swell the daemon's memory under load)."""
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
    """ASGI middleware: version headers on every HTTP response; JSON bodies over 1 MiB refused unread;
    bodies read as JSON.

    Plain ASGI (not BaseHTTPMiddleware) so streamed responses flush immediately and client
    disconnects reach the handler.
    """

    def __init__(self, app):
        self.app = app
        version = __version__.encode()
        self.headers = [(b"x-kiln-version", version), (b"x-bhatti-version", version)]

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

        raw_body = RAW_BODY_PATH.match(scope["path"]) is not None
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > MAX_JSON_BODY and not raw_body:
            body = json.dumps({"error": "request body too large (max 1 MiB)"}).encode() + b"\n"
            await send_with_headers(
                {
                    "type": "http.response.start",
                    "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        if not raw_body:
            # Every API body is JSON whatever Content-Type says (`curl -d` sends a form type).
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = dict(scope, headers=[*headers, (b"content-type", b"application/json")])
        await self.app(scope, receive, send_with_headers)
