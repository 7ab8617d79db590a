"""Builds the default sandbox image: Debian bookworm (essential) + python3, with the uid 1000 user.

The image is a plain read-only directory tree used as the overlayfs lower layer of every sandbox.
It is built once into `<images_dir>/default` and reused; a half-built tree never becomes visible
because the build goes to a temporary directory that is renamed into place at the end.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

DEFAULT_IMAGE = "default"
SUITE = "bookworm"
PACKAGES = ["python3", "procps"]
# Documentation and translations are dead weight in a sandbox image.
PATH_EXCLUDES = ["/usr/share/man/*", "/usr/share/locale/*", "/usr/share/doc/*", "/usr/share/info/*"]
# Unprivileged user that exec and shells run as by default (uid/gid 1000), with /workspace.
CUSTOMIZE = [
    'echo "kiln:x:1000:1000:kiln:/home/kiln:/bin/bash" >> "$1/etc/passwd"',
    'echo "kiln:x:1000:" >> "$1/etc/group"',
    'echo "kiln:*:19000:0:99999:7:::" >> "$1/etc/shadow"',
    'mkdir -p "$1/home/kiln" "$1/workspace" && chown 1000:1000 "$1/home/kiln" "$1/workspace"',
    'mkdir -p "$1/opt/kiln/agent" && : > "$1/opt/kiln/config.json"',
]


class ImageBuildError(Exception):
    pass


def image_path(images_dir: Path, name: str = DEFAULT_IMAGE) -> Path:
    return images_dir / name


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
        "kiln builds its image from the sources the host already uses"
    )


def ensure_default_image(images_dir: Path, log=print) -> Path:
    """Return the default image, building it first if it does not exist yet."""
    target = image_path(images_dir)
    if (target / "usr/bin/python3").exists():
        return target
    images_dir.mkdir(parents=True, exist_ok=True)
    # One build at a time per images_dir (several daemons or test runs may share it).
    with open(images_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "usr/bin/python3").exists():
            return target
        tmp = images_dir / f".{DEFAULT_IMAGE}.building"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = ["mmdebstrap", "--variant=essential", f"--include={','.join(PACKAGES)}"]
        cmd += [f"--dpkgopt=path-exclude={p}" for p in PATH_EXCLUDES]
        cmd += [f"--customize-hook={h}" for h in CUSTOMIZE]
        cmd += [SUITE, str(tmp), host_mirror()]
        log(f"building the default image (Debian {SUITE} + python3) into {target}; this takes ~30 s, once")
        # mmdebstrap reads a sources list from stdin when stdin is not a terminal: give it nothing.
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=sys.stderr, stderr=sys.stderr)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"mmdebstrap failed with exit code {proc.returncode}")
        os.rename(tmp, target)
        log(f"default image ready: {target}")
    return target
