"""Image archives the image tests import, made by the tests themselves from what the host has:
a busybox-only root filesystem (no python3 at all), a two-layer image whose second layer deletes a
file of the first (a whiteout) as a `docker save` tarball and an OCI-layout archive, and tars with
members that try to escape the tree."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static: one static binary, no libraries
APPLETS = ("sh", "ls", "cat", "echo", "env", "pwd", "id", "test", "sleep", "httpd", "rm", "mkdir", "sync", "ps")


def _add(
    tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644
) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, mode
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def busybox_rootfs(path: Path, extra: dict[str, bytes] | None = None) -> Path:
    """A plain root filesystem tar (what `docker export` writes) with busybox and its applets only."""
    with tarfile.open(path, "w") as tar:
        for d in ("bin", "etc", "tmp", "root"):
            _add(tar, d, kind=tarfile.DIRTYPE, mode=0o1777 if d == "tmp" else 0o755)
        _add(tar, "bin/busybox", BUSYBOX.read_bytes(), mode=0o755)
        for applet in APPLETS:
            _add(tar, f"bin/{applet}", kind=tarfile.SYMTYPE, link="busybox")
        _add(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        _add(tar, "etc/group", b"root:x:0:\n")
        for name, data in (extra or {}).items():
            _add(tar, name, data)
    return path


def escaping_rootfs(path: Path, marker: str) -> Path:
    """A root filesystem tar whose members try to write outside the tree: `../`, absolute paths,
    and files under symlinks that point out of it (absolute and relative)."""
    with tarfile.open(path, "w") as tar:
        _add(tar, "bin", kind=tarfile.DIRTYPE, mode=0o755)
        _add(tar, "bin/busybox", BUSYBOX.read_bytes(), mode=0o755)
        _add(tar, "bin/sh", kind=tarfile.SYMTYPE, link="busybox")
        _add(tar, f"../../tmp/{marker}-dotdot", b"x")
        _add(tar, f"/tmp/{marker}-absolute", b"x")
        _add(tar, "abs", kind=tarfile.SYMTYPE, link="/tmp")
        _add(tar, f"abs/{marker}-abs-symlink", b"x")
        _add(tar, "rel", kind=tarfile.SYMTYPE, link="../../../../../../tmp")
        _add(tar, f"rel/{marker}-rel-symlink", b"x")
        _add(tar, "etc", kind=tarfile.SYMTYPE, link="/etc")  # kiln's own mount points go under etc/
    return path


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def two_layer_image(work: Path) -> tuple[Path, Path]:
    """(docker save tarball, OCI-layout archive) of one image built with umoci: layer 1 is busybox
    plus /etc/gone, layer 2 deletes /etc/gone; Env FOO=bar and WorkingDir /srv in its config."""
    layout, bundle = work / "layout", work / "bundle"
    image = f"{layout}:t"
    run("umoci", "init", "--layout", str(layout))
    run("umoci", "new", "--image", image)
    run("umoci", "config", "--image", image, "--config.env", "FOO=bar", "--config.workingdir", "/srv")
    run("umoci", "unpack", "--image", image, str(bundle))
    root = bundle / "rootfs"
    for d in ("bin", "etc", "srv"):
        (root / d).mkdir(exist_ok=True)
    (root / "bin/busybox").write_bytes(BUSYBOX.read_bytes())
    (root / "bin/busybox").chmod(0o755)
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc/gone").write_text("deleted by the second layer\n")
    (root / "etc/kept").write_text("kept\n")
    run("umoci", "repack", "--refresh-bundle", "--image", image, str(bundle))
    (root / "etc/gone").unlink()
    run("umoci", "repack", "--image", image, str(bundle))
    docker, oci = work / "docker-save.tar", work / "oci-layout.tar"
    run("skopeo", "copy", "--quiet", f"oci:{image}", f"docker-archive:{docker}:kiln-test:latest")
    run("skopeo", "copy", "--quiet", f"oci:{image}", f"oci-archive:{oci}:t")
    layers = json.loads(
        subprocess.run(
            ["skopeo", "inspect", "--config", f"oci:{image}"], check=True, capture_output=True, text=True
        ).stdout
    )["rootfs"]["diff_ids"]
    assert len(layers) == 2, layers
    return docker, oci
