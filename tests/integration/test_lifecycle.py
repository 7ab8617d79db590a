"""Sandbox lifecycle through the real API, against real gVisor sandboxes."""

import httpx

from tests.conftest import make_sandbox


def test_create_exec_destroy_leaves_nothing_behind(daemon, api):
    sb = make_sandbox(api, name="roundtrip")
    assert sb["status"] == "running"
    assert sb["cpus"] == 1 and sb["memory_mb"] == 512
    assert sb["ip"].startswith(daemon.subnet.rsplit(".", 1)[0])

    r = api.post(f"/sandboxes/{sb['id']}/exec", json={"cmd": ["echo", "hello"]})
    assert r.status_code == 200
    assert r.json() == {"exit_code": 0, "stdout": "hello\n", "stderr": ""}

    assert not daemon.clean()  # the check below is not vacuous
    assert daemon.clean(keep={sb["id"]})

    r = api.delete(f"/sandboxes/{sb['id']}")
    assert r.status_code == 200 and r.json() == {"status": "destroyed"}
    assert daemon.leftovers() == {k: [] for k in daemon.leftovers()}
    assert api.get(f"/sandboxes/{sb['id']}").status_code == 404


def test_get_by_id_and_name_list_and_health(daemon, api):
    sb = make_sandbox(api, name="lookup", cpus=0.5, memory_mb=256)
    try:
        assert api.get(f"/sandboxes/{sb['id']}").json()["name"] == "lookup"
        got = api.get("/sandboxes/lookup").json()
        assert got["id"] == sb["id"] and got["cpus"] == 0.5 and got["memory_mb"] == 256
        assert sb["id"] in [s["id"] for s in api.get("/sandboxes").json()]
        health = api.get("/health").json()  # with a key: the caller's own count
        assert health["status"] == "ok" and health["sandboxes"] >= 1 and health["uptime"].endswith("s")
        anonymous = httpx.get(daemon.url + "/health").json()  # without: nothing about the tenants
        assert anonymous["status"] == "ok" and "sandboxes" not in anonymous
    finally:
        api.delete(f"/sandboxes/{sb['id']}")


def test_default_name_is_generated(api):
    sb = make_sandbox(api)
    try:
        assert sb["name"].startswith("sandbox-") and len(sb["name"]) == len("sandbox-") + 6
    finally:
        api.delete(f"/sandboxes/{sb['id']}")


def test_create_with_existing_name_returns_the_existing_sandbox(api):
    sb = make_sandbox(api, name="same")
    try:
        r = api.post("/sandboxes", json={"name": "same", "cpus": 2})
        assert r.status_code == 200
        assert r.headers["X-Bhatti-Existing"] == "true"
        assert r.json()["id"] == sb["id"] and r.json()["cpus"] == 1
    finally:
        api.delete(f"/sandboxes/{sb['id']}")


def test_hostname_is_the_sandbox_name(api):
    sb = make_sandbox(api, name="my-host")
    try:
        r = api.post(f"/sandboxes/{sb['id']}/exec", json={"cmd": ["hostname"]})
        assert r.json()["stdout"] == "my-host\n"
    finally:
        api.delete(f"/sandboxes/{sb['id']}")


def test_init_runs_once_as_session_init(api):
    script = "id -u > /tmp/init-uid; pwd > /tmp/init-cwd; echo init-output-marker"
    sb = make_sandbox(api, name="with-init", init=script)
    try:
        for _ in range(100):
            sessions = api.get(f"/sandboxes/{sb['id']}/sessions").json()
            init = [s for s in sessions if s["session_id"] == "init"]
            if init and not init[0]["running"]:
                break
            import time

            time.sleep(0.1)
        assert init, sessions
        assert init[0]["tty"] is True and init[0]["exit_code"] == 0
        assert init[0]["argv"].endswith(script)
        out = api.post(f"/sandboxes/{sb['id']}/exec", json={"cmd": ["cat", "/tmp/init-uid", "/tmp/init-cwd"]})
        assert out.json()["stdout"] == "1000\n/workspace\n"
    finally:
        api.delete(f"/sandboxes/{sb['id']}")


def test_patch_renames_and_labels(api):
    a = make_sandbox(api, name="patch-a")
    b = make_sandbox(api, name="patch-b")
    try:
        r = api.patch(f"/sandboxes/{a['id']}", json={"name": "patch-b"})
        assert r.status_code == 409 and r.json() == {"error": 'name "patch-b" is already in use'}
        assert api.patch(f"/sandboxes/{a['id']}", json={"name": "bad name"}).status_code == 400
        r = api.patch(f"/sandboxes/{a['id']}", json={"name": "patch-c", "labels_add": {"team": "x", "tier": "1"}})
        assert r.status_code == 200 and r.json()["name"] == "patch-c"
        assert r.json()["labels"] == {"team": "x", "tier": "1"}
        r = api.patch("/sandboxes/patch-c", json={"labels_remove": ["tier"]})
        assert r.json()["labels"] == {"team": "x"}
        assert api.patch(f"/sandboxes/{a['id']}", json={"labels_add": {"bad key!": "v"}}).status_code == 400
        assert api.get("/sandboxes/patch-a").status_code == 404
        # the renamed sandbox keeps working
        assert api.post("/sandboxes/patch-c/exec", json={"cmd": ["true"]}).json()["exit_code"] == 0
    finally:
        api.delete(f"/sandboxes/{a['id']}")
        api.delete(f"/sandboxes/{b['id']}")
