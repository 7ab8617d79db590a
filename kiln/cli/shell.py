"""`kiln shell`: the local terminal in raw mode, wired to a sandbox's PTY over the WebSocket.

Keystrokes go to the sandbox as they are typed; output is written as it arrives; the window
size follows the local one (SIGWINCH). Ctrl+\\ detaches: the shell keeps running in the sandbox
and `kiln shell` attaches to it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import termios
import tty

from ..client.aio import AsyncSandbox

DETACH = b"\x1c"  # Ctrl+\


async def interactive_shell(sandbox: AsyncSandbox, session: str | None, new: bool) -> str:
    """Run until the shell exits ("exited") or the user detaches ("detached")."""
    cols, rows = shutil.get_terminal_size()
    stdin_fd, stdout = sys.stdin.fileno(), sys.stdout.buffer
    loop = asyncio.get_running_loop()
    async with sandbox.pty(session=session, new=new, rows=rows, cols=cols) as term:
        saved = termios.tcgetattr(stdin_fd) if os.isatty(stdin_fd) else None
        done: asyncio.Future = loop.create_future()
        keys: asyncio.Queue[bytes] = asyncio.Queue()

        def on_key() -> None:
            data = os.read(stdin_fd, 4096)
            if not data or DETACH in data:
                before = data.split(DETACH, 1)[0] if data else b""
                if before:
                    keys.put_nowait(before)
                if not done.done():
                    done.set_result("detached")
                return
            keys.put_nowait(data)

        resizes: set[asyncio.Future] = set()

        def on_resize() -> None:
            c, r = shutil.get_terminal_size()
            resizes.add(task := asyncio.ensure_future(term.resize(r, c)))
            task.add_done_callback(resizes.discard)

        async def pump_keys() -> None:
            while True:
                await term.send(await keys.get())

        async def pump_output() -> None:
            while chunk := await term.recv():
                stdout.write(chunk)
                stdout.flush()
            if not done.done():
                done.set_result("exited")

        try:
            if saved is not None:
                tty.setraw(stdin_fd)
            loop.add_reader(stdin_fd, on_key)
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGWINCH, on_resize)
            tasks = [asyncio.ensure_future(pump_keys()), asyncio.ensure_future(pump_output())]
            try:
                return await done
            finally:
                for t in tasks:
                    t.cancel()
        finally:
            loop.remove_reader(stdin_fd)
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGWINCH)
            if saved is not None:
                termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
