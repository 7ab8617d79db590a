"""Memory snapshots that write only what changed: a content-addressed page store per sandbox.

runsc checkpoints uncompressed, so `pages.img` is raw 4 KiB pages. Pages are named by their
XXH3-128 digest and live in append-only pack files; a snapshot is an index (one record
per page: digest, pack, slot) plus the small image files runsc writes beside the pages.

- First stop (full): runsc writes into the sandbox directory on disk and `pages.img` itself is
  renamed into pack 0 — nothing is copied. Its index (the page digests) is only needed by the
  next diff, so it is computed after the stop has returned (`ensure_index`), or by that diff.
- Later stops (diff): runsc writes a scratch image in memory when there is room (the engine's
  memory_scratch), else beside the store; only pages whose digest the store lacks are appended to
  a new pack, and the scratch image is deleted unsynced. When the changed pages stayed in place they
  are then folded into the base pack's own slots (`fold_into_base`); otherwise a diff left stopped is
  later repacked as one pack, page for page (`repack`). Either way a restore then links the pack like
  a full snapshot's. 4 KiB granularity matters: gVisor's memory file shifts by whole pages between
  checkpoints (a process allocating a few pages moves everything after it), which defeats larger
  fixed chunks but not page-sized ones.
- A manifest written last (temp + fsync + rename) makes a snapshot current, so a failed stop
  never harms the previous good one. Packs the current index no longer references are deleted.
- The hash: XXH3-128 costs ~0.07 s for a 290 MB image here, SHA-256 ~0.6 s (more than the writes a
  diff saves). It is not collision-resistant against someone crafting pages, but every page store
  is one sandbox's (kept.py: one owner's), so a crafted collision could only swap that tenant's
  own pages. Indexes of SHA-256 digests written before simply match nothing: their pages are
  written again once, and restores (by pack and slot) are unaffected.
- Restore reassembles the image files beside the store for `runsc restore` (on disk, not tmpfs:
  a restore from tmpfs made the sandbox's next checkpoint 3x slower, and pinned its RAM).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import secrets
import shutil
import struct
import sys
import threading
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from xxhash import xxh3_128_digest

from ...fileio import write_atomic
from ..base import SnapshotSummary

PAGE = 4096
PAGES_FILE = "pages.img"
RECORD = struct.Struct("<16sII")  # digest, pack number, slot in pack
MANIFEST = "manifest.json"


def differing(a: Sequence, b: Sequence, block: int = 512) -> list[int]:
    """The positions where two sequences of one length differ; equal blocks are skipped in C
    (diffs change a few pages of tens of thousands)."""
    found: list[int] = []
    for start in range(0, len(a), block):
        x, y = a[start : start + block], b[start : start + block]
        if x != y:
            found.extend(start + i for i, (p, q) in enumerate(zip(x, y, strict=True)) if p != q)
    return found


class Index:
    """A snapshot's pages in columns: each one's digest, and the pack and slot holding it (on disk:
    one RECORD per page). Columns, because a 290 MB image has ~74,000 pages, and building,
    comparing and writing a tuple per page cost a diff stop ~0.15 s here; arrays do it in C."""

    __slots__ = ("digests", "packs", "slots")

    def __init__(self, digests: list[bytes], packs: array, slots: array):
        self.digests, self.packs, self.slots = digests, packs, slots

    @classmethod
    def whole(cls, digests: list[bytes], pack: int) -> Index:
        """Every page in `pack`, page i at slot i."""
        return cls(digests, array("I", [pack]) * len(digests), array("I", range(len(digests))))

    @classmethod
    def parse(cls, data: bytes) -> Index:
        columns = array("I")
        columns.frombytes(data)
        if sys.byteorder == "big":
            columns.byteswap()
        digests = [data[k : k + 16] for k in range(0, len(data), RECORD.size)]
        return cls(digests, columns[4::6], columns[5::6])

    def to_bytes(self) -> bytes:
        n = len(self.digests)
        digests = array("I")
        digests.frombytes(b"".join(self.digests))
        if sys.byteorder == "big":  # (swapped back with the rest below: digests are bytes, as they were)
            digests.byteswap()
        columns = array("I", bytes(RECORD.size * n))
        for word in range(4):
            columns[word::6] = digests[word::4]
        columns[4::6], columns[5::6] = self.packs, self.slots
        if sys.byteorder == "big":
            columns.byteswap()
        return columns.tobytes()

    def __len__(self) -> int:
        return len(self.digests)

    def locations(self) -> Iterable[tuple[int, int]]:
        return zip(self.packs, self.slots, strict=True)

    def whole_pack(self) -> int | None:
        """The pack that holds these pages as the image itself (page i at slot i), if one does."""
        if not self.digests:
            return None
        ideal = Index.whole(self.digests, self.packs[0])
        return ideal.packs[0] if self.packs == ideal.packs and self.slots == ideal.slots else None


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class PageStore:
    """`<sandbox_dir>/snapshot/`: manifest.json, packs/<n>.pack, <n>.idx, <n>.<image file>."""

    def __init__(self, sandbox_dir: Path):
        self.dir = sandbox_dir / "snapshot"
        self.packs = self.dir / "packs"

    # ------------------------------------------------------------ reading

    def manifest(self) -> dict | None:
        try:
            return json.loads((self.dir / MANIFEST).read_text())
        except (OSError, ValueError):
            return None

    def restorable(self) -> bool:
        m = self.manifest()
        return bool(m and m.get("restorable"))

    def index(self, manifest: dict) -> Index:
        if manifest["index"] is None:  # a full snapshot not indexed yet: index it now
            indexed = self.ensure_index()
            assert indexed is not None
            manifest = indexed
        return Index.parse((self.dir / manifest["index"]).read_bytes())

    def ensure_index(self) -> dict | None:
        """Hash the pages of a full snapshot (pack = its generation, page i at slot i) and record
        the index in the manifest. Idempotent; returns the manifest."""
        m = self.manifest()
        if m is None or m["index"] is not None:
            return m
        gen = m["generation"]
        digests = page_digests(self.pack_path(gen))
        index = f"{gen}.idx"
        self.write_index(index, Index.whole(digests, gen))
        m = self.manifest()  # unchanged meanwhile: the engine never writes it concurrently
        assert m is not None
        m["index"] = index
        write_atomic(self.dir / MANIFEST, json.dumps(m).encode())
        return m

    def write_index(self, name: str, index: Index) -> None:
        write_atomic(self.dir / name, index.to_bytes())

    def stray_packs(self) -> list[str]:
        """Page packs no snapshot references (a save cut short must leave none behind)."""
        if not self.packs.exists():
            return []
        m = self.manifest()
        if m is None:
            live = set()
        elif m["index"] is None:  # a full snapshot not indexed yet is exactly its own pack
            live = {m["generation"]}
        else:
            live = set(self.index(m).packs)
        return [str(p) for p in self.packs.glob("*.pack") if int(p.stem) not in live]

    def pack_path(self, n: int) -> Path:
        return self.packs / f"{n}.pack"

    # ------------------------------------------------------------ writing

    def save(self, image_dir: Path) -> SnapshotSummary:
        """Make the checkpoint in image_dir the current snapshot.

        On failure (e.g. a full disk) everything this attempt wrote is removed again, the previous
        snapshot is untouched, and a full snapshot's pages.img is back in image_dir.
        """
        old = self.manifest()
        gen = old["generation"] + 1 if old else 0
        try:
            return self._save(image_dir, old, gen)
        except BaseException:
            pack = self.pack_path(gen)
            if old is None and pack.exists() and not (image_dir / PAGES_FILE).exists():
                os.replace(pack, image_dir / PAGES_FILE)
            pack.unlink(missing_ok=True)
            for f in self.dir.glob(f"{gen}.*"):
                f.unlink(missing_ok=True)
            raise

    def save_interrupted(self, image_dir: Path) -> SnapshotSummary:
        """Finish a save that a crash cut short, from the checkpoint still in image_dir: a first save
        may already have moved pages.img into its pack (the manifest, written last, says not yet)."""
        old = self.manifest()
        gen = old["generation"] + 1 if old else 0
        pack = self.pack_path(gen)
        if old is None and pack.exists() and not (image_dir / PAGES_FILE).exists():
            os.replace(pack, image_dir / PAGES_FILE)
        return self.save(image_dir)

    def _save(self, image_dir: Path, old: dict | None, gen: int) -> SnapshotSummary:
        self.packs.mkdir(parents=True, exist_ok=True)
        pages = image_dir / PAGES_FILE
        pages_size = pages.stat().st_size
        total = sum(p.stat().st_size for p in image_dir.iterdir() if p.is_file())
        if old is None:
            index, written = None, self._adopt_as_pack(pages, gen)
        else:
            index, written = self._append_new_pages(pages, gen, self.index(old))
        others = {}
        for p in sorted(image_dir.iterdir()):
            if p.is_file() and p.name != PAGES_FILE:
                target = self.dir / f"{gen}.{p.name}"
                shutil.copyfile(p, target)
                fsync_file(target)
                others[p.name] = target.name
                written += p.stat().st_size
        index_name = None
        if index is not None:
            index_name = f"{gen}.idx"
            self.write_index(index_name, index)
        info = SnapshotSummary(
            kind="diff" if old else "full", bytes_written=written, bytes_total=total, taken_at=now_rfc3339()
        )
        manifest = {
            "generation": gen,
            "restorable": True,
            "info": info.to_dict(),
            "index": index_name,
            "pages_size": pages_size,
            "files": others,
        }
        fsync_dir(self.packs)
        write_atomic(self.dir / MANIFEST, json.dumps(manifest).encode())
        fsync_dir(self.dir)
        self.collect_garbage(manifest, index)
        if index is not None:
            try:
                folded = self.fold_into_base(manifest, index)
            except OSError:  # the diff is whole as it is: a later repack (or wake) copies its pages
                folded = 0
            if folded:
                info = SnapshotSummary(
                    kind=info.kind, bytes_written=written + folded, bytes_total=total, taken_at=info.taken_at
                )
                manifest["info"] = info.to_dict()
                write_atomic(self.dir / MANIFEST, json.dumps(manifest).encode())
        return info

    def fold_into_base(self, manifest: dict, index: Index) -> int:
        """Copy a diff's changed pages into the base pack's own slots, so that the snapshot is that
        pack page for page again: the next wake links it instead of copying every page (~0.15 s for
        290 MB here). Returns the bytes written; 0 when it does not apply.

        The diff stays a valid snapshot throughout, so a crash at any point leaves it restorable:
        only slots no record of the diff refers to are overwritten, and the index switches to the
        base pack (atomically) after the pack is synced. It does not apply when a changed slot is
        still needed or too many changed (gVisor moved pages around: a repack copies them all
        later), or when anyone else links the pack (a fork's or a restore's image: runsc reads it)."""
        if not len(index):
            return 0
        base = Counter(index.packs).most_common(1)[0][0]
        target = self.pack_path(base)
        folded = Index.whole(index.digests, base)
        packs, slots = index.packs, index.slots
        changed = sorted({*differing(packs, folded.packs), *differing(slots, folded.slots)})
        if len(changed) > len(index) * FOLD_AT_MOST or os.stat(target).st_nlink != 1:
            return 0
        if changed:
            # a slot of the base that a changed page is read from must not be overwritten (the
            # unchanged pages' own slots never are)
            if not {slots[i] for i in changed if packs[i] == base}.isdisjoint(changed):
                return 0
            self._write_into(target, [(i, packs[i], slots[i]) for i in changed])
            self.write_index(manifest["index"], folded)  # both indexes describe the same pages now
            fsync_dir(self.dir)
        if target.stat().st_size > manifest["pages_size"]:  # slots past the image: nobody's any more
            os.truncate(target, manifest["pages_size"])
        if changed:  # (with nothing changed, the save has just collected what the diff left)
            self.collect_garbage(manifest, folded)
        return len(changed) * PAGE

    def _write_into(self, target: Path, moves: list[tuple[int, int, int]]) -> None:
        """Copy pages (to slot, from pack, from slot) into target, then sync it."""
        sources: dict[int, int] = {}
        try:
            with open(target, "r+b") as out:
                for to, pack, slot in moves:
                    if pack not in sources:
                        sources[pack] = os.open(self.pack_path(pack), os.O_RDONLY)
                    block = os.pread(sources[pack], PAGE, slot * PAGE)
                    os.pwrite(out.fileno(), block.ljust(PAGE, b"\0"), to * PAGE)
                os.fsync(out.fileno())
        finally:
            for fd in sources.values():
                os.close(fd)

    def _adopt_as_pack(self, pages: Path, gen: int) -> int:
        """Full snapshot: pages.img (already on this disk) becomes pack `gen` as it is (indexed later)."""
        with open(pages, "rb") as f:
            os.fsync(f.fileno())
        os.replace(pages, self.pack_path(gen))
        return self.pack_path(gen).stat().st_size

    def _append_new_pages(self, pages: Path, gen: int, old: Index) -> tuple[Index, int]:
        """Diff snapshot: only pages the store does not hold yet go into a new pack. Most pages are
        where they were: compared in place first, only the others are looked up by digest."""
        digests = page_digests(pages)
        n, kept = len(digests), min(len(digests), len(old))
        packs, slots = old.packs[:kept], old.slots[:kept]
        packs.extend(array("I", [0]) * (n - kept))
        slots.extend(array("I", [0]) * (n - kept))
        moved = differing(digests[:kept], old.digests[:kept])
        moved.extend(range(kept, n))
        where = dict(zip(old.digests, range(len(old)), strict=True)) if moved else {}
        new: dict[bytes, int] = {}  # digest -> its slot in the new pack
        first: list[int] = []  # the page of each new slot
        for i in moved:
            digest = digests[i]
            j = where.get(digest)
            if j is not None:
                packs[i], slots[i] = old.packs[j], old.slots[j]
                continue
            slot = new.setdefault(digest, len(new))
            if slot == len(first):
                first.append(i)
            packs[i], slots[i] = gen, slot
        written = 0
        if first:
            with open(pages, "rb") as f, open(self.pack_path(gen), "wb") as out:
                for i in first:
                    block = os.pread(f.fileno(), PAGE, i * PAGE)
                    out.write(block.ljust(PAGE, b"\0"))
                    written += len(block)
                out.flush()
                os.fsync(out.fileno())
        return Index(digests, packs, slots), written

    def repack(self, stop: threading.Event | None = None) -> dict | None:
        """Rewrite the current snapshot's pages as one pack, page for page, and drop the packs it no
        longer needs. Run after a diff stop has returned (the stop itself wrote only new pages): the
        next wake then links the pack as its image instead of copying ~all pages (~0.2 s for 290 MB
        here). Setting `stop` abandons it (RepackStopped), leaving the snapshot as it was.
        Idempotent; returns the manifest."""
        m = self.manifest()
        if m is None or m["index"] is None:
            return m
        index = self.index(m)
        if index.whole_pack() is not None:
            return m
        gen = m["generation"] + 1  # a generation of its own, so pack numbers stay unique
        pack, partial = self.pack_path(gen), self.packs / f".repack-{gen}"  # not *.pack until it is whole
        index_name = f"{gen}.idx"
        switched = False
        try:
            with open(partial, "wb") as out:
                copy_pages(index.locations(), self.pack_path, out, stop)
                out.truncate(m["pages_size"])
                out.flush()
                os.fsync(out.fileno())
            if stop is not None and stop.is_set():
                raise RepackStopped
            index = Index.whole(index.digests, gen)
            self.write_index(index_name, index)
            os.replace(partial, pack)
            fsync_dir(self.packs)
            m = dict(m, generation=gen, index=index_name)
            write_atomic(self.dir / MANIFEST, json.dumps(m).encode())
            switched = True
            fsync_dir(self.dir)
        except BaseException:
            partial.unlink(missing_ok=True)
            if not switched:  # the new pack and index are nobody's
                pack.unlink(missing_ok=True)
                (self.dir / index_name).unlink(missing_ok=True)
            raise
        self.collect_garbage(m, index)
        return m

    def collect_garbage(self, manifest: dict, index: Index | None) -> None:
        """Delete packs and files the current snapshot does not use (and half-written repacks)."""
        live_packs = set(index.packs) if index is not None else {manifest["generation"]}
        for pack in self.packs.iterdir():
            if pack.suffix != ".pack" or int(pack.stem) not in live_packs:
                pack.unlink(missing_ok=True)
        keep = {MANIFEST, manifest["index"], "packs", *manifest["files"].values()} - {None}
        for f in self.dir.iterdir():
            if f.name not in keep:
                f.unlink(missing_ok=True) if f.is_file() else shutil.rmtree(f, ignore_errors=True)

    def mark_consumed(self) -> None:
        """After a restore the sandbox diverges from its snapshot: keep the pages as the next
        diff's base, but never restore this memory image again."""
        m = self.manifest()
        if m and m.get("restorable"):
            m["restorable"] = False
            write_atomic(self.dir / MANIFEST, json.dumps(m).encode())

    # ------------------------------------------------------------ restoring

    def assemble(self, target_dir: Path) -> None:
        """Write the snapshot's image files into target_dir for runsc restore."""
        m = self.manifest()
        if not m:
            raise FileNotFoundError(f"no snapshot in {self.dir}")
        target_dir.mkdir(parents=True, exist_ok=True)
        for name, stored in m["files"].items():
            shutil.copyfile(self.dir / stored, target_dir / name)
        index = self.index(m) if m["index"] is not None else None
        whole = m["generation"] if index is None else index.whole_pack()
        if whole is not None:  # a full snapshot (or a repacked one) is its pack, page for page: no copy
            pack = self.pack_path(whole)
            if pack.stat().st_size > m["pages_size"]:  # a fold cut short before its truncate
                os.truncate(pack, m["pages_size"])
            os.link(pack, target_dir / PAGES_FILE)
            return
        assert index is not None
        with open(target_dir / PAGES_FILE, "wb") as out:
            copy_pages(index.locations(), self.pack_path, out)
            out.truncate(m["pages_size"])


FOLD_AT_MOST = 0.25  # of a diff's pages changed in place: more is a repack's work (it copies them all)
GATHER = 1 << 20  # bytes read or written at once (memory stays flat however large a snapshot is)


class RepackStopped(Exception):
    """A repack was abandoned: someone wants the sandbox (or its packs) now."""


def copy_pages(
    pages: Iterable[tuple[int, int]],
    pack_path: Callable[[int], Path],
    out: BinaryIO,
    stop: threading.Event | None = None,
) -> None:
    """Write the pages at (pack, slot), in order, to out (from where it is; packs are numbers, opened
    by pack_path once each: a Path per page cost more than the copy): each run of consecutive
    slots of one pack is copied by the kernel when long, else read in big reads, and short runs are
    gathered into big writes. Setting `stop` ends it at the next big write (RepackStopped)."""
    out.flush()
    out_fd, pos = out.fileno(), out.tell()
    packs: dict[int, int] = {}
    gathered = bytearray()
    run_pack: int | None = None
    run_start = run_len = 0

    def write_gathered() -> None:
        nonlocal pos
        if stop is not None and stop.is_set():
            raise RepackStopped
        done = 0
        with memoryview(gathered) as view:  # released before the buffer is cleared
            while done < len(view):
                n = os.pwrite(out_fd, view[done:], pos)
                done, pos = done + n, pos + n
        gathered.clear()

    kernel_copy = True  # until the kernel refuses copy_file_range for these files

    def copy_in_kernel(fd: int, offset: int, left: int) -> tuple[int, int]:
        """Copy a long run with copy_file_range (one copy in the kernel instead of a read and a
        write: 87 against 125 ms for 300 MB here); returns (offset, left) of what it did not copy."""
        nonlocal pos, kernel_copy
        write_gathered()
        while left:
            if stop is not None and stop.is_set():
                raise RepackStopped
            try:
                n = os.copy_file_range(fd, out_fd, min(left, GATHER), offset, pos)
            except OSError:
                kernel_copy = False
                break
            if not n:  # the pack ends here (a last, short page)
                return offset, 0
            offset, left, pos = offset + n, left - n, pos + n
        return offset, left

    def flush() -> None:
        if run_pack is None:
            return
        fd, offset, left = packs[run_pack], run_start * PAGE, run_len * PAGE
        if kernel_copy and left >= GATHER:
            offset, left = copy_in_kernel(fd, offset, left)
        while left:
            chunk = os.pread(fd, min(left, GATHER), offset)
            if not chunk:  # the pack ends here (a last, short page)
                break
            gathered.extend(chunk)
            offset, left = offset + len(chunk), left - len(chunk)
            if len(gathered) >= GATHER:
                write_gathered()

    try:
        for pack, slot in pages:
            if pack not in packs:
                packs[pack] = os.open(pack_path(pack), os.O_RDONLY | os.O_CLOEXEC)
            if pack == run_pack and slot == run_start + run_len:
                run_len += 1
                continue
            flush()
            run_pack, run_start, run_len = pack, slot, 1
        flush()
        write_gathered()
        out.seek(pos)
    finally:
        for fd in packs.values():
            os.close(fd)


def remove_scratch(path: Path) -> None:
    """Remove a scratch image directory, or the link to one in memory (memory_scratch) and its target."""
    if path.is_symlink():
        shutil.rmtree(path.readlink(), ignore_errors=True)
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


TRASH = ".trash-"  # scratch images set aside for deletion in the background (recovery removes leftovers)


def set_aside(path: Path) -> Path | None:
    """Rename a scratch directory out of the way (instant), for remove_and_commit later. Its links
    to packs (a restore's image) go at once, also instant: the pack is then no one else's again
    (fold_into_base writes only into a pack no one else links)."""
    if path.is_dir() and not path.is_symlink():
        for f in path.iterdir():
            with contextlib.suppress(OSError):
                if f.is_file() and f.stat().st_nlink > 1:
                    f.unlink()
    target = path.with_name(f"{TRASH}{path.name}-{secrets.token_hex(4)}")
    try:
        os.replace(path, target)
    except FileNotFoundError:
        return None
    return target


def remove_and_commit(path: Path) -> None:
    """Delete a set-aside image and commit the deletion: on a filesystem mounted with `discard`,
    freeing a few hundred MB costs ~0.2 s, and the next fsync anyone makes (a stop's) would pay
    for it if this did not."""
    remove_scratch(path)
    with contextlib.suppress(OSError):  # the sandbox's directory may be gone meanwhile (a destroy)
        fsync_dir(path.parent)


def remove_trash(sandbox_dir: Path) -> None:
    for p in sandbox_dir.glob(TRASH + "*"):
        remove_scratch(p)


def page_digests(path: Path) -> list[bytes]:
    """The XXH3-128 digest of every 4 KiB page (see the module's note on the hash), read in place
    through a mapping (no copy of the image into this process)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return []
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m, memoryview(m) as view:
            return [xxh3_128_digest(view[off : off + PAGE]) for off in range(0, size, PAGE)]
