"""Named snapshots' shared page store on plain files: sharing within an owner, never across owners,
resumable images, deletes that free only unreferenced pages, and what a crash leaves."""

import asyncio
import os

import pytest

from kiln.engine.gvisor.kept import KeptSnapshots
from kiln.engine.gvisor.snapshots import PAGE


def checkpoint(kept: KeptSnapshots, snapshot_id: str, pages: bytes, state=b"checkpoint-state"):
    """What runsc and the disk clone leave in a snapshot's directory before it is saved."""
    d = kept.path(snapshot_id)
    (d / "image").mkdir(parents=True)
    (d / "image" / "pages.img").write_bytes(pages)
    (d / "image" / "checkpoint.img").write_bytes(state)
    (d / "disk.ext4").write_bytes(b"disk")


def save(kept, snapshot_id, owner, pages, state=b"checkpoint-state") -> int:
    checkpoint(kept, snapshot_id, pages, state)
    return asyncio.run(kept.save(snapshot_id, owner, {"token": "t", "image": "i", "memory_mb": 512}))


def opened(kept, snapshot_id, target):
    async def read():
        target.mkdir(exist_ok=True)
        async with kept.opened(snapshot_id, target) as image:
            files = {p.name: p.read_bytes() for p in image.iterdir()}
        assert not (target / "resume.tmp").exists()  # the image is gone once runsc has read it
        return files, (target / "disk.ext4").read_bytes()

    return asyncio.run(read())


def pack_bytes(kept) -> int:
    return sum(p.stat().st_size for p in kept.pages.rglob("*.pack"))


def test_a_second_snapshot_stores_only_new_pages_and_each_resumes_to_its_own_image(tmp_path):
    kept = KeptSnapshots(tmp_path)
    first = os.urandom(PAGE * 200) + b"not-page-aligned-tail"
    save(kept, "a", "usr_1", first)
    assert pack_bytes(kept) == len(first)  # nothing to share: the image became the pack as it was

    # an idle sandbox checkpointed again: one page new at the front (everything shifts), one changed
    second = bytearray(os.urandom(PAGE) + first)
    second[PAGE * 90 : PAGE * 91] = os.urandom(PAGE)
    added = save(kept, "b", "usr_1", bytes(second), b"state-2")
    assert pack_bytes(kept) - len(first) == 2 * PAGE  # the new front page and the changed one
    assert added < 20 * PAGE  # its own pack, index, state and disk: no copy of the shared pages

    files, disk = opened(kept, "a", tmp_path / "ra")
    assert files == {"pages.img": first, "checkpoint.img": b"checkpoint-state"} and disk == b"disk"
    files, _ = opened(kept, "b", tmp_path / "rb")
    assert files == {"pages.img": bytes(second), "checkpoint.img": b"state-2"}


def test_a_delete_frees_only_pages_no_other_snapshot_references(tmp_path):
    kept = KeptSnapshots(tmp_path)
    base = os.urandom(PAGE * 100)
    save(kept, "a", "usr_1", base)
    later = base + os.urandom(PAGE * 10)
    save(kept, "b", "usr_1", later)
    asyncio.run(kept.delete("a"))  # b still needs a's 100 pages: a's pack stays
    assert not kept.path("a").exists() and pack_bytes(kept) == PAGE * 110
    files, _ = opened(kept, "b", tmp_path / "rb")
    assert files["pages.img"] == later
    assert kept.leftovers(frozenset()) == {"snapshots": ["b"], "snapshot_packs": []}
    asyncio.run(kept.delete("b"))
    assert pack_bytes(kept) == 0 and kept.leftovers(frozenset()) == {"snapshots": [], "snapshot_packs": []}
    asyncio.run(kept.delete("b"))  # idempotent


def test_owners_never_share_pages(tmp_path):
    kept = KeptSnapshots(tmp_path)
    same = os.urandom(PAGE * 50)
    save(kept, "a", "usr_1", same)
    save(kept, "b", "usr_2", same)
    assert pack_bytes(kept) == 2 * PAGE * 50  # identical memory, two owners: two copies
    asyncio.run(kept.delete("a"))
    assert opened(kept, "b", tmp_path / "rb")[0]["pages.img"] == same


def test_a_failed_save_leaves_nothing_and_the_others_intact(tmp_path, monkeypatch):
    kept = KeptSnapshots(tmp_path)
    base = os.urandom(PAGE * 64)
    save(kept, "a", "usr_1", base)
    from kiln.engine.gvisor import kept as module

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, "write_atomic", full)
    under_way = kept.pack(KeptSnapshots.group_of("usr_1"), "c")  # another save's pack, its index not yet written
    under_way.write_bytes(b"\1" * PAGE)
    with pytest.raises(OSError, match="No space"):
        save(kept, "b", "usr_1", base + os.urandom(PAGE))
    monkeypatch.undo()
    assert not kept.path("b").exists() and under_way.exists()  # a failed save removes only its own
    under_way.unlink()
    assert pack_bytes(kept) == PAGE * 64
    assert opened(kept, "a", tmp_path / "ra")[0]["pages.img"] == base


def test_a_crash_leaves_what_start_up_removes(tmp_path):
    kept = KeptSnapshots(tmp_path)
    base = os.urandom(PAGE * 32)
    save(kept, "a", "usr_1", base)
    save(kept, "b", "usr_1", base + os.urandom(PAGE * 4))  # never recorded by the daemon's store
    checkpoint(kept, "c", os.urandom(PAGE * 8))  # cut short before its pages were stored
    stray = kept.pages / KeptSnapshots.group_of("usr_1") / "c.pack"
    stray.write_bytes(b"\0" * PAGE)  # cut short after a pack, before the index
    assert kept.leftovers(frozenset())["snapshot_packs"] == [str(stray)]
    assert sorted(kept.prune({"a"})) == ["b", "c"]
    assert kept.leftovers(frozenset()) == {"snapshots": ["a"], "snapshot_packs": []}
    assert pack_bytes(kept) == PAGE * 32
    assert opened(kept, "a", tmp_path / "ra")[0]["pages.img"] == base


def test_a_snapshot_made_before_pages_were_shared_still_resumes_and_deletes(tmp_path):
    kept = KeptSnapshots(tmp_path)
    checkpoint(kept, "old", b"p" * PAGE)
    (kept.path("old") / "snapshot.json").write_text('{"token": "t", "image": "i", "memory_mb": 256}')
    files, disk = opened(kept, "old", tmp_path / "r")
    assert files["pages.img"] == b"p" * PAGE and disk == b"disk"
    assert (kept.path("old") / "image" / "pages.img").exists()  # its own image is only read
    asyncio.run(kept.delete("old"))
    assert not kept.path("old").exists()
