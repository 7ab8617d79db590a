"""Routes: POST /secrets (upsert), GET /secrets (names and times only), DELETE /secrets/:name."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, StrictStr

from ..store.db import SecretRow, User
from .auth import require_user
from .deps import services
from .models import SecretOut, StatusOut

router = APIRouter()


class SecretBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr = ""
    value: StrictStr = ""


def secret_json(row: SecretRow) -> dict:
    return {"name": row.name, "created_at": row.created_at, "updated_at": row.updated_at}


@router.post("/secrets", status_code=201, response_model=SecretOut, response_model_exclude_none=True)
async def set_secret(body: SecretBody, request: Request, user: User = Depends(require_user)):
    return secret_json(services(request).secrets.set(user, body.name, body.value))


@router.get("/secrets", response_model=list[SecretOut], response_model_exclude_none=True)
async def list_secrets(request: Request, user: User = Depends(require_user)):
    return [secret_json(r) for r in services(request).secrets.list(user)]


@router.delete("/secrets/{name}", response_model=StatusOut, response_model_exclude_none=True)
async def delete_secret(name: str, request: Request, user: User = Depends(require_user)):
    services(request).secrets.delete(user, name)
    return {"status": "deleted"}
