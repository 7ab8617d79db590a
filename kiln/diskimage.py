"""Sparse ext4 image files: made, loop-mounted and unmounted on the host.

Volumes (core) and sandbox root disks (engine) are both such images: sparse (they cost only what
is written), no reserved blocks, capped by their size (writing past it is ENOSPC inside). Host
mounts are nosuid,nodev: a tenant's setuid-root file or device node on them means nothing here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
from pathlib import Path

from .proc import CommandFailed, exit_status, run

__all__ = ["CommandFailed", "copy_sparse", "grow_ext4", "is_mounted", "make_ext4", "mount", "unmount"]


async def make_ext4(image: Path, size_mb: int, root_owner: tuple[int, int] | None = None) -> None:
    """A new sparse image of size_mb with an empty ext4 (lazy init: ~10 ms whatever the size)."""
    image.parent.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    opts = "lazy_itable_init=1,lazy_journal_init=1,nodiscard"
    if root_owner is not None:
        opts += f",root_owner={root_owner[0]}:{root_owner[1]}"
    await run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", opts, str(image)])


async def grow_ext4(image: Path, size_mb: int) -> None:
    """Grow an unmounted image and its ext4 to size_mb: checked first (resize2fs insists), then grown."""
    fsck = await exit_status(["e2fsck", "-f", "-p", str(image)])
    if fsck >= 4:  # 0: clean, 1/2: errors fixed; 4 and up: left uncorrected
        raise CommandFailed(f"e2fsck {image.name}: exit {fsck}: the filesystem has errors it could not fix")
    with open(image, "r+b") as f:
        f.truncate(size_mb * 1024 * 1024)
    await run(["resize2fs", str(image)], timeout=600)


async def copy_sparse(source: Path, target: Path) -> None:
    """A copy of an image that shares blocks when the filesystem can (reflink) and keeps holes."""
    await run(["cp", "--reflink=auto", "--sparse=always", str(source), str(target)], timeout=3600)


def is_mounted(path: Path) -> bool:
    return os.path.ismount(path)


async def mount(image: Path, target: Path, read_only: bool = False) -> None:
    """Loop-mount image at target (made if missing); a no-op if something is mounted there."""
    if is_mounted(target):
        return
    target.mkdir(parents=True, exist_ok=True)
    opts = "loop,noatime,nosuid,nodev" + (",ro" if read_only else "")
    await run(["mount", "-o", opts, str(image), str(target)])


MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def unmount_now(target: Path, lazy: bool = False) -> bool:
    """umount2(2) itself: no umount(8) process per mount (~10 ms each). A loop device that mount(8)
    set up with -o loop is detached by the kernel when its filesystem goes (autoclear)."""
    return _libc.umount2(os.fsencode(target), MNT_DETACH if lazy else 0) == 0


async def unmount(target: Path, remove_dir: bool = False, lazy: bool = False) -> None:
    """Unmount target (lazily if it is busy, or at once with lazy); with remove_dir, remove the empty
    mount point too. In a thread: unmounting a written filesystem writes it out first."""
    if is_mounted(target) and not await asyncio.to_thread(unmount_now, target, lazy):
        await asyncio.to_thread(unmount_now, target, True)
    if remove_dir:
        with contextlib.suppress(OSError):
            target.rmdir()
