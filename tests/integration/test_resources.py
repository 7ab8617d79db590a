"""Limits: memory and CPU are held by the sandbox's cgroup; an OOM is reported and recoverable."""

import time

import httpx

from tests.conftest import make_sandbox

HOG = "import time\nchunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 * 1024))\n    time.sleep(0.01)\n"


def exec_(api, sb, cmd, **kw):
    return api.post(f"/sandboxes/{sb['id']}/exec", json={"cmd": cmd, **kw})


def test_memory_hog_kills_only_its_sandbox_which_reports_oom_and_restarts(daemon, api):
    bystander = make_sandbox(api, name="bystander")
    hog = make_sandbox(api, name="hog", memory_mb=128)
    try:
        sandbox_pid = daemon.engine().runsc.pids(hog["id"])[0]  # type: ignore[attr-defined]
        assert open(f"/proc/{sandbox_pid}/oom_score_adj").read().strip() == "1000"  # killed whole, first
        assert exec_(api, hog, ["sh", "-c", "echo kept > /home/kiln/disk-marker"]).json()["exit_code"] == 0
        meminfo = exec_(api, hog, ["head", "-1", "/proc/meminfo"]).json()["stdout"]
        assert "131072 kB" in meminfo

        r = exec_(api, hog, ["python3", "-c", HOG], timeout_sec=60)
        assert r.status_code == 409, r.text
        assert "out of memory" in r.json()["error"] and "/start" in r.json()["error"]

        got = api.get(f"/sandboxes/{hog['id']}").json()
        assert got["status"] == "stopped" and got["reason"] == "oom" and "stopped_at" in got
        listed = {s["id"]: s for s in api.get("/sandboxes").json()}
        assert listed[hog["id"]]["reason"] == "oom"
        r = exec_(api, hog, ["true"])
        assert r.status_code == 409 and "out of memory" in r.json()["error"]

        # the daemon and the other sandbox never noticed
        assert httpx.get(daemon.url + "/health").status_code == 200
        assert exec_(api, bystander, ["echo", "fine"]).json()["stdout"] == "fine\n"

        r = api.post(f"/sandboxes/{hog['id']}/start")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "running" and "reason" not in r.json()
        out = exec_(api, hog, ["cat", "/home/kiln/disk-marker"]).json()
        assert out == {"exit_code": 0, "stdout": "kept\n", "stderr": ""}
        # start on a running sandbox is a no-op
        assert api.post(f"/sandboxes/{hog['id']}/start").json()["status"] == "running"
    finally:
        api.delete(f"/sandboxes/{hog['id']}")
        api.delete(f"/sandboxes/{bystander['id']}")


def cpu_usage_ns(daemon, sandbox_id: str) -> int:
    usage = daemon.engine().usage(sandbox_id)
    assert usage is not None
    return int(usage.cpu_seconds * 1e9)


def test_one_cpu_caps_a_two_process_busy_loop(daemon, api):
    sb = make_sandbox(api, name="busy", cpus=1)
    try:
        spin = "end=$(( $(date +%s) + 4 )); while [ $(date +%s) -lt $end ]; do :; done"
        before, t0 = cpu_usage_ns(daemon, sb["id"]), time.monotonic()
        r = exec_(api, sb, ["sh", "-c", f"({spin}) & ({spin}) & wait"], timeout_sec=30)
        used = (cpu_usage_ns(daemon, sb["id"]) - before) / 1e9
        wall = time.monotonic() - t0
        assert r.json()["exit_code"] == 0
        cores = used / wall
        # two busy processes would use two cores unconstrained; the quota holds them near one
        assert 0.5 < cores < 1.25, f"{cores:.2f} cores"
    finally:
        api.delete(f"/sandboxes/{sb['id']}")
