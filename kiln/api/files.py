"""Routes: GET/PUT/HEAD /sandboxes/:id/files?path=… (raw bytes; `ls=true` lists a directory)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from ..core.errors import BadRequest
from ..store.db import User
from .auth import require_user
from .deps import services
from .models import FileEntryOut, StatusOut

router = APIRouter()
PSEUDO_FILESYSTEMS = ("/proc/", "/sys/")


def int_param(request: Request, name: str) -> int:
    value = request.query_params.get(name, "")
    try:
        return max(0, int(value)) if value else 0
    except ValueError:
        raise BadRequest(f"{name} must be an integer")


def parse_mode(value: str | None) -> int:
    if not value:
        return 0o644
    try:
        mode = int(value, 8)
    except ValueError:
        raise BadRequest("mode must be octal, e.g. 0644")
    if not 0 < mode <= 0o7777:
        raise BadRequest("mode must be octal, e.g. 0644")
    return mode


# HEAD before GET: Starlette's GET routes answer HEAD too
@router.head("/sandboxes/{sandbox_id}/files")
async def stat_file(sandbox_id: str, request: Request, path: str = "", user: User = Depends(require_user)):
    info = await services(request).files.stat(user, sandbox_id, path)
    return Response(
        headers={
            "X-File-Size": str(info["size"]),
            "X-File-Mode": info["mode"],
            "X-File-IsDir": "true" if info["is_dir"] else "false",
        }
    )


@router.get("/sandboxes/{sandbox_id}/files", response_model=list[FileEntryOut])
async def read_file(sandbox_id: str, request: Request, path: str = "", user: User = Depends(require_user)):
    files = services(request).files
    if request.query_params.get("ls") == "true":
        return await files.ls(user, sandbox_id, path)
    offset, limit, max_bytes = (int_param(request, k) for k in ("offset", "limit", "max_bytes"))
    info, chunks = await files.read(user, sandbox_id, path, offset, limit, max_bytes)
    headers = {"X-File-Size": str(info["size"])}
    if not (offset or limit or max_bytes) and not path.startswith(PSEUDO_FILESYSTEMS):
        headers["Content-Length"] = str(info["size"])  # /proc and /sys report sizes that are not their content
    return StreamingResponse(chunks, media_type="application/octet-stream", headers=headers)


@router.put("/sandboxes/{sandbox_id}/files", response_model=StatusOut, response_model_exclude_none=True)
async def write_file(
    sandbox_id: str, request: Request, path: str = "", mode: str | None = None, user: User = Depends(require_user)
):
    length = request.headers.get("content-length")
    if length is None or not length.isdigit() or "chunked" in request.headers.get("transfer-encoding", ""):
        raise BadRequest("Content-Length header required for file upload")
    await services(request).files.write(user, sandbox_id, path, int(length), parse_mode(mode), request.stream())
    return {"status": "ok"}
