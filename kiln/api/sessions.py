"""Route: GET /sandboxes/:id/sessions."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from ..store.db import User
from .auth import require_user

router = APIRouter()


@router.get("/sandboxes/{sandbox_id}/sessions")
async def list_sessions(sandbox_id: str, request: Request, user: User = Depends(require_user)):
    return await request.app.state.sandboxes.sessions(user, sandbox_id)
