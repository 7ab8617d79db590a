"""Builds the HTTP app and runs what lives beside it: the store, the engine, background loops."""

from __future__ import annotations

import contextlib
import logging
import time

from fastapi import FastAPI

from . import __version__
from .api import (
    errors,
    exec as exec_api,
    files as files_api,
    forwards as forwards_api,
    health,
    images as images_api,
    ports as ports_api,
    proxy as proxy_api,
    publish as publish_api,
    sandboxes as sandboxes_api,
    secrets as secrets_api,
    sessions as sessions_api,
    snapshots as snapshots_api,
    templates as templates_api,
    terminal as terminal_api,
    volumes as volumes_api,
    web,
    web_shell as web_shell_api,
)
from .api.auth import CommonHeaders
from .api.deps import Services
from .api.public import PublicLimits, PublicProxy
from .config import Config
from .core.builds import BuildService
from .core.checkpoints import CheckpointService
from .core.events import SandboxEvents
from .core.exec import ExecService
from .core.files import FileService
from .core.forks import ForkService
from .core.forwards import ForwardService
from .core.http_pools import HttpPools
from .core.images import ImageService
from .core.lifecycle import SandboxService
from .core.pools import PoolService
from .core.ports import PortTracker
from .core.publish import PublishService
from .core.ratelimit import UserRateLimits
from .core.runtime import Runtimes
from .core.secrets import SecretBox, SecretService
from .core.templates import TemplateService
from .core.terminal import TerminalService
from .core.thermal import ThermalPolicy
from .core.upstream import Upstreams
from .core.users import ensure_admin
from .core.volumes import VolumeService
from .core.web_shell import WebShellService
from .e2b import control as e2b_control
from .e2b.envd import build_envd
from .e2b.gateway import E2bGateway
from .e2b.processes import ProcessTable, Watchers
from .e2b.sandboxes import E2bService
from .e2b.tls import tls_files
from .engine import make_engine
from .engine.gvisor.reaper import become_subreaper
from .store.db import Store

log = logging.getLogger("kiln")


def openapi_with_unique_ids(app: FastAPI) -> dict:
    """FastAPI names operations by route, so routes taking several methods (the proxy) would share
    one operationId; name each by method and path instead, which is unique by construction."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path, ops in spec["paths"].items():
            slug = path.strip("/").replace("/", "_").replace("{", "").replace("}", "") or "root"
            for method, op in ops.items():
                op["operationId"] = f"{method}_{slug}"
        app.openapi_schema = spec
    return app.openapi_schema


def build_app(config: Config) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        config.data_dir.mkdir(parents=True, exist_ok=True)
        config.data_dir.chmod(0o700)
        become_subreaper()
        store = Store(config.data_dir / "state.db")
        if ensure_admin(store, config):
            log.info("created the admin user; its API key is in %s", config.data_dir / "admin.token")
        engine = make_engine(config)
        secrets = SecretService(store, SecretBox(config.data_dir / "secret.key"))
        volumes = VolumeService(store, config.data_dir, config.limits.max_volume_storage_mb)
        runtimes = Runtimes()
        images = ImageService(store, engine, config, runtimes)
        templates = TemplateService(store, images, config.limits.max_warm_pool)
        events = SandboxEvents()
        sandboxes = SandboxService(store, engine, config, secrets, volumes, templates, runtimes, events, images)
        upstreams = Upstreams(sandboxes)
        http_pools = HttpPools(sandboxes, upstreams)
        ports = PortTracker(sandboxes, upstreams, config.ports, config.limits.max_ports_per_sandbox)
        forwards = ForwardService(sandboxes, upstreams, config.ports, config.limits.max_ports_per_sandbox)
        publish = PublishService(store, config)
        lim = config.limits
        # Who reacts to what: connections into a sandbox end before its checkpoint or destroy;
        # what is held for a destroyed sandbox is released.
        events.on_before_stop(upstreams.cut)
        events.on_before_stop(http_pools.forget)
        events.on_destroyed(ports.forget)
        events.on_destroyed(forwards.forget)
        events.on_destroyed(publish.forget_sandbox)
        await engine.start_engine()
        await images.start()  # built-in images still missing are built in the background
        builds = BuildService(sandboxes, images)
        await sandboxes.reconcile()
        await builds.start()  # after reconcile: the sandboxes of interrupted builds are destroyed
        checkpoints = CheckpointService(sandboxes)
        await checkpoints.start()
        pools = PoolService(checkpoints)
        await pools.start()  # members that came through a restart are kept, then every pool is topped up
        app.state.services = Services(
            store=store,
            sandboxes=sandboxes,
            exec=ExecService(sandboxes, config.limits),
            files=FileService(sandboxes),
            terminals=TerminalService(sandboxes),
            ports=ports,
            forwards=forwards,
            forks=ForkService(sandboxes),
            checkpoints=checkpoints,
            pools=pools,
            upstreams=upstreams,
            http_pools=http_pools,
            publish=publish,
            public_limits=PublicLimits(config.publish),
            rate_limits=UserRateLimits(
                *((r.burst, r.per_minute) for r in (lim.rate_create, lim.rate_exec, lim.rate_read))
            ),
            secrets=secrets,
            templates=templates,
            volumes=volumes,
            images=images,
            builds=builds,
            web_shells=WebShellService(sandboxes),
            started=time.monotonic(),
            server=config.server,
        )
        e2b_processes, e2b_watchers = ProcessTable(), Watchers()
        events.on_before_stop(e2b_processes.forget)  # envd's processes and watches end with a stop or destroy
        events.on_before_stop(e2b_watchers.forget)
        if config.e2b.enabled:
            e2b = E2bService(store, sandboxes, config.e2b, app.state.services.rate_limits, config.data_dir / "e2b.key")
            e2b.domain = config.e2b.domain or tls_files(config.data_dir).domain()
            e2b.control_app = e2b_control.build_app(e2b)
            e2b.envd_app = build_envd(sandboxes, e2b_processes, e2b_watchers, config.e2b.max_upload_bytes)
            events.on_destroyed(e2b.forget_destroyed)
            app.state.services.e2b = e2b
            e2b.start()
        await ports.start()
        await forwards.start()
        thermal = ThermalPolicy(config.thermal, sandboxes)
        thermal.start()
        log.info(
            "kiln %s listening on http://%s (admin token: %s)",
            __version__,
            config.listen,
            config.data_dir / "admin.token",
        )
        try:
            yield
        finally:
            await thermal.stop()
            if app.state.services.e2b is not None:
                await app.state.services.e2b.stop()
            await e2b_processes.close()
            await pools.close()
            await images.close()
            await ports.stop()
            await forwards.stop()
            if config.thermal.snapshot_on_shutdown:
                await sandboxes.shutdown()
            await engine.close_engine()
            store.close()

    app = FastAPI(
        redirect_slashes=False,  # a redirect would be built from the request's Host header (open redirect)
        title="kiln",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        description="Isolated Linux sandboxes: exec, files, terminals, ports, publish. Every route "
        "but /health takes `Authorization: Bearer <API key>`.",
    )
    app.openapi = lambda: openapi_with_unique_ids(app)  # type: ignore[method-assign]
    app.add_middleware(CommonHeaders, limits=config.server)
    app.add_middleware(PublicProxy)  # published hosts never reach the API
    # added last = outermost: E2B's hosts and paths never reach kiln's routes, limits or JSON handling
    app.add_middleware(E2bGateway)
    errors.install(app)
    for module in (
        health,
        sandboxes_api,
        exec_api,
        sessions_api,
        files_api,
        terminal_api,
        ports_api,
        forwards_api,
        publish_api,
        proxy_api,
        templates_api,
        secrets_api,
        volumes_api,
        images_api,
        snapshots_api,
        web_shell_api,
        web,
    ):
        app.include_router(module.router)
    app.mount("/static", web.static_files, name="static")
    return app
