"""Images from archives: a `docker save` tarball, an OCI image-layout tar, or a plain root
filesystem tar (`docker export`, optionally compressed).

Layers are applied by umoci (whiteouts, hard links, and paths that can never leave the tree, since
it resolves every member inside the root), after skopeo turned a Docker or OCI archive into an OCI
layout; a plain root filesystem becomes a one-layer image first, so all three take the same path.
Before anything is unpacked, the archive's members are measured without extracting them, so an
archive that would unpack to more than the caller allows (a compression bomb) is refused up front.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from .config import ImageConfig

DOCKER, OCI, ROOTFS = "docker-archive", "oci-archive", "rootfs"
TOOL_TIMEOUT = 1800.0
TAG = "kiln"


class BadArchive(Exception):
    """The archive is not an image kiln can import; the message says why (for the caller)."""


class TooBig(Exception):
    pass


@dataclass
class Measured:
    format: str
    unpacked_bytes: int  # what its files (every layer's) add up to


def _inner_size(stream, budget: int) -> int:
    """Total member size of a (possibly compressed) tar read from `stream`, or -1 if it is no tar."""
    total = 0
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as inner:
            for m in inner:
                total += m.size
                if total > budget:
                    raise TooBig
    except (tarfile.TarError, EOFError, OSError, ValueError):
        return -1 if total == 0 else total
    return total


def measure(archive: Path, budget: int) -> Measured:
    """Which kind of archive this is and how much it unpacks to; TooBig beyond budget."""
    top: set[str] = set()  # of the names that decide the kind: never more than two
    total = 0
    try:
        with tarfile.open(archive, mode="r:*") as outer:
            for m in outer:
                name = m.name.lstrip("./")
                if name in ("manifest.json", "oci-layout"):
                    top.add(name)
                total += m.size
                if total > budget:
                    raise TooBig
            kind = DOCKER if "manifest.json" in top else OCI if "oci-layout" in top else ROOTFS
            if kind == ROOTFS:
                return Measured(kind, total)
            layers = 0
            for m in outer.getmembers():
                if m.isfile() and m.size > 512 and not m.name.endswith(".json"):
                    f = outer.extractfile(m)
                    if f is not None:
                        layers += max(0, _inner_size(f, budget - layers))
                        if layers > budget:
                            raise TooBig
            return Measured(kind, layers)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise BadArchive(f"not a readable tar archive ({e})") from e


def run(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=TOOL_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        raise BadArchive(f"{argv[0]} took longer than {TOOL_TIMEOUT:.0f} s") from e
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise BadArchive(f"{argv[0]} {argv[1]}: {last.strip(' ⨯')}")
    return proc.stdout


def to_layout(archive: Path, kind: str, layout: Path) -> None:
    """An OCI layout at `layout` holding the archive's image under tag kiln."""
    if kind == ROOTFS:
        run(["umoci", "init", "--layout", str(layout)])
        run(["umoci", "new", "--image", f"{layout}:{TAG}"])
        run(["umoci", "raw", "add-layer", "--image", f"{layout}:{TAG}", str(archive)])
    else:
        run(["skopeo", "copy", "--quiet", f"{kind}:{archive}", f"oci:{layout}:{TAG}"])


def unpack(archive: Path, kind: str, work: Path, rootfs: Path) -> ImageConfig:
    """Apply the archive's layers into `rootfs` (a path that must not exist yet); `work` is scratch."""
    layout = work / "layout"
    to_layout(archive, kind, layout)
    config = json.loads(run(["skopeo", "inspect", "--config", f"oci:{layout}:{TAG}"]))
    bundle = work / "bundle"
    run(["umoci", "unpack", "--image", f"{layout}:{TAG}", str(bundle)])
    (bundle / "rootfs").rename(rootfs)
    return ImageConfig.from_oci(config)
