"""Routes: GET /images, GET/DELETE /images/:name, POST /images/import?name=N (the archive as the
body), POST /images/build?name=N (a build context tar; the log streams as NDJSON), POST
/sandboxes/:id/save-image {"name"}; POST /images/pull is refused (kiln reaches no registry)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, StrictStr

from ..core.errors import NotImplementedYet
from ..store.db import User
from .auth import require_user
from .deps import services
from .models import ImageOut, StatusOut

router = APIRouter()


class SaveBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr = ""


def declared_length(request: Request) -> int | None:
    length = request.headers.get("content-length")
    return int(length) if length is not None and length.isdigit() else None


@router.get("/images", response_model=list[ImageOut], response_model_exclude_none=True)
async def list_images(request: Request, user: User = Depends(require_user)):
    """The built-in images (with their build status) and the caller's own."""
    return services(request).images.list(user)


@router.get("/images/{name}", response_model=ImageOut, response_model_exclude_none=True)
async def get_image(name: str, request: Request, user: User = Depends(require_user)):
    return services(request).images.get(user, name)


@router.delete("/images/{name}", response_model=StatusOut)
async def delete_image(name: str, request: Request, user: User = Depends(require_user)):
    """409 while a sandbox, template or snapshot of the caller's uses it; built-in ones are read-only."""
    await services(request).images.delete(user, name)
    return {"status": "deleted"}


@router.post("/images/import", status_code=201, response_model=ImageOut, response_model_exclude_none=True)
async def import_image(request: Request, name: str = "", user: User = Depends(require_user)):
    """The body is a `docker save` tarball, an OCI image-layout tar or a root filesystem tar."""
    images = services(request).images
    return await images.import_archive(user, name, request.stream(), declared_length(request))


@router.post("/images/build", response_class=StreamingResponse)
async def build_image(request: Request, name: str = "", dockerfile: str = "", user: User = Depends(require_user)):
    """Build an image from a Dockerfile in the body's build context (a tar; `dockerfile` names the
    Dockerfile in it, default `Dockerfile`). The log streams as NDJSON: `build`, then per step
    `step` ({n, of, instruction, cached}) and its `stdout`/`stderr` lines, then `done` (with the
    image) or `error` (with the step's exit code). A Dockerfile that cannot build is a 4xx at once."""
    build = await services(request).builds.prepare(user, name, dockerfile, request.stream(), declared_length(request))

    async def lines():
        async for event in build.run():
            yield (json.dumps(event) + "\n").encode()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.post("/images/pull", include_in_schema=False)
async def pull_image(user: User = Depends(require_user)):
    raise NotImplementedYet(
        "pulling from a registry: kiln reaches no registry; `docker save` (or skopeo copy to an "
        "oci-archive) and POST /images/import?name=N instead"
    )


@router.post("/sandboxes/{sandbox_id}/save-image", status_code=201, response_model=ImageOut)
async def save_image(sandbox_id: str, body: SaveBody, request: Request, user: User = Depends(require_user)):
    """The sandbox's root disk as a new image; the sandbox keeps running (paused for its disk clone)."""
    svc = services(request)
    return await svc.images.save(user, svc.sandboxes.get(user, sandbox_id), body.name)
