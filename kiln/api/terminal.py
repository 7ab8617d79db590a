"""Route: GET /sandboxes/:id/ws — the WebSocket terminal.

First message (text): {"type":"session","session_id":…}. Then PTY output as binary frames; from the
client, a text frame {"type":"resize","rows","cols"} resizes, every other frame is keystrokes.
The token may come as `Authorization: Bearer` or `?token=` (browsers cannot set headers here).
"""

from __future__ import annotations

import contextlib
import json

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse

from ..core.errors import KilnError
from ..core.terminal import Terminal
from ..store.db import User
from ..tasks import first_completed
from .auth import bearer_key, route_template
from .deps import services

router = APIRouter()


def ws_user(websocket: WebSocket, allow_query_token: bool = True) -> User | None:
    key = bearer_key(websocket)
    if not key and allow_query_token:
        key = websocket.query_params.get("token", "")
    return services(websocket).store.user_by_key(key) if key else None


async def deny_unless_allowed(websocket: WebSocket, user: User | None) -> bool:
    """Answer a WebSocket that cannot proceed (401 or 429) before it is upgraded; True if denied."""
    if user is None:
        msg = (
            "invalid api key"
            if websocket.headers.get("authorization") or websocket.query_params.get("token")
            else "authorization required"
        )
        await websocket.send_denial_response(JSONResponse({"error": msg}, status_code=401))
        return True
    if not services(websocket).rate_limits.allow(user.id, "WEBSOCKET", route_template(websocket)):
        await websocket.send_denial_response(JSONResponse({"error": "rate limit exceeded"}, status_code=429))
        return True
    return False


@router.websocket("/sandboxes/{sandbox_id}/ws")
async def terminal(websocket: WebSocket, sandbox_id: str):
    user = ws_user(websocket)
    if await deny_unless_allowed(websocket, user):
        return
    assert user is not None
    svc = services(websocket)
    try:
        row = svc.sandboxes.get(user, sandbox_id)
    except KilnError as e:
        return await websocket.send_denial_response(JSONResponse({"error": e.message}, status_code=e.status))
    await websocket.accept()
    params = websocket.query_params
    attached = False
    try:
        async with svc.terminals.attach(user, row.id, params.get("session"), params.get("new") == "true") as term:
            attached = True
            await websocket.send_text(json.dumps({"type": "session", "session_id": term.session_id}))
            await relay(websocket, term)
    except KilnError as e:
        if not attached:
            await websocket.send_text(json.dumps({"type": "error", "error": e.message}))
            await websocket.close(1011)
            return
    with contextlib.suppress(Exception):
        await websocket.close(1000)


async def relay(websocket: WebSocket, term: Terminal) -> None:
    async def to_client():
        while (data := await term.read()) is not None:
            await websocket.send_bytes(data)

    async def from_client():
        while True:
            msg = await websocket.receive()
            if msg["type"] == "websocket.disconnect":
                return
            text, data = msg.get("text"), msg.get("bytes")
            if text is not None:
                size = resize_request(text)
                if size is not None:
                    await term.resize(*size)
                    continue
                data = text.encode()
            if data:
                await term.write(data)

    with contextlib.suppress(Exception, WebSocketDisconnect):
        await first_completed(to_client(), from_client())


def resize_request(text: str) -> tuple[int, int] | None:
    """(rows, cols) if a text frame is a resize message, else None (it is keystrokes)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("type") != "resize":
        return None
    try:
        return int(obj.get("rows", 24)), int(obj.get("cols", 80))
    except (TypeError, ValueError):
        return None
