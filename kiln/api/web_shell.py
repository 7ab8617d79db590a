"""Routes: POST/DELETE /sandboxes/:id/shell-token, and the web shell itself at /_shell/:id (its page)
and /_shell/:id/ws (its terminal), which take no API key: the share link's token is the credential."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets

from fastapi import APIRouter, Depends, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, JSONResponse

from ..core.errors import KilnError
from ..core.web_shell import AUTH_TIMEOUT
from ..store.db import User
from ..tasks import first_completed
from .auth import require_user
from .deps import services
from .models import ShellTokenOut
from .terminal import relay
from .web import STATIC

router = APIRouter()
PAGE = (STATIC / "shell.html").read_text()


@router.post("/sandboxes/{sandbox_id}/shell-token", response_model=ShellTokenOut)
async def make_shell_token(sandbox_id: str, request: Request, user: User = Depends(require_user)):
    """A share link that opens a terminal in the browser without an API key (replaces any earlier one)."""
    row, token = services(request).web_shells.issue(user, sandbox_id)
    base = str(request.base_url).rstrip("/")
    return {"token": token, "url": f"{base}/_shell/{row.id}#token={token}"}


@router.delete("/sandboxes/{sandbox_id}/shell-token", status_code=204)
async def revoke_shell_token(sandbox_id: str, request: Request, user: User = Depends(require_user)):
    """Revoke the share link and end the web shells opened with it."""
    services(request).web_shells.revoke(user, sandbox_id)
    return Response(status_code=204)


@router.get("/_shell/{sandbox_id}", include_in_schema=False)
async def shell_page(sandbox_id: str):
    # the same page for every id: it never says whether a sandbox exists
    nonce = secrets.token_urlsafe(16)
    csp = (
        f"default-src 'none'; script-src 'self' 'nonce-{nonce}'; style-src 'self' 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    headers = {
        "Content-Security-Policy": csp,
        "Cache-Control": "no-store",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
    }
    return HTMLResponse(PAGE.replace("{{nonce}}", nonce), headers=headers)


@router.websocket("/_shell/{sandbox_id}/ws")
async def shell_socket(websocket: WebSocket, sandbox_id: str):
    shells = services(websocket).web_shells
    if not shells.allow_attempt((websocket.client or ("",))[0]):
        await websocket.send_denial_response(JSONResponse({"error": "rate limit exceeded"}, status_code=429))
        return
    await websocket.accept()  # before anything is checked: a refusal looks the same for every id

    async def fail(message: str) -> None:
        with contextlib.suppress(Exception):
            await websocket.send_text(json.dumps({"type": "error", "error": message}))
            await websocket.close(1008)

    try:
        first = json.loads(await asyncio.wait_for(websocket.receive_text(), AUTH_TIMEOUT))
        token = first.get("token") if isinstance(first, dict) and first.get("type") == "auth" else None
        owner, row = shells.authenticate(sandbox_id, token)
    except (KilnError, TimeoutError, ValueError, KeyError, RuntimeError, WebSocketDisconnect):
        return await fail("unauthorized")
    try:
        async with shells.opened(row.id) as revoked:
            await websocket.send_text(json.dumps({"type": "connected", "sandbox": row.name, "status": row.status}))
            async with services(websocket).terminals.attach(owner, row.id, None, new=True) as term:
                await first_completed(relay(websocket, term), revoked.wait())
            if revoked.is_set():
                return await fail("revoked")
    except KilnError as e:
        return await fail(e.message)
    with contextlib.suppress(Exception):
        await websocket.close(1000)
