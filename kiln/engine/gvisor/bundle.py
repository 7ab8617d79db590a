"""The OCI bundle of a sandbox: an overlayfs root over the image and the runtime spec.

Layout of a sandbox directory:
    disk.ext4         the sandbox's writable disk: a sparse ext4 image of its disk size, loop-mounted
    disk/             ... at this mount point, holding upper/ and work/, the overlayfs upper and work
                      dirs: the sandbox's disk changes and nothing else, capped by the image's size
                      (sandboxes made before the cap have upper/ and work/ directly here)
    rootfs/           the overlay mount point, handed to runsc as the bundle root
    config.json       the OCI runtime spec
    agent.json        the agent's config (token, env, init), mounted read-only, root-only readable
    engine.json       what the engine needs to find this sandbox again after a daemon restart
    console.log       runsc's and the agent's stdio (append mode: runsc writes it with its own offset)
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from ... import diskimage
from ...agent import AGENT_DIR
from ...fileio import write_atomic
from ...images.runtime import GUEST_RUNTIME, RUNTIME_ENV, agent_argv
from ..base import EngineError, SandboxSpec
from .network import Link
from .proc import run

Bind = tuple[str, str, bool]  # host source, guest target, read-only
GUEST_AGENT_DIR = "/opt/kiln/agent"
GUEST_AGENT_CONFIG = "/opt/kiln/config.json"
RESOLV_CONF = "resolv.conf"
CPU_PERIOD = 100_000

# Docker's default capability set plus SYS_PTRACE: the agent runs as root and must be able to
# switch users and own files; gVisor is the isolation boundary, not capabilities.
CAPABILITIES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
    "CAP_SYS_PTRACE",
]


def runtime_spec(
    spec: SandboxSpec, sandbox_dir: Path, link: Link, cgroups_path: str, binds: list[Bind], runtime: Path
) -> dict:
    memory = spec.memory_mb * 1024 * 1024
    caps = {k: CAPABILITIES for k in ("bounding", "effective", "permitted")}
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            # the agent runs on kiln's Python runtime, never the image's (which may have none)
            "args": agent_argv(GUEST_AGENT_DIR, GUEST_AGENT_CONFIG),
            "env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8",
                *(f"{k}={v}" for k, v in RUNTIME_ENV.items()),
            ],
            "cwd": "/",
            "capabilities": caps,
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1048576, "soft": 1048576}],
        },
        "root": {"path": str(sandbox_dir / "rootfs"), "readonly": False},
        "hostname": spec.hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "nodev", "mode=1777"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
            {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=755"]},
            {"destination": GUEST_AGENT_DIR, "type": "bind", "source": str(AGENT_DIR), "options": ["rbind", "ro"]},
            {"destination": GUEST_RUNTIME, "type": "bind", "source": str(runtime), "options": ["rbind", "ro"]},
            {
                "destination": GUEST_AGENT_CONFIG,
                "type": "bind",
                "source": str(sandbox_dir / "agent.json"),
                "options": ["bind", "ro"],
            },
            # kiln's resolver, never the image's own resolv.conf (read-only: the policy's DNS is this one)
            {
                "destination": "/etc/resolv.conf",
                "type": "bind",
                "source": str(sandbox_dir / RESOLV_CONF),
                "options": ["bind", "ro"],
            },
            *(
                {"destination": target, "type": "bind", "source": source, "options": ["rbind", "ro" if ro else "rw"]}
                for source, target, ro in binds
            ),
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "network", "path": link.netns_path},
            ],
            "cgroupsPath": cgroups_path,
            "resources": {
                "memory": {"limit": memory, "swap": memory},
                "cpu": {"quota": int(spec.cpus * CPU_PERIOD), "period": CPU_PERIOD},
                "pids": {"limit": 4096},
            },
        },
    }


def write_bundle(
    spec: SandboxSpec,
    sandbox_dir: Path,
    link: Link,
    cgroups_path: str,
    token: str,
    binds: list[Bind],
    resolver: str,
    runtime: Path,
) -> None:
    (sandbox_dir / "rootfs").mkdir(exist_ok=True)
    write_atomic(sandbox_dir / RESOLV_CONF, f"nameserver {resolver}\noptions timeout:2 attempts:2\n", mode=0o644)
    image = spec.image
    agent_config = {
        "token": token,
        "env": spec.env,
        "init": spec.init,
        "setup_pending": spec.setup_pending,
        "user": image.user,
        "workdir": image.workdir,
        "start": list(image.start),
    }
    write_atomic(sandbox_dir / "agent.json", json.dumps(agent_config))
    config = runtime_spec(spec, sandbox_dir, link, cgroups_path, binds, runtime)
    write_atomic(sandbox_dir / "config.json", json.dumps(config))


MAX_DISK_TEMPLATES = 4  # sizes kept as templates (users may ask for any size: the rest get mkfs)


async def make_disk(sandbox_dir: Path, size_mb: int, templates: Path) -> None:
    """The writable disk: sparse (costs only what is written), no reserved blocks, lazy init.

    mkfs costs ~30 ms a disk here, a sparse copy of an empty ext4 of the same size ~5 ms: the first
    disk of a size leaves its empty ext4 in `templates` for the next ones. (The copies share the
    template's filesystem UUID, which nothing of kiln's or of ext4's relies on.)"""
    disk = sandbox_dir / "disk.ext4"
    template = templates / f"empty-{size_mb}mb.ext4"
    if not template.exists():
        templates.mkdir(parents=True, exist_ok=True)
        if len(list(templates.glob("empty-*.ext4"))) >= MAX_DISK_TEMPLATES:
            await diskimage.make_ext4(disk, size_mb)
            return
        tmp = templates / f".{template.name}.{secrets.token_hex(4)}"
        try:
            await diskimage.make_ext4(tmp, size_mb)
            os.replace(tmp, template)
        finally:
            tmp.unlink(missing_ok=True)
    await diskimage.copy_sparse(template, disk)


def layer_dir(sandbox_dir: Path) -> Path:
    """Where upper/ and work/ live: on the capped disk, or (older sandboxes) beside the bundle."""
    return sandbox_dir / "disk" if (sandbox_dir / "disk.ext4").exists() else sandbox_dir


async def mount_rootfs(image_dir: Path, sandbox_dir: Path) -> None:
    rootfs = sandbox_dir / "rootfs"
    if diskimage.is_mounted(rootfs):
        return
    layers = layer_dir(sandbox_dir)
    if layers != sandbox_dir:
        try:
            await diskimage.mount(sandbox_dir / "disk.ext4", layers)
        except diskimage.CommandFailed as e:
            raise EngineError(str(e)) from e
    for d in ("upper", "work"):
        (layers / d).mkdir(exist_ok=True)
    # nosuid,nodev: the upper layer holds whatever the tenant wrote, setuid-root files included
    opts = f"nosuid,nodev,lowerdir={image_dir},upperdir={layers / 'upper'},workdir={layers / 'work'}"
    await run(["mount", "-t", "overlay", "overlay", "-o", opts, str(rootfs)])


async def unmount_rootfs(sandbox_dir: Path) -> None:
    await diskimage.unmount(sandbox_dir / "rootfs", lazy=True)
    await diskimage.unmount(sandbox_dir / "disk")
