"""The snapshot page store on plain files: round trips, diffs, garbage collection, failures."""

import errno
import os

import pytest

from kiln.engine.gvisor import snapshots
from kiln.engine.gvisor.snapshots import PAGE, PageStore


def image(tmp_path, name, pages: bytes, meta=b"checkpoint-state"):
    d = tmp_path / name
    d.mkdir()
    (d / "pages.img").write_bytes(pages)
    (d / "checkpoint.img").write_bytes(meta)
    return d


def assembled(store, tmp_path, name="out"):
    target = tmp_path / name
    store.assemble(target)
    return (target / "pages.img").read_bytes(), (target / "checkpoint.img").read_bytes()


def test_full_then_diff_round_trip_and_write_only_new_pages(tmp_path):
    base = os.urandom(PAGE * 300) + b"tail-not-page-aligned"
    store = PageStore(tmp_path / "sb")
    first = store.save(image(tmp_path, "i0", base))
    assert first.kind == "full" and first.bytes_written >= len(base)
    assert assembled(store, tmp_path, "a0") == (base, b"checkpoint-state")

    # shift everything by one page (a new page at the front) and change one page
    changed = bytearray(os.urandom(PAGE) + base)
    changed[PAGE * 50 : PAGE * 51] = os.urandom(PAGE)
    second = store.save(image(tmp_path, "i1", bytes(changed), b"state-2"))
    assert second.kind == "diff"
    assert second.bytes_written <= 2 * PAGE + len(b"state-2") + PAGE
    assert assembled(store, tmp_path, "a1") == (bytes(changed), b"state-2")
    assert store.restorable()


def test_long_runs_are_copied_by_the_kernel_or_read_when_it_refuses(tmp_path, monkeypatch):
    base = os.urandom(PAGE * 1500) + b"tail-not-page-aligned"  # runs of 700 and 800 pages after the diff
    changed = bytearray(os.urandom(PAGE) + base)
    changed[PAGE * 701 : PAGE * 702] = os.urandom(PAGE)
    store = PageStore(tmp_path / "sb")
    store.save(image(tmp_path, "i0", base))
    store.save(image(tmp_path, "i1", bytes(changed)))
    calls = []
    real = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", lambda *a: calls.append(a) or real(*a))
    assert assembled(store, tmp_path, "kernel")[0] == bytes(changed) and calls

    def refused(*a):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refused)
    assert assembled(store, tmp_path, "read")[0] == bytes(changed)


def test_unreferenced_packs_are_deleted(tmp_path):
    store = PageStore(tmp_path / "sb")
    store.save(image(tmp_path, "i0", os.urandom(PAGE * 10)))
    store.save(image(tmp_path, "i1", os.urandom(PAGE * 10)))  # nothing shared with pack 0
    packs = sorted(p.name for p in store.packs.iterdir())
    assert packs == ["1.pack"]
    assert sorted(p.name for p in store.dir.iterdir()) == ["1.checkpoint.img", "1.idx", "manifest.json", "packs"]


def test_consumed_snapshot_is_not_restorable_but_stays_a_diff_base(tmp_path):
    data = os.urandom(PAGE * 20)
    store = PageStore(tmp_path / "sb")
    store.save(image(tmp_path, "i0", data))
    store.mark_consumed()
    assert not store.restorable()
    again = store.save(image(tmp_path, "i1", data))
    assert again.kind == "diff" and again.bytes_written < PAGE and store.restorable()


def test_a_failed_save_leaves_the_previous_snapshot_whole(tmp_path, monkeypatch):
    data = os.urandom(PAGE * 40)
    store = PageStore(tmp_path / "sb")
    store.save(image(tmp_path, "i0", data))
    store.ensure_index()
    before = {p.relative_to(store.dir): p.read_bytes() for p in store.dir.rglob("*") if p.is_file()}

    def disk_full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(snapshots, "fsync_file", disk_full)
    second = image(tmp_path, "i1", os.urandom(PAGE * 40))
    with pytest.raises(OSError):
        store.save(second)
    after = {p.relative_to(store.dir): p.read_bytes() for p in store.dir.rglob("*") if p.is_file()}
    assert after == before
    assert (second / "pages.img").exists()  # the image is still there to resume from
    assert assembled(store, tmp_path)[0] == data


def test_a_failed_full_save_gives_the_image_back(tmp_path, monkeypatch):
    data = os.urandom(PAGE * 8)
    store = PageStore(tmp_path / "sb")
    monkeypatch.setattr(snapshots, "fsync_file", lambda p: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    img = image(tmp_path, "i0", data)
    with pytest.raises(OSError):
        store.save(img)
    assert (img / "pages.img").read_bytes() == data
    assert store.manifest() is None and not any(store.packs.iterdir())


def test_a_full_snapshot_is_indexed_after_the_stop_and_restores_without_a_copy(tmp_path):
    data = os.urandom(PAGE * 64)
    store = PageStore(tmp_path / "sb")
    store.save(image(tmp_path, "i0", data))
    assert store.manifest()["index"] is None  # the stop did not hash anything
    out = tmp_path / "restore"
    store.assemble(out)
    assert (out / "pages.img").read_bytes() == data
    assert os.stat(out / "pages.img").st_ino == os.stat(store.pack_path(0)).st_ino  # a link, not a copy
    manifest = store.ensure_index()
    assert manifest["index"] == "0.idx" and store.ensure_index() == manifest  # idempotent
    assert assembled(store, tmp_path, "again")[0] == data
    changed = bytearray(data)
    changed[:PAGE] = os.urandom(PAGE)
    diff = store.save(image(tmp_path, "i1", bytes(changed)))
    assert diff.kind == "diff" and diff.bytes_written < 2 * PAGE + 100
    assert assembled(store, tmp_path, "a1")[0] == bytes(changed)


def test_a_diff_indexes_an_unindexed_full_snapshot_itself(tmp_path):
    """The daemon may die before the background indexing: the next stop does it."""
    data = os.urandom(PAGE * 32)
    store = PageStore(tmp_path / "sb")
    store.save(image(tmp_path, "i0", data))
    diff = store.save(image(tmp_path, "i1", data))
    assert diff.kind == "diff" and diff.bytes_written < PAGE
    assert assembled(store, tmp_path)[0] == data


def test_a_diff_with_nothing_new_writes_no_pack_and_repeated_new_pages_are_stored_once(tmp_path):
    base = os.urandom(PAGE * 20)
    store = PageStore(tmp_path / "sb")
    store.save(image(tmp_path, "i0", base))
    packs = sorted(p.name for p in store.packs.iterdir())
    same = store.save(image(tmp_path, "i1", base, b"state-1"))
    assert same.bytes_written == len(b"state-1") and sorted(p.name for p in store.packs.iterdir()) == packs
    page = os.urandom(PAGE)
    doubled = page + base + page  # one new page, twice
    twice = store.save(image(tmp_path, "i2", doubled, b"s"))
    assert twice.bytes_written == PAGE + 1
    assert assembled(store, tmp_path, "a2") == (doubled, b"s")


def test_scratch_images_set_aside_are_deleted_later_or_at_the_next_start(tmp_path):
    sandbox = tmp_path / "sb"
    sandbox.mkdir()
    scratch = image(tmp_path, "sb/checkpoint.tmp", b"x" * PAGE)
    aside = snapshots.set_aside(scratch)
    assert aside is not None and not scratch.exists() and aside.parent == sandbox
    assert snapshots.set_aside(scratch) is None  # nothing there: nothing to set aside
    leftover = snapshots.set_aside(image(tmp_path, "sb/restore.tmp", b"y"))
    snapshots.remove_and_commit(aside)
    assert not aside.exists() and leftover is not None and leftover.exists()
    snapshots.remove_trash(sandbox)  # what a start does with what a crash left
    assert sorted(p.name for p in sandbox.iterdir()) == []


def test_a_repacked_diff_is_one_pack_that_a_restore_links(tmp_path):
    base = os.urandom(PAGE * 40) + b"short"
    store = PageStore(tmp_path / "sb")
    store.save(image(tmp_path, "i0", base))
    store.ensure_index()
    changed = os.urandom(PAGE) + base  # every page moved by one: no fold, a repack's work
    assert store.save(image(tmp_path, "i1", changed, b"state-1")).kind == "diff"
    assert len(list(store.packs.glob("*.pack"))) == 2
    before = assembled(store, tmp_path, "a0")
    m = store.repack()
    assert m is not None and store.restorable() and store.stray_packs() == []
    assert [p.name for p in store.packs.iterdir()] == [f"{m['generation']}.pack"]  # the old ones collected
    assert assembled(store, tmp_path, "a1") == before == (changed, b"state-1")
    assert os.stat(tmp_path / "a1" / "pages.img").st_nlink == 2  # linked, not copied
    assert store.repack() == m  # nothing left to do
    (tmp_path / "a1" / "pages.img").unlink()  # the restore is done with its image
    later = changed[: PAGE * 3] + os.urandom(PAGE) + changed[PAGE * 4 :]
    third = store.save(image(tmp_path, "i2", later, b"state-2"))  # a diff against the repacked pack
    # its new page written twice: into a pack of its own, then folded into the repacked one
    assert third.kind == "diff" and third.bytes_written <= 2 * PAGE + len(b"state-2")
    assert assembled(store, tmp_path, "a2") == (later, b"state-2")
    assert len(list(store.packs.glob("*.pack"))) == 1


def test_a_failed_repack_leaves_the_snapshot_as_it_was(tmp_path, monkeypatch):
    store = PageStore(tmp_path / "sb")
    base = os.urandom(PAGE * 8)
    store.save(image(tmp_path, "i0", base))
    changed = base[: PAGE * 4] + os.urandom(PAGE) + base[PAGE * 4 :]  # half the pages moved: no fold
    store.save(image(tmp_path, "i1", changed, b"s"))
    packs = sorted(p.name for p in store.packs.iterdir())

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(snapshots.os, "fsync", full_disk)
    with pytest.raises(OSError):
        store.repack()
    monkeypatch.undo()
    assert sorted(p.name for p in store.packs.iterdir()) == packs and store.stray_packs() == []
    assert assembled(store, tmp_path, "a") == (changed, b"s")


def test_a_stopped_repack_leaves_the_snapshot_as_it_was(tmp_path):
    import threading

    store = PageStore(tmp_path / "sb")
    base = os.urandom(PAGE * 600)  # more than one big write (GATHER) of pages to copy
    store.save(image(tmp_path, "i0", base))
    changed = base[:PAGE] + os.urandom(PAGE) + base[PAGE:]  # pages moved: no fold
    store.save(image(tmp_path, "i1", changed, b"s"))
    packs, manifest = sorted(p.name for p in store.packs.iterdir()), store.manifest()
    stop = threading.Event()
    stop.set()
    with pytest.raises(snapshots.RepackStopped):
        store.repack(stop)
    assert sorted(p.name for p in store.packs.iterdir()) == packs and store.manifest() == manifest
    assert assembled(store, tmp_path, "a") == (changed, b"s")


def test_a_diff_of_pages_changed_in_place_is_folded_into_its_base_which_a_restore_links(tmp_path):
    base = os.urandom(PAGE * 64) + b"short"
    store = PageStore(tmp_path / "sb")
    store.save(image(tmp_path, "i0", base))
    changed = bytearray(base + os.urandom(PAGE * 2))  # two pages changed, two more at the end
    changed[PAGE * 3 : PAGE * 4] = os.urandom(PAGE)
    changed[PAGE * 9 : PAGE * 10] = os.urandom(PAGE)
    changed[PAGE * 64 :] = os.urandom(PAGE * 2) + b"tail"  # (the short last page grows into a whole one)
    diff = store.save(image(tmp_path, "i1", bytes(changed), b"state-1"))
    # written twice: into the diff's own pack, then into the base pack's slots
    assert diff.kind == "diff" and diff.bytes_written <= 2 * 5 * PAGE + len(b"state-1")
    assert [p.name for p in store.packs.iterdir()] == ["0.pack"] and store.stray_packs() == []
    assert assembled(store, tmp_path, "a") == (bytes(changed), b"state-1")
    assert os.stat(tmp_path / "a" / "pages.img").st_nlink == 2  # linked, not copied
    (tmp_path / "a" / "pages.img").unlink()
    shorter = bytes(changed[: PAGE * 10])  # the image shrinks: the pack is cut to it
    store.save(image(tmp_path, "i2", shorter, b"state-2"))
    assert store.pack_path(0).stat().st_size == len(shorter)
    assert assembled(store, tmp_path, "b") == (shorter, b"state-2")


def test_no_fold_into_a_pack_someone_else_links_and_a_fold_cut_short_leaves_the_diff_whole(tmp_path, monkeypatch):
    base = os.urandom(PAGE * 32)
    store = PageStore(tmp_path / "sb")
    store.save(image(tmp_path, "i0", base))
    os.link(store.pack_path(0), tmp_path / "forks-image")  # a fork restoring from it reads it
    changed = base[: PAGE * 5] + os.urandom(PAGE) + base[PAGE * 6 :]
    store.save(image(tmp_path, "i1", changed, b"s1"))
    assert len(list(store.packs.glob("*.pack"))) == 2 and (tmp_path / "forks-image").read_bytes() == base
    assert assembled(store, tmp_path, "a") == (changed, b"s1")
    (tmp_path / "forks-image").unlink()

    later = changed[: PAGE * 7] + os.urandom(PAGE * 2) + changed[PAGE * 9 :]
    real_pwrite, calls = os.pwrite, []

    def host_gone_mid_fold(fd, data, offset):  # the fold's first page is written, then the disk fails
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(errno.EIO, "I/O error")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(snapshots.os, "pwrite", host_gone_mid_fold)
    second = store.save(image(tmp_path, "i2", later, b"s2"))
    monkeypatch.undo()
    assert len(calls) == 2 and second.bytes_written <= 2 * PAGE + len(b"s2")  # no fold counted
    assert len(list(store.packs.glob("*.pack"))) == 3 and store.stray_packs() == []  # (the diffs' own packs)
    assert assembled(store, tmp_path, "b") == (later, b"s2")


def test_an_index_in_columns_reads_and_writes_the_records_on_disk():
    digests = [os.urandom(16) for _ in range(1000)]
    records = [(d, i % 3, 7 * i) for i, d in enumerate(digests)]
    on_disk = b"".join(snapshots.RECORD.pack(*r) for r in records)
    index = snapshots.Index.parse(on_disk)
    assert list(zip(index.digests, index.packs, index.slots, strict=True)) == records
    assert index.to_bytes() == on_disk and index.whole_pack() is None
    assert snapshots.Index.parse(snapshots.Index.whole(digests, 5).to_bytes()).whole_pack() == 5
    assert snapshots.differing(index.slots, snapshots.Index.whole(digests, 0).slots) == list(range(1, 1000))
