"""Host ports forwarded into sandboxes on request (bhatti's `forward`).

`POST /sandboxes/:id/forward {"guest_port", "host_port"}` listens on `ports.host_bind`:host_port (any
free port for 0) and relays each connection to guest_port, waking the sandbox first; it lasts until
DELETE or the sandbox is destroyed, and a daemon restart reopens it (kept in the store). Unlike the
automatic host_port of a listening port, it exists before anything listens in the sandbox.
"""

from __future__ import annotations

import logging

from ..config import PortsConfig
from ..store.db import User
from .errors import BadRequest, Conflict, TooManyRequests
from .lifecycle import SandboxService
from .ports import PortRelay
from .upstream import Upstreams

log = logging.getLogger("kiln.forwards")

MIN_HOST_PORT = 1024  # the host's own services live below


class ForwardService:
    def __init__(self, sandboxes: SandboxService, upstreams: Upstreams, config: PortsConfig, max_per_sandbox: int):
        self.sandboxes = sandboxes
        self.store = sandboxes.store
        self.upstreams = upstreams
        self.config = config
        self.max_per_sandbox = max_per_sandbox
        self.relays: dict[str, list[PortRelay]] = {}

    async def start(self) -> None:
        """Reopen the stored forwards on their host ports (one whose port is taken now is dropped)."""
        for sandbox_id, host_port, guest_port in self.store.forwards():
            try:
                await self.open(sandbox_id, guest_port, host_port)
            except OSError as e:
                log.error("forward of host port %d to %s:%d not reopened: %s", host_port, sandbox_id, guest_port, e)
                self.store.delete_forward(host_port)

    async def stop(self) -> None:
        for relays in self.relays.values():
            for r in relays:
                await r.close()

    async def open(self, sandbox_id: str, guest_port: int, host_port: int) -> PortRelay:
        relay = PortRelay(self.upstreams, sandbox_id, guest_port)
        await relay.open(self.config.host_bind, host_port, exact=True)
        self.relays.setdefault(sandbox_id, []).append(relay)
        return relay

    async def add(self, user: User, id_or_name: str, guest_port: object, host_port: object) -> PortRelay:
        row = self.sandboxes.get(user, id_or_name)
        if not isinstance(guest_port, int) or isinstance(guest_port, bool) or not 1 <= guest_port <= 65535:
            raise BadRequest("guest_port must be 1-65535")
        if host_port is None:
            host_port = 0
        if not isinstance(host_port, int) or isinstance(host_port, bool):
            raise BadRequest("host_port must be an integer (0: any free port)")
        if host_port != 0 and not MIN_HOST_PORT <= host_port <= 65535:
            raise BadRequest(f"host_port must be 0 or {MIN_HOST_PORT}-65535")
        if len(self.relays.get(row.id, [])) >= self.max_per_sandbox:
            raise TooManyRequests(f"forward limit reached ({self.max_per_sandbox} per sandbox)")
        try:
            relay = await self.open(row.id, guest_port, host_port)
        except OSError as e:
            raise Conflict(f"host port {host_port} is not free: {e.strerror or e}") from e
        if self.store.sandbox_by_id(row.id) is None:  # destroyed meanwhile
            await self.forget(row.id)
            raise Conflict(f'sandbox "{id_or_name}" was destroyed')
        self.store.insert_forward(row.id, relay.host_port, guest_port)
        log.info("forwarding host port %d to %s:%d", relay.host_port, row.id, guest_port)
        return relay

    def listing(self, user: User, id_or_name: str) -> list[PortRelay]:
        return list(self.relays.get(self.sandboxes.get(user, id_or_name).id, []))

    async def close(self, user: User, id_or_name: str) -> int:
        row = self.sandboxes.get(user, id_or_name)
        n = len(self.relays.get(row.id, []))
        await self.forget(row.id)
        return n

    async def forget(self, sandbox_id: str) -> None:
        for relay in self.relays.pop(sandbox_id, []):
            await relay.close()
        self.store.delete_forwards(sandbox_id)

    def host_addr(self, relay: PortRelay) -> str:
        return f"{self.config.host_bind}:{relay.host_port}"
