"""A hostile sandbox (root inside) against everything around it: each attempt is contained, and the
daemon and other sandboxes stay responsive. Also: agent crashes, and a full disk under data_dir."""

import contextlib
import json
import os
import subprocess
import threading
import time

import httpx
import pytest

from tests.conftest import make_sandbox, run
from tests.daemon import Daemon
from tests.integration.test_isolation import probe
from tests.integration.test_thermal_restart import small_filesystem


@pytest.fixture(scope="module")
def bystander(api):
    sb = make_sandbox(api, name="bystander", keep_hot=True)
    yield sb
    api.delete(f"/sandboxes/{sb['id']}")


@pytest.fixture
def attacker(api):
    sb = make_sandbox(api, name=f"attacker-{os.urandom(2).hex()}", keep_hot=True, disk_size_mb=128)
    yield sb
    api.delete(f"/sandboxes/{sb['id']}")


@contextlib.contextmanager
def responsiveness(daemon, bystander):
    """Probe the daemon and another sandbox every 0.2 s while the block runs; yields the latencies."""
    latencies: list[float] = []
    failures: list[str] = []
    stop = threading.Event()

    def watch():
        with httpx.Client(
            base_url=daemon.url, timeout=15, headers={"Authorization": f"Bearer {daemon.admin_token}"}
        ) as c:
            while not stop.is_set():
                t = time.monotonic()
                try:
                    ok = (
                        c.get("/health").status_code == 200
                        and c.post(f"/sandboxes/{bystander['id']}/exec", json={"cmd": ["true"]}).json()["exit_code"]
                        == 0
                    )
                    if not ok:
                        failures.append("bad answer")
                except httpx.HTTPError as e:
                    failures.append(repr(e))
                latencies.append(time.monotonic() - t)
                stop.wait(0.2)

    t = threading.Thread(target=watch)
    t.start()
    try:
        yield latencies
    finally:
        stop.set()
        t.join()
    assert failures == [], failures
    assert latencies and max(latencies) < 10, latencies  # slow under a 2-core fork bomb, never stuck


@contextlib.contextmanager
def private_targets():
    """Addresses of the kinds a sandbox must never reach (link-local metadata-style, RFC 1918 ranges),
    served from a network namespace of the test's own and routed from the host, so an escape would
    have somewhere to land, and nothing ever leaves this machine."""
    name, host_if, ns_if = f"kiln-t-{os.getpid()}", f"ktm{os.getpid() % 100000}h", f"ktm{os.getpid() % 100000}n"
    addrs = ["169.254.77.77", "192.168.231.1", "172.31.231.1"]
    sh = lambda *a: subprocess.run(list(a), check=True, capture_output=True)  # noqa: E731
    server = None
    try:
        sh("ip", "netns", "add", name)
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        sh("ip", "link", "set", ns_if, "netns", name)
        sh("ip", "addr", "add", "10.255.231.1/30", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "-n", name, "addr", "add", "10.255.231.2/30", "dev", ns_if)
        for a in addrs:
            sh("ip", "-n", name, "addr", "add", f"{a}/32", "dev", ns_if)
            sh("ip", "route", "add", f"{a}/32", "via", "10.255.231.2")
        sh("ip", "-n", name, "link", "set", ns_if, "up")
        sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", name, "route", "add", "default", "via", "10.255.231.1")
        server = subprocess.Popen(
            ["ip", "netns", "exec", name, "python3", "-m", "http.server", "80", "--bind", "0.0.0.0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for a in addrs:  # the host itself reaches them: the targets are live
            for _ in range(50):
                try:
                    httpx.get(f"http://{a}/", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            else:
                raise AssertionError(f"test target {a} did not come up")
        yield addrs
    finally:
        if server is not None:
            server.kill()  # by PID
            server.wait()
        for a in addrs:
            subprocess.run(["ip", "route", "del", f"{a}/32"], capture_output=True)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_metadata_style_and_private_ranges_are_unreachable(api, attacker):
    with private_targets() as addrs:
        for a in addrs:
            assert probe(api, attacker, a, 80).startswith("blocked"), a


def test_fork_bomb_is_contained(daemon, api, attacker, bystander):
    bomb = "bomb() { bomb | bomb & }; bomb"
    with responsiveness(daemon, bystander):
        r = api.post(
            f"/sandboxes/{attacker['id']}/exec",
            json={"cmd": ["bash", "-c", bomb], "user": "root", "timeout_sec": 8},
            timeout=60,
        )
        # the bomb ends by the timeout (its process group killed until empty), or takes the whole
        # sandbox down with it (past its memory: "oom"; past its cgroup's pid limit, which gVisor's
        # per-process host stubs count against: "exited"). Either way nothing outside it suffers.
        assert r.status_code in (200, 409), r.text
        for _ in range(3):  # usable again, after a `start` if the bomb took it down
            r = api.post(f"/sandboxes/{attacker['id']}/exec", json={"cmd": ["echo", "ok"]})
            if r.status_code == 200:
                break
            got = api.get(f"/sandboxes/{attacker['id']}").json()
            assert r.status_code == 409 and got["status"] == "stopped" and got["reason"] in ("oom", "exited"), (
                r.text,
                got,
            )
            assert api.post(f"/sandboxes/{attacker['id']}/start").json()["status"] == "running"
            time.sleep(1)
        assert r.json()["stdout"] == "ok\n"
    for _ in range(3):
        r = api.post(f"/sandboxes/{attacker['id']}/exec", json={"cmd": ["sh", "-c", "ps -e --no-headers | wc -l"]})
        if r.status_code == 200:
            break
        api.post(f"/sandboxes/{attacker['id']}/start")  # it went down after all: back on its disk
    assert int(r.json()["stdout"]) < 20, r.text


def test_filling_the_disk_stops_at_its_cap(daemon, api, attacker, bystander):
    before = os.statvfs(daemon.data_dir)
    with responsiveness(daemon, bystander):
        r = run(api, attacker, ["dd", "if=/dev/zero", "of=/fill", "bs=1M", "count=1024"], user="root")
    assert r["exit_code"] != 0 and "No space left on device" in r["stderr"]
    after = os.statvfs(daemon.data_dir)
    used = (before.f_bavail - after.f_bavail) * after.f_frsize
    assert used < 200 << 20, used  # its 128 MB disk, not the host's
    run(api, attacker, ["rm", "/fill"], user="root")
    assert run(api, attacker, ["sh", "-c", "echo fine > /home/kiln/x && cat /home/kiln/x"])["stdout"] == "fine\n"


def test_flooding_stdout_is_capped_and_cut(daemon, api, attacker, bystander):
    with responsiveness(daemon, bystander):
        r = run(api, attacker, ["sh", "-c", "yes flood"], timeout_sec=5)
        assert r["exit_code"] == 124 and len(r["stdout"]) <= 10 * 1024 * 1024
        assert "[output truncated at 10MB]" in r["stderr"]
        # a streaming reader that goes away: the flood is killed with it
        with api.stream(
            "POST",
            f"/sandboxes/{attacker['id']}/exec",
            json={"cmd": ["yes", "flood"]},
            headers={"Accept": "application/x-ndjson"},
        ) as s:
            lines = s.iter_lines()
            for _ in range(1000):
                next(lines)
    time.sleep(1)
    assert "yes" not in run(api, attacker, ["ps", "-eo", "args"])["stdout"].split()


def test_killing_the_agent_is_detected_reported_and_recoverable(api, attacker):
    run(api, attacker, ["sh", "-c", "echo precious > /home/kiln/data"])
    # the agent's server (PID 1 starts it again)
    r = api.post(f"/sandboxes/{attacker['id']}/exec", json={"cmd": ["sh", "-c", "kill -9 $PPID"], "user": "root"})
    assert r.status_code == 502 and "agent" in r.json()["error"] and "restarted" in r.json()["error"]
    assert api.get(f"/sandboxes/{attacker['id']}").json()["agent_restarts"] == 1
    assert run(api, attacker, ["cat", "/home/kiln/data"])["stdout"] == "precious\n"
    # PID 1 itself: the whole sandbox ends; it says why, and start boots it again on its disk
    r = api.post(f"/sandboxes/{attacker['id']}/exec", json={"cmd": ["kill", "-9", "1"], "user": "root"})
    assert r.status_code == 409 and "start it with" in r.json()["error"]
    got = api.get(f"/sandboxes/{attacker['id']}").json()
    assert got["status"] == "stopped" and got["reason"] == "exited"
    assert api.post(f"/sandboxes/{attacker['id']}/start").json()["status"] == "running"
    assert run(api, attacker, ["cat", "/home/kiln/data"])["stdout"] == "precious\n"


def test_a_bundle_from_before_kiln_init_boots_with_its_python_pid1(daemon, api, attacker):
    """Sandboxes created before kiln-init keep their bundle: the agent is its own PID 1 there."""
    config = daemon.data_dir / "sandboxes" / attacker["id"] / "config.json"
    spec = json.loads(config.read_text())
    assert spec["process"]["args"][0].endswith("/kiln-init")
    spec["process"]["args"] = spec["process"]["args"][1:]
    config.write_text(json.dumps(spec))
    assert (
        api.post(f"/sandboxes/{attacker['id']}/exec", json={"cmd": ["kill", "-9", "1"], "user": "root"}).status_code
        == 409
    )
    assert api.post(f"/sandboxes/{attacker['id']}/start").json()["status"] == "running"
    assert "guest.py" in run(api, attacker, ["cat", "/proc/1/cmdline"], user="root")["stdout"]
    assert "kiln-init" not in run(api, attacker, ["ps", "-eo", "args"], user="root")["stdout"]
    before = api.get(f"/sandboxes/{attacker['id']}").json().get("agent_restarts", 0)
    r = api.post(f"/sandboxes/{attacker['id']}/exec", json={"cmd": ["sh", "-c", "kill -9 $PPID"], "user": "root"})
    assert r.status_code == 502 and "restarted" in r.json()["error"]
    assert api.get(f"/sandboxes/{attacker['id']}").json()["agent_restarts"] == before + 1
    assert run(api, attacker, ["true"])["exit_code"] == 0


def test_a_streamed_exec_that_fails_midway_says_so_and_is_logged(daemon, api, attacker):
    r = api.post(
        f"/sandboxes/{attacker['id']}/exec",
        json={"cmd": ["sh", "-c", "echo started; sleep 0.3; kill -9 $PPID"], "user": "root"},
        headers={"Accept": "application/x-ndjson"},
    )
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert lines[0] == {"type": "stdout", "data": "started\n"}
    assert lines[-1]["type"] == "error" and "agent" in lines[-1]["data"]
    assert f"streamed exec in sandbox {attacker['id']} failed" in daemon.log()


def test_disk_full_under_data_dir_refuses_creates_cleanly(default_image):
    with small_filesystem(400) as fs:
        d = Daemon(parent_dir=fs)
        try:
            d.start()
            with d.client() as api:
                existing = make_sandbox(api, name="existing")
                free = subprocess.run(
                    ["df", "--output=avail", "-B1", str(fs)], capture_output=True, text=True
                ).stdout.split()[-1]
                subprocess.run(["fallocate", "-l", str(int(free) - 30_000_000), str(fs / "filler")], check=True)
                r = api.post("/sandboxes", json={"name": "no-room"})
                assert r.status_code == 507 and "not enough disk space" in r.json()["error"], r.text
                assert [s["name"] for s in api.get("/sandboxes").json()] == ["existing"]
                assert sorted(p.name for p in (d.data_dir / "sandboxes").iterdir()) == [existing["id"]]
                assert run(api, existing, ["echo", "still fine"])["stdout"] == "still fine\n"
                (fs / "filler").unlink()
                assert api.post("/sandboxes", json={"name": "room-again"}).status_code == 201
                d.destroy_all([d.admin_token])
        finally:
            d.scrub()
