"""Builds a built-in image from its recipe with mmdebstrap, once per machine.

An image is a directory `<images_dir>/<name>-<key>/` holding `rootfs/` (the read-only lower layer
of every sandbox made from it) and `image.json` (what it is, its size, how long it took), written
last: a directory without it is a build that did not finish. One build of an image at a time per
machine (a lock file beside it), so daemons and test runs that share the cache never race.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..fileio import write_atomic
from .recipes import KILN, PATH_EXCLUDES, PIP_TARGET, SUITE, Recipe
from .rootfs import ensure_mount_points, tree_size

IMAGE_FILE = "image.json"
Progress = Callable[[str], None]


class ImageBuildError(Exception):
    pass


def image_dir(images_dir: Path, recipe: Recipe) -> Path:
    return images_dir / recipe.dir_name


def built(path: Path) -> dict | None:
    """The image's metadata if it is completely built, else None."""
    try:
        return json.loads((path / IMAGE_FILE).read_text())
    except (OSError, ValueError):
        return None


def host_mirror(root: Path = Path("/")) -> str:
    """The Debian mirror this host already uses, so the build reaches only configured registries."""
    apt = root / "etc/apt"
    for f in sorted((apt / "sources.list.d").glob("*.sources")):
        for line in f.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    for f in [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]:
        if f.exists():
            for line in f.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[0] == "deb" and "security" not in line and parts[2].startswith(SUITE):
                    return parts[1]
    raise ImageBuildError(
        f"no Debian package source is configured on this host ({apt}/sources.list or sources.list.d/): "
        "kiln builds its images from the sources the host already uses"
    )


@contextlib.contextmanager
def build_lock(images_dir: Path, name: str) -> Iterator[None]:
    images_dir.mkdir(parents=True, exist_ok=True)
    with open(images_dir / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def mmdebstrap_argv(recipe: Recipe, target: Path, mirror: str) -> list[str]:
    cmd = ["mmdebstrap", f"--variant={recipe.variant}", f"--include={','.join(recipe.packages)}"]
    cmd += [f"--dpkgopt=path-exclude={p}" for p in PATH_EXCLUDES]
    cmd += [f"--customize-hook={h}" for h in recipe.hooks]
    return [*cmd, SUITE, str(target), mirror]


def ensure_built(recipe: Recipe, images_dir: Path, progress: Progress = print) -> Path:
    """The image's directory, built first if this machine does not have it yet."""
    path = image_dir(images_dir, recipe)
    if built(path):
        return path
    with build_lock(images_dir, recipe.dir_name):
        if built(path):
            return path
        remove_tree(path)
        path.mkdir(parents=True)
        started = time.monotonic()
        progress(f"building image {recipe.name} ({recipe.description}) into {path}")
        run_with_progress(mmdebstrap_argv(recipe, path / "rootfs", host_mirror()), progress)
        add_pip_and_copies(recipe, path / "rootfs", progress)
        ensure_mount_points(path / "rootfs")
        size = tree_size(path / "rootfs")
        meta = {
            "name": recipe.name,
            "description": recipe.description,
            "recipe": recipe.key,
            "size_bytes": size,
            "build_seconds": round(time.monotonic() - started, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_atomic(path / IMAGE_FILE, json.dumps(meta), mode=0o644)
        progress(f"image {recipe.name} ready: {size >> 20} MB in {meta['build_seconds']} s")
        return path


def add_pip_and_copies(recipe: Recipe, rootfs: Path, progress: Progress) -> None:
    """A recipe's PyPI packages, by the host's pip from the host's configured sources (binary wheels for
    the image's Python, the same 3.11 as the host's), and the files it copies from the kiln package."""
    if recipe.pip:
        progress(f"pip: {len(recipe.pip)} packages (and what they need) into {PIP_TARGET}")
        target = rootfs / PIP_TARGET.lstrip("/")
        argv = [sys.executable, "-m", "pip", "install", "--quiet", "--no-warn-script-location"]
        argv += ["--disable-pip-version-check", "--only-binary=:all:", "--target", str(target), *recipe.pip]
        run_with_progress(argv, progress)
    for src, dst in recipe.copies:
        target = rootfs / dst.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(KILN / src, target)
        target.chmod(0o644)


def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    return sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """Remove an unfinished build: first whatever an interrupted mmdebstrap left mounted in it (its
    chroot's /proc, /sys, /dev: rmtree must never walk into the host's), then the tree."""
    if not path.exists():
        return
    for point in mounts_under(path):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    if mounts_under(path):
        raise ImageBuildError(f"cannot unmount what is mounted under {path}; remove it by hand")
    shutil.rmtree(path, ignore_errors=True)


def run_with_progress(argv: list[str], progress: Progress) -> None:
    # mmdebstrap reads a sources list from stdin when stdin is not a terminal: give it nothing.
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        tail = [*tail[-19:], line]
        if line.startswith("I: ") or line.startswith("E: "):
            progress(line[3:])
    if proc.wait() != 0:
        raise ImageBuildError(f"{argv[0]} failed with exit code {proc.returncode}: " + " | ".join(tail[-5:]))


def main() -> None:
    """`python -m kiln.images.builder NAME IMAGES_DIR`: how the daemon builds a missing image in the
    background (a process of its own, so a daemon that stops can stop the build with it)."""
    import ctypes
    import os
    import signal
    import sys

    from .recipes import BUILTIN

    def stop(signum, frame) -> None:  # mmdebstrap and its children are in this process group
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.killpg(os.getpgrp(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: the daemon gone (even kill -9), stop too
    name, images_dir = sys.argv[1], Path(sys.argv[2])
    try:
        ensure_built(BUILTIN[name], images_dir, lambda line: print(line, flush=True))
    except ImageBuildError as e:
        print(f"E: {e}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
