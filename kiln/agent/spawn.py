"""Starting processes fast as another user, waiting for them, and killing process groups.

Part of the guest agent: standard library only, imported as kiln.agent.spawn on the host (tests) and
as a plain module inside the sandbox."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import threading
import time

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CLONE_FS = 0x200
SPAWN_LOCK = threading.Lock()  # only where a thread cannot have a working directory of its own
# setresuid/setresgid as the kernel has them: they change the calling thread's ids only. glibc's
# change every thread's, by signalling each one, which costs ~3-4 ms per exec under gVisor.
SETRESUID_SETRESGID = {"x86_64": (117, 119), "aarch64": (147, 149)}.get(os.uname().machine)
_libc = ctypes.CDLL(None, use_errno=True)


def set_thread_real_ids(uid: int, gid: int) -> None:
    """Set this thread's real uid and gid (its effective ids stay as they are)."""
    if SETRESUID_SETRESGID is None:  # an architecture not listed: the process-wide calls
        os.setresgid(gid, -1, -1)
        os.setresuid(uid, -1, -1)
        return
    for number, value in zip(SETRESUID_SETRESGID[::-1], (gid, uid), strict=True):
        keep = ctypes.c_long(-1)
        if _libc.syscall(ctypes.c_long(number), ctypes.c_long(value), keep, keep) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))


class Launch:
    """Who a process runs as, where, with what environment. (A plain class: dataclasses costs the
    agent ~35 ms of imports at every boot, inside gVisor more.)"""

    __slots__ = ("cwd", "env", "gid", "uid")

    def __init__(self, uid: int, gid: int, cwd: str, env: dict):
        self.uid, self.gid, self.cwd, self.env = uid, gid, cwd, env


_thread = threading.local()


def own_working_directory() -> bool:
    """Give the calling thread a working directory of its own, once (unshare(CLONE_FS)): then its
    chdir before a spawn moves no other thread, and spawns from several threads need no lock (20
    parallel execs were serialized on it, each for the whole vfork-to-exec). False if refused."""
    private = getattr(_thread, "private_fs", None)
    if private is None:
        private = _thread.private_fs = _libc.unshare(CLONE_FS) == 0
    return private


def which(name: str, path: str) -> str | None:
    """The first executable `name` on `path` (shutil.which without importing shutil)."""
    for d in path.split(os.pathsep):
        candidate = os.path.join(d or ".", name)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return None


def spawn(argv: list[str], launch: Launch, stdin: int, stdout: int, stderr: int, output_file: str = "") -> int:
    """Start argv in a new session as launch.uid and return its pid.

    With output_file, stdout and stderr go to that file instead (appended, created if missing),
    opened by the child after its ids are reset: it can write only where that user may.

    Under gVisor's systrap platform a fork of the (large, threaded) agent costs ~30 ms, a vfork
    ~6 ms. Python only vforks when no user change is asked, so: posix_spawn (a vfork) with
    RESETIDS, while the agent's *real* ids are briefly the target's (its effective ids stay 0);
    the child's ids are reset to those real ids, and it never runs as root. Only the calling
    thread's ids change (set_thread_real_ids), and only its working directory
    (own_working_directory; else a lock keeps the process-wide one consistent).
    """
    path = argv[0]
    if "/" not in path:
        found = which(path, launch.env.get("PATH", DEFAULT_PATH))
        if found is None:
            raise FileNotFoundError(errno.ENOENT, "command not found", argv[0])
        path = found
    actions: list[tuple] = [(os.POSIX_SPAWN_DUP2, stdin, 0)]
    if output_file:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        actions += [(os.POSIX_SPAWN_OPEN, 1, output_file, flags, 0o644), (os.POSIX_SPAWN_DUP2, 1, 2)]
    else:
        actions += [(os.POSIX_SPAWN_DUP2, stdout, 1), (os.POSIX_SPAWN_DUP2, stderr, 2)]
    switch = (launch.uid, launch.gid) != (os.geteuid(), os.getegid())
    with contextlib.nullcontext() if own_working_directory() else SPAWN_LOCK:
        os.chdir(launch.cwd)
        try:
            if switch:
                set_thread_real_ids(launch.uid, launch.gid)
            return os.posix_spawn(path, argv, launch.env, file_actions=actions, setsid=True, resetids=switch)
        finally:
            if switch:
                set_thread_real_ids(0, 0)
            os.chdir("/")


class Child:
    """A spawned process, waited for by pid."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            if self.returncode is None:
                self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            return self.returncode
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() >= deadline:
                raise TimeoutError
            time.sleep(0.002)
        assert self.returncode is not None
        return self.returncode


def kill_process_group(pgid: int, patience: float = 3.0) -> None:
    """SIGKILL a process group until no live member is left: members forking while the first
    signal lands (a fork bomb) would otherwise live on in the group."""
    deadline = time.monotonic() + patience
    while True:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline or not live_members(pgid):
            return
        time.sleep(0.01)


def live_members(pgid: int) -> bool:
    """Whether any process of the group is still alive (zombies wait for their reaper, harmless)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False
