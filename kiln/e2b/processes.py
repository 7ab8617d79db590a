"""envd's process model on top of the agent's one-shot exec: processes addressed by pid that outlive
the request that started them, with output fanned out to every subscriber and stdin by separate calls.

The daemon holds each process's agent connection (the agent kills a command when its connection
closes): its output is read as it comes and handed to whoever is subscribed (Start's own stream,
Connect streams: live output only, no replay, as envd does); stdin and kills go down the same
connection. A process is listed until it exits. It ends with its sandbox's stop or destroy, and with
the daemon: envd's processes live in the guest, these in the daemon's hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass, field

from ..agent.client import AgentConnection, AgentError

log = logging.getLogger("kiln.e2b")

QUEUE_EVENTS = 256  # per subscriber: a subscriber this far behind holds the process's output back


@dataclass
class Event:
    kind: str  # "stdout" | "stderr" | "pty" | "end"
    data: bytes = b""
    exit_code: int = 0
    signal: int = 0
    timed_out: bool = False
    error: str = ""


@dataclass
class EnvdProcess:
    pid: int
    cmd: str
    args: list[str]
    envs: dict[str, str]
    cwd: str
    tag: str
    conn: AgentConnection
    stdin: bool
    session_id: str = ""  # a PTY process: the agent's terminal session it runs in
    killed: bool = False  # SIGKILL sent: an end without an exit status is that kill's
    subscribers: set[asyncio.Queue[Event]] = field(default_factory=set)
    end: Event | None = None
    pump: asyncio.Task | None = None
    keep: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    def subscribe(self) -> asyncio.Queue[Event]:
        q: asyncio.Queue[Event] = asyncio.Queue(QUEUE_EVENTS)
        if self.end is not None:
            q.put_nowait(self.end)
        else:
            self.subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[Event]) -> None:
        self.subscribers.discard(q)
        while not q.empty():  # a publish waiting for room in it goes on
            q.get_nowait()

    async def publish(self, ev: Event) -> None:
        for q in list(self.subscribers):
            await q.put(ev)

    async def send_stdin(self, data: bytes) -> None:
        await self.conn.send_stdin(data)

    async def close_stdin(self) -> None:
        await self.conn.close_stdin()

    async def resize(self, rows: int, cols: int) -> None:
        await self.conn.resize(rows, cols)

    async def kill(self) -> None:
        """SIGKILL to its process group: a one-shot's KILL frame, a terminal session's EXEC_KILL."""
        self.killed = True
        with contextlib.suppress(ConnectionError, OSError, AgentError):
            if self.session_id:
                await self.conn.client.kill_session(self.session_id)
            else:
                await self.conn.kill()


class ProcessTable:
    """Every sandbox's envd processes, by pid."""

    def __init__(self) -> None:
        self.by_sandbox: dict[str, dict[int, EnvdProcess]] = {}
        self.background: set[asyncio.Task] = set()  # kills at a deadline, held until done

    def of(self, sandbox_id: str) -> dict[int, EnvdProcess]:
        return self.by_sandbox.get(sandbox_id, {})

    def get(self, sandbox_id: str, pid: int) -> EnvdProcess | None:
        return self.of(sandbox_id).get(pid)

    def by_tag(self, sandbox_id: str, tag: str) -> EnvdProcess | None:
        return next((p for p in self.of(sandbox_id).values() if p.tag == tag), None)

    def add(self, sandbox_id: str, proc: EnvdProcess) -> None:
        """Take the process over: its output is read from now on, and it leaves the table when it ends."""
        self.by_sandbox.setdefault(sandbox_id, {})[proc.pid] = proc
        proc.pump = asyncio.create_task(self.pump(sandbox_id, proc))

    async def pump(self, sandbox_id: str, proc: EnvdProcess) -> None:
        end = Event("end", error="the sandbox's agent went away")
        try:
            while True:
                ev = await proc.conn.read_event()
                if ev is None:
                    continue
                if ev.kind == "exit":
                    end = Event("end", exit_code=ev.exit_code, signal=ev.signal, timed_out=ev.timed_out)
                    break
                kind = "pty" if proc.session_id and ev.kind == "stdout" else ev.kind
                await proc.publish(Event(kind, ev.data))
        except (AgentError, ConnectionError, OSError) as e:
            if proc.killed:  # the agent hangs up on a command it was told to kill
                end = Event("end", signal=9)
            else:
                log.info("e2b process %d in %s ended without its exit status: %s", proc.pid, sandbox_id, e)
        finally:
            proc.end = end
            self.of(sandbox_id).pop(proc.pid, None)
            with contextlib.suppress(Exception):
                await proc.publish(end)
            await proc.conn.close()
            await proc.keep.aclose()

    def forget(self, sandbox_id: str) -> None:
        """Before a stop or destroy: every process of the sandbox ends (its connection is cut)."""
        for proc in list(self.by_sandbox.pop(sandbox_id, {}).values()):
            proc.conn.writer.transport.abort()

    async def close(self) -> None:
        for sandbox_id in list(self.by_sandbox):
            self.forget(sandbox_id)


MAX_WATCHER_EVENTS = 10_000  # buffered for a polling watcher; older ones are dropped


@dataclass
class Watcher:
    conn: AgentConnection
    events: list[dict] = field(default_factory=list)
    reader: asyncio.Task | None = None


class Watchers:
    """envd's polling watchers (CreateWatcher / GetWatcherEvents / RemoveWatcher): each holds its
    agent watch connection and buffers what it reports until the client asks."""

    def __init__(self) -> None:
        self.by_sandbox: dict[str, dict[str, Watcher]] = {}

    def add(self, sandbox_id: str, conn: AgentConnection) -> str:
        watcher_id = secrets.token_hex(8)
        w = Watcher(conn)
        w.reader = asyncio.create_task(self.read(w))
        self.by_sandbox.setdefault(sandbox_id, {})[watcher_id] = w
        return watcher_id

    async def read(self, w: Watcher) -> None:
        with contextlib.suppress(AgentError, ConnectionError, OSError):
            while True:
                ev = await w.conn.read_watch_event()
                if ev is not None:
                    w.events.append(ev)
                    del w.events[:-MAX_WATCHER_EVENTS]

    def take(self, sandbox_id: str, watcher_id: str) -> list[dict] | None:
        w = self.by_sandbox.get(sandbox_id, {}).get(watcher_id)
        if w is None:
            return None
        events, w.events = w.events, []
        return events

    async def remove(self, sandbox_id: str, watcher_id: str) -> bool:
        w = self.by_sandbox.get(sandbox_id, {}).pop(watcher_id, None)
        if w is None:
            return False
        await w.conn.close()
        return True

    def forget(self, sandbox_id: str) -> None:
        for w in self.by_sandbox.pop(sandbox_id, {}).values():
            w.conn.writer.transport.abort()
