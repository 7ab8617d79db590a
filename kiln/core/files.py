"""Files inside a sandbox: read (whole or truncated), write (atomic), stat and list, all streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator

from ..store.db import User
from .errors import BadRequest
from .lifecycle import SandboxService
from .names import is_text

MAX_PATH = 4096  # PATH_MAX


class FileService:
    def __init__(self, sandboxes: SandboxService):
        self.sandboxes = sandboxes

    async def _call(self, user: User, id_or_name: str, path: str, op):
        if not path:
            raise BadRequest("path query parameter required")
        if not path.startswith("/"):
            raise BadRequest("path must be absolute")
        if "\x00" in path:
            raise BadRequest("path must not contain NUL characters")
        if len(path.encode(errors="replace")) > MAX_PATH or not is_text(path):
            raise BadRequest(f"path must be valid UTF-8 of at most {MAX_PATH} bytes")
        async with self.sandboxes.using_named(user, id_or_name) as handle:
            return await op(handle.agent)

    async def stat(self, user: User, id_or_name: str, path: str) -> dict:
        return await self._call(user, id_or_name, path, lambda agent: agent.stat(path))

    async def ls(self, user: User, id_or_name: str, path: str) -> list[dict]:
        return await self._call(user, id_or_name, path, lambda agent: agent.ls(path))

    async def read(
        self, user: User, id_or_name: str, path: str, offset: int, limit: int, max_bytes: int
    ) -> tuple[dict, AsyncIterator[bytes]]:
        return await self._call(user, id_or_name, path, lambda agent: agent.read(path, offset, limit, max_bytes))

    async def write(
        self, user: User, id_or_name: str, path: str, size: int, mode: int, chunks: AsyncIterator[bytes]
    ) -> None:
        await self._call(user, id_or_name, path, lambda agent: agent.write(path, size, mode, chunks))
