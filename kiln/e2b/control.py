"""E2B's REST control plane (its OpenAPI "E2B API"): create, connect, list, get, kill, timeout, pause.

Its own FastAPI app, never mixed with kiln's routes (E2B reuses /sandboxes/{id} with other bodies):
camelCase JSON, E2B's exact statuses, and errors as {"code": <status>, "message": ...}, which the
SDKs' generated clients need. The caller is found by `X-API-Key` (a kiln key, or its `e2b_` alias)
before any body is read (gateway.py).
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.errors import BadRequest, Internal, KilnError, TooManyRequests
from ..store.db import User
from .sandboxes import ENVD_VERSION, E2bSandbox, E2bService, rfc3339

USER = "kiln.e2b.user"  # where the gateway leaves the authenticated caller in the scope
CLIENT_ID = "kiln"
MAX_PAGE = 1000


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status, headers=headers)


class Body(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def refuse_unknown(self, *unsupported: str) -> None:
        """400 naming every field kiln does not honour: unknown ones, and known ones asking for more."""
        names = [*sorted(self.model_extra or {}), *unsupported]
        if names:
            raise BadRequest(f"kiln does not support {', '.join(names)}")


class AutoResume(BaseModel):
    model_config = ConfigDict(extra="ignore")
    enabled: StrictBool = False


class NewSandbox(Body):
    template_id: StrictStr = Field(alias="templateID")
    timeout: StrictInt | None = None
    metadata: dict[StrictStr, StrictStr] | None = None
    env_vars: dict[StrictStr, StrictStr] | None = Field(None, alias="envVars")
    auto_pause: StrictBool = Field(False, alias="autoPause")
    auto_pause_memory: StrictBool = Field(True, alias="autoPauseMemory")
    auto_resume: AutoResume | None = Field(None, alias="autoResume")
    secure: StrictBool | None = None  # every sandbox gets an envd token, as E2B's v2 does
    allow_internet_access: StrictBool = True
    # asked-for features kiln does not have: refused by name when they ask for something
    network: dict[str, Any] | None = None
    mcp: dict[str, Any] | None = None
    iam: dict[str, Any] | None = None
    volume_mounts: list[Any] | None = Field(None, alias="volumeMounts")

    def check(self) -> None:
        unsupported = [
            name
            for name, asked in (
                ("network", bool(self.network)),
                ("mcp", bool(self.mcp)),
                ("iam", bool(self.iam)),
                ("volumeMounts", bool(self.volume_mounts)),
                ("autoPauseMemory=false (a filesystem-only pause)", not self.auto_pause_memory),
            )
            if asked
        ]
        self.refuse_unknown(*unsupported)


class ConnectBody(Body):
    timeout: StrictInt | None = None
    memory: StrictBool = True  # false: resume by rebooting, which kiln does not offer

    def check(self) -> None:
        self.refuse_unknown(*([] if self.memory else ["memory=false (a resume by reboot)"]))


class TimeoutBody(Body):
    timeout: StrictInt


class PauseBody(Body):
    memory: StrictBool = True
    require_healthy_guest: StrictBool | None = Field(None, alias="requireHealthyGuest")


def summary(sb: E2bSandbox) -> dict:
    """E2B's ListedSandbox."""
    return {
        "templateID": sb.record.template,
        "alias": sb.record.template,
        "sandboxID": sb.row.id,
        "clientID": CLIENT_ID,
        "startedAt": sb.row.created_at,
        "endAt": rfc3339(sb.record.end_at),
        "envdVersion": ENVD_VERSION,
        "cpuCount": max(1, round(sb.row.cpus)),
        "memoryMB": sb.row.memory_mb,
        "diskSizeMB": sb.row.disk_mb,
        "state": sb.state,
        "metadata": sb.record.metadata,
    }


def build_app(e2b: E2bService) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)

    @app.exception_handler(KilnError)
    async def kiln_error(request: Request, exc: KilnError):
        if isinstance(exc, Internal):
            return error(500, "internal error")
        return error(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors()]
        return error(400, "invalid request: " + "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code in (404, 405):
            return error(501, f"kiln's E2B API does not offer {request.method} {request.url.path}")
        return error(exc.status_code, str(exc.detail))

    def caller(request: Request, klass: str = "read") -> User:
        user: User = request.scope[USER]
        if not e2b.sandboxes_rate_ok(user, klass):
            raise TooManyRequests("rate limit exceeded")
        return user

    async def parse(request: Request, model: type[Body]) -> Any:
        raw = await request.body()
        try:
            return model.model_validate_json(raw or b"{}")
        except ValidationError as exc:
            parts = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()]
            raise BadRequest("invalid request: " + "; ".join(parts))

    def created(sb: E2bSandbox, status: int) -> JSONResponse:
        return JSONResponse(
            {
                "templateID": sb.record.template,
                "sandboxID": sb.row.id,
                "clientID": CLIENT_ID,
                "envdVersion": ENVD_VERSION,
                "envdAccessToken": e2b.envd_token(sb.row.id),
                "trafficAccessToken": None,
                "domain": None,
                "alias": sb.record.template,
            },
            status_code=status,
        )

    async def create(request: Request) -> JSONResponse:
        user = caller(request, "create")
        body: NewSandbox = await parse(request, NewSandbox)
        body.check()
        sb = await e2b.create(
            user,
            body.template_id,
            body.timeout,
            body.metadata or {},
            body.env_vars or {},
            "pause" if body.auto_pause else "kill",
            body.allow_internet_access,
            auto_resume=bool(body.auto_resume and body.auto_resume.enabled),
            route=f"{request.method} {request.url.path}",
        )
        return created(sb, 201)

    app.add_api_route("/sandboxes", create, methods=["POST"])
    app.add_api_route("/v2/sandboxes", create, methods=["POST"])

    async def connect(request: Request, sandbox_id: str) -> JSONResponse:
        user = caller(request)
        body: ConnectBody = await parse(request, ConnectBody)
        body.check()
        sb, resumed = await e2b.connect(user, sandbox_id, body.timeout)
        return created(sb, 201 if resumed else 200)

    for path in (
        "/sandboxes/{sandbox_id}/connect",
        "/v2/sandboxes/{sandbox_id}/connect",
        "/sandboxes/{sandbox_id}/resume",
    ):
        app.add_api_route(path, connect, methods=["POST"])

    def listing(request: Request, v2: bool) -> Response:
        user = caller(request)
        q = request.query_params
        states = {s for s in (q.get("state") or ("running,paused" if v2 else "running")).split(",") if s}
        if not states <= {"running", "paused"}:
            raise BadRequest(f"state must be running and/or paused, not {q.get('state')}")
        wanted = dict(urllib.parse.parse_qsl(q.get("metadata") or "", keep_blank_values=True))
        try:
            limit = int(q.get("limit") or (100 if v2 else MAX_PAGE))
        except ValueError:
            raise BadRequest("limit must be a number")
        if not 1 <= limit <= MAX_PAGE:
            raise BadRequest(f"limit must be between 1 and {MAX_PAGE}")
        matching = [
            sb
            for sb in e2b.list(user)
            if sb.state in states and all(sb.record.metadata.get(k) == v for k, v in wanted.items())
        ]
        after = q.get("nextToken") or ""
        if after:
            ids = [sb.row.id for sb in matching]
            if after not in ids:
                raise BadRequest("nextToken is not a token of this listing")
            matching = matching[ids.index(after) + 1 :]
        page = matching[:limit]
        headers = {"x-next-token": page[-1].row.id} if len(matching) > limit else {}
        return JSONResponse([summary(sb) for sb in page], headers=headers)

    async def list_v1(request: Request) -> Response:
        return listing(request, v2=False)

    async def list_v2(request: Request) -> Response:
        return listing(request, v2=True)

    app.add_api_route("/sandboxes", list_v1, methods=["GET"])
    app.add_api_route("/v2/sandboxes", list_v2, methods=["GET"])

    async def get(request: Request, sandbox_id: str) -> JSONResponse:
        sb = e2b.get(caller(request), sandbox_id)
        return JSONResponse(
            {
                **summary(sb),
                "envdAccessToken": e2b.envd_token(sb.row.id),
                "domain": None,
                "allowInternetAccess": (sb.row.net_policy or {}).get("default") != "deny",
                "lifecycle": {"onTimeout": sb.record.on_timeout, "autoResume": sb.record.auto_resume},
            }
        )

    app.add_api_route("/sandboxes/{sandbox_id}", get, methods=["GET"])

    async def kill(request: Request, sandbox_id: str) -> Response:
        await e2b.kill(caller(request), sandbox_id)
        return Response(status_code=204)

    app.add_api_route("/sandboxes/{sandbox_id}", kill, methods=["DELETE"])

    async def set_timeout(request: Request, sandbox_id: str) -> Response:
        user = caller(request)
        body: TimeoutBody = await parse(request, TimeoutBody)
        body.refuse_unknown()
        await e2b.set_timeout(user, sandbox_id, body.timeout)
        return Response(status_code=204)

    app.add_api_route("/sandboxes/{sandbox_id}/timeout", set_timeout, methods=["POST"])

    async def pause(request: Request, sandbox_id: str) -> Response:
        user = caller(request)
        body: PauseBody = await parse(request, PauseBody)
        body.refuse_unknown()
        if not body.memory:
            raise BadRequest("kiln does not support memory=false (a filesystem-only pause)")
        if not await e2b.pause(user, sandbox_id):
            return error(409, f"sandbox {sandbox_id} is already paused")
        return Response(status_code=204)

    app.add_api_route("/sandboxes/{sandbox_id}/pause", pause, methods=["POST"])

    async def metrics(request: Request, sandbox_id: str) -> JSONResponse:
        return JSONResponse(e2b.metrics(caller(request), sandbox_id))

    app.add_api_route("/sandboxes/{sandbox_id}/metrics", metrics, methods=["GET"])

    async def unknown(request: Request, rest: str) -> Response:
        caller(request)
        return error(501, f"kiln's E2B API does not offer {request.method} /{rest}")

    app.add_api_route("/{rest:path}", unknown, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    return app
