"""Maps kiln's exceptions and the framework's own errors to `{"error": ...}` JSON with the right status."""

from __future__ import annotations

import logging
import secrets

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.errors import Internal, KilnError
from .auth import bearer_key
from .deps import services

log = logging.getLogger("kiln.api")


def error(status: int, message: str, headers: dict[str, str] | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def describe_validation(exc: RequestValidationError) -> str:
    errs = exc.errors()
    for e in errs:
        if e.get("type") == "json_invalid":
            return f"invalid json: {e.get('ctx', {}).get('error', e.get('msg'))}"
    parts = []
    for e in errs:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        if e.get("type") == "missing" and not loc:
            return "invalid json: request body required"
        parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg')}")
    return "invalid request: " + "; ".join(parts)


def authenticated(request: Request) -> bool:
    key = bearer_key(request)
    return bool(key) and services(request).store.user_by_key(key) is not None


def install(app: FastAPI) -> None:
    @app.exception_handler(KilnError)
    async def kiln_error(request: Request, exc: KilnError):
        if isinstance(exc, Internal):
            request_id = "req_" + secrets.token_hex(8)
            log.error("%s %s failed (%s): %s", request.method, request.url.path, request_id, exc.cause)
            return error(500, "internal error", request_id=request_id)
        return error(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return error(400, describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404 and not authenticated(request):
            # Like bhatti, auth comes before routing: a path that matches nothing (`/health/../sandboxes`)
            # tells an anonymous caller nothing but "authorization required".
            return error(401, "authorization required")
        messages = {404: "not found", 405: "method not allowed"}
        return error(exc.status_code, messages.get(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def unhandled(request: Request, exc: Exception):
        request_id = "req_" + secrets.token_hex(8)
        log.exception("%s %s crashed (%s)", request.method, request.url.path, request_id)
        return error(500, "internal error", request_id=request_id)
