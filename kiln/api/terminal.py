"""Route: GET /sandboxes/:id/ws — the WebSocket terminal.

First message (text): {"type":"session","session_id":…}. Then PTY output as binary frames; from the
client, a text frame {"type":"resize","rows","cols"} resizes, every other frame is keystrokes.
The token may come as `Authorization: Bearer` or `?token=` (browsers cannot set headers here).
"""
from __future__ import annotations

import asyncio
import contextlib
import json

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse

from ..agent import protocol as P
from ..core.errors import KilnError
from ..store.db import User

router = APIRouter()


def ws_user(websocket: WebSocket, allow_query_token: bool = True) -> User | None:
    header = websocket.headers.get("authorization", "")
    key = header[7:].strip() if header.startswith("Bearer ") else ""
    if not key and allow_query_token:
        key = websocket.query_params.get("token", "")
    return websocket.app.state.store.user_by_key(key) if key else None


async def deny_unless_allowed(websocket: WebSocket, user: User | None) -> bool:
    """Answer a WebSocket that cannot proceed (401 or 429) before it is upgraded; True if denied."""
    if user is None:
        msg = "invalid api key" if websocket.headers.get("authorization") or websocket.query_params.get("token") \
            else "authorization required"
        await websocket.send_denial_response(JSONResponse({"error": msg}, status_code=401))
        return True
    if not websocket.app.state.rate_limits.allow(user.id, "GET", websocket.url.path):
        await websocket.send_denial_response(JSONResponse({"error": "rate limit exceeded"}, status_code=429))
        return True
    return False


@router.websocket("/sandboxes/{sandbox_id}/ws")
async def terminal(websocket: WebSocket, sandbox_id: str):
    user = ws_user(websocket)
    if await deny_unless_allowed(websocket, user):
        return
    sandboxes = websocket.app.state.sandboxes
    try:
        row = sandboxes.get(user, sandbox_id)
    except KilnError as e:
        return await websocket.send_denial_response(JSONResponse({"error": e.message}, status_code=e.status))
    await websocket.accept()
    params = websocket.query_params
    try:
        info, conn = await websocket.app.state.terminals.open(
            user, row.id, params.get("session"), params.get("new") == "true")
    except KilnError as e:
        await websocket.send_text(json.dumps({"type": "error", "error": e.message}))
        await websocket.close(1011)
        return
    with sandboxes.thermal.pin(row.id):  # an attached terminal keeps the sandbox hot
        await websocket.send_text(json.dumps({"type": "session", "session_id": info["session_id"]}))
        await relay(websocket, conn)


async def relay(websocket: WebSocket, conn) -> None:
    async def to_client():
        while True:
            ftype, data = await conn.read_frame()
            if ftype == P.STDOUT:
                await websocket.send_bytes(data)
            elif ftype == P.EXIT:
                return

    async def from_client():
        while True:
            msg = await websocket.receive()
            if msg["type"] == "websocket.disconnect":
                return
            text, data = msg.get("text"), msg.get("bytes")
            if text is not None:
                try:
                    obj = json.loads(text)
                except ValueError:
                    obj = None
                if isinstance(obj, dict) and obj.get("type") == "resize":
                    size = {"rows": int(obj.get("rows", 24)), "cols": int(obj.get("cols", 80))}
                    await conn.send(P.RESIZE, json.dumps(size).encode())
                    continue
                data = text.encode()
            if data:
                await conn.send(P.STDIN, data)

    tasks = [asyncio.create_task(to_client()), asyncio.create_task(from_client())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            with contextlib.suppress(Exception, WebSocketDisconnect):
                t.result()
    finally:
        for t in tasks:
            t.cancel()
        await conn.close()  # detaches: the shell keeps running
        with contextlib.suppress(Exception):
            await websocket.close(1000)
