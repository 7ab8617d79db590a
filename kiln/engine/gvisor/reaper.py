"""Watching runsc's sandbox and gofer processes, and reaping them the moment they exit.

`runsc run -detach` leaves the sandbox and gofer processes orphaned. The daemon makes itself a
child subreaper, so they become its children; it reaps each on exit through a pidfd. Left to
this host's PID 1 they stay zombies for 1-2 s, and `runsc delete` waits for them all that time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
from collections.abc import Callable

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


class ProcessWatcher:
    def __init__(self):
        self.fds: dict[int, int] = {}  # pid -> pidfd
        self.waiters: dict[int, list[asyncio.Future]] = {}  # pid -> who waits for its exit

    def track(self, pid: int, on_exit: Callable[[], None] | None = None) -> None:
        """Reap pid when it exits, then call on_exit."""
        if pid in self.fds or pid <= 0:
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # already gone
            self.reap(pid)
            return
        self.fds[pid] = fd

        def exited() -> None:
            self.forget(pid)
            self.reap(pid)
            for waiter in self.waiters.pop(pid, []):
                if not waiter.done():
                    waiter.set_result(None)
            if on_exit is not None:
                on_exit()

        asyncio.get_running_loop().add_reader(fd, exited)

    def forget(self, pid: int) -> None:
        fd = self.fds.pop(pid, None)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    async def kill(self, pid: int, timeout: float = 5.0) -> bool:
        """SIGKILL a watched process through its pidfd (so never a reused pid) and wait until it
        has exited; False if it is not watched or did not exit in time."""
        fd = self.fds.get(pid)
        if fd is None:
            return False
        exited = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(pid, []).append(exited)
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            await asyncio.wait_for(exited, timeout)
            return True
        except (OSError, TimeoutError):
            return False

    @staticmethod
    def reap(pid: int) -> None:
        with contextlib.suppress(ChildProcessError):  # not our child (adopted after a restart): PID 1 reaps it
            os.waitpid(pid, os.WNOHANG)

    def close(self) -> None:
        for pid in list(self.fds):
            self.forget(pid)
