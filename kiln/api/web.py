"""The web page at / and its static files under /static/* (no auth to load: the page asks for a key),
and /docs, a plain page over /openapi.json that needs nothing from the internet."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parents[1] / "web" / "static"

router = APIRouter(include_in_schema=False)
static_files = StaticFiles(directory=STATIC)


@router.get("/")
async def index():
    return FileResponse(STATIC / "index.html")


@router.get("/docs")
async def docs():
    return FileResponse(STATIC / "docs.html")
