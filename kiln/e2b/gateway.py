"""The E2B surface's front door: an ASGI middleware, outermost, that takes E2B's requests before any
of kiln's own routes, limits or JSON handling see them.

Domain mode (`e2b.domain`, on the TLS listener and the main one alike): `api.<domain>` is the REST
control plane, `<port>-<sandbox id>.<domain>` a sandbox's port (49983: envd). A sandbox's other ports
answer anyone who knows its id unless `e2b.public_ports` is off, as E2B's do.

URL mode (the SDKs' `E2B_API_URL` / `E2B_SANDBOX_URL`), on the main listener:
- `/e2b/sandbox[/...]`: a sandbox's traffic. The sandbox comes from `E2b-Sandbox-Id` (or, for SDK
  versions that leave it out, from the envd token alone), the port from `E2b-Sandbox-Port`: 49983 is
  envd, any other port goes to that port of the sandbox through kiln's proxy. Every envd request but
  `/health` needs the sandbox's envd token (`X-Access-Token`).
- `/e2b/...`: the REST control plane; the caller's `X-API-Key` is checked before the body is read,
  and the body is capped like kiln's own API bodies.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import time
import urllib.parse

from fastapi import WebSocket

from ..api.auth import read_at_most, replay
from ..api.deps import services_of
from ..api.proxy import Target, proxy_http, proxy_websocket
from ..core.errors import KilnError
from ..states import Status
from ..store.db import User
from .control import USER, error
from .envd import CALL, EnvdCall, basic_user
from .sandboxes import E2bSandbox, E2bService

log = logging.getLogger("kiln.e2b")

PREFIX = "/e2b"
SANDBOX_PREFIX = "/e2b/sandbox"
ENVD_PORT = 49983
SANDBOX_HOST = re.compile(r"(\d{1,5})-([0-9a-f]{1,64})")  # <port>-<sandbox id>


async def refuse(scope, receive, send, status: int, message: str) -> None:
    """E2B's error body, as an HTTP reply or as the denial of a WebSocket handshake."""
    response = error(status, message)
    if scope["type"] == "websocket":
        return await WebSocket(scope, receive, send).send_denial_response(response)
    await response(scope, receive, send)


def signed(token: str, method: str, query: dict[str, list[str]]) -> bool:
    """envd's signed file URLs: "v1_" + base64(sha256("<path>:<read|write>:<user>:<token>[:<expiry>]")),
    unpadded, made by the SDK from the sandbox's token; an expired one is refused."""
    path, user = (query.get(k, [""])[0] for k in ("path", "username"))
    expiry = query.get("signature_expiration", [""])[0]
    if expiry and (not expiry.isdigit() or int(expiry) < time.time()):
        return False
    operation = "read" if method == "GET" else "write"
    raw = f"{path}:{operation}:{user}:{token}" + (f":{expiry}" if expiry else "")
    expected = "v1_" + base64.b64encode(hashlib.sha256(raw.encode()).digest()).rstrip(b"=").decode()
    return hmac.compare_digest(expected.encode(), query.get("signature", [""])[0].encode())


def under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def strip(scope: dict, prefix: str) -> dict:
    path = scope["path"][len(prefix) :] or "/"
    raw = scope.get("raw_path") or scope["path"].encode()
    return dict(scope, path=path, raw_path=raw[len(prefix) :] or b"/", root_path=scope.get("root_path", "") + prefix)


def api_key_user(e2b: E2bService, headers: dict[bytes, bytes]) -> User | None:
    """`X-API-Key`: a kiln key, or its `e2b_` alias (some SDK versions insist on that prefix)."""
    key = headers.get(b"x-api-key", b"").decode("latin-1").strip()
    if key.startswith("e2b_"):
        key = "kiln_" + key[4:]
    return e2b.store.user_by_key(key) if key else None


class E2bGateway:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        state = services_of(scope["app"])
        e2b: E2bService | None = state.e2b
        if e2b is None:  # turned off (e2b.enabled: false): kiln's own routes answer, with a 404
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1").rsplit(":", 1)[0].strip().lower().rstrip(".")
        domain = e2b.domain
        if domain and host == f"api.{domain}":
            return await self.control(state, e2b, scope, headers, receive, send)
        if domain and host.endswith("." + domain):
            label = SANDBOX_HOST.fullmatch(host[: -len(domain) - 1])
            if label is None:
                return await refuse(
                    scope, receive, send, 404, f"{host} is not a sandbox host: <port>-<sandbox id>.{domain}"
                )
            return await self.sandbox(state, e2b, scope, headers, receive, send, label[2], int(label[1]))
        if state.publish.alias_of_host(host) is not None or not under(scope["path"], PREFIX):
            return await self.app(scope, receive, send)  # published URLs and kiln's own API
        if under(scope["path"], SANDBOX_PREFIX):
            sandbox_id = headers.get(b"e2b-sandbox-id", b"").decode("latin-1")
            port = headers.get(b"e2b-sandbox-port", b"").decode("latin-1") or str(ENVD_PORT)
            if not port.isdigit() or not 0 < int(port) < 65536:
                return await refuse(scope, receive, send, 400, "E2b-Sandbox-Port must be a port number")
            scope = strip(scope, SANDBOX_PREFIX)
            return await self.sandbox(state, e2b, scope, headers, receive, send, sandbox_id, int(port))
        return await self.control(state, e2b, strip(scope, PREFIX), headers, receive, send)

    async def control(self, state, e2b: E2bService, scope, headers, receive, send) -> None:
        if scope["type"] != "http":
            return await refuse(scope, receive, send, 404, "the E2B API has no WebSocket routes")
        user = api_key_user(e2b, headers)
        if user is None:
            return await refuse(
                scope, receive, send, 401, "invalid API key" if headers.get(b"x-api-key") else "X-API-Key required"
            )
        cap = state.server.max_json_body_bytes
        body = await read_at_most(receive, cap)
        if body is None:
            return await refuse(scope, receive, send, 413, f"request body too large (max {cap} bytes)")
        await e2b.control_app(dict(scope, **{USER: user}), replay(body, receive), send)

    async def sandbox(self, state, e2b: E2bService, scope, headers, receive, send, sandbox_id: str, port: int):
        token = headers.get(b"x-access-token", b"").decode("latin-1")
        sb = self.find(e2b, sandbox_id, token)
        if sb is None:
            return await refuse(scope, receive, send, 502, f"The sandbox {sandbox_id or '(unnamed)'} was not found")
        valid = hmac.compare_digest(token.encode(), e2b.envd_token(sb.row.id).encode())
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if port == ENVD_PORT:
            needs_token = scope["path"] != "/health"
            if not valid and scope["path"] == "/files" and "signature" in query:
                valid = signed(e2b.envd_token(sb.row.id), scope["method"], query)
        else:
            traffic = headers.get(b"e2b-traffic-access-token", b"").decode("latin-1")
            valid = valid or hmac.compare_digest(traffic.encode(), e2b.envd_token(sb.row.id).encode())
            needs_token = not e2b.config.public_ports
        if needs_token and not valid:
            return await refuse(scope, receive, send, 401, "unauthenticated: a valid X-Access-Token is required")
        if sb.row.status == Status.STOPPED and not sb.record.auto_resume:
            return await refuse(
                scope, receive, send, 502, f"The sandbox {sb.row.id} was not found"
            )  # paused: not running
        if not state.rate_limits.allow_class(sb.row.owner_id, "exec"):
            return await refuse(scope, receive, send, 429, "rate limit exceeded")
        if port != ENVD_PORT:
            target = Target(sb.row, port, (scope.get("raw_path") or b"/").decode("latin-1"), strip_credentials=False)
            if scope["type"] == "websocket":
                return await proxy_websocket(state, target, WebSocket(scope, receive, send))
            return await proxy_http(state, target, scope, receive, send)
        if scope["type"] != "http":
            return await refuse(scope, receive, send, 404, "envd has no WebSocket routes")
        try:
            user = basic_user(headers.get(b"authorization", b"").decode("latin-1"))
        except Exception:
            return await refuse(scope, receive, send, 400, "malformed Basic authorization")
        if scope["path"] == "/files" and query.get("username"):
            user = query["username"][0]  # /files names its user in the query (signed URLs have no headers)
        call = EnvdCall(sb, user)
        reset = CALL.set(call)
        try:
            await e2b.envd_app(scope, receive, send)
        except KilnError as e:
            await refuse(scope, receive, send, e.status, e.message)
        finally:
            CALL.reset(reset)

    @staticmethod
    def find(e2b: E2bService, sandbox_id: str, token: str) -> E2bSandbox | None:
        """By its id (the token is checked after), else by the token alone."""
        return e2b.by_id(sandbox_id) if sandbox_id else e2b.by_token(token)
