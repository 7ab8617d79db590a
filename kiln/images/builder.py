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
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..fileio import write_atomic
from .recipes import PATH_EXCLUDES, SUITE, Recipe
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
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        started = time.monotonic()
        progress(f"building image {recipe.name} ({recipe.description}) into {path}")
        run_with_progress(mmdebstrap_argv(recipe, path / "rootfs", host_mirror()), progress)
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


def remove_unfinished(images_dir: Path, keep: set[str]) -> None:
    """Builds interrupted by a crash (no image.json, lock free) are removed; `keep` names are left."""
    if not images_dir.is_dir():
        return
    for d in images_dir.iterdir():
        if d.is_dir() and d.name not in keep and not built(d) and not d.name.startswith("runtime-"):
            with contextlib.suppress(OSError), open(images_dir / f".{d.name}.lock", "w") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                shutil.rmtree(d, ignore_errors=True)
                os.unlink(images_dir / f".{d.name}.lock")
