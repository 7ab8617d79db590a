"""Routes: POST/GET /sandboxes/:id/publish, DELETE /sandboxes/:id/publish/:port."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr

from ..core.errors import BadRequest
from ..store.db import PublishRule, User
from .auth import require_user
from .deps import services
from .models import PublishOut

router = APIRouter()


class PublishBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    port: StrictInt = 0
    alias: StrictStr | None = None


def rule_json(rule: PublishRule, url: str) -> dict:
    return {
        "id": rule.id,
        "sandbox_id": rule.sandbox_id,
        "user_id": rule.user_id,
        "port": rule.port,
        "alias": rule.alias,
        "url": url,
        "created_at": rule.created_at,
    }


@router.post(
    "/sandboxes/{sandbox_id}/publish", status_code=201, response_model=PublishOut, response_model_exclude_none=True
)
async def publish(
    sandbox_id: str, body: PublishBody, request: Request, response: Response, user: User = Depends(require_user)
):
    """Publish a sandbox port at http://<alias>.<publish.domain>/ (does not wake the sandbox)."""
    state = services(request)
    row = state.sandboxes.get(user, sandbox_id)
    rule, existed = state.publish.publish(user, row, body.port, body.alias)
    if existed:
        response.status_code = 200
        response.headers["X-Bhatti-Existing"] = "true"
    return rule_json(rule, state.publish.url(rule.alias))


@router.get("/sandboxes/{sandbox_id}/publish", response_model=list[PublishOut], response_model_exclude_none=True)
async def list_published(sandbox_id: str, request: Request, user: User = Depends(require_user)):
    state = services(request)
    row = state.sandboxes.get(user, sandbox_id)
    return [rule_json(r, state.publish.url(r.alias)) for r in state.publish.rules(row)]


@router.delete("/sandboxes/{sandbox_id}/publish/{port}", status_code=204)
async def unpublish(sandbox_id: str, port: str, request: Request, user: User = Depends(require_user)):
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise BadRequest("invalid port in path")
    state = services(request)
    row = state.sandboxes.get(user, sandbox_id)
    state.publish.unpublish(row, int(port))
    return Response(status_code=204)
