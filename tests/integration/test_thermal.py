"""hot -> warm -> cold with short timers, waking, pinning, stop/start and diff snapshots."""

import concurrent.futures
import json
import threading
import time

import pytest

from tests.conftest import listed, make_sandbox, run, wait_for
from tests.daemon import running_daemon

THERMAL = {"warm_after": 1.0, "cold_after": 3.0, "tick": 0.3}


@pytest.fixture(scope="module")
def daemon(default_image):
    with running_daemon({"thermal": THERMAL}) as d:
        yield d


def test_idle_sandbox_goes_warm_then_cold_and_requests_wake_it(daemon, api):
    sb = make_sandbox(api, name="idle")
    try:
        assert listed(api, sb)["thermal"] == "hot"
        engine = daemon.engine()
        assert engine.usage(sb["id"]) is not None  # the check below is not vacuous
        wait_for(lambda: listed(api, sb)["thermal"] == "warm", what="warm")
        assert listed(api, sb)["status"] == "running"
        assert run(api, sb, ["echo", "warm-wake"])["stdout"] == "warm-wake\n"
        assert listed(api, sb)["thermal"] == "hot"

        wait_for(lambda: listed(api, sb)["thermal"] == "cold", what="cold")
        got = api.get(f"/sandboxes/{sb['id']}").json()
        assert got["status"] == "stopped" and "stopped_at" in got
        assert got["snapshot"]["kind"] in ("full", "diff") and got["snapshot"]["bytes_total"] > 0
        # its memory is freed: (once the background delete is done) the engine holds no resources for it
        wait_for(lambda: engine.usage(sb["id"]) is None, timeout=5, what="resources freed")

        assert run(api, sb, ["echo", "cold-wake"])["stdout"] == "cold-wake\n"
        got = listed(api, sb)
        assert got["status"] == "running" and got["thermal"] == "hot"
    finally:
        api.delete(f"/sandboxes/{sb['id']}")


def test_an_open_streaming_exec_keeps_the_sandbox_hot(daemon, api):
    sb = make_sandbox(api, name="pinned")
    seen = []
    done = threading.Event()
    try:

        def watch():
            with daemon.client() as own:  # one client per thread
                while not done.is_set():
                    state = listed(own, sb)["thermal"]
                    if not done.is_set():
                        seen.append(state)
                    time.sleep(0.2)

        t = threading.Thread(target=watch)
        with api.stream(
            "POST",
            f"/sandboxes/{sb['id']}/exec",
            json={"cmd": ["sleep", "6"]},
            headers={"Accept": "application/x-ndjson"},
        ) as r:
            t.start()
            lines = [json.loads(x) for x in r.iter_lines()]
        done.set()
        t.join()
        assert lines[-1] == {"type": "exit", "exit_code": 0}
        assert seen and set(seen) == {"hot"}, seen
        wait_for(lambda: listed(api, sb)["thermal"] == "warm", what="warm after the exec ended")
    finally:
        api.delete(f"/sandboxes/{sb['id']}")


def test_keep_hot_stays_hot_and_patch_toggles_it(api):
    sb = make_sandbox(api, name="always", keep_hot=True)
    try:
        for _ in range(3 * 4):  # several cold_after periods
            time.sleep(THERMAL["cold_after"] / 4)
            assert listed(api, sb)["thermal"] == "hot"
        r = api.patch(f"/sandboxes/{sb['id']}", json={"keep_hot": False})
        assert r.status_code == 200 and r.json()["keep_hot"] is False
        wait_for(lambda: listed(api, sb)["thermal"] in ("warm", "cold"), what="warm")
        r = api.patch(f"/sandboxes/{sb['id']}", json={"keep_hot": True})
        assert r.json()["keep_hot"] is True and r.json()["status"] == "running"
        assert listed(api, sb)["thermal"] == "hot"
    finally:
        api.delete(f"/sandboxes/{sb['id']}")


COUNTER = """
import os, time
n = 0
while True:
    n += 1
    with open('/tmp/count.tmp', 'w') as f:
        f.write(f'{os.getpid()} {n}')
    os.replace('/tmp/count.tmp', '/tmp/count')
    time.sleep(0.05)
"""


def counter(api, sb):
    pid, n = run(api, sb, ["cat", "/tmp/count"])["stdout"].split()
    return int(pid), int(n)


def test_memory_processes_and_disk_survive_three_stop_start_cycles(api):
    sb = make_sandbox(api, name="cycles", keep_hot=True)
    try:
        run(api, sb, ["sh", "-c", f'nohup python3 -c "{COUNTER}" >/dev/null 2>&1 &'])
        run(api, sb, ["sh", "-c", "echo ram > /dev/shm/marker; echo disk > /home/kiln/marker"])
        wait_for(lambda: run(api, sb, ["test", "-f", "/tmp/count"])["exit_code"] == 0, what="counter")
        pid, n = counter(api, sb)
        kinds = []
        for cycle in range(3):
            r = api.post(f"/sandboxes/{sb['id']}/stop")
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "stopped"
            kinds.append(r.json()["snapshot"]["kind"])
            r = api.post(f"/sandboxes/{sb['id']}/start")
            assert r.status_code == 200 and r.json()["status"] == "running", r.text
            new_pid, new_n = counter(api, sb)
            assert new_pid == pid and new_n >= n, (cycle, pid, n, new_pid, new_n)  # continued, not rebooted
            n = new_n
            out = run(api, sb, ["cat", "/dev/shm/marker", "/home/kiln/marker"])["stdout"]
            assert out == "ram\ndisk\n"
        assert kinds == ["full", "diff", "diff"]
        time.sleep(0.3)
        assert counter(api, sb)[1] > n  # still counting after the last restore
    finally:
        api.delete(f"/sandboxes/{sb['id']}")


def test_start_on_running_and_stop_on_stopped_are_no_ops(api):
    sb = make_sandbox(api, name="idem", keep_hot=True)
    try:
        r = api.post(f"/sandboxes/{sb['id']}/start")
        assert r.status_code == 200 and r.json()["status"] == "running"
        first = api.post(f"/sandboxes/{sb['id']}/stop").json()
        again = api.post(f"/sandboxes/{sb['id']}/stop")
        assert again.status_code == 200 and again.json() == first
    finally:
        api.delete(f"/sandboxes/{sb['id']}")


def test_wake_storm_restores_once_and_serves_everyone(daemon, api):
    sb = make_sandbox(api, name="storm", keep_hot=True)
    try:
        run(api, sb, ["sh", "-c", "echo before > /dev/shm/m"])
        assert api.post(f"/sandboxes/{sb['id']}/stop").json()["status"] == "stopped"
        restores_before = daemon.log().count(f"sandbox {sb['id']} restored")

        def one(i):
            with daemon.client() as c:
                r = c.post(f"/sandboxes/{sb['id']}/exec", json={"cmd": ["sh", "-c", f"cat /dev/shm/m; echo {i}"]})
                return r.status_code, r.json()

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            results = list(pool.map(one, range(12)))
        for i, (status, body) in enumerate(results):
            assert status == 200 and body["stdout"] == f"before\n{i}\n", body
        assert daemon.log().count(f"sandbox {sb['id']} restored") - restores_before == 1
    finally:
        api.delete(f"/sandboxes/{sb['id']}")


def test_second_stop_writes_only_what_changed(daemon, api):
    sb = make_sandbox(api, name="diff", keep_hot=True, memory_mb=512)
    try:
        run(
            api,
            sb,
            ["sh", "-c", "head -c 200000000 /dev/urandom > /dev/shm/big; sha256sum /dev/shm/big > /home/kiln/sum"],
        )
        first = api.post(f"/sandboxes/{sb['id']}/stop").json()["snapshot"]
        assert first["kind"] == "full" and first["bytes_written"] >= 200_000_000
        assert run(api, sb, ["sha256sum", "-c", "/home/kiln/sum"])["exit_code"] == 0
        second = api.post(f"/sandboxes/{sb['id']}/stop").json()["snapshot"]
        assert second["kind"] == "diff"
        assert second["bytes_written"] <= first["bytes_written"] * 0.10, (first, second)
        assert second["bytes_total"] >= 200_000_000
        assert f"sandbox {sb['id']}: diff checkpoint into memory" in daemon.log()
        snapshot_dir = daemon.data_dir / "sandboxes" / sb["id"] / "snapshot"
        # left stopped, the diff is repacked as one pack, page for page, which the wake links
        wait_for(lambda: len(list(snapshot_dir.rglob("*.pack"))) == 1, timeout=30, what="the repack")
        assert run(api, sb, ["sha256sum", "-c", "/home/kiln/sum"])["exit_code"] == 0
        engine = daemon.engine()
        wait_for(lambda: not any(engine.memory_scratch_root.glob("*")), what="the memory scratch deleted")
        limits = engine.cgroups.memory_limits(sb["id"])  # raised for the checkpoint only
        assert limits is not None and limits[0] == 512 << 20, limits
    finally:
        api.delete(f"/sandboxes/{sb['id']}")
    assert not snapshot_dir.exists()  # deleting the sandbox frees its pages


def test_a_failed_restore_needs_start_force_which_boots_on_the_disk(daemon, api):
    sb = make_sandbox(api, name="broken", keep_hot=True)
    try:
        run(api, sb, ["sh", "-c", "echo disk > /home/kiln/d; echo ram > /dev/shm/r"])
        assert api.post(f"/sandboxes/{sb['id']}/stop").json()["status"] == "stopped"
        for pack in (daemon.data_dir / "sandboxes" / sb["id"] / "snapshot" / "packs").iterdir():
            pack.unlink()  # the snapshot is lost

        for _ in range(2):  # the first wake tries and fails; later ones do not retry
            r = api.post(f"/sandboxes/{sb['id']}/exec", json={"cmd": ["true"]})
            assert r.status_code == 500 and '"force": true' in r.json()["error"], r.text
        r = api.post(f"/sandboxes/{sb['id']}/start")
        assert r.status_code == 500 and "force" in r.json()["error"]
        assert api.get(f"/sandboxes/{sb['id']}").json()["reason"] == "restore_failed"

        r = api.post(f"/sandboxes/{sb['id']}/start", json={"force": True})
        assert r.status_code == 200 and r.json()["status"] == "running", r.text
        out = run(api, sb, ["sh", "-c", "cat /home/kiln/d; cat /dev/shm/r 2>/dev/null || echo no-ram"])
        assert out["stdout"] == "disk\nno-ram\n"  # booted fresh on its disk: files kept, memory not
    finally:
        api.delete(f"/sandboxes/{sb['id']}")
