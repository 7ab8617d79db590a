"""Web shell share links (bhatti's shell-token): a terminal in the browser for whoever holds the link.

`POST /sandboxes/:id/shell-token` makes a 64-hex token (its SHA-256 is stored; a new one replaces
the old); the link is `/_shell/<sandbox id>#token=<token>`: the token travels in the fragment, which
browsers never send to a server or put in a Referer. The page's WebSocket authenticates with its
first message. Every failure looks the same ("unauthorized"), so a link never tells whether a
sandbox exists. Revoking the token also ends the shells opened with it.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ..store.db import SandboxRow, User
from .errors import KilnError, TooManyRequests
from .lifecycle import SandboxService
from .ratelimit import KeyedLimiter

MAX_SHELLS_PER_SANDBOX = 5
ATTEMPTS_PER_SECOND = 10  # per client address, before any upgrade
AUTH_TIMEOUT = 10.0  # seconds the page has to send its token


class Unauthorized(KilnError):
    status = 401


class WebShellService:
    def __init__(self, sandboxes: SandboxService):
        self.sandboxes = sandboxes
        self.store = sandboxes.store
        self.attempts = KeyedLimiter(ATTEMPTS_PER_SECOND, ATTEMPTS_PER_SECOND * 60)
        self.live: dict[str, set[asyncio.Event]] = {}  # sandbox id -> a "revoked" event per open shell

    def issue(self, user: User, id_or_name: str) -> tuple[SandboxRow, str]:
        row = self.sandboxes.get(user, id_or_name)
        token = secrets.token_hex(32)
        self.store.set_shell_token(row.id, token)
        self.end_shells(row.id)  # opened with the old token, which no longer works
        return row, token

    def revoke(self, user: User, id_or_name: str) -> None:
        row = self.sandboxes.get(user, id_or_name)
        self.store.delete_shell_token(row.id)
        self.end_shells(row.id)

    def end_shells(self, sandbox_id: str) -> None:
        for revoked in self.live.pop(sandbox_id, set()):
            revoked.set()

    def allow_attempt(self, client_ip: str) -> bool:
        return self.attempts.take(client_ip)

    def authenticate(self, sandbox_id: str, token: object) -> tuple[User, SandboxRow]:
        """The sandbox's owner and row when the token is its current one; Unauthorized otherwise."""
        row = self.store.sandbox_by_id(sandbox_id) if isinstance(sandbox_id, str) else None
        if row is None or not isinstance(token, str) or not self.store.shell_token_matches(row.id, token):
            raise Unauthorized("unauthorized")
        owner = self.store.user_by_id(row.owner_id)
        if owner is None:
            raise Unauthorized("unauthorized")
        return owner, row

    @asynccontextmanager
    async def opened(self, sandbox_id: str) -> AsyncIterator[asyncio.Event]:
        """One open web shell for the block; the event is set when its token is revoked or replaced."""
        shells = self.live.setdefault(sandbox_id, set())
        if len(shells) >= MAX_SHELLS_PER_SANDBOX:
            raise TooManyRequests("too many sessions")
        revoked = asyncio.Event()
        shells.add(revoked)
        try:
            yield revoked
        finally:
            shells.discard(revoked)
            if not shells and self.live.get(sandbox_id) is shells:
                del self.live[sandbox_id]
