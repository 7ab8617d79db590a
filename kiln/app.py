"""Builds the HTTP app and runs what lives beside it: the store, the engine, background loops."""
from __future__ import annotations

import contextlib
import logging
import time

from fastapi import FastAPI

from . import __version__
from .api import (errors, exec as exec_api, files as files_api, health, ports as ports_api, proxy as proxy_api,
                  publish as publish_api, sandboxes as sandboxes_api, secrets as secrets_api,
                  sessions as sessions_api, templates as templates_api, terminal as terminal_api,
                  volumes as volumes_api, web)
from .api.auth import CommonHeaders
from .api.proxy import HttpPools
from .api.public import PublicLimits, PublicProxy
from .config import Config
from .core.files import FileService
from .core.ports import PortTracker
from .core.publish import PublishService
from .core.ratelimit import UserRateLimits
from .core.sandboxes import SandboxService
from .core.secrets import SecretBox, SecretService
from .core.templates import TemplateService
from .core.terminal import TerminalService
from .core.upstream import Upstreams
from .core.users import ensure_admin
from .core.volumes import VolumeService
from .engine.gvisor.engine import GVisorEngine
from .engine.gvisor.reaper import become_subreaper
from .images.default import ensure_default_image
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
        ensure_default_image(config.image_root, log=log.info)
        store = Store(config.data_dir / "state.db")
        key = ensure_admin(store, config)
        if key:
            log.info("created the admin user; its API key is in %s", config.data_dir / "admin.token")
        engine = GVisorEngine(config.data_dir, config.image_root, config.network.subnet, config.runsc)
        app.state.secrets = secrets = SecretService(store, SecretBox(config.data_dir / "secret.key"))
        app.state.volumes = volumes = VolumeService(store, config.data_dir, config.limits.max_volume_storage_mb)
        app.state.templates = templates = TemplateService(store)
        sandboxes = SandboxService(store, engine, config, secrets, volumes, templates)
        sandboxes.after_destroy.append(volumes.release)
        await engine.start_engine()
        await sandboxes.reconcile()
        await volumes.release("")     # volumes left mounted for sandboxes that are gone
        await volumes.mount_all()     # before any sandbox can restore or boot
        app.state.store, app.state.engine, app.state.sandboxes = store, engine, sandboxes
        app.state.files = FileService(sandboxes)
        app.state.terminals = TerminalService(sandboxes)
        app.state.upstreams = upstreams = Upstreams(sandboxes)
        app.state.ports = ports = PortTracker(sandboxes, upstreams, config.ports)
        app.state.http_pools = HttpPools(app.state)
        app.state.publish = publish = PublishService(store, config)
        app.state.public_limits = PublicLimits(config.publish)
        lim = config.limits
        app.state.rate_limits = UserRateLimits(*((r.burst, r.per_minute) for r in
                                                 (lim.rate_create, lim.rate_exec, lim.rate_read)))
        sandboxes.after_destroy.append(publish.forget_sandbox)
        await ports.start()
        app.state.started = time.monotonic()
        sandboxes.thermal.start(sandboxes)
        log.info("kiln %s listening on http://%s (admin token: %s)", __version__, config.listen,
                 config.data_dir / "admin.token")
        try:
            yield
        finally:
            await sandboxes.thermal.stop()
            await ports.stop()
            if config.thermal.snapshot_on_shutdown:
                await sandboxes.shutdown()
            await engine.close_engine()
            store.close()

    app = FastAPI(title="kiln", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Isolated Linux sandboxes: exec, files, terminals, ports, publish. Every route "
                              "but /health takes `Authorization: Bearer <API key>`.")
    app.openapi = lambda: openapi_with_unique_ids(app)
    app.add_middleware(CommonHeaders)
    app.add_middleware(PublicProxy)  # added last = outermost: published hosts never reach the API
    errors.install(app)
    for module in (health, sandboxes_api, exec_api, sessions_api, files_api, terminal_api, ports_api,
                   publish_api, proxy_api, templates_api, secrets_api, volumes_api, web):
        app.include_router(module.router)
    app.mount("/static", web.static_files, name="static")
    return app
