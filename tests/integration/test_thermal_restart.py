"""Thermal state across daemon restarts and shutdowns, and snapshot failures that lose nothing."""

import contextlib
import subprocess
import tempfile
import time
from pathlib import Path

from tests.conftest import listed, make_sandbox, run, wait_for
from tests.daemon import Daemon


def test_restart_keeps_hot_warm_and_cold_sandboxes_as_they_were(default_image):
    d = Daemon({"thermal": {"warm_after": 1.0, "cold_after": 3600, "tick": 0.3}})
    try:
        d.start()
        with d.client() as api:
            hot = make_sandbox(api, name="hot", keep_hot=True)
            warm = make_sandbox(api, name="warm")
            cold = make_sandbox(api, name="cold")
            for sb in (hot, warm, cold):
                run(api, sb, ["sh", "-c", f"echo {sb['name']} > /dev/shm/m"])
            assert api.post(f"/sandboxes/{cold['id']}/stop").json()["status"] == "stopped"
            wait_for(lambda: listed(api, warm)["thermal"] == "warm", what="warm")
        d.kill9()
        d.start()
        with d.client() as api:
            assert listed(api, hot)["thermal"] == "hot"
            assert listed(api, warm)["thermal"] == "warm" and listed(api, warm)["status"] == "running"
            got = listed(api, cold)
            assert got["thermal"] == "cold" and got["status"] == "stopped"
            time.sleep(1.0)
            assert listed(api, cold)["thermal"] == "cold"  # still cold until touched
            assert d.engine().usage(cold["id"]) is None  # nothing of it runs
            for sb in (hot, warm, cold):
                assert run(api, sb, ["cat", "/dev/shm/m"])["stdout"] == f"{sb['name']}\n"
                assert listed(api, sb)["thermal"] == "hot"
            for sb in (hot, warm, cold):
                api.delete(f"/sandboxes/{sb['id']}")
    finally:
        d.scrub()


def test_sigterm_stops_running_sandboxes_to_disk_and_they_come_back(default_image):
    d = Daemon()
    try:
        d.start()
        with d.client() as api:
            sb = make_sandbox(api, name="shutdown")
            run(api, sb, ["sh", "-c", "echo in-memory > /dev/shm/m"])
        d.stop()  # SIGTERM
        # a clean shutdown (uvicorn re-raises SIGTERM after it, hence -15)
        assert d.proc.returncode in (0, -15) and "Application shutdown complete" in d.log()
        assert "stopped to disk (shutdown)" in d.log()
        assert d.engine().usage(sb["id"]) is None  # nothing left running, nothing killed unsnapshotted
        d.start()
        with d.client() as api:
            got = listed(api, sb)
            assert got["status"] == "stopped" and got["thermal"] == "cold"
            assert run(api, sb, ["cat", "/dev/shm/m"])["stdout"] == "in-memory\n"
            api.delete(f"/sandboxes/{sb['id']}")
    finally:
        d.scrub()


@contextlib.contextmanager
def small_filesystem(size_mb: int):
    """A loop-mounted ext4 of size_mb, removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix="kiln-test-fs-"))
    image, mnt = work / "fs.img", work / "mnt"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", f"{size_mb}M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        subprocess.run(["rm", "-rf", str(work)], check=False)


def test_a_failed_snapshot_keeps_the_sandbox_and_the_previous_snapshot(default_image):
    with small_filesystem(700) as fs:
        d = Daemon(parent_dir=fs)
        try:
            d.start()
            with d.client() as api:
                sb = make_sandbox(api, name="full-disk", keep_hot=True, memory_mb=512)
                run(
                    api,
                    sb,
                    ["sh", "-c", "head -c 100000000 /dev/urandom > /dev/shm/a; sha256sum /dev/shm/a > /tmp/sums"],
                )
                first = api.post(f"/sandboxes/{sb['id']}/stop")
                assert first.status_code == 200 and first.json()["snapshot"]["kind"] == "full"
                snap_dir = d.data_dir / "sandboxes" / sb["id"] / "snapshot"
                # (the page index of a full snapshot is written in the background: leave it out)
                whole = lambda: sorted(p.name for p in snap_dir.rglob("*") if p.suffix != ".idx")  # noqa: E731
                good = whole()

                run(
                    api,
                    sb,
                    ["sh", "-c", "head -c 80000000 /dev/urandom > /dev/shm/b; sha256sum /dev/shm/b >> /tmp/sums"],
                )
                filler = fs / "filler"
                free = subprocess.run(
                    ["df", "--output=avail", "-B1", str(fs)], capture_output=True, text=True
                ).stdout.split()[-1]
                subprocess.run(["fallocate", "-l", str(int(free) - 2_000_000), str(filler)], check=True)

                r = api.post(f"/sandboxes/{sb['id']}/stop")
                assert r.status_code == 507, r.text
                assert "not enough disk space" in r.json()["error"] and "still running" in r.json()["error"]
                got = api.get(f"/sandboxes/{sb['id']}").json()
                assert got["status"] == "running" and got["snapshot"]["kind"] == "full"
                assert run(api, sb, ["sha256sum", "-c", "/tmp/sums"])["exit_code"] == 0
                assert whole() == good  # the old snapshot is whole

                filler.unlink()
                again = api.post(f"/sandboxes/{sb['id']}/stop")
                assert again.status_code == 200 and again.json()["snapshot"]["kind"] == "diff"
                assert run(api, sb, ["sha256sum", "-c", "/tmp/sums"])["exit_code"] == 0
                api.delete(f"/sandboxes/{sb['id']}")
        finally:
            d.scrub()


def test_three_failed_thermal_snapshots_make_it_unknown_and_a_wake_recovers_it(default_image):
    with small_filesystem(300) as fs:
        d = Daemon({"thermal": {"warm_after": 0.5, "cold_after": 1.0, "tick": 0.2}}, parent_dir=fs)
        try:
            d.start()
            with d.client() as api:
                sb = make_sandbox(api, name="no-room", memory_mb=512)
                run(api, sb, ["sh", "-c", "echo kept > /dev/shm/m"])
                free = subprocess.run(
                    ["df", "--output=avail", "-B1", str(fs)], capture_output=True, text=True
                ).stdout.split()[-1]
                subprocess.run(["fallocate", "-l", str(int(free) - 4_000_000), str(fs / "filler")], check=True)
                wait_for(
                    lambda: api.get(f"/sandboxes/{sb['id']}").json()["status"] == "unknown",
                    timeout=30,
                    what="unknown after three failed snapshots",
                )
                assert d.log().count(f"snapshot of {sb['id']} failed") >= 3
                # it was never killed: a wake brings it back with its memory
                assert run(api, sb, ["cat", "/dev/shm/m"])["stdout"] == "kept\n"
                assert api.get(f"/sandboxes/{sb['id']}").json()["status"] == "running"
                (fs / "filler").unlink()
                api.delete(f"/sandboxes/{sb['id']}")
        finally:
            d.scrub()
