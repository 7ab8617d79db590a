"""E2B sandboxes: kiln sandboxes made through the E2B API, with a lease, metadata and an envd token.

An E2B sandbox is an ordinary kiln sandbox (its id is the E2B sandboxID, its owner the API key's
user) plus a record: the template it was asked for, free-form metadata, when its lease ends and what
happens then (kill, or pause = kiln's stop to disk). E2B's "paused" is kiln's stopped; kiln's own
warm pause is invisible to E2B clients. The envd access token is derived from the sandbox id with a
key of the daemon's, so it is never stored; the store keeps only its hash, to find a sandbox by token.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..config import E2bConfig
from ..core.errors import BadRequest, NotFound, Unavailable
from ..core.lifecycle import CreateRequest, SandboxService
from ..core.ratelimit import UserRateLimits
from ..fileio import key_file
from ..states import Status
from ..store.db import E2bRecord, SandboxRow, Store, User

log = logging.getLogger("kiln.e2b")

ENVD_VERSION = "0.5.7"  # what the SDKs gate features on; raise it as envd features land
# E2B template names with an image of kiln's own; any other name is a kiln template or image
TEMPLATE_IMAGES = {"base": "e2b-base", "code-interpreter-v1": "e2b-code-interpreter"}
# templates whose server must listen before a create returns (E2B's templates have a ready check)
READY_PORTS = {"code-interpreter-v1": 49999}
READY_TIMEOUT = 120.0
DEFAULT_TIMEOUT = 15  # seconds: E2B's spec default (the SDKs send 300)
NEVER = 1e18  # a paused sandbox's lease: it waits for a connect


@dataclass
class E2bSandbox:
    row: SandboxRow
    record: E2bRecord

    @property
    def state(self) -> str:
        return "paused" if self.row.status == Status.STOPPED else "running"


class TokenKey:
    """The daemon's key for envd tokens (data_dir/e2b.key, made once, root-only)."""

    def __init__(self, path: Path):
        self.key = key_file(path, lambda: secrets.token_bytes(32))

    def token(self, sandbox_id: str) -> str:
        return hmac.new(self.key, sandbox_id.encode(), hashlib.sha256).hexdigest()


RFC3339 = "%Y-%m-%dT%H:%M:%S.%fZ"  # the store's timestamps (store.db.now)


def rfc3339(unix: float) -> str:
    return datetime.fromtimestamp(min(unix, 253402300799), UTC).strftime(RFC3339)  # NEVER: year 9999


def unix_of(text: str) -> float:
    return datetime.strptime(text, RFC3339).replace(tzinfo=UTC).timestamp()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class E2bService:
    def __init__(
        self, store: Store, sandboxes: SandboxService, config: E2bConfig, rate_limits: UserRateLimits, key_path: Path
    ):
        self.store = store
        self.sandboxes = sandboxes
        self.config = config
        self.rate_limits = rate_limits
        self.tokens = TokenKey(key_path)
        self.reaper: asyncio.Task | None = None
        self.cpu_seen: dict[str, tuple[float, float]] = {}  # sandbox -> (when, its CPU seconds then)
        self.domain = ""  # domain mode's (app.py: the config's, else what `kiln e2b setup` recorded)
        self.control_app: Any = None  # the ASGI apps the gateway hands E2B's requests to (app.py sets them)
        self.envd_app: Any = None

    def sandboxes_rate_ok(self, user: User, klass: str) -> bool:
        return self.rate_limits.allow_class(user.id, klass)

    # ------------------------------------------------------------ lookups

    def envd_token(self, sandbox_id: str) -> str:
        return self.tokens.token(sandbox_id)

    def by_id(self, sandbox_id: str) -> E2bSandbox | None:
        """Any owner's E2B sandbox that is neither being made nor being destroyed."""
        record = self.store.e2b_record(sandbox_id)
        row = self.store.sandbox_by_id(sandbox_id) if record else None
        if record is None or row is None or row.status in (Status.CREATING, Status.DESTROYING):
            return None
        return E2bSandbox(row, record)

    def by_token(self, token: str) -> E2bSandbox | None:
        """The sandbox an envd token opens (any owner's: the token is the credential)."""
        record = self.store.e2b_by_token_hash(token_hash(token)) if token else None
        sb = self.by_id(record.sandbox_id) if record else None
        if sb is None or not hmac.compare_digest(self.envd_token(sb.row.id), token):
            return None
        return sb

    def get(self, user: User, sandbox_id: str) -> E2bSandbox:
        sb = self.by_id(sandbox_id)
        if sb is None or sb.row.owner_id != user.id:
            raise NotFound(f"sandbox {sandbox_id} not found")
        return sb

    def list(self, user: User) -> builtins.list[E2bSandbox]:
        out = []
        for record in self.store.e2b_records(user.id):
            row = self.store.sandbox_by_id(record.sandbox_id)
            if row is not None and row.status not in (Status.CREATING, Status.DESTROYING):
                out.append(E2bSandbox(row, record))
        return out

    # ------------------------------------------------------------ lifecycle

    def lease(self, timeout: int | None) -> float:
        seconds = DEFAULT_TIMEOUT if timeout is None else timeout
        if not 0 <= seconds <= self.config.max_lease:
            raise BadRequest(f"timeout must be between 0 and {int(self.config.max_lease)} seconds")
        return time.time() + seconds

    def create_request(self, user: User, template: str, env: dict[str, str], internet: bool) -> CreateRequest:
        """The kiln create for an E2B template: E2B's own names, else a kiln template, else an image."""
        req = CreateRequest(
            name=f"e2b-{secrets.token_hex(6)}",
            env=env,
            keep_hot=self.config.keep_hot,
            net_policy=None if internet else {"default": "deny"},
        )
        if template in TEMPLATE_IMAGES:
            req.image = TEMPLATE_IMAGES[template]
        elif self.sandboxes.store.get_template(user.id, template) is not None:
            req.template_id = template
        else:
            try:
                self.sandboxes.images.resolve(user, template)
            except NotFound:
                raise NotFound(f"template '{template}' not found")
            req.image = template
        return req

    async def create(
        self,
        user: User,
        template: str,
        timeout: int | None,
        metadata: dict[str, str],
        env: dict[str, str],
        on_timeout: str,
        internet: bool,
        auto_resume: bool,
        route: str = "",
    ) -> E2bSandbox:
        end_at = self.lease(timeout)
        row, _ = await self.sandboxes.create(user, self.create_request(user, template, env, internet))
        token = token_hash(self.envd_token(row.id))
        record = E2bRecord(row.id, template, metadata, end_at, on_timeout, auto_resume, token)
        try:
            self.store.insert_e2b(record)
            if template in READY_PORTS:
                await self.wait_listening(row, READY_PORTS[template])
        except BaseException:
            await self.sandboxes.destroy_row(row)
            raise
        log.info("e2b sandbox %s created from template %s (%s)", row.id, template, route)
        return E2bSandbox(row, record)

    async def wait_listening(self, row: SandboxRow, port: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        async with self.sandboxes.using(row) as handle:
            while not any(p["port"] == port for p in await handle.agent.ports()):
                if time.monotonic() > deadline:
                    raise Unavailable(f"the template's server did not listen on port {port} in time")
                await asyncio.sleep(0.1)

    async def connect(self, user: User, sandbox_id: str, timeout: int | None) -> tuple[E2bSandbox, bool]:
        """Resume a paused sandbox (True) or extend a running one's lease (never shortens it)."""
        sb = self.get(user, sandbox_id)
        end_at = self.lease(timeout)
        resumed = sb.state == "paused"
        if resumed:
            await self.sandboxes.start(user, sandbox_id)
        if resumed or end_at > sb.record.end_at:
            self.store.set_e2b_lease(sandbox_id, end_at)
        return self.get(user, sandbox_id), resumed

    async def set_timeout(self, user: User, sandbox_id: str, timeout: int) -> None:
        sb = self.get(user, sandbox_id)
        self.store.set_e2b_lease(sb.row.id, self.lease(timeout))

    async def kill(self, user: User, sandbox_id: str) -> None:
        await self.sandboxes.destroy_row(self.get(user, sandbox_id).row)

    async def pause(self, user: User, sandbox_id: str) -> bool:
        """Stop to disk; False when it is paused already."""
        sb = self.get(user, sandbox_id)
        if sb.state == "paused":
            return False
        await self.sandboxes.stop(user, sandbox_id)
        self.store.set_e2b_lease(sandbox_id, NEVER)
        return True

    def metrics(self, user: User, sandbox_id: str) -> builtins.list[dict]:
        """One sample now (E2B's SandboxMetric): CPU since the last sample (or since boot), memory, disk."""
        sb = self.get(user, sandbox_id)
        usage = self.sandboxes.engine.usage(sb.row.id) if sb.state == "running" else None
        if usage is None:
            return []
        now = time.time()
        then, cpu_then = self.cpu_seen.get(sb.row.id, (unix_of(sb.row.created_at), 0.0))
        self.cpu_seen[sb.row.id] = (now, usage.cpu_seconds)
        pct = 100 * (usage.cpu_seconds - cpu_then) / max(now - then, 1e-3) / max(sb.row.cpus, 0.01)
        return [
            {
                "timestamp": rfc3339(now),
                "timestampUnix": int(now),
                "cpuCount": max(1, round(sb.row.cpus)),
                "cpuUsedPct": round(min(max(pct, 0.0), 100.0), 2),
                "memUsed": usage.memory_bytes,
                "memTotal": sb.row.memory_mb << 20,
                "memCache": 0,
                "diskUsed": usage.disk_used_bytes,
                "diskTotal": usage.disk_total_bytes,
            }
        ]

    async def forget_destroyed(self, sandbox_id: str) -> None:
        self.cpu_seen.pop(sandbox_id, None)

    # ------------------------------------------------------------ leases

    def start(self) -> None:
        self.reaper = asyncio.create_task(self.reap_loop())

    async def stop(self) -> None:
        if self.reaper is not None:
            self.reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reaper

    async def reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.lease_tick)
            try:
                await self.reap_expired()
            except Exception:  # one bad tick must not end the loop
                log.exception("e2b lease check failed")

    async def reap_expired(self) -> None:
        """Sandboxes whose lease has ended are killed, or paused when they asked for that."""
        for record in self.store.expired_e2b(time.time()):
            row = self.store.sandbox_by_id(record.sandbox_id)
            if row is None or row.status in (Status.CREATING, Status.DESTROYING):
                continue
            try:
                if record.on_timeout == "pause" and row.status != Status.STOPPED:
                    await self.sandboxes.snapshot(row, reason="lease")
                    self.store.set_e2b_lease(row.id, NEVER)
                    log.info("e2b sandbox %s paused: its lease ended", row.id)
                else:
                    await self.sandboxes.destroy_row(row)
                    log.info("e2b sandbox %s killed: its lease ended", row.id)
            except Exception as e:  # tried again a minute later, not every tick
                log.error("e2b sandbox %s: ending its lease failed: %s", row.id, e)
                self.store.set_e2b_lease(row.id, time.time() + 60)
