"""The synchronous kiln SDK: the async SDK's objects with the same names and methods, blocking.

Each `Kiln` runs the async client on an event loop in a background thread; every method call
runs there and waits. Streaming callbacks (on_stdout, on_stderr) are called from that thread.
"""

from __future__ import annotations

import asyncio
import inspect
import threading

from .aio import AsyncKiln, AsyncPty, AsyncSandbox


class _Loop:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="kiln-client", daemon=True)
        self.thread.start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class _Sync:
    """A blocking view of an async SDK object."""

    def __init__(self, target, loop: _Loop):
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_loop", loop)

    def __getattr__(self, name: str):
        attr = getattr(self._target, name)
        if inspect.iscoroutinefunction(attr):

            def call(*args, **kwargs):
                return _wrap(self._loop.run(attr(*args, **kwargs)), self._loop)

            call.__doc__ = attr.__doc__
            return call
        if callable(attr) and not isinstance(attr, type):

            def call_plain(*args, **kwargs):
                return _wrap(attr(*args, **kwargs), self._loop)

            call_plain.__doc__ = attr.__doc__
            return call_plain
        return _wrap(attr, self._loop)

    def __repr__(self) -> str:
        return repr(self._target)


def _wrap(value, loop: _Loop):
    if isinstance(value, list):
        return [_wrap(v, loop) for v in value]
    if isinstance(value, AsyncSandbox):
        return Sandbox._from(value, loop)
    if isinstance(value, AsyncPty):
        return Pty(value, loop)
    if type(value).__module__ == "kiln.client.aio" and type(value).__name__.startswith("Async"):
        return _Sync(value, loop)
    return value


class Kiln(_Sync):
    """`Kiln(url, token)`; url and token default to $KILN_URL and $KILN_TOKEN."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 60.0):
        super().__init__(AsyncKiln(url, token, timeout), _Loop())

    def __enter__(self) -> Kiln:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._loop.run(self._target.aclose())
        self._loop.stop()


class Sandbox(_Sync):
    @classmethod
    def _from(cls, target: AsyncSandbox, loop: _Loop) -> Sandbox:
        return cls(target, loop)

    @classmethod
    def connect(cls, id_or_name: str, kiln: Kiln | None = None) -> Sandbox:
        kiln = kiln or Kiln()
        return kiln.sandboxes.get(id_or_name)


class Pty(_Sync):
    """`with sb.pty() as term: term.send("ls\\n"); term.read_until("$ ")`."""

    def __enter__(self) -> Pty:
        self._loop.run(self._target.open())
        return self

    def __exit__(self, *exc) -> None:
        self._loop.run(self._target.close())
