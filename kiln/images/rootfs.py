"""Making an image's root tree ready to be a sandbox's root: the mount points kiln binds over.

Image trees come from users (imports, builds), so nothing here follows a symlink: every path is
walked one component at a time relative to an open directory, and a symlink or file where a
directory must be is replaced. A hostile `etc -> /` can never make kiln write outside the tree.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

# What the runtime spec mounts over (dirs) or binds onto (files); present in the tree so runsc
# never has to create them in the sandbox's own writable layer.
MOUNT_DIRS = ("proc", "dev", "sys", "tmp", "run", "opt/kiln/agent", "opt/kiln/runtime")
MOUNT_FILES = ("opt/kiln/config.json", "etc/resolv.conf")
WORKSPACE = "workspace"  # the default working directory of shells and init, owned by uid 1000


def _open_dir(parent: int, name: str) -> int:
    """Open `name` under `parent` as a directory, replacing anything else (a symlink, a file) there."""
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
    except FileNotFoundError:
        pass
    except (NotADirectoryError, OSError):
        os.unlink(name, dir_fd=parent)
    os.mkdir(name, 0o755, dir_fd=parent)
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)


def _walk(root: int, rel: str) -> tuple[int, str]:
    """The open parent directory of `rel` (made as needed) and its last component."""
    *parents, last = rel.split("/")
    fd = os.dup(root)
    for part in parents:
        nxt = _open_dir(fd, part)
        os.close(fd)
        fd = nxt
    return fd, last


def ensure_mount_points(tree: Path, owner: tuple[int, int] = (1000, 1000)) -> None:
    root = os.open(tree, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for rel in MOUNT_DIRS:
            parent, last = _walk(root, rel)
            os.close(_open_dir(parent, last))
            os.close(parent)
        for rel in MOUNT_FILES:
            parent, last = _walk(root, rel)
            try:
                st = os.stat(last, dir_fd=parent, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    if stat.S_ISDIR(st.st_mode):
                        raise ValueError(f"/{rel} is a directory in this image")
                    os.unlink(last, dir_fd=parent)
                    raise FileNotFoundError
            except FileNotFoundError:
                os.close(os.open(last, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644, dir_fd=parent))
            finally:
                os.close(parent)
        try:
            os.stat(WORKSPACE, dir_fd=root, follow_symlinks=False)
        except FileNotFoundError:
            os.mkdir(WORKSPACE, 0o755, dir_fd=root)
            os.chown(WORKSPACE, *owner, dir_fd=root, follow_symlinks=False)
    finally:
        os.close(root)


def tree_size(tree: Path) -> int:
    """Bytes the tree takes on disk (each hard-linked file once), without following symlinks."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in filenames + dirnames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total
