"""Volumes: named, size-capped filesystems that outlive sandboxes.

Each volume is a sparse ext4 image under `<data_dir>/volumes/<owner>/<id>.ext4` (ext4 itself caps
the size: writing past it is "No space left on device" inside the sandbox). Core records who uses
it and hands the engine a VolumeAttachment (the image, the mount path, read-only or not); how it gets
into the sandbox is the engine's business. One read-write user at a time, or any number of read-only.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

from .. import diskimage
from ..engine.base import VolumeAttachment
from ..store.db import Attachment, NameTaken, Store, User, Volume, now
from .errors import BadRequest, Conflict, Internal, NotFound, TooManyRequests
from .names import NAME_RE, check_name

log = logging.getLogger("kiln.volumes")

DEFAULT_SIZE_MB = 1024
PROTECTED = {
    "/",
    "/proc",
    "/sys",
    "/dev",
    "/dev/pts",
    "/run",
    "/tmp",
    "/etc",
    "/bin",
    "/sbin",
    "/lib",
    "/lib64",
    "/usr",
    "/usr/local/bin",
    "/boot",
    "/root",
    "/opt/kiln",
}


@dataclass
class VolumeRequest:
    """One entry of `volumes` (existing) or `new_volumes` (created now) in a create request."""

    name: str
    mount: str
    read_only: bool = False
    size_mb: int | None = None  # only for new volumes


@dataclass
class PersistentVolume:
    """One entry of bhatti's `persistent_volumes`: attach the named volume, making it first if it does
    not exist and auto_create is set (with size_mb, or the default size)."""

    name: str
    mount: str
    read_only: bool = False
    size_mb: int | None = None
    auto_create: bool = False


def validate_mount(path: str) -> None:
    if not isinstance(path, str) or not path.startswith("/"):
        raise BadRequest(f"volume mount must be an absolute path: {path!r}")
    parts = path.split("/")
    if ".." in parts or "." in parts:
        raise BadRequest(f"volume mount must not contain . or ..: {path!r}")
    clean = "/" + "/".join(p for p in parts if p)
    if (
        clean in PROTECTED
        or clean.startswith("/opt/kiln/")
        or clean.startswith("/proc/")
        or clean.startswith("/sys/")
        or clean.startswith("/dev/")
    ):
        raise BadRequest(f"volume mount {clean!r} is a protected path")


class VolumeService:
    def __init__(self, store: Store, data_dir: Path, max_storage_mb: int):
        self.store = store
        self.root = data_dir / "volumes"
        self.max_storage_mb = max_storage_mb
        self.lock = asyncio.Lock()  # attach/detach/mount decisions, one at a time

    def image(self, v: Volume) -> Path:
        return self.root / v.owner_id / f"{v.id}.ext4"

    # ------------------------------------------------------------ CRUD

    def get(self, user: User, name: str) -> Volume:
        if not NAME_RE.match(name):
            raise BadRequest("invalid volume name")
        v = self.store.get_volume(user.id, name)
        if v is None:
            raise NotFound(f'volume "{name}" not found')
        return v

    def list(self, user: User) -> builtins.list[Volume]:
        return self.store.list_volumes(user.id)

    def check_new(self, user: User, name: str, size_mb: int | None, extra_mb: int = 0) -> int:
        """Validate a volume to be created; returns its size. `extra_mb`: others created in the same request."""
        size_mb = DEFAULT_SIZE_MB if size_mb is None else size_mb
        if not name or not isinstance(size_mb, int) or size_mb <= 0:
            raise BadRequest("name and size_mb (> 0) required")
        check_name("volume", name)
        if self.store.get_volume(user.id, name) is not None:
            raise Conflict(f'volume "{name}" already exists')
        used = self.store.volume_storage_mb(user.id) + extra_mb
        limit = min(user.max_volume_storage_mb, self.max_storage_mb)
        if used + size_mb > limit:
            raise TooManyRequests(f"volume storage quota exceeded ({used}MB used, {limit}MB max)")
        return size_mb

    async def create(self, user: User, name: str, size_mb: int | None) -> Volume:
        size_mb = self.check_new(user, name, size_mb)
        v = Volume(id=secrets.token_hex(8), owner_id=user.id, name=name, size_mb=size_mb, created_at=now())
        path = self.image(v)
        try:
            await diskimage.make_ext4(path, size_mb, root_owner=(1000, 1000))  # owned by the sandbox user
            self.store.insert_volume(v)
        except NameTaken:
            path.unlink(missing_ok=True)
            raise Conflict(f'volume "{name}" already exists')
        except BaseException as e:
            path.unlink(missing_ok=True)
            if isinstance(e, Exception):
                raise Internal(f"create volume {name}: {e}") from e
            raise
        log.info("created volume %s (%s, %d MB) for %s", v.id, name, size_mb, user.id)
        return v

    async def delete(self, user: User, name: str) -> None:
        v = self.get(user, name)
        async with self.lock:
            n = len(self.store.attachments(volume_id=v.id))
            if n:
                raise Conflict(f'volume "{name}" has {n} active attachment(s)')
            self.store.delete_volume(v.id)
            await asyncio.to_thread(self.image(v).unlink, missing_ok=True)  # a large sparse file: off the loop
        log.info("deleted volume %s (%s)", v.id, name)

    async def resize(self, user: User, name: str, size_mb: object) -> Volume:
        """Grow a detached volume (its ext4 with it); shrinking is refused: it would lose data."""
        v = self.get(user, name)
        if not isinstance(size_mb, int) or isinstance(size_mb, bool) or size_mb <= v.size_mb:
            raise BadRequest(f"size_mb must be larger than the volume's {v.size_mb} MB (volumes only grow)")
        async with self.lock:
            self.check_detached(v, "resized")
            used = self.store.volume_storage_mb(user.id) - v.size_mb
            limit = min(user.max_volume_storage_mb, self.max_storage_mb)
            if used + size_mb > limit:
                raise TooManyRequests(f"volume storage quota exceeded ({used}MB used, {limit}MB max)")
            try:
                await diskimage.grow_ext4(self.image(v), size_mb)
            except diskimage.CommandFailed as e:
                raise Internal(f"resize volume {name}: {e}") from e
            self.store.set_volume_size(v.id, size_mb)
        log.info("resized volume %s (%s) to %d MB", v.id, name, size_mb)
        v.size_mb = size_mb
        return v

    async def clone(self, user: User, name: str, new_name: str) -> Volume:
        """A new volume with a detached volume's content (bhatti's volume snapshot)."""
        v = self.get(user, name)
        async with self.lock:
            self.check_detached(v, "snapshotted")
            self.check_new(user, new_name, v.size_mb)
            copy = Volume(id=secrets.token_hex(8), owner_id=user.id, name=new_name, size_mb=v.size_mb, created_at=now())
            path = self.image(copy)
            try:
                await diskimage.copy_sparse(self.image(v), path)
                self.store.insert_volume(copy)
            except NameTaken:
                path.unlink(missing_ok=True)
                raise Conflict(f'volume "{new_name}" already exists') from None
            except BaseException as e:
                path.unlink(missing_ok=True)
                if isinstance(e, Exception):
                    raise Internal(f"snapshot volume {name}: {e}") from e
                raise
        log.info("cloned volume %s (%s) as %s (%s)", v.id, name, copy.id, new_name)
        return copy

    def check_detached(self, v: Volume, verb: str) -> None:
        n = len(self.store.attachments(volume_id=v.id))
        if n:
            raise Conflict(f'volume "{v.name}" has {n} active attachment(s): it can only be {verb} detached')

    # ------------------------------------------------------------ attaching

    def split_persistent(
        self, user: User, persistent: builtins.list[PersistentVolume]
    ) -> tuple[builtins.list[VolumeRequest], builtins.list[VolumeRequest]]:
        """bhatti's persistent_volumes as (existing to attach, new to make): a missing volume is made only
        with auto_create, else it is looked up (and found missing: 404) like any other."""
        wanted: builtins.list[VolumeRequest] = []
        new: builtins.list[VolumeRequest] = []
        for pv in persistent:
            if pv.auto_create and self.store.get_volume(user.id, pv.name) is None:
                new.append(VolumeRequest(pv.name, pv.mount, pv.read_only, pv.size_mb))
            else:
                wanted.append(VolumeRequest(pv.name, pv.mount, pv.read_only))
        return wanted, new

    def resolve(self, user: User, wanted: builtins.list[VolumeRequest], new: builtins.list[VolumeRequest]) -> None:
        """Check a create request's volumes before anything is made: names, mounts, sizes, conflicts."""
        mounts = set()
        extra = 0
        for req in wanted + new:
            validate_mount(req.mount)
            if req.mount in mounts:
                raise BadRequest(f"two volumes mounted at {req.mount}")
            mounts.add(req.mount)
        for req in new:
            extra += self.check_new(user, req.name, req.size_mb, extra)
        if len({r.name for r in new}) != len(new):
            raise BadRequest("new_volumes names must be unique")
        for req in wanted:
            v = self.get(user, req.name)
            self.check_attachable(v, req.read_only)

    def check_attachable(self, v: Volume, read_only: bool) -> None:
        current = self.store.attachments(volume_id=v.id)
        rw = sum(1 for a in current if not a.read_only)
        if not read_only and current:
            raise Conflict(f'volume "{v.name}" is already attached (rw={rw}, ro={len(current) - rw})')
        if read_only and rw:
            raise Conflict(f'volume "{v.name}" has a read-write attachment')

    async def attach(
        self, user: User, sandbox_id: str, wanted: builtins.list[VolumeRequest], new: builtins.list[VolumeRequest]
    ) -> tuple[VolumeAttachment, ...]:
        """Create the new volumes and record every attachment; the engine attaches them."""
        plan: builtins.list[tuple[Volume, VolumeRequest]] = []
        for req in new:
            plan.append((await self.create(user, req.name, req.size_mb), req))
        async with self.lock:
            for req in wanted:
                v = self.get(user, req.name)
                self.check_attachable(v, req.read_only)  # again: another create may have won meanwhile
                plan.append((v, req))
            out = []
            for v, req in plan:
                self.store.attach_volume(Attachment(v.id, sandbox_id, req.mount, req.read_only))
                out.append(VolumeAttachment(str(self.image(v)), req.mount, req.read_only))
        return tuple(out)

    def volume_json(self, v: Volume, with_attachments: bool = True) -> dict:
        attachments = None
        if with_attachments:
            attachments = [
                {"sandbox_id": a.sandbox_id, "mount": a.mount, "read_only": a.read_only}
                for a in self.store.attachments(volume_id=v.id)
            ]
        return {
            "id": v.id,
            "user_id": v.owner_id,
            "name": v.name,
            "size_mb": v.size_mb,
            "status": "ready",
            "attachments": attachments,
            "created_at": v.created_at,
        }
