"""Named snapshots on disk, with their memory pages shared among one owner's snapshots.

`data_dir/snapshots/<id>/`: `snapshot.json` (written last: a directory without it is half-made),
`disk.ext4` (a clone of the source's disk), `image/` (runsc's image files except the pages) and
`pages.idx` (one record per page: digest, pack, slot). The pages themselves live in
`data_dir/snapshot-pages/<group>/<id>.pack`, where a group is every snapshot of one owner (a
lineage: snapshots of one sandbox, of its forks and of sandboxes resumed from them, is always
one owner's). A new snapshot stores only the pages its group does not hold yet, so a second
checkpoint of an idle sandbox costs the few pages that changed; a pack is deleted once no
snapshot's index references it.

Saves and reads (resumes) of a group run side by side; deleting (which collects unreferenced
packs) waits for them and they for it, so no resume reads a pack being removed and no save
references one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

from ... import diskimage
from ...fileio import write_atomic
from .snapshots import PAGE, PAGES_FILE, RECORD, copy_pages, fsync_dir, fsync_file, page_digests

META = "snapshot.json"
INDEX = "pages.idx"


class SharedLock:
    """Held by many at once (saves, resumes) or by one alone (a delete and its garbage collection)."""

    def __init__(self) -> None:
        self.cond = asyncio.Condition()
        self.holders = 0
        self.alone = False

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self.cond:
            await self.cond.wait_for(lambda: not self.alone)
            self.holders += 1
        try:
            yield
        finally:
            async with self.cond:
                self.holders -= 1
                self.cond.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self.cond:
            await self.cond.wait_for(lambda: not self.alone and self.holders == 0)
            self.alone = True
        try:
            yield
        finally:
            async with self.cond:
                self.alone = False
                self.cond.notify_all()


class KeptSnapshots:
    def __init__(self, data_dir: Path):
        self.dir = data_dir / "snapshots"
        self.pages = data_dir / "snapshot-pages"
        self.locks: dict[str, SharedLock] = {}

    def path(self, snapshot_id: str) -> Path:
        return self.dir / snapshot_id

    def lock(self, group: str) -> SharedLock:
        return self.locks.setdefault(group, SharedLock())

    @staticmethod
    def group_of(owner: str) -> str:
        return hashlib.sha256(owner.encode()).hexdigest()[:16]  # a safe directory name for any owner key

    def meta(self, snapshot_id: str) -> dict | None:
        try:
            return json.loads((self.path(snapshot_id) / META).read_text())
        except (OSError, ValueError):
            return None

    def members(self, group: str) -> dict[str, dict]:
        """The complete snapshots of a group, by id."""
        out = {}
        for d in self.dir.glob("*") if self.dir.is_dir() else []:
            m = self.meta(d.name)
            if m is not None and m.get("group") == group:
                out[d.name] = m
        return out

    def pack(self, group: str, name: str) -> Path:
        return self.pages / group / f"{name}.pack"

    # ------------------------------------------------------------ saving

    async def save(self, snapshot_id: str, owner: str, meta: dict) -> int:
        """Make the checkpoint runsc wrote into <id>/image a complete snapshot (its pages into the
        group's store); returns the bytes it added to the disk. On failure nothing of it is left."""
        group = self.group_of(owner)
        try:
            async with self.lock(group).shared():
                added = await asyncio.to_thread(self._save, snapshot_id, group, meta)
            return added
        except BaseException:
            # only its own: a pack of another save still under way is unreferenced too until it ends
            await asyncio.to_thread(shutil.rmtree, self.path(snapshot_id), True)
            self.pack(group, snapshot_id).unlink(missing_ok=True)
            raise

    def _save(self, snapshot_id: str, group: str, meta: dict) -> int:
        d = self.path(snapshot_id)
        pages = d / "image" / PAGES_FILE
        (self.pages / group).mkdir(parents=True, exist_ok=True, mode=0o700)
        known: dict[bytes, tuple[str, int]] = {}
        for other, m in self.members(group).items():
            for digest, pack, slot in RECORD.iter_unpack((self.path(other) / INDEX).read_bytes()):
                known.setdefault(digest, (m["packs"][pack], slot))
        digests, size = page_digests(pages), pages.stat().st_size
        own = self.pack(group, snapshot_id)
        if not any(dg in known for dg in digests):  # nothing to share: the image is the pack, page for page
            fsync_file(pages)
            os.replace(pages, own)
            packs, records = [snapshot_id], [(dg, 0, i) for i, dg in enumerate(digests)]
        else:
            packs, records = self._append_new(pages, digests, known, own, snapshot_id)
            pages.unlink()
        write_atomic(d / INDEX, b"".join(RECORD.pack(*r) for r in records))
        fsync_dir(own.parent)
        write_atomic(d / META, json.dumps({**meta, "group": group, "packs": packs, "pages_size": size}))
        fsync_dir(d)
        added = sum(p.stat().st_blocks * 512 for p in d.rglob("*") if p.is_file())
        return added + (own.stat().st_blocks * 512 if own.exists() else 0)

    @staticmethod
    def _append_new(pages: Path, digests, known, own: Path, snapshot_id: str):
        """Only pages the group lacks go into this snapshot's pack; the rest point at other packs."""
        pack_no: dict[str, int] = {}
        records, slot = [], 0
        with open(pages, "rb") as f, open(own, "wb") as out:
            for i, digest in enumerate(digests):
                where = known.get(digest)
                if where is None:
                    f.seek(i * PAGE)
                    out.write(f.read(PAGE).ljust(PAGE, b"\0"))
                    where = known[digest] = (snapshot_id, slot)
                    slot += 1
                records.append((digest, pack_no.setdefault(where[0], len(pack_no)), where[1]))
            out.flush()
            os.fsync(out.fileno())
        if slot == 0:
            own.unlink()
        return list(pack_no), records

    # ------------------------------------------------------------ reading

    @contextlib.asynccontextmanager
    async def opened(self, snapshot_id: str, target: Path) -> AsyncIterator[Path]:
        """The snapshot's disk and runsc image in `target` (disk.ext4, image/), for a resume; the
        image is removed when the block ends (runsc has read it by then)."""
        m = self.meta(snapshot_id)
        if m is None:
            raise FileNotFoundError(f"snapshot {snapshot_id} is missing or half-made")
        if "group" not in m:  # made before pages were shared: its image holds every page itself
            await diskimage.copy_sparse(self.path(snapshot_id) / "disk.ext4", target / "disk.ext4")
            yield self.path(snapshot_id) / "image"
            return
        image = target / "resume.tmp"
        try:
            async with self.lock(m["group"]).shared():
                await diskimage.copy_sparse(self.path(snapshot_id) / "disk.ext4", target / "disk.ext4")
                await asyncio.to_thread(self._assemble, snapshot_id, m, image)
            yield image
        finally:
            await asyncio.to_thread(shutil.rmtree, image, True)

    def _assemble(self, snapshot_id: str, m: dict, image: Path) -> None:
        d = self.path(snapshot_id)
        image.mkdir(parents=True)
        for f in (d / "image").iterdir():
            os.link(f, image / f.name)  # runsc only reads them
        records = list(RECORD.iter_unpack((d / INDEX).read_bytes()))
        packs = [self.pack(m["group"], name) for name in m["packs"]]
        if len(packs) == 1 and all(p == 0 and s == i for i, (_, p, s) in enumerate(records)):
            os.link(packs[0], image / PAGES_FILE)  # the pack is the image, page for page: no copy
            return
        with open(image / PAGES_FILE, "wb") as out:
            copy_pages(((p, s) for _, p, s in records), packs.__getitem__, out)
            out.truncate(m["pages_size"])

    # ------------------------------------------------------------ deleting

    async def delete(self, snapshot_id: str) -> None:
        """Remove a snapshot and the packs no other snapshot references (idempotent)."""
        m = self.meta(snapshot_id)
        if m is None or "group" not in m:  # half-made, or made before pages were shared
            await asyncio.to_thread(shutil.rmtree, self.path(snapshot_id), True)
            return
        async with self.lock(m["group"]).exclusive():
            await asyncio.to_thread(self._remove, snapshot_id, m["group"])

    def _remove(self, snapshot_id: str, group: str) -> None:
        shutil.rmtree(self.path(snapshot_id), ignore_errors=True)
        for pack in self.unreferenced(group):
            pack.unlink(missing_ok=True)

    def unreferenced(self, group: str) -> list[Path]:
        live = {name for m in self.members(group).values() for name in m["packs"]}
        d = self.pages / group
        return [p for p in d.glob("*.pack") if p.stem not in live] if d.is_dir() else []

    def prune(self, keep: set[str]) -> list[str]:
        """At start (nothing else runs): remove snapshots not in `keep` (a crash came between the
        engine's save and the store's row, or during a save) and every unreferenced pack."""
        removed = [d.name for d in self.dir.glob("*") if d.name not in keep] if self.dir.is_dir() else []
        for name in removed:
            shutil.rmtree(self.path(name), ignore_errors=True)
        for group in self.pages.glob("*") if self.pages.is_dir() else []:
            for pack in self.unreferenced(group.name):
                pack.unlink(missing_ok=True)
        return removed

    def leftovers(self, keep: frozenset[str]) -> dict[str, list[str]]:
        groups = [g.name for g in self.pages.glob("*")] if self.pages.is_dir() else []
        return {
            "snapshots": [d.name for d in self.dir.glob("*") if d.name not in keep] if self.dir.is_dir() else [],
            "snapshot_packs": [str(p) for g in groups for p in self.unreferenced(g)],
        }
