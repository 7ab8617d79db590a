"""Forks: `POST /sandboxes {"from": "<id or name>"}` makes a sandbox that is a copy of another at one
instant: processes, memory, files, env (and the secrets in its memory). It gets its own id, name,
address, netns, cgroup and disk; the source keeps running, paused only while its memory is imaged
and its disk cloned (`fork.paused_ms` in the answer), and loses only its open TCP connections. A
stopped source stays stopped. Counted against the user's quotas like a create.

A fork is a clone: same hostname, same PIDs, same user-space PRNG state (reseed what must differ).
It inherits image, cpus, memory, disk cap, env, init (already run) and the net policy (which the
request may override); name, labels and keep_hot are the request's.
"""

from __future__ import annotations

import logging
import secrets

from ..agent.client import AgentError
from ..engine.base import Forkable, SandboxHandle
from ..states import DEATHS, Status
from ..store.db import SandboxRow, User
from .errors import BadRequest, Conflict, KilnError, NotFound, NotImplementedYet
from .lifecycle import CreateRequest, SandboxService, inherited, spec_of
from .names import check_labels, check_name

log = logging.getLogger("kiln.forks")

# request fields a fork takes from its source: asking for something else with "from" is refused by name
SOURCE_FIELDS = ("template_id", "image", "cpus", "memory_mb", "disk_size_mb", "env", "init", "secrets", "files")


ON_FORK = "/etc/kiln/on_fork"  # run in every copy (fork, snapshot resume) if the image or user put it there
ON_FORK_TIMEOUT = 30


async def run_on_fork_hook(handle: SandboxHandle, sandbox_id: str) -> None:
    """A copy shares its source's memory: hostname, PRNG state, caches. An executable /etc/kiln/on_fork
    runs in the copy (as root, KILN_FORK=1) before it is handed out, e.g. to reseed or re-register.
    Its failure is logged, not fatal: the copy itself is sound."""
    try:
        info = await handle.agent.stat(ON_FORK)
    except AgentError:
        return
    if info.get("is_dir") or not int(info.get("mode", "0"), 8) & 0o111:
        return  # not an executable file: nothing to run
    request = {"argv": [ON_FORK], "user": 0, "cwd": "/", "env": {"KILN_FORK": "1"}, "timeout_sec": ON_FORK_TIMEOUT}
    code = None
    try:
        async for ev in handle.agent.exec(request):
            if ev.kind == "exit":
                code = ev.exit_code
    except AgentError as e:
        log.warning("the on_fork hook of %s could not run: %s", sandbox_id, e)
        return
    if code != 0:
        log.warning("the on_fork hook of %s exited with %s", sandbox_id, code)


class ForkService:
    def __init__(self, sandboxes: SandboxService):
        self.sandboxes = sandboxes
        self.store = sandboxes.store
        self.engine = sandboxes.engine if isinstance(sandboxes.engine, Forkable) else None

    def check_request(self, req: CreateRequest, src: SandboxRow) -> None:
        """A fork takes these from its source: empty (bhatti's CLI sends every field, 0 or "" for none)
        or the source's own value is fine, anything else is refused by name."""
        same = {
            "template_id": src.template_id,
            "image": src.image,
            "cpus": src.cpus,
            "memory_mb": src.memory_mb,
            "disk_size_mb": src.disk_asked_mb,
        }
        given = [
            f for f in SOURCE_FIELDS if getattr(req, f) not in (None, "", 0, [], {}) and getattr(req, f) != same.get(f)
        ]
        if req.volumes or req.new_volumes or req.persistent_volumes:
            given.append("volumes")
        if given:
            raise BadRequest(f"{given[0]}: a fork takes it from its source (only name, labels, keep_hot, net_policy)")

    async def fork(self, user: User, source_ref: str, req: CreateRequest) -> tuple[SandboxRow, str, int]:
        """Returns the new sandbox, its source's id and how long the source was paused (ms)."""
        if self.engine is None:
            raise NotImplementedYet(f"this engine ({self.sandboxes.engine.name}) cannot fork")
        sandboxes = self.sandboxes
        sandboxes.check_quota(user)
        src = self.store.get_sandbox(user.id, source_ref)
        if src is None:
            raise NotFound(f'source sandbox "{source_ref}" not found')
        self.check_request(req, src)
        name = check_name("sandbox", req.name if req.name is not None else f"{src.name}-{secrets.token_hex(3)}")
        check_labels(req.labels)
        policy = sandboxes.net_policy(req.net_policy) if req.net_policy is not None else sandboxes.policy_of(src)
        if self.store.attachments(sandbox_id=src.id):
            raise Conflict(f'sandbox "{source_ref}" has volumes attached: it cannot be forked')
        sandboxes.check_disk_quota(user, src.disk_mb)
        image = sandboxes.images.resolve(user, src.image)
        env = sandboxes.secrets.open_env(src.id, src.sealed_env)
        row = sandboxes.copy_row(user, name, inherited(src), env, policy, req.labels, bool(req.keep_hot))
        fork_id = row.id
        sandboxes.insert_copy(row)
        # a fork keeps its source's hostname (it comes from the memory image); its agent has its secrets
        spec = spec_of(row, policy, image, hostname=src.name)
        paused_ms = 0
        engine, source_id = self.engine, src.id

        async def start():
            nonlocal paused_ms
            result = await engine.fork(source_id, spec)
            paused_ms = result.paused_ms
            await run_on_fork_hook(result.handle, fork_id)
            return result.handle

        # the source's lock: no pause, stop, wake or destroy of it meanwhile
        async with sandboxes.runtimes.lock(src.id):
            try:  # the source as it is now, under its lock
                src = sandboxes.get(user, src.id)
                if src.status != Status.RUNNING and not (src.status == Status.STOPPED and src.reason not in DEATHS):
                    raise Conflict(f'sandbox "{source_ref}" is {src.status} ({src.reason}): start it before forking')
            except KilnError:
                self.store.delete_sandbox(fork_id)
                raise
            sandboxes.events.before_stop(src.id)  # host connections into it are reset by the checkpoint
            await sandboxes.bring_up(row, f"fork of {src.id}", start)
        log.info("forked %s (%s) as %s (%s); the source paused %d ms", src.id, src.name, fork_id, name, paused_ms)
        return row, src.id, paused_ms
