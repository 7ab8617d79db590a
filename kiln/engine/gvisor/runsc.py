"""The runsc command line, with the flags and workarounds this host needs (gvisor-notes.md)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

from ..base import EngineError
from .proc import run

# runsc refuses --network=sandbox on this kernel because its root-netns check finds
# /proc/sys/net/core/rmem_default in every netns. Hide /proc/sys/net from the runsc CLI in a
# private mount namespace; the sentry never reads the host's /proc/sys/net.
HIDE_PROC_SYS_NET = 'mount -t tmpfs -o size=4k,mode=555 kiln-hide /proc/sys/net && exec "$0" "$@"'


class Runsc:
    def __init__(self, root: Path, binary: str = "runsc", platform: str = "systrap"):
        self.root = root
        self.binary = binary
        # --overlay2=none: root-fs writes go to the host overlay's upper dir (durable, the disk diff)
        # instead of a memory-backed file store. --net-disconnect-ok: a checkpoint resets open TCP
        # connections instead of failing.
        self.global_flags = [
            f"--root={root}",
            f"--platform={platform}",
            "--network=sandbox",
            "--overlay2=none",
            "--net-disconnect-ok",
        ]

    def argv(self, *args: str) -> list[str]:
        return [self.binary, *self.global_flags, *args]

    async def run_detached(self, container_id: str, bundle: Path, log: Path) -> None:
        await self._start_detached("run", container_id, bundle, log)

    async def restore_detached(self, container_id: str, bundle: Path, log: Path, image_dir: Path) -> None:
        await self._start_detached("restore", container_id, bundle, log, f"--image-path={image_dir}")

    async def _start_detached(self, command: str, container_id: str, bundle: Path, log: Path, *extra: str) -> None:
        """`runsc run|restore -detach` through the /proc/sys/net workaround.

        -detach hands its stdio to the sandbox: an append-mode log, never a pipe we wait on.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        argv = [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            HIDE_PROC_SYS_NET,
            *self.argv(command, "-detach", f"-bundle={bundle}", *extra, container_id),
        ]
        with open(log, "ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        rc = await proc.wait()
        if rc != 0:
            raise EngineError(f"runsc {command} {container_id}: exit {rc}: {tail(log)}")

    async def checkpoint(self, container_id: str, image_dir: Path, leave_running: bool = False) -> None:
        """Uncompressed, so pages.img is raw memory that chunks well; the sandbox exits after, unless
        leave_running (then it stays as it was: running, or paused by `pause`)."""
        extra = ["--leave-running"] if leave_running else []
        await run(
            self.argv("checkpoint", f"--image-path={image_dir}", "--compression=none", *extra, container_id),
            timeout=600,
        )

    async def pause(self, container_id: str) -> None:
        """gVisor's own pause (not the freezer): its control server still answers, so it can checkpoint."""
        await run(self.argv("pause", container_id))

    async def resume(self, container_id: str) -> None:
        await run(self.argv("resume", container_id))

    def checkpoint_running(self, container_id: str) -> bool:
        """Whether a `runsc checkpoint` of this container (under our root) is still at work: it may
        have been started by a daemon that has since died. Reads /proc; signals nothing."""
        want = [f"--root={self.root}".encode(), b"checkpoint", container_id.encode()]
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                args = (Path("/proc") / entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if all(w in args for w in want):
                return True
        return False

    async def state(self, container_id: str) -> dict | None:
        if not self.exists(container_id):
            return None
        out = await run(self.argv("state", container_id), check=False)
        try:
            return json.loads(out)
        except ValueError:
            return None

    def pids(self, container_id: str) -> tuple[int | None, int | None]:
        """(sandbox pid, gofer pid) from runsc's state file: no call to a possibly frozen sandbox."""
        for f in self.root.glob(f"{container_id}_sandbox:*.state"):
            try:
                st = json.loads(f.read_text())
                return (int((st.get("sandbox") or {}).get("pid") or 0) or None, int(st.get("goferPid") or 0) or None)
            except (OSError, ValueError, TypeError):
                break
        return None, None

    async def delete(self, container_id: str) -> None:
        if self.exists(container_id):  # (else runsc would only say so, in ~20 ms)
            await run(self.argv("delete", "-force", container_id), check=False)

    def exists(self, container_id: str) -> bool:
        """Whether runsc has the container: its state file is there until `runsc delete` ends it."""
        return any(self.root.glob(f"{container_id}_sandbox:*.state"))

    def list_ids(self) -> list[str]:
        """Containers under our root, from their state files (`runsc list` hangs on a frozen one)."""
        if not self.root.exists():
            return []
        return sorted({f.name.split("_sandbox:")[0] for f in self.root.glob("*_sandbox:*.state")})


def tail(path: Path, n: int = 600) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - n))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""
