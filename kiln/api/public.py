"""The public proxy: requests whose Host is `<alias>.<publish.domain>` go to the published sandbox
port, without auth, and never reach an API route.

Order per request: resolve the alias (unknown -> 404, before any rate limit), rate limits
(global, then per client IP, then per alias -> 429 + Retry-After: 1), body cap, wake (single-flight
per sandbox through ensure_hot; at most `max_concurrent_wakes` at once -> 503 + Retry-After: 2), then
the HTTP or WebSocket proxy (app down -> 502). Each HTTP request ends by `server.public_deadline`.
"""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import WebSocket
from fastapi.responses import JSONResponse

from ..config import PublishConfig
from ..core.errors import KilnError
from ..core.ratelimit import KeyedLimiter, TokenBucket
from ..states import Status
from .deps import Services, services_of
from .proxy import Target, json_reply, proxy_http, proxy_websocket


class PublicLimits:
    def __init__(self, config: PublishConfig):
        self.global_bucket = TokenBucket(config.rate_global.burst, config.rate_global.per_minute)
        self.per_ip = KeyedLimiter(config.rate_per_ip.burst, config.rate_per_ip.per_minute)
        self.per_alias = KeyedLimiter(config.rate_per_alias.burst, config.rate_per_alias.per_minute)
        self.max_wakes = config.max_concurrent_wakes
        self.waking = 0

    def allow(self, ip: str, alias: str) -> bool:
        # Checked in order; an earlier bucket's token is spent even when a later one refuses.
        return self.global_bucket.take() and self.per_ip.take(ip) and self.per_alias.take(alias)


class PublicProxy:
    """ASGI middleware, outermost: picks the public proxy by Host before anything of the API runs."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        state = services_of(scope["app"])
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        alias = state.publish.alias_of_host(host)
        if alias is None:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":  # WebSockets end by their idle timeout instead
            return await self.serve(state, alias, scope, receive, send)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.serve(state, alias, scope, receive, send), state.server.public_deadline)

    async def serve(self, state: Services, alias: str, scope, receive, send) -> None:
        websocket = WebSocket(scope, receive, send) if scope["type"] == "websocket" else None

        async def refuse(status: int, message: str, retry_after: str | None = None):
            headers = [("retry-after", retry_after)] if retry_after else []
            if websocket is not None:
                await websocket.send_denial_response(
                    JSONResponse({"error": message}, status_code=status, headers=dict(headers))
                )
            else:
                await json_reply(send, status, {"error": message}, headers)

        rule = state.publish.resolve(alias)
        row = state.store.sandbox_by_id(rule.sandbox_id) if rule else None
        if rule is None or row is None:
            return await refuse(404, "not found")
        limits: PublicLimits = state.public_limits
        client_ip = (scope.get("client") or ("",))[0]
        if not limits.allow(client_ip, alias):
            return await refuse(429, "rate limit exceeded", "1")
        sandboxes = state.sandboxes
        if row.status != Status.RUNNING or sandboxes.waker.is_warm(row.id):
            if limits.waking >= limits.max_wakes:
                return await refuse(503, "server busy, retry shortly", "2")
            limits.waking += 1
            try:
                await sandboxes.waker.ready_handle(row)  # the wake, admitted; the exchange below pins it
            except KilnError:
                state.publish.cache.pop(alias, None)
                return await refuse(502, "sandbox unavailable")
            finally:
                limits.waking -= 1
            row = state.store.sandbox_by_id(row.id) or row
        target = Target(
            row,
            rule.port,
            (scope.get("raw_path") or b"/").decode("latin-1") or "/",
            strip_credentials=False,
            public=True,
        )
        if websocket is not None:
            await proxy_websocket(state, target, websocket, bad_gateway="bad gateway")
        else:
            await proxy_http(state, target, scope, receive, send, bad_gateway="bad gateway")
