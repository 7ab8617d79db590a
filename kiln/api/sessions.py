"""Route: GET /sandboxes/:id/sessions."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from ..store.db import User
from .auth import require_user
from .deps import services
from .models import SessionOut

router = APIRouter()


@router.get("/sandboxes/{sandbox_id}/sessions", response_model=list[SessionOut], response_model_exclude_none=True)
async def list_sessions(sandbox_id: str, request: Request, user: User = Depends(require_user)):
    return await services(request).terminals.sessions(user, sandbox_id)
