"""Dockerfile builds: `POST /images/build?name=N` with a build context tar.

The whole Dockerfile is checked first (instructions, FROM image, every COPY's sources): a build
that cannot work is a 4xx before anything runs. Then its steps run in a temporary kiln sandbox
started from the FROM image, so RUN is isolated by gVisor like any user code and uses the
sandbox's egress. After each step that changes files its tree is kept in the build cache, keyed by
the parent's key, the step and what it copies (core of kiln/images/dockerfile.py); a step found
there is not run, and the sandbox for the next step that must run starts from the cached tree.
The log streams as NDJSON events. A failed step fails the build: no image, no sandbox left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

from ..engine.base import ImageSpec
from ..images.config import ImageConfig
from ..images.context import BuildContext, Entry
from ..images.dockerfile import DockerfileError, Plan, Step, parse, step_key
from ..images.runtime import python_request
from ..proc import run
from ..store.db import SandboxRow, User
from .errors import BadRequest, KilnError, NotFound, TooLarge
from .images import ImageService, ResolvedImage, receive
from .lifecycle import CreateRequest, SandboxService

log = logging.getLogger("kiln.builds")

MAX_CACHE_ENTRIES = 200  # step trees kept (oldest go first); each shares unchanged files with its parent
BUILD_MEMORY_MB = 2048
CACHE_META = "step.json"
# Run by the runtime's python inside the build sandbox (any image, with or without a python):
# make directories and give copied paths their owner, resolving names in the image's own files.
PREPARE = """
import grp, json, os, pwd, sys
req = json.load(sys.stdin)
for d in req["dirs"]:
    os.makedirs(d, exist_ok=True)
user, _, group = (req.get("chown") or "0:0").partition(":")
uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
if group:
    gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
else:
    try:
        gid = pwd.getpwuid(uid).pw_gid
    except KeyError:
        gid = uid
for p in req["paths"]:
    os.lchown(p, uid, gid)
"""


class BuildFailed(Exception):
    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        self.exit_code = exit_code


class Build:
    """One build, checked and ready to run; run() streams its events and always cleans up."""

    def __init__(
        self,
        service: BuildService,
        user: User,
        name: str,
        plan: Plan,
        context: BuildContext,
        incoming: Path,
        stack: contextlib.AsyncExitStack,
    ):
        self.service, self.user, self.name, self.plan = service, user, name, plan
        self.context, self.incoming, self.stack = context, incoming, stack
        self.copies: dict[int, list[Entry]] = {}
        self.keys: dict[int, str] = {}
        self.sandbox: SandboxRow | None = None
        self.sandbox_tree = ""
        self.started = time.monotonic()

    def plan_keys(self, base_key: str) -> None:
        key = base_key
        for step in self.plan.steps:
            if step.copy is not None:
                entries = self.context.select(step.copy)
                self.copies[step.n] = entries
                key = step_key(key, step, self.context.digest(entries))
            elif step.changes_files:
                key = step_key(key, step)
            self.keys[step.n] = key

    async def run(self) -> AsyncIterator[dict]:
        svc = self.service
        steps = self.plan.steps
        tree = svc.base_tree(self.user, self.plan.base)
        cached_steps = 0
        cached = True
        try:
            yield {"type": "build", "image": self.name, "steps": len(steps)}
            await self.stack.enter_async_context(svc.images.work())  # released by cleanup, before the last event
            for step in steps:
                if step.changes_files:
                    hit = svc.cached_tree(self.keys[step.n])
                    cached = hit is not None
                if step.changes_files and cached:
                    tree = str(hit)
                cached_steps += cached
                yield {"type": "step", "n": step.n, "of": len(steps), "instruction": step.text, "cached": cached}
                if step.changes_files and not cached:
                    async for event in self.run_step(step, tree):
                        yield event
                    tree = await self.keep(step)
            image = await svc.images.make(self.user, self.name, "build", self.fill(tree))
            result = {
                "type": "done",
                "image": image,
                "steps": len(steps),
                "cached_steps": cached_steps,
                "seconds": round(time.monotonic() - self.started, 2),
            }
        except BuildFailed as e:
            result = {"type": "error", "error": str(e), "exit_code": e.exit_code}
        except (KilnError, DockerfileError) as e:
            result = {"type": "error", "error": getattr(e, "message", str(e)), "exit_code": None}
        except Exception as e:
            log.exception("build %s of %s failed", self.name, self.user.id)
            result = {"type": "error", "error": f"internal error ({type(e).__name__})", "exit_code": None}
        finally:
            await self.cleanup()  # before the last event: a client that goes on at once finds it all done
        yield result

    def fill(self, tree: str):
        """The final image: the last step's tree, every file a hard link to it (both are read-only),
        directories made anew with their owners, modes and times (cp -a)."""

        async def copy(rootfs: Path) -> ImageConfig:
            await run(["cp", "-al", tree, str(rootfs)], timeout=3600)
            return self.plan.final.config

        return copy

    def remaining(self) -> float:
        left = self.service.timeout - (time.monotonic() - self.started)
        if left <= 0:
            raise BuildFailed(f"the build took longer than {self.service.timeout:.0f} s")
        return left

    async def ensure_sandbox(self, tree: str) -> SandboxRow:
        """The build's sandbox, on `tree` (a new one when the tree under the old one is not it)."""
        if self.sandbox is not None and self.sandbox_tree == tree:
            return self.sandbox
        await self.drop_sandbox()
        svc = self.service
        image = ResolvedImage(self.plan.base, ImageSpec(rootfs=tree), {})
        memory = min(
            BUILD_MEMORY_MB, self.user.max_memory_mb_per_sandbox, svc.sandboxes.config.limits.max_memory_mb_per_sandbox
        )
        req = CreateRequest(name=f"build-{secrets.token_hex(4)}", keep_hot=True, memory_mb=memory)
        row, _ = await svc.sandboxes.create(self.user, req, image=image)
        svc.track(row)
        self.sandbox, self.sandbox_tree = row, tree
        return row

    async def run_step(self, step: Step, tree: str) -> AsyncIterator[dict]:
        row = await self.ensure_sandbox(tree)
        config = step.state.config
        async with self.service.sandboxes.using(row) as handle:
            if step.instruction == "RUN":
                request = {
                    "argv": step.argv,
                    "env": {**step.state.args, **config.env},
                    "cwd": config.workdir or "/",
                    "user": config.user or 0,
                    "timeout_sec": int(self.remaining()) + 1,
                }
                code = None
                async for ev in handle.agent.exec(request):
                    if ev.kind in ("stdout", "stderr"):
                        yield {"type": ev.kind, "n": step.n, "data": ev.data.decode("utf-8", errors="replace")}
                    elif ev.kind == "exit":
                        code = ev.exit_code
                        if ev.timed_out:
                            raise BuildFailed(f"step {step.n} ({step.text[:80]}) timed out")
                if code != 0:
                    raise BuildFailed(f"step {step.n} ({step.text[:80]}) failed with exit code {code}", code)
            elif step.instruction == "WORKDIR":
                await self.prepare(handle, [step.workdir], [], "")
            else:
                assert step.copy is not None
                entries = self.copies[step.n]
                dirs = sorted({e.dest for e in entries if e.member.isdir()})
                for e in entries:
                    if e.member.isfile():
                        yield {"type": "stdout", "n": step.n, "data": f"{e.dest}\n"}
                        await handle.agent.write(
                            e.dest, e.member.size, e.member.mode & 0o7777, member_chunks(self.context, e)
                        )
                await self.prepare(handle, dirs, [e.dest for e in entries], step.copy.chown)

    async def prepare(self, handle, dirs: list[str], paths: list[str], chown: str) -> None:
        request = python_request(PREPARE, 120)
        stdin = json.dumps({"dirs": dirs, "paths": paths, "chown": chown}).encode()
        err = b""
        async for ev in handle.agent.exec(request, stdin=stdin):
            if ev.kind == "stderr":
                err += ev.data
            elif ev.kind == "exit" and ev.exit_code != 0:
                last = (err.decode(errors="replace").strip().splitlines() or ["?"])[-1]
                raise BuildFailed(f"preparing {', '.join((dirs + paths)[:3])}: {last}", ev.exit_code)

    async def keep(self, step: Step) -> str:
        """The sandbox's tree after the step, into the cache under the step's key."""
        assert self.sandbox is not None
        return str(await self.service.keep(self.sandbox, self.keys[step.n], step.text))

    async def drop_sandbox(self) -> None:
        if self.sandbox is not None:
            row, self.sandbox = self.sandbox, None
            await self.service.discard(self.user, row)

    async def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            await self.drop_sandbox()
        self.context.close()
        await asyncio.to_thread(shutil.rmtree, self.incoming, True)
        await self.stack.aclose()


async def member_chunks(context: BuildContext, entry: Entry):
    for chunk in context.chunks(entry.member):
        yield chunk


class BuildService:
    def __init__(self, sandboxes: SandboxService, images: ImageService):
        self.sandboxes = sandboxes
        self.images = images
        self.config = sandboxes.config
        self.timeout = sandboxes.config.limits.build_timeout
        self.cache = sandboxes.config.data_dir / "build-cache"
        self.running = self.cache / "sandboxes"  # one file per build sandbox alive: a crash's leftovers

    async def start(self) -> None:
        self.running.mkdir(parents=True, exist_ok=True)
        self.cache.chmod(0o700)
        for f in self.running.iterdir():  # sandboxes of builds a crash interrupted
            row = self.sandboxes.store.sandbox_by_id(f.name)
            user = self.sandboxes.store.user_by_id(f.read_text().strip()) if row else None
            if row is not None and user is not None:
                with contextlib.suppress(KilnError):
                    await self.sandboxes.destroy(user, row.id)
            f.unlink(missing_ok=True)
        for d in self.cache.iterdir():
            if d.name.endswith(".tmp"):
                await asyncio.to_thread(shutil.rmtree, d, True)

    def track(self, row: SandboxRow) -> None:
        (self.running / row.id).write_text(row.owner_id)

    async def discard(self, user: User, row: SandboxRow) -> None:
        with contextlib.suppress(NotFound):
            await self.sandboxes.destroy(user, row.id)
        (self.running / row.id).unlink(missing_ok=True)

    def base_tree(self, user: User, name: str) -> str:
        return self.images.resolve(user, name).spec.rootfs

    def cached_tree(self, key: str) -> Path | None:
        d = self.cache / key
        if (d / CACHE_META).exists():
            with contextlib.suppress(OSError):
                d.touch()  # recently used: pruned last
            return d / "rootfs"
        return None

    async def keep(self, row: SandboxRow, key: str, text: str) -> Path:
        tmp = self.cache / f"{key}.{secrets.token_hex(4)}.tmp"
        tmp.mkdir()
        try:
            async with self.sandboxes.runtimes.lock(row.id):
                await self.sandboxes.engine.export_rootfs(row.id, tmp / "rootfs")
            (tmp / CACHE_META).write_text(json.dumps({"step": text, "at": time.time()}))
            final = self.cache / key
            if final.exists():  # another build made it meanwhile
                await asyncio.to_thread(shutil.rmtree, tmp, True)
            else:
                tmp.rename(final)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, tmp, True)
            raise
        await asyncio.to_thread(self.prune)
        return final / "rootfs"

    def prune(self) -> None:
        entries = sorted((d.stat().st_mtime, d) for d in self.cache.iterdir() if (d / CACHE_META).exists())
        for _, d in entries[: max(0, len(entries) - MAX_CACHE_ENTRIES)]:
            shutil.rmtree(d, ignore_errors=True)

    async def prepare(
        self, user: User, name: object, dockerfile: str, chunks: AsyncIterator[bytes], length: int | None
    ) -> Build:
        """Receive and check a build; 4xx for anything wrong before it starts."""
        name = self.images.check_new(user, name)
        cap = self.config.limits.max_import_bytes
        if length is not None and length > cap:
            raise TooLarge(f"build context too large (max {cap} bytes)")
        stack = contextlib.AsyncExitStack()
        await stack.enter_async_context(self.images.job(user))
        incoming = self.cache / f"context-{secrets.token_hex(8)}.tmp"
        try:
            incoming.mkdir(parents=True)
            await receive(
                chunks,
                incoming / "context.tar",
                cap,
                self.config.server.body_idle_timeout,
                what="a build context (a tar with a Dockerfile)",
            )
            context = await asyncio.to_thread(BuildContext, incoming / "context.tar")
            try:
                text = context.read_text(dockerfile or "Dockerfile")
                plan = parse(text, lambda base: self.base_config(user, base))
                base = self.images.resolve(user, plan.base)
                build = Build(self, user, name, plan, context, incoming, stack)
                await asyncio.to_thread(build.plan_keys, self.base_key(user, base))
            except BaseException:
                context.close()
                raise
        except BaseException as e:
            await asyncio.to_thread(shutil.rmtree, incoming, True)
            await stack.aclose()
            if isinstance(e, DockerfileError):
                raise BadRequest(f"Dockerfile: {e}") from None
            raise
        return build

    def base_config(self, user: User, name: str) -> ImageConfig:
        self.images.resolve(user, name)  # 404 for an image that does not exist, 503 while building
        return self.images.config_of(user, name)

    def base_key(self, user: User, base: ResolvedImage) -> str:
        """Cache keys are per user and per base tree (a rebuilt base image starts a new chain)."""
        return f"{user.id}:{base.spec.rootfs}"
