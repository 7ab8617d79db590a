"""Images: the built-in ones (built once per machine from recipes, in the background if missing)
and each user's own (imported from an archive, built from a Dockerfile, saved from a sandbox).

A user's image is a directory `<data_dir>/user-images/<id>/rootfs`, its row in the store holding
its name, size and config (env, workdir, user, start command). A row is stored `creating` before
its tree is made (the name is taken meanwhile) and `ready` after; a crash leaves a creating row,
removed with its directory at the next start. Built-in names are global and read-only; a user's
names are their own, and never a built-in's.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config
from ..engine.base import Engine, EngineError, ImageSpec
from ..images import archive
from ..images.builder import built, image_dir
from ..images.config import ImageConfig
from ..images.recipes import BUILTIN, DEFAULT_IMAGE, Recipe
from ..images.rootfs import ensure_mount_points, tree_size
from ..store.db import ImageRow, NameTaken, SandboxRow, Store, User, now
from .errors import (
    BadRequest,
    Conflict,
    Forbidden,
    InsufficientStorage,
    Internal,
    NotFound,
    RequestTimeout,
    TooLarge,
    TooManyRequests,
    Unavailable,
)
from .names import check_name
from .runtime import Runtimes

log = logging.getLogger("kiln.images")

RETRY_AFTER = "10"  # seconds, for a create that names a built-in image still being built
FREE_MARGIN = 256 << 20  # bytes left free on the server's disk after an import
WORK_WAIT = 600.0  # seconds an image job waits for a free slot before it is 503


@dataclass
class Builtin:
    recipe: Recipe
    path: Path
    status: str = "missing"  # missing, building, ready or failed
    progress: str = ""
    error: str = ""
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ResolvedImage:
    """What a sandbox gets from its image: the tree and defaults (engine), and env under its own."""

    name: str
    spec: ImageSpec
    env: dict[str, str]


class ImageService:
    def __init__(self, store: Store, engine: Engine, config: Config, runtimes: Runtimes):
        self.store = store
        self.engine = engine
        self.config = config
        self.runtimes = runtimes
        self.root = config.data_dir / "user-images"
        self.builtins = {n: Builtin(r, image_dir(config.image_root, r)) for n, r in BUILTIN.items()}
        self.build_tasks: builtins.list[asyncio.Task] = []
        self.build_procs: builtins.list[asyncio.subprocess.Process] = []
        self.jobs = asyncio.Semaphore(config.limits.max_image_jobs)
        self.busy_users: set[str] = set()

    # ------------------------------------------------------------ start-up and built-ins

    async def start(self, build_missing: bool = True) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        await asyncio.to_thread(self.remove_unfinished)
        for b in self.builtins.values():
            meta = built(b.path)
            if meta is not None:
                b.status, b.meta = "ready", meta
            elif build_missing:
                b.status = "building"
                self.build_tasks.append(asyncio.create_task(self.build_builtin(b)))

    async def close(self) -> None:
        """A build still running stops with the daemon (the next start builds it again)."""
        for proc in self.build_procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for t in self.build_tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(t, 30)

    async def build_builtin(self, b: Builtin) -> None:
        """Build in a process of its own (kiln/images/builder.py), its progress lines read as they come."""
        argv = [sys.executable, "-m", "kiln.images.builder", b.recipe.name, str(self.config.image_root)]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        self.build_procs.append(proc)
        assert proc.stdout is not None
        last = ""
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").strip()
            if line:
                last = b.progress = line
                log.info("image %s: %s", b.recipe.name, line)
        code = await proc.wait()
        self.build_procs.remove(proc)
        meta = built(b.path)
        if code == 0 and meta is not None:
            b.meta, b.status, b.progress = meta, "ready", ""
        else:
            b.status, b.error = "failed", last.removeprefix("E: ") or f"exit status {code}"
            log.error("building image %s failed: %s", b.recipe.name, b.error)

    def remove_unfinished(self) -> None:
        """Images a crash interrupted (a creating row or a directory no row names) go."""
        rows = {r.id: r for r in self.store.images()}
        for r in rows.values():
            if r.status != "ready":
                self.store.delete_image(r.id)
        for d in self.root.iterdir():
            row = rows.get(d.name)
            if row is None or row.status != "ready":
                log.warning("removing unfinished image %s", d)
                shutil.rmtree(d, ignore_errors=True)

    # ------------------------------------------------------------ lookups

    def tree(self, image_id: str) -> Path:
        return self.root / image_id / "rootfs"

    def describe_builtin(self, b: Builtin) -> dict:
        out = {
            "id": b.recipe.key,
            "name": b.recipe.name,
            "owner": "global",
            "source": "builtin",
            "status": b.status,
            "description": b.recipe.description,
            "size_mb": int(b.meta.get("size_bytes", 0)) >> 20,
            "created_at": b.meta.get("built_at", ""),
            "config": ImageConfig().to_json(),
        }
        if b.status == "building":
            out["progress"] = b.progress
        if b.status == "failed":
            out["error"] = b.error
        return out

    @staticmethod
    def describe(row: ImageRow) -> dict:
        return {
            "id": row.id,
            "name": row.name,
            "owner": row.owner_id,
            "source": row.source,
            "status": row.status,
            "size_mb": row.size_bytes >> 20,
            "created_at": row.created_at,
            "config": row.config,
        }

    def list(self, user: User) -> builtins.list[dict]:
        own = [self.describe(r) for r in self.store.images(user.id) if r.status == "ready"]
        return [*(self.describe_builtin(b) for b in self.builtins.values()), *own]

    def get(self, user: User, name: str) -> dict:
        if name in self.builtins:
            return self.describe_builtin(self.builtins[name])
        return self.describe(self.own(user, name))

    def own(self, user: User, name: str) -> ImageRow:
        row = self.store.image(user.id, name)
        if row is None or row.status != "ready":
            raise NotFound(f'image "{name}" not found')
        return row

    def resolve(self, user: User, name: str | None) -> ResolvedImage:
        """The image a sandbox named `name` (None or "": the default) runs; 404 if there is none,
        503 with Retry-After while a built-in one is still being built."""
        name = name or DEFAULT_IMAGE
        b = self.builtins.get(name)
        if b is not None:
            if b.status == "ready":
                r = b.recipe
                spec = ImageSpec(rootfs=str(b.path / "rootfs"), workdir=r.workdir, start=r.start)
                return ResolvedImage(name, spec, dict(r.env))
            if b.status == "failed":
                raise Unavailable(f'image "{name}" could not be built: {b.error}')
            step = f" ({b.progress})" if b.progress else ""
            raise Unavailable(f'image "{name}" is still being built{step}; retry shortly', {"Retry-After": RETRY_AFTER})
        row = self.own(user, name)
        cfg = ImageConfig.from_json(row.config)
        spec = ImageSpec(rootfs=str(self.tree(row.id)), user=cfg.user, workdir=cfg.workdir, start=tuple(cfg.start))
        return ResolvedImage(name, spec, dict(cfg.env))

    def check_exists(self, user: User, name: str | None) -> None:
        """A template may name an image still being built, but never one that does not exist."""
        if name and name not in self.builtins:
            self.own(user, name)

    # ------------------------------------------------------------ making and removing

    def check_new(self, user: User, name: object) -> str:
        name = check_name("image", name)
        if name in self.builtins:
            raise Conflict(f'image "{name}" is a built-in image')
        if self.store.image(user.id, name) is not None:
            raise Conflict(f'image "{name}" already exists')
        have, limit = len(self.store.images(user.id)), self.config.limits.max_images
        if have >= limit:
            raise TooManyRequests(f"image limit reached ({have}/{limit})")
        return name

    def storage_left(self, user: User) -> int:
        used = sum(r.size_bytes for r in self.store.images(user.id))
        return (self.config.limits.max_image_storage_mb << 20) - used

    @contextlib.asynccontextmanager
    async def job(self, user: User) -> AsyncIterator[None]:
        """One image job (import, build, save) per user at a time, upload included: a slow upload
        holds up only its own user."""
        if user.id in self.busy_users:
            raise TooManyRequests("another image import, build or save of yours is running", {"Retry-After": "5"})
        self.busy_users.add(user.id)
        try:
            yield
        finally:
            self.busy_users.discard(user.id)

    @contextlib.asynccontextmanager
    async def work(self) -> AsyncIterator[None]:
        """The disk-heavy part of a job (unpack, build steps, copy): `max_image_jobs` at once on the
        server; the others wait their turn, at most WORK_WAIT seconds (then 503)."""
        try:
            await asyncio.wait_for(self.jobs.acquire(), WORK_WAIT)
        except TimeoutError:
            raise Unavailable("the server is busy with other image jobs; retry later", {"Retry-After": "30"}) from None
        try:
            yield
        finally:
            self.jobs.release()

    async def make(self, user: User, name: str, source: str, fill: Callable[[Path], Awaitable[ImageConfig]]) -> dict:
        """Reserve the name, let fill() make the tree at the path it is given and return its config,
        then prepare and count it. On any failure nothing of the image is left."""
        image_id = secrets.token_hex(8)
        row = ImageRow(image_id, user.id, name, "creating", source, 0, {}, now())
        try:
            self.store.insert_image(row)
        except NameTaken:
            raise Conflict(f'image "{name}" already exists') from None
        directory = self.root / image_id
        try:
            directory.mkdir()
            config = await fill(directory / "rootfs")
            await asyncio.to_thread(ensure_mount_points, directory / "rootfs")
            size = await asyncio.to_thread(tree_size, directory / "rootfs")
            if size > self.storage_left(user):
                raise TooManyRequests(
                    f"image storage quota exceeded: {size >> 20} MB more asked, "
                    f"{self.config.limits.max_image_storage_mb} MB allowed per user"
                )
            self.store.finish_image(image_id, size, config.to_json())
        except BaseException:
            self.store.delete_image(image_id)
            await asyncio.to_thread(shutil.rmtree, directory, True)
            raise
        log.info("image %s (%s) of %s made by %s: %d MB", name, image_id, user.id, source, size >> 20)
        return self.describe(self.own(user, name))

    async def delete(self, user: User, name: str) -> None:
        if name in self.builtins:
            raise Forbidden(f'image "{name}" is built in and cannot be deleted')
        row = self.own(user, name)
        users = {k: v for k, v in self.store.image_users(user.id, name).items() if v}
        if users:
            what = ", ".join(f"{v} {k}" for k, v in users.items())
            raise Conflict(f'image "{name}" is in use ({what})')
        self.store.delete_image(row.id)
        await asyncio.to_thread(shutil.rmtree, self.root / row.id, True)

    # ------------------------------------------------------------ import

    async def import_archive(self, user: User, name: object, chunks: AsyncIterator[bytes], length: int | None) -> dict:
        name = self.check_new(user, name)
        cap = self.config.limits.max_import_bytes
        if length is not None and length > cap:
            raise TooLarge(f"image archive too large (max {cap} bytes)")
        async with self.job(user):
            incoming = self.root / f".incoming-{secrets.token_hex(8)}"
            incoming.mkdir()
            try:
                upload = incoming / "archive"
                await receive(chunks, upload, cap, self.config.server.body_idle_timeout)
                async with self.work():
                    budget = min(self.storage_left(user), self.disk_free() - FREE_MARGIN)
                    try:
                        measured = await asyncio.to_thread(archive.measure, upload, max(0, budget))
                    except archive.TooBig:
                        raise self.too_big(user) from None
                    except archive.BadArchive as e:
                        raise BadRequest(f"invalid image archive: {e}") from None

                    async def fill(rootfs: Path) -> ImageConfig:
                        try:
                            return await asyncio.to_thread(archive.unpack, upload, measured.format, incoming, rootfs)
                        except archive.BadArchive as e:
                            raise BadRequest(f"invalid image archive ({measured.format}): {e}") from None

                    return await self.make(user, name, "import", fill)
            finally:
                await asyncio.to_thread(shutil.rmtree, incoming, True)

    def too_big(self, user: User) -> Exception:
        if self.storage_left(user) < self.disk_free() - FREE_MARGIN:
            return TooManyRequests(
                f"image storage quota exceeded: this archive unpacks to more than the "
                f"{max(0, self.storage_left(user)) >> 20} MB left of {self.config.limits.max_image_storage_mb} MB"
            )
        free = self.disk_free() >> 20
        return InsufficientStorage(f"not enough disk space on the server for this image ({free} MB free)")

    def disk_free(self) -> int:
        return shutil.disk_usage(self.root).free

    # ------------------------------------------------------------ save a sandbox

    async def save(self, user: User, sandbox: SandboxRow, name: object) -> dict:
        """The sandbox's root disk as a new image (it keeps running); its image's config carries over."""
        name = self.check_new(user, name)
        base = self.config_of(user, sandbox.image)
        async with self.job(user), self.work():

            async def fill(rootfs: Path) -> ImageConfig:
                async with self.runtimes.lock(sandbox.id):
                    try:
                        await self.engine.export_rootfs(sandbox.id, rootfs)
                    except EngineError as e:
                        raise Internal(f"saving sandbox {sandbox.id} as an image: {e}") from e
                return base

            return await self.make(user, name, "save", fill)

    def config_of(self, user: User, name: str) -> ImageConfig:
        if name in self.builtins or not name:
            return ImageConfig()
        row = self.store.image(user.id, name)
        return ImageConfig.from_json(row.config if row else None)


async def receive(
    chunks: AsyncIterator[bytes],
    target: Path,
    cap: int,
    idle_timeout: float,
    what: str = "an image archive (docker save, OCI layout or rootfs tar)",
) -> int:
    """Write a request body to target as it arrives, never more than cap bytes (413 past it)."""
    size = 0
    started = time.monotonic()
    body = aiter(chunks)
    with open(target, "wb") as f:
        while True:
            try:  # a client that stops sending is cut off, never waited for
                chunk = await asyncio.wait_for(anext(body), idle_timeout)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise RequestTimeout(f"no body data for {idle_timeout:g} s: upload abandoned") from None
            size += len(chunk)
            if size > cap:
                raise TooLarge(f"request body too large (max {cap} bytes)")
            await asyncio.to_thread(f.write, chunk)
    if size == 0:
        raise BadRequest(f"the request body must be {what}")
    log.info("received an image archive of %d MB in %.1f s", size >> 20, time.monotonic() - started)
    return size
