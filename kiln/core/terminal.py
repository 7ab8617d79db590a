"""Terminals: which PTY session a client gets (the one it names, else the newest detached running
one, else a new login shell), and the connection to it while attached."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..agent import protocol as P
from ..agent.client import AgentClient, AgentConnection, AgentRequestError
from ..store.db import User
from .errors import BadRequest
from .lifecycle import SandboxService

SHELL_IDLE_SEC = 3600
MAX_ROWS_COLS = 1000


@dataclass
class Terminal:
    """An attached PTY session. Detach with close(): the shell keeps running."""

    session_id: str
    conn: AgentConnection

    async def read(self) -> bytes | None:
        """The next output bytes; None once the session's process has exited."""
        while True:
            ftype, data = await self.conn.read_frame()
            if ftype == P.STDOUT:
                return data
            if ftype == P.EXIT:
                return None

    async def write(self, data: bytes) -> None:
        if data:
            await self.conn.send(P.STDIN, data)

    async def resize(self, rows: int, cols: int) -> None:
        if not (0 < rows <= MAX_ROWS_COLS and 0 < cols <= MAX_ROWS_COLS):
            raise BadRequest(f"rows and cols must be 1-{MAX_ROWS_COLS}")
        await self.conn.send(P.RESIZE, json.dumps({"rows": rows, "cols": cols}).encode())

    async def close(self) -> None:
        await self.conn.close()


async def choose_session(agent: AgentClient, session: str | None, new: bool, rows: int, cols: int):
    if session:
        return await agent.attach({"session": session})
    if not new:
        candidates = [s for s in await agent.sessions() if s["tty"] and s["running"] and not s["attached"]]
        for s in sorted(candidates, key=lambda s: s["created_at"], reverse=True):
            try:
                return await agent.attach({"session": s["session_id"], "if_detached": True})
            except AgentRequestError:
                continue  # someone attached first
    return await agent.attach(
        {
            "tty": True,
            # no cwd: the agent starts shells in the image's working directory (or /workspace), with bash or sh
            "env": {"TERM": "xterm-256color"},
            "rows": rows,
            "cols": cols,
            "max_idle_sec": SHELL_IDLE_SEC,
        }
    )


class TerminalService:
    def __init__(self, sandboxes: SandboxService):
        self.sandboxes = sandboxes

    @contextlib.asynccontextmanager
    async def attach(
        self, user: User, id_or_name: str, session: str | None, new: bool, rows: int = 24, cols: int = 80
    ) -> AsyncIterator[Terminal]:
        """Attached for the block; the sandbox stays hot (in use) all that time."""
        async with self.sandboxes.using_named(user, id_or_name) as handle:
            info, conn = await choose_session(handle.agent, session, new, rows, cols)
            term = Terminal(info["session_id"], conn)
            try:
                yield term
            finally:
                await term.close()

    async def sessions(self, user: User, id_or_name: str) -> list[dict]:
        async with self.sandboxes.using_named(user, id_or_name) as handle:
            return await handle.agent.sessions()
