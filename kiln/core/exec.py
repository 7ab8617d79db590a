"""One-shot commands in a sandbox: validated, then streamed as events (or buffered up to a cap)."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

from ..agent.client import AgentError, ExecEvent
from ..config import LimitsConfig
from ..store.db import User
from .errors import BadRequest, Internal
from .lifecycle import SandboxService
from .names import check_env_keys, is_text

log = logging.getLogger("kiln.exec")

DEFAULT_TIMEOUT = 300
MAX_TIMEOUT = 86400


@dataclass
class ExecRequest:
    cmd: list[str]
    timeout_sec: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    user: str | int | None = None
    stdin: str | None = None
    detach: bool = False
    output_file: str | None = None


@dataclass
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool = False


def agent_request(req: ExecRequest) -> dict:
    """Validate an exec request and turn it into the agent's; 400 for anything it would refuse."""
    if not req.cmd or not all(isinstance(a, str) for a in req.cmd) or req.cmd[0] == "":
        raise BadRequest("cmd required")
    check_env_keys(req.env)
    if req.cwd is not None and not req.cwd.startswith("/"):
        raise BadRequest("cwd must be an absolute path")
    texts = [*req.cmd, *req.env.values(), req.cwd or "", req.user if isinstance(req.user, str) else ""]
    if any("\x00" in t for t in texts):
        raise BadRequest("cmd, env, cwd and user must not contain NUL characters")
    if not all(is_text(t) for t in [*texts, *req.env]):
        raise BadRequest("cmd, env, cwd and user must be valid UTF-8 text")
    if isinstance(req.user, int) and not 0 <= req.user < 2**31:
        raise BadRequest(f"invalid user id: {req.user}")
    if req.output_file is not None and not req.detach:
        raise BadRequest("output_file is only for detach: true")
    if req.detach and req.stdin is not None:
        raise BadRequest("stdin cannot be given to a detached command")
    if req.output_file is not None and (
        not req.output_file.startswith("/") or "\x00" in req.output_file or not is_text(req.output_file)
    ):
        raise BadRequest("output_file must be an absolute path")
    timeout = req.timeout_sec if req.timeout_sec and 1 <= req.timeout_sec <= MAX_TIMEOUT else DEFAULT_TIMEOUT
    out: dict = {"argv": req.cmd, "env": req.env, "timeout_sec": timeout}
    if req.cwd:
        out["cwd"] = req.cwd
    if req.user is not None and req.user != "":
        out["user"] = req.user
    if req.output_file:
        out["output_file"] = req.output_file
    return out


class ExecService:
    def __init__(self, sandboxes: SandboxService, limits: LimitsConfig):
        self.sandboxes = sandboxes
        self.limits = limits

    async def events(self, user: User, id_or_name: str, req: ExecRequest) -> AsyncGenerator[ExecEvent, None]:
        """Validate, then return the event stream of the command (stdout/stderr chunks, then exit).

        Fails before the first byte for what can be known early (bad user or cwd, agent down): the
        agent answers "started" as soon as the command runs. The sandbox stays in use (pinned hot)
        from the request until the stream is closed.
        """
        agent_req = agent_request(req)
        row = self.sandboxes.get(user, id_or_name)
        stack = contextlib.AsyncExitStack()
        try:
            handle = await stack.enter_async_context(self.sandboxes.using(row))
            stdin = req.stdin.encode() if req.stdin is not None else None
            events = handle.agent.exec(agent_req, stdin)
            stack.push_async_callback(events.aclose)  # type: ignore[attr-defined]
            try:
                first = await anext(events)
            except StopAsyncIteration as e:
                raise AgentError("the agent closed the exec stream before it started") from e
        except BaseException:
            if not await stack.__aexit__(*sys.exc_info()):
                raise
            raise Internal("exec did not start")  # pragma: no cover (using() re-raises every error)
        return self._stream(first, events, stack)

    async def _stream(
        self, first: ExecEvent, rest: AsyncIterator[ExecEvent], stack: contextlib.AsyncExitStack
    ) -> AsyncGenerator[ExecEvent, None]:
        try:
            if first.kind != "started":
                yield first
                if first.kind == "exit":
                    return
            async for ev in rest:
                yield ev
        except BaseException:
            # using() turns agent failures into API errors (dead sandbox, crashed agent)
            if not await stack.__aexit__(*sys.exc_info()):
                raise
        else:
            await stack.aclose()

    async def detached(self, user: User, id_or_name: str, req: ExecRequest) -> dict:
        """Start a command in its own session writing to an output file; it outlives the request and
        has no timeout. Returns {"pid", "output_file", "detached": true} as soon as it runs."""
        agent_req = agent_request(req)
        del agent_req["timeout_sec"]
        row = self.sandboxes.get(user, id_or_name)
        async with self.sandboxes.using(row) as handle:
            return await handle.agent.detach(agent_req)

    async def buffered(self, user: User, id_or_name: str, req: ExecRequest) -> ExecResult:
        cap = self.limits.exec_output_cap_bytes
        out, err = bytearray(), bytearray()
        truncated = False
        events = await self.events(user, id_or_name, req)
        async with contextlib.aclosing(events):
            async for ev in events:
                if ev.kind == "exit":
                    stderr = err.decode(errors="replace")
                    if truncated:
                        stderr += f"\n[output truncated at {cap // (1024 * 1024)}MB]"
                    return ExecResult(ev.exit_code, out.decode(errors="replace"), stderr, ev.timed_out)
                room = cap - len(out) - len(err)
                if len(ev.data) > room:
                    truncated = True
                (out if ev.kind == "stdout" else err).extend(ev.data[: max(0, room)])
        raise Internal("exec stream ended without an exit status")
