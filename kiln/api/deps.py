"""The services the routes use, as one typed object (built in app.py's lifespan)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request, WebSocket

if TYPE_CHECKING:
    from ..config import ServerConfig
    from ..core.builds import BuildService
    from ..core.checkpoints import CheckpointService
    from ..core.exec import ExecService
    from ..core.files import FileService
    from ..core.forks import ForkService
    from ..core.forwards import ForwardService
    from ..core.http_pools import HttpPools
    from ..core.images import ImageService
    from ..core.lifecycle import SandboxService
    from ..core.pools import PoolService
    from ..core.ports import PortTracker
    from ..core.publish import PublishService
    from ..core.ratelimit import UserRateLimits
    from ..core.secrets import SecretService
    from ..core.templates import TemplateService
    from ..core.terminal import TerminalService
    from ..core.upstream import Upstreams
    from ..core.volumes import VolumeService
    from ..core.web_shell import WebShellService
    from ..e2b.sandboxes import E2bService
    from ..store.db import Store
    from .public import PublicLimits


@dataclass
class Services:
    store: Store
    sandboxes: SandboxService
    exec: ExecService
    files: FileService
    terminals: TerminalService
    ports: PortTracker
    forwards: ForwardService
    forks: ForkService
    checkpoints: CheckpointService
    pools: PoolService
    upstreams: Upstreams
    http_pools: HttpPools
    publish: PublishService
    public_limits: PublicLimits
    rate_limits: UserRateLimits
    secrets: SecretService
    templates: TemplateService
    volumes: VolumeService
    images: ImageService
    builds: BuildService
    web_shells: WebShellService
    started: float
    server: ServerConfig
    e2b: E2bService | None = None  # None: the E2B API is turned off


def services(conn: Request | WebSocket) -> Services:
    """FastAPI dependency (and plain helper for ASGI code): the app's services."""
    return services_of(conn.app)


def services_of(app: Any) -> Services:
    svc: Services = app.state.services
    return svc
