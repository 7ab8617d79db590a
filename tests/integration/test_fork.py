"""Forks (issue 15): POST /sandboxes {"from": ...}, against real sandboxes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from pathlib import Path

import httpx
import pytest

from kiln.agent.client import AgentClient, AgentError
from kiln.agent.protocol import AGENT_PORT
from tests.conftest import listed, make_sandbox, run, wait_for
from tests.daemon import running_daemon

COUNTER = Path(__file__).parent / "apps" / "counter.py"


def state(api, sb) -> dict:
    r = api.get(f"/sandboxes/{sb['id']}/proxy/7000/", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def start_counter(api, sb) -> dict:
    r = api.put(f"/sandboxes/{sb['id']}/files", params={"path": "/tmp/counter.py"}, content=COUNTER.read_bytes())
    assert r.status_code == 200, r.text
    run(api, sb, ["sh", "-c", "nohup python3 /tmp/counter.py 7000 >/tmp/counter.out 2>&1 &"], user="root")
    wait_for(lambda: run(api, sb, ["test", "-f", "/tmp/counter-ready"])["exit_code"] == 0, timeout=60, what="counter")
    up = wait_for(lambda: api.get(f"/sandboxes/{sb['id']}/proxy/7000/").status_code == 200, what="its server")
    return state(api, sb) if up else {}


def agent_token(daemon, sb) -> str:
    rec = daemon.engine().record_on_disk(sb["id"])
    assert rec is not None
    return rec.token


def assert_has_its_own_token(daemon, copy, origin_token: str) -> None:
    """A copy's restored memory knew its origin's agent token; it is handed its own, and the old
    one no longer opens it."""
    own = agent_token(daemon, copy)
    assert own != origin_token

    async def activity(token):
        return await AgentClient(copy["ip"], AGENT_PORT, token).activity()

    with pytest.raises(AgentError, match="auth required"):
        asyncio.run(activity(origin_token))
    assert "agent_restarts" in asyncio.run(activity(own))


def fork(api, source, **body) -> dict:
    r = api.post("/sandboxes", json={"from": source["name"], **body}, timeout=120)
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture(scope="module")
def source(api):
    sb = make_sandbox(api, name="fork-src", memory_mb=512)
    start_counter(api, sb)
    yield sb
    api.delete(f"/sandboxes/{sb['id']}")


def test_a_fork_continues_from_the_fork_point_while_the_source_carries_on(api, daemon, source):
    before = state(api, source)
    f = fork(api, source, name="fork-a", labels={"kind": "fork"})
    try:
        assert_has_its_own_token(daemon, f, agent_token(daemon, source))
        assert f["name"] == "fork-a" and f["id"] != source["id"] and f["ip"] != source["ip"]
        assert f["fork"]["source"] == source["id"] and 0 < f["fork"]["paused_ms"] < 30_000
        assert (f["cpus"], f["memory_mb"], f["labels"]) == (source["cpus"], source["memory_mb"], {"kind": "fork"})
        theirs, mine = state(api, f), state(api, source)
        assert theirs["token"] == before["token"] and theirs["ballast_ok"] and theirs["pid"] == before["pid"]
        assert mine["pid"] == before["pid"] and mine["counter"] > before["counter"]  # never restarted
        # the fork's file holds exactly what the source's held at the fork point, and nothing after
        assert theirs["sequential"] and mine["sequential"]
        time.sleep(0.5)
        later_f, later_s = state(api, f), state(api, source)
        assert later_f["counter"] > theirs["counter"] and later_s["counter"] > mine["counter"]  # both live
        assert later_f["lines"] == later_f["last_line"] and later_s["lines"] == later_s["last_line"]
        # writes in one never appear in the other
        run(api, f, ["sh", "-c", "echo fork-only > /root/only-in-fork"], user="root")
        assert run(api, source, ["test", "-e", "/root/only-in-fork"], user="root")["exit_code"] == 1
        assert api.get("/sandboxes", params={"label": "kind=fork"}).json()[0]["id"] == f["id"]
    finally:
        api.delete(f"/sandboxes/{f['id']}")
    assert state(api, source)["token"] == before["token"]  # the source is unaffected by the fork's end


def test_three_concurrent_forks_of_one_source(api, source):
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        forks = list(pool.map(lambda i: fork(api, source, name=f"fork-c{i}"), range(3)))
    try:
        tokens = {state(api, f)["token"] for f in forks}
        assert tokens == {state(api, source)["token"]} and len({f["ip"] for f in forks}) == 3
    finally:
        for f in forks:
            api.delete(f"/sandboxes/{f['id']}")


def test_a_cold_source_is_forked_untouched(api):
    sb = make_sandbox(api, name="fork-cold")
    try:
        run(api, sb, ["sh", "-c", "echo kept > /home/kiln/mark"])
        assert api.post(f"/sandboxes/{sb['id']}/stop").json()["status"] == "stopped"
        cold = fork(api, sb, name="fork-of-cold")
        assert cold["fork"]["paused_ms"] == 0
        assert api.get(f"/sandboxes/{sb['id']}").json()["status"] == "stopped"  # still cold
        assert run(api, cold, ["cat", "/home/kiln/mark"])["stdout"] == "kept\n"
        api.delete(f"/sandboxes/{cold['id']}")
    finally:
        api.delete(f"/sandboxes/{sb['id']}")


def test_a_warm_source_is_forked_and_left_warm(default_image):
    with running_daemon({"thermal": {"warm_after": 0.5, "cold_after": 3600, "tick": 0.1}}) as d, d.client() as api:
        sb = make_sandbox(api, name="fork-warm")
        run(api, sb, ["sh", "-c", "echo kept > /home/kiln/mark"])
        wait_for(lambda: listed(api, sb).get("thermal") == "warm", what="the source to go warm")
        f = fork(api, sb, name="fork-of-warm")
        assert run(api, f, ["cat", "/home/kiln/mark"])["stdout"] == "kept\n"
        assert listed(api, sb)["thermal"] == "warm"  # frozen again: nothing woke it
        assert run(api, sb, ["cat", "/home/kiln/mark"])["stdout"] == "kept\n"


def test_a_fork_during_heavy_writes_has_consistent_files(api):
    sb = make_sandbox(api, name="fork-writer")
    try:
        whole = "head -c 20000000 /dev/urandom > /home/kiln/whole && sha256sum /home/kiln/whole > /home/kiln/whole.sum"
        run(api, sb, ["sh", "-c", whole])
        churn = "while true; do for i in 1 2 3 4; do head -c 1000000 /dev/urandom > /home/kiln/churn.$i; done; done"
        run(api, sb, ["sh", "-c", f"nohup sh -c '{churn}' >/dev/null 2>&1 &"])
        time.sleep(1)
        f = fork(api, sb, name="fork-of-writer")
        try:
            assert run(api, f, ["sha256sum", "-c", "/home/kiln/whole.sum"])["exit_code"] == 0
            sizes = run(api, f, ["sh", "-c", "stat -c %s /home/kiln/churn.*"])["stdout"].split()
            assert sizes and all(int(n) <= 1_000_000 for n in sizes)  # no file longer than ever written
        finally:
            api.delete(f"/sandboxes/{f['id']}")
    finally:
        api.delete(f"/sandboxes/{sb['id']}")


def test_forks_are_refused_clearly(api, daemon, source):
    r = api.post("/sandboxes", json={"from": "no-such-sandbox"})
    assert r.status_code == 404 and r.json()["error"] == 'source sandbox "no-such-sandbox" not found'
    for field, value in (("cpus", 2), ("memory_mb", 1024), ("env", {"A": "1"}), ("init", "true")):
        r = api.post("/sandboxes", json={"from": source["name"], field: value})
        assert r.status_code == 400 and field in r.json()["error"], r.text
    # what bhatti's CLI sends with --from: every field, empty or at its default (the source's values here)
    bhatti = {"name": "", "image": "", "cpus": source["cpus"], "memory_mb": 0, "disk_size_mb": 0, "env": {},
              "init": "", "secrets": [], "files": [], "persistent_volumes": [], "labels": {}}  # fmt: skip
    r = api.post("/sandboxes", json={"from": source["name"], **bhatti})
    assert r.status_code == 201, r.text
    api.delete(f"/sandboxes/{r.json()['id']}")
    r = api.post("/sandboxes", json={"from": source["name"], "net_policy": {"default": "nope"}})
    assert r.status_code == 400 and "invalid net_policy" in r.json()["error"]
    # another user's sandbox is not there for them
    token = daemon.create_user(f"forker-{time.time_ns() % 100000}")
    with httpx.Client(base_url=daemon.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as other:
        r = other.post("/sandboxes", json={"from": source["id"]})
        assert r.status_code == 404 and "not found" in r.json()["error"]
    before = {s["id"] for s in api.get("/sandboxes").json()}
    assert {s["id"] for s in api.get("/sandboxes").json()} == before


def test_the_cli_and_the_sdk_fork(api, daemon, source):
    import json
    import os
    import subprocess
    import sys

    from kiln.client import Kiln

    env = {**os.environ, "KILN_URL": daemon.url, "KILN_TOKEN": daemon.admin_token}
    r = subprocess.run([sys.executable, "-m", "kiln.cli.main", "fork", source["name"], "cli-fork", "--json"],
                       env=env, capture_output=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert made["name"] == "cli-fork" and made["fork"]["source"] == source["id"]
    api.delete(f"/sandboxes/{made['id']}")
    with Kiln(daemon.url, daemon.admin_token) as k:
        f = k.sandboxes.get(source["name"]).fork("sdk-fork")
        assert f.info["name"] == "sdk-fork" and state(api, f.info)["token"] == state(api, source)["token"]
        f.destroy()


def test_a_fork_that_fails_leaves_the_source_as_it_was_and_nothing_behind(default_image):
    import subprocess

    from tests.daemon import Daemon
    from tests.integration.test_thermal_restart import small_filesystem

    with small_filesystem(400) as fs:
        d = Daemon(parent_dir=fs)
        try:
            d.start()
            with d.client() as api:
                sb = make_sandbox(api, name="no-room-src", memory_mb=256)
                run(api, sb, ["sh", "-c", "head -c 30000000 /dev/urandom > /dev/shm/b; sha256sum /dev/shm/b > /tmp/s"])
                before = d.leftovers()
                free = subprocess.run(["df", "--output=avail", "-B1", str(fs)], capture_output=True, text=True)
                subprocess.run(["fallocate", "-l", str(int(free.stdout.split()[-1]) - 2_000_000), str(fs / "filler")],
                               check=True)  # fmt: skip
                r = api.post("/sandboxes", json={"from": "no-room-src", "name": "no-room-fork"})
                assert r.status_code >= 500, r.text
                assert [s["name"] for s in api.get("/sandboxes").json()] == ["no-room-src"]
                got = api.get(f"/sandboxes/{sb['id']}").json()
                assert got["status"] == "running" and listed(api, sb).get("thermal") == "hot"
                assert run(api, sb, ["sha256sum", "-c", "/tmp/s"])["exit_code"] == 0  # memory intact, running
                assert d.leftovers() == before  # no netns, veth, cgroup, dir, mount or container of the fork
                (fs / "filler").unlink()
                again = api.post("/sandboxes", json={"from": "no-room-src", "name": "no-room-fork"})
                assert again.status_code == 201, again.text
                api.delete(f"/sandboxes/{again.json()['id']}")
                api.delete(f"/sandboxes/{sb['id']}")
            assert d.clean()
        finally:
            d.scrub()


def test_a_named_snapshot_resumes_into_independent_sandboxes_after_its_source_is_gone(api, daemon):
    sb = make_sandbox(api, name="snap-src", memory_mb=512)
    at_snapshot = start_counter(api, sb)
    source_token = agent_token(daemon, sb)
    r = api.post(f"/sandboxes/{sb['id']}/checkpoint", json={"name": "cp1"})
    assert r.status_code == 201, r.text
    snap = r.json()
    assert snap["name"] == "cp1" and snap["source_sandbox"] == sb["id"] and snap["size_mb"] > 64
    assert snap["paused_ms"] > 0 and snap["user_id"].startswith("usr_")
    for body, status, message in [
        ({"name": "cp1"}, 409, "already exists"),
        ({"name": "bad name"}, 400, "invalid snapshot name"),
        ({"name": "cp2", "type": "filesystem"}, 501, "filesystem"),
    ]:
        r = api.post(f"/sandboxes/{sb['id']}/checkpoint", json=body)
        assert r.status_code == status and message in r.json()["error"], r.text
    assert api.post("/sandboxes/nope/checkpoint", json={"name": "x"}).status_code == 404
    assert state(api, sb)["counter"] > at_snapshot["counter"]  # the source carried on
    assert [s["name"] for s in api.get("/snapshots").json()] == ["cp1"]
    assert api.get("/snapshots/cp1").json()["id"] == snap["id"]
    assert api.delete(f"/sandboxes/{sb['id']}").status_code == 200  # the snapshot outlives its source

    a = api.post("/snapshots/cp1/resume", json={"name": "from-cp1"}).json()
    b = api.post("/snapshots/cp1/resume").json()
    try:
        assert a["name"] == "from-cp1" and b["name"].startswith("cp1-") and a["ip"] != b["ip"]
        sa, sb_ = state(api, a), state(api, b)
        assert sa["token"] == sb_["token"] == at_snapshot["token"] and sa["ballast_ok"] and sb_["ballast_ok"]
        run(api, a, ["sh", "-c", "echo only-a > /root/a"], user="root")
        assert run(api, b, ["test", "-e", "/root/a"], user="root")["exit_code"] == 1
        assert_has_its_own_token(daemon, a, source_token)
        assert agent_token(daemon, b) not in (source_token, agent_token(daemon, a))
        # its own token outlives a stop and a start (it is in the restored memory and on its tmpfs)
        assert api.post(f"/sandboxes/{a['id']}/stop").json()["status"] == "stopped"
        assert run(api, a, ["cat", "/root/a"], user="root")["stdout"] == "only-a\n"
        token = daemon.create_user(f"snapper-{time.time_ns() % 100000}")
        with httpx.Client(base_url=daemon.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as other:
            assert other.get("/snapshots").json() == []
            assert other.get("/snapshots/cp1").status_code == 404
            assert other.post("/snapshots/cp1/resume").status_code == 404
            assert other.delete("/snapshots/cp1").status_code == 404
    finally:
        api.delete(f"/sandboxes/{a['id']}")
        api.delete(f"/sandboxes/{b['id']}")
    assert api.delete("/snapshots/cp1").json() == {"status": "deleted"}
    assert api.get("/snapshots/cp1").status_code == 404 and api.post("/snapshots/cp1/resume").status_code == 404
    assert daemon.leftovers()["snapshots"] == []


def test_snapshots_share_pages_and_a_delete_frees_only_what_no_other_needs(api, daemon):
    sb = make_sandbox(api, name="share-src", memory_mb=512)
    start_counter(api, sb)  # 64 MB of random ballast in memory
    pages = daemon.data_dir / "snapshot-pages"

    def stored_mb() -> float:
        return sum(p.stat().st_blocks * 512 for p in pages.rglob("*.pack")) / (1 << 20)

    try:
        first = api.post(f"/sandboxes/{sb['id']}/checkpoint", json={"name": "s1"}, timeout=120).json()
        alone = stored_mb()
        second = api.post(f"/sandboxes/{sb['id']}/checkpoint", json={"name": "s2"}, timeout=120).json()
        both = stored_mb()
        assert first["size_mb"] > 64 and alone > 64
        # the second checkpoint of the same sandbox stores what changed since (ticks, a log), not the ballast
        assert second["size_mb"] < first["size_mb"] / 4 and both - alone < alone / 4, (first, second, alone, both)
        assert api.delete("/snapshots/s1").json() == {"status": "deleted"}
        assert stored_mb() == both  # s2 still needs most of s1's pages
        r = api.post("/snapshots/s2/resume", json={"name": "from-s2"}, timeout=120)
        assert r.status_code == 201, r.text
        resumed = r.json()
        got = state(api, resumed)
        assert got["ballast_ok"] and got["sequential"] and got["token"] == state(api, sb)["token"]
        assert daemon.leftovers(keep={sb["id"], resumed["id"]})["snapshot_packs"] == []
        api.delete(f"/sandboxes/{resumed['id']}")
        assert api.delete("/snapshots/s2").json() == {"status": "deleted"}
        assert stored_mb() == 0  # every page freed once no snapshot references it
    finally:
        api.delete(f"/sandboxes/{sb['id']}")
        for name in ("s1", "s2"):
            api.delete(f"/snapshots/{name}")


def test_the_cli_and_the_sdk_keep_and_resume_snapshots(api, daemon):
    import json
    import os
    import subprocess
    import sys

    from kiln.client import Kiln

    env = {**os.environ, "KILN_URL": daemon.url, "KILN_TOKEN": daemon.admin_token}

    def kiln(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kiln.cli.main", *args], env=env, capture_output=True, timeout=300)

    sb = make_sandbox(api, name="snap-cli")
    run(api, sb, ["sh", "-c", "echo from-cli > /home/kiln/m"])
    try:
        made = json.loads(kiln("snapshot", "create", "snap-cli", "cli-cp", "--json").stdout)
        assert made["name"] == "cli-cp"
        assert "cli-cp" in kiln("snapshot", "list").stdout.decode()
        resumed = json.loads(kiln("snapshot", "resume", "cli-cp", "cli-resumed", "--json").stdout)
        assert run(api, resumed, ["cat", "/home/kiln/m"])["stdout"] == "from-cli\n"
        api.delete(f"/sandboxes/{resumed['id']}")
        with Kiln(daemon.url, daemon.admin_token) as k:
            k.sandboxes.get("snap-cli").checkpoint("sdk-cp")
            again = k.snapshots.resume("sdk-cp", "sdk-resumed")
            assert again.commands.run("cat /home/kiln/m").stdout == "from-cli\n"
            again.destroy()
            k.snapshots.delete("sdk-cp")
        assert kiln("snapshot", "delete", "cli-cp").returncode == 0
        assert api.get("/snapshots").json() == []
    finally:
        api.delete(f"/sandboxes/{sb['id']}")


def test_a_template_made_from_a_sandbox_starts_its_sandboxes_already_serving(api):
    setup = 'cd /workspace && echo \'{"name": "app"}\' > package.json'
    setup += " && nohup python3 -m http.server 8000 >/dev/null 2>&1 &"
    sb = make_sandbox(api, name="tpl-src", init=setup)
    try:
        wait_for(lambda: api.get(f"/sandboxes/{sb['id']}/proxy/8000/package.json").status_code == 200, what="setup")
        api.post("/secrets", json={"name": "TPL_TOKEN", "value": "s3cret"})
        r = api.post("/templates", json={"name": "served", "from_sandbox": "tpl-src", "secrets": ["TPL_TOKEN"]})
        assert r.status_code == 201, r.text
        assert r.json()["snapshot"] == "served-template"
        r = api.delete("/snapshots/served-template")
        assert r.status_code == 409 and "template" in r.json()["error"]  # in use
    finally:
        api.delete(f"/sandboxes/{sb['id']}")  # the template does not need its source
    made = make_sandbox(api, template_id="served", env={"GREETING": "hi"}, labels={"from": "tpl"})
    try:
        assert made["name"].startswith("served-") and made["template_id"] and made["labels"] == {"from": "tpl"}
        r = api.get(f"/sandboxes/{made['id']}/proxy/8000/package.json")  # no exec: the server was already there
        assert r.status_code == 200 and r.json() == {"name": "app"}
        assert run(api, made, ["sh", "-c", "echo $GREETING $TPL_TOKEN"])["stdout"] == "hi s3cret\n"
        r = api.post("/sandboxes", json={"template_id": "served", "memory_mb": 1024})
        assert r.status_code == 400 and "memory_mb" in r.json()["error"]
    finally:
        api.delete(f"/sandboxes/{made['id']}")
    assert api.post("/templates", json={"name": "x", "snapshot": "no-such"}).status_code == 404
    assert api.delete("/templates/served").status_code == 200
    assert api.delete("/snapshots/served-template").status_code == 200
    api.delete("/secrets/TPL_TOKEN")


def test_the_on_fork_hook_runs_in_every_copy_and_never_in_the_source(api):
    src = make_sandbox(api, name="hooked")
    hook = (
        "#!/bin/sh\nseed=$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \\n')\n"
        'printf "%s\\n%s\\n" "$seed" "$KILN_FORK" > /run/reseeded\n'
    )
    try:
        w = api.put(f"/sandboxes/{src['id']}/files", params={"path": "/etc/kiln/on_fork", "mode": "0755"}, content=hook)
        assert w.status_code == 200, w.text
        fork = api.post("/sandboxes", json={"from": src["id"], "name": "hooked-fork"})
        assert fork.status_code == 201, fork.text
        seeded = run(api, fork.json(), ["cat", "/run/reseeded"])
        assert seeded["exit_code"] == 0 and seeded["stdout"].endswith("\n1\n"), seeded
        assert run(api, src, ["test", "-e", "/run/reseeded"])["exit_code"] == 1  # the source never ran it
        assert api.post(f"/sandboxes/{src['id']}/checkpoint", json={"name": "hooked-snap"}).status_code == 201
        resumed = api.post("/snapshots/hooked-snap/resume", json={"name": "hooked-resumed"})
        assert resumed.status_code == 201, resumed.text
        again = run(api, resumed.json(), ["cat", "/run/reseeded"])["stdout"]
        assert again.endswith("\n1\n") and again != seeded["stdout"]  # its own seed
        api.delete(f"/sandboxes/{resumed.json()['id']}")
        api.delete(f"/sandboxes/{fork.json()['id']}")
    finally:
        api.delete(f"/sandboxes/{src['id']}")
        api.delete("/snapshots/hooked-snap")
