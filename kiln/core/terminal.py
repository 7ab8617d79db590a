"""Which PTY session a terminal client gets: the one it names, else the newest detached running
one (reattach), else a new login shell."""
from __future__ import annotations

from ..agent.client import AgentConnection, AgentRequestError
from ..store.db import User
from .sandboxes import SandboxService

SHELL_IDLE_SEC = 3600


class TerminalService:
    def __init__(self, sandboxes: SandboxService):
        self.sandboxes = sandboxes

    async def open(self, user: User, id_or_name: str, session: str | None, new: bool,
                   rows: int = 24, cols: int = 80) -> tuple[dict, AgentConnection]:
        async def choose(agent):
            if session:
                return await agent.attach({"session": session})
            if not new:
                candidates = [s for s in await agent.sessions()
                              if s["tty"] and s["running"] and not s["attached"]]
                for s in sorted(candidates, key=lambda s: s["created_at"], reverse=True):
                    try:
                        return await agent.attach({"session": s["session_id"], "if_detached": True})
                    except AgentRequestError:
                        continue  # someone attached first
            return await agent.attach({"tty": True, "cwd": "/workspace",  # the agent picks bash or sh
                                       "env": {"TERM": "xterm-256color"}, "rows": rows, "cols": cols,
                                       "max_idle_sec": SHELL_IDLE_SEC})

        return await self.sandboxes.with_agent(user, id_or_name, choose)
