"""Listening ports of sandboxes, and the host_port relay that serves each one on the daemon host.

A background scan asks the agent of a hot sandbox which TCP ports listen (it never wakes a
sandbox, and scanning is not guest activity): every `scan_interval` while the sandbox is used, and
less and less often (up to `scan_max_interval`) while nobody uses it and nothing changes, so idle
sandboxes cost the daemon and their agents next to nothing. `/ports` scans on demand.
Each port seen gets a PortRelay: a listener on `ports.host_bind` that relays every connection to
that sandbox port, waking the sandbox first. The last scan and the host ports are kept in the
store, so after a daemon restart paused and cold sandboxes still list their ports and keep their
host ports (when those are still free).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from ..agent.client import AgentError
from ..config import PortsConfig
from ..store.db import SandboxRow, User
from ..tasks import cancel_and_wait
from .errors import KilnError
from .lifecycle import SandboxService
from .upstream import Upstreams

log = logging.getLogger("kiln.ports")

SCAN_TIMEOUT = 2.0
RELAY_IDLE_TIMEOUT = 600.0
CHUNK = 64 * 1024


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, idle: float) -> None:
    """Copy one direction until EOF or `idle` seconds without data, passing the half-close on."""
    try:
        while data := await asyncio.wait_for(reader.read(CHUNK), idle):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (TimeoutError, ConnectionError, OSError):
        writer.transport.abort()


async def relay(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    idle: float = RELAY_IDLE_TIMEOUT,
) -> None:
    """Bytes both ways until both directions are done (or one breaks); closes both."""
    try:
        await asyncio.gather(pipe(a[0], b[1], idle), pipe(b[0], a[1], idle))
    finally:
        for _, writer in (a, b):
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class PortRelay:
    """host_bind:host_port -> sandbox:container_port, one relay per connection (waking the sandbox).
    The host relays of listening ports and the forwards a user asks for are both such relays."""

    def __init__(self, upstreams: Upstreams, sandbox_id: str, container_port: int):
        self.upstreams = upstreams
        self.sandbox_id = sandbox_id
        self.container_port = container_port
        self.server: asyncio.Server | None = None
        self.host_port = 0

    async def open(self, host: str, wanted_port: int = 0, exact: bool = False) -> None:
        """Listen on wanted_port (any free port if 0). If it is taken: another port, or OSError if exact."""
        try:
            self.server = await asyncio.start_server(self.serve, host, wanted_port)
        except OSError:
            if not wanted_port or exact:
                raise
            self.server = await asyncio.start_server(self.serve, host, 0)  # the old port is taken
        self.host_port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        row = self.upstreams.sandboxes.store.sandbox_by_id(self.sandbox_id)
        try:
            if row is None:
                return
            async with self.upstreams.connection(row, self.container_port) as sock:
                upstream = await asyncio.open_connection(sock=sock)
                await relay((reader, writer), upstream)
        except KilnError as e:
            log.info("host port %d -> %s:%d: %s", self.host_port, self.sandbox_id, self.container_port, e.message)
        finally:
            writer.close()


def listening_ports(found: object) -> list[int]:
    """The valid ports of an agent's PORTS reply (anything else in it is ignored)."""
    if not isinstance(found, list):
        return []
    ports = {p.get("port") for p in found if isinstance(p, dict)}
    return sorted(p for p in ports if isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535)


@dataclass
class ScanSchedule:
    """When a sandbox's next background scan is due: `interval` after the last one, doubling while
    nothing changes and nobody uses the sandbox, back to the base interval on any use or change."""

    interval: float
    next_at: float = 0.0
    used_at_scan: float = 0.0  # the sandbox's host activity clock when it was last scanned

    def due(self, now: float, used: float) -> bool:
        # used since the last scan (an exec may have started a server): at this tick
        return used > self.used_at_scan or now >= self.next_at

    def scanned(self, now: float, used: float, changed: bool, base: float, most: float) -> None:
        self.interval = base if changed or used > self.used_at_scan else min(self.interval * 2, most)
        self.used_at_scan = used
        self.next_at = now + self.interval


class PortTracker:
    def __init__(self, sandboxes: SandboxService, upstreams: Upstreams, config: PortsConfig, max_ports: int):
        self.sandboxes = sandboxes
        self.store = sandboxes.store
        self.upstreams = upstreams
        self.config = config
        self.max_ports = max_ports  # relays per sandbox: each is a listening socket of the daemon's
        self.capped: set[str] = set()  # sandboxes told about the cap (once each)
        self.relays: dict[str, dict[int, PortRelay]] = {}
        self.schedules: dict[str, ScanSchedule] = {}
        self.task: asyncio.Task | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Reopen the relays of the last scan (same host ports where free), then scan periodically."""
        for sandbox_id, ports in self.store.sandbox_ports().items():
            await self.apply(sandbox_id, list(ports), wanted=ports)
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        await cancel_and_wait(self.task)
        for relays in self.relays.values():
            for r in relays.values():
                await r.close()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.config.scan_interval)
            now = time.monotonic()
            for sandbox_id in self.store.running_sandbox_ids():  # rows are read only for scans that are due
                if self.sandboxes.waker.is_warm(sandbox_id):
                    continue  # a frozen agent cannot answer; its wake is a use, which makes a scan due
                schedule = self.schedules.setdefault(sandbox_id, ScanSchedule(self.config.scan_interval))
                rt = self.sandboxes.runtimes.peek(sandbox_id)
                used = rt.last_activity if rt is not None else 0.0
                if not schedule.due(now, used):
                    continue
                row = self.store.sandbox_by_id(sandbox_id)
                try:
                    changed = row is not None and await self.scan(row)
                except Exception:
                    log.exception("port scan of %s failed", sandbox_id)
                    changed = False
                schedule.scanned(now, used, changed, self.config.scan_interval, self.config.scan_max_interval)

    async def forget(self, sandbox_id: str) -> None:
        self.capped.discard(sandbox_id)
        self.schedules.pop(sandbox_id, None)
        for relay in self.relays.pop(sandbox_id, {}).values():
            await relay.close()

    # ------------------------------------------------------------ scanning

    async def scan(self, row: SandboxRow) -> bool:
        """Ask a hot sandbox's agent for its ports (paused and cold sandboxes keep their last scan);
        True if they changed."""
        async with self.sandboxes.runtimes.lock(row.id):  # never while a pause or snapshot is under way
            handle = self.sandboxes.waker.hot_handle(self.store.sandbox_by_id(row.id))
            if handle is None:
                return False
            try:
                found = await asyncio.wait_for(handle.agent.ports(), SCAN_TIMEOUT)
            except (TimeoutError, AgentError):
                return False
        return await self.apply(row.id, listening_ports(found))

    async def apply(self, sandbox_id: str, ports: list[int], wanted: dict[int, int] | None = None) -> bool:
        """Make the relays match the listening ports: open new ones, close those that went away.
        True if they changed."""
        relays = self.relays.setdefault(sandbox_id, {})
        if len(ports) > self.max_ports:
            # the lowest ports get relays; thousands of listeners must not cost the daemon its fds
            if sandbox_id not in self.capped:
                self.capped.add(sandbox_id)
                log.warning(
                    "sandbox %s listens on %d ports: relaying the first %d", sandbox_id, len(ports), self.max_ports
                )
            ports = sorted(ports)[: self.max_ports]
        changed = False
        for port in ports:
            if port not in relays:
                relay = PortRelay(self.upstreams, sandbox_id, port)
                await relay.open(self.config.host_bind, (wanted or {}).get(port, 0))
                relays[port] = relay
                changed = True
        for port in [p for p in relays if p not in ports]:
            await relays.pop(port).close()
            changed = True
        if changed or wanted is not None:
            if self.store.sandbox_by_id(sandbox_id) is None:  # destroyed meanwhile
                await self.forget(sandbox_id)
                return False
            self.store.set_sandbox_ports(sandbox_id, {p: r.host_port for p, r in relays.items()})
        return changed

    # ------------------------------------------------------------ API

    def listing(self, sandbox_id: str) -> list[tuple[int, int]]:
        """[(container_port, host_port)] from the last scan."""
        return sorted((p, r.host_port) for p, r in self.relays.get(sandbox_id, {}).items())

    async def refresh(self, user: User, id_or_name: str) -> SandboxRow:
        """GET /sandboxes/:id/ports: wake the sandbox and scan it now (an agent that cannot answer
        leaves the last scan in place, as bhatti answers [] rather than an error)."""
        row = self.sandboxes.get(user, id_or_name)
        async with self.sandboxes.using(row) as handle:
            try:
                found = await asyncio.wait_for(handle.agent.ports(), SCAN_TIMEOUT)
            except (TimeoutError, AgentError) as e:
                log.warning("port scan of %s failed: %s", row.id, e)
                return row
        await self.apply(row.id, listening_ports(found))
        return row
