"""Request shapes bhatti's clients send (issue 16): honoured, or refused with a 400/404/501 that names
the field; never a silent success. Written from bhatti's API contract, not from its code."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from kiln import BHATTI_API_VERSION, __version__
from tests.conftest import make_sandbox, run, start_web_app, wait_for
from tests.daemon import Daemon, free_port


def test_an_empty_name_means_no_name(api):
    # bhatti's CLI always sends "name"; empty means "generate one"
    sb = make_sandbox(api, name="")
    try:
        assert re.fullmatch(r"sandbox-[0-9a-f]{6}", sb["name"]), sb["name"]
    finally:
        api.delete(f"/sandboxes/{sb['id']}")


def test_labels_on_create_and_the_label_filter(api):
    a = make_sandbox(api, name="lab-a", labels={"team": "ci", "tier": "web"})
    b = make_sandbox(api, name="lab-b", labels={"team": "ci"})
    c = make_sandbox(api, name="lab-c")
    try:
        assert a["labels"] == {"team": "ci", "tier": "web"} and "labels" not in c

        def names(*filters):
            r = api.get("/sandboxes", params=[("label", f) for f in filters])
            assert r.status_code == 200, r.text
            return sorted(s["name"] for s in r.json() if s["name"].startswith("lab-"))

        assert names("team=ci") == ["lab-a", "lab-b"]
        assert names("team=ci", "tier=web") == ["lab-a"]  # several filters AND together
        assert names("team=nobody") == []
        assert names() == ["lab-a", "lab-b", "lab-c"]
        assert names("tier=") == []  # an empty value is a value
        assert names("team=ci", "team=web") == []  # one key, two values: AND matches nothing
        for bad in ("team", "=ci", "bhatti.sh/x=1"):
            r = api.get("/sandboxes", params={"label": bad})
            assert r.status_code == 400 and "label" in r.json()["error"], (bad, r.text)
        r = api.post("/sandboxes", json={"name": "lab-bad", "labels": {"bhatti.sh/owner": "x"}})
        assert r.status_code == 400 and "reserved" in r.json()["error"]
        assert "lab-bad" not in [s["name"] for s in api.get("/sandboxes").json()]
    finally:
        for s in (a, b, c):
            api.delete(f"/sandboxes/{s['id']}")


@pytest.mark.parametrize(
    ("field", "value", "status", "message"),
    [
        ("image", "browser", 404, 'image "browser" not found'),
        ("from", "some-sandbox", 404, 'source sandbox "some-sandbox" not found'),
        ("net_policy", {"default": "sometimes"}, 400, "invalid net_policy"),
        ("mounts", [{"host_path": "/etc", "guest_path": "/mnt"}], 400, "mounts"),
        ("hugepages", True, 400, "hugepages"),
    ],
)
def test_fields_kiln_does_not_honour_are_refused_by_name(api, field, value, status, message):
    before = [s["id"] for s in api.get("/sandboxes").json()]
    r = api.post("/sandboxes", json={"name": "refused", field: value})
    assert r.status_code == status and message in r.json()["error"], r.text
    assert [s["id"] for s in api.get("/sandboxes").json()] == before  # nothing made


def test_what_bhatti_clients_send_empty_is_accepted(api):
    # the CLI sends every field; empty ones ask for nothing kiln lacks
    sb = make_sandbox(
        api, name="empties", image="", files=[], mounts=[], hugepages=False, persistent_volumes=[], labels={}
    )
    try:
        assert sb["image"] == "default"
        assert make_sandbox(api, name="named-image", image="default")["image"] == "default"
    finally:
        api.delete(f"/sandboxes/{sb['id']}")
        for s in api.get("/sandboxes").json():
            if s["name"] == "named-image":
                api.delete(f"/sandboxes/{s['id']}")


def test_persistent_volumes_attach_existing_or_auto_created_volumes(api):
    def create(name, *pvs):
        return api.post("/sandboxes", json={"name": name, "persistent_volumes": list(pvs)})

    before = api.get("/sandboxes").json()
    r = create("pv-missing", {"name": "pv-none", "mount": "/data"})
    assert r.status_code == 404 and r.json() == {"error": 'volume "pv-none" not found'}
    assert api.get("/sandboxes").json() == before and api.get("/volumes/pv-none").status_code == 404
    first = create("pv-a", {"name": "pv-data", "mount": "/data", "size_mb": 16, "auto_create": True})
    assert first.status_code == 201, first.text
    a = first.json()
    try:
        assert api.get("/volumes/pv-data").json()["size_mb"] == 16
        out = api.post(f"/sandboxes/{a['id']}/exec", json={"cmd": ["sh", "-c", "echo kept > /data/f; cat /data/f"]})
        assert out.json()["stdout"] == "kept\n"
        # a second read-write user of the same volume is refused, as bhatti does
        r = create("pv-b", {"name": "pv-data", "mount": "/data", "auto_create": True})
        assert r.status_code == 409 and "already attached" in r.json()["error"]
    finally:
        api.delete(f"/sandboxes/{a['id']}")
    ro = create("pv-ro", {"name": "pv-data", "mount": "/data", "read_only": True})
    assert ro.status_code == 201, ro.text
    try:
        sb = ro.json()
        out = api.post(f"/sandboxes/{sb['id']}/exec", json={"cmd": ["sh", "-c", "cat /data/f; echo x > /data/g"]})
        assert out.json()["stdout"] == "kept\n" and out.json()["exit_code"] != 0  # data there, read-only
    finally:
        api.delete(f"/sandboxes/{sb['id']}")
    assert api.delete("/volumes/pv-data").status_code == 200


def test_listings_carry_the_published_urls(api):
    sb = make_sandbox(api, name="with-url")
    try:
        assert "urls" not in {s["id"]: s for s in api.get("/sandboxes").json()}[sb["id"]]
        url = api.post(f"/sandboxes/{sb['id']}/publish", json={"port": 3000}).json()["url"]
        listed = {s["id"]: s for s in api.get("/sandboxes").json()}[sb["id"]]
        assert listed["urls"] == [url]
        assert "urls" not in api.get(f"/sandboxes/{sb['id']}").json()  # list-only, as bhatti
    finally:
        api.delete(f"/sandboxes/{sb['id']}")


def test_bhatti_secret_names_are_injected_under_an_env_var_name(api):
    assert api.post("/secrets", json={"name": "openai-key", "value": "sk-test-1"}).status_code == 201
    assert api.post("/secrets", json={"name": "Plain_Name", "value": "v2"}).status_code == 201
    sb = make_sandbox(api, name="bhatti-secrets", secrets=["openai-key", "Plain_Name"])
    try:
        out = api.post(f"/sandboxes/{sb['id']}/exec", json={"cmd": ["sh", "-c", "echo $OPENAI_KEY $Plain_Name"]})
        assert (
            out.json()["stdout"] == "sk-test-1 v2\n"
        )  # `-`/`.` names upper-cased with `_`; env-safe names as they are
    finally:
        api.delete(f"/sandboxes/{sb['id']}")
        api.delete("/secrets/openai-key")
        api.delete("/secrets/Plain_Name")
    r = api.post("/secrets", json={"name": "no spaces", "value": "x"})
    assert r.status_code == 400 and "invalid secret name" in r.json()["error"]


def test_a_detached_exec_answers_at_once_and_outlives_the_request(api, sandbox):
    sid = sandbox["id"]
    r = api.post(
        f"/sandboxes/{sid}/exec",
        json={"cmd": ["sh", "-c", "echo out; echo err >&2; sleep 3; echo late"], "detach": True, "timeout_sec": 1},
    )
    assert r.status_code == 200, r.text
    started = r.json()
    assert started["detached"] is True and started["pid"] > 1
    assert re.fullmatch(r"/tmp/kiln-exec-[0-9a-f]{8}\.log", started["output_file"])
    log = started["output_file"]
    wait_for(lambda: run(api, sandbox, ["cat", log])["stdout"] == "out\nerr\n", what="the first lines")
    # its own session (sid == pid), owned by the default user, past the 1 s timeout
    ps = run(api, sandbox, ["ps", "-o", "pid=,sid=,user=", "-p", str(started["pid"])])["stdout"].split()
    assert ps == [str(started["pid"]), str(started["pid"]), "kiln"], ps
    wait_for(lambda: run(api, sandbox, ["cat", log])["stdout"] == "out\nerr\nlate\n", what="the late line")
    assert run(api, sandbox, ["stat", "-c", "%U", log])["stdout"] == "kiln\n"

    # a chosen output file, as another user; errors are 400 and start nothing
    r = api.post(
        f"/sandboxes/{sid}/exec",
        json={"cmd": ["id", "-un"], "detach": True, "output_file": "/root/id.log", "user": "root"},
    )
    assert r.json()["output_file"] == "/root/id.log"
    wait_for(lambda: run(api, sandbox, ["cat", "/root/id.log"], user="root")["stdout"] == "root\n", what="root's file")
    for body, message in [
        ({"cmd": ["true"], "detach": True, "output_file": "/root/no.log"}, "Permission denied"),
        ({"cmd": ["no-such-binary"], "detach": True}, "no-such-binary"),
        ({"cmd": ["true"], "detach": True, "output_file": "rel.log"}, "absolute"),
        ({"cmd": ["true"], "detach": True, "stdin": "x"}, "stdin"),
        ({"cmd": ["true"], "output_file": "/tmp/x.log"}, "detach"),
    ]:
        r = api.post(f"/sandboxes/{sid}/exec", json=body)
        assert r.status_code == 400 and message in r.json()["error"], (body, r.text)


def test_an_exec_returns_when_its_command_exits_and_leaves_background_children_running(api, sandbox):
    # the server holds the command's stdout and stderr; the exec still ends when sh does
    script = "python3 -c 'import time; print(\"up\", flush=True); time.sleep(60)' & echo started"
    r = api.post(f"/sandboxes/{sandbox['id']}/exec", json={"cmd": ["sh", "-c", script], "timeout_sec": 30})
    assert r.status_code == 200, r.text
    assert r.json()["exit_code"] == 0 and r.json()["stdout"].startswith("started\n")
    assert "timed_out" not in r.json()
    survivors = run(api, sandbox, ["pgrep", "-f", "time.sleep"])["stdout"].split()
    assert len(survivors) == 1  # left running, not killed with the exec
    # the same over NDJSON: the stream ends with the command's exit line
    with api.stream(
        "POST",
        f"/sandboxes/{sandbox['id']}/exec",
        json={"cmd": ["sh", "-c", "sleep 60 & echo bg"], "timeout_sec": 30},
        headers={"Accept": "application/x-ndjson"},
    ) as s:
        lines = [json.loads(x) for x in s.iter_lines() if x]
    assert lines[0] == {"type": "stdout", "data": "bg\n"} and lines[-1] == {"type": "exit", "exit_code": 0}
    assert run(api, sandbox, ["pgrep", "-x", "sleep"])["stdout"].strip() != ""


def test_files_on_create_are_written_before_init_runs(api):
    config = base64.b64encode(b'{"key": "v"}\n').decode()
    sb = make_sandbox(
        api,
        name="with-files",
        files=[
            {"guest_path": "/workspace/app/config.json", "content": config, "mode": "0600"},
            {"guest_path": "/home/kiln/empty", "content": ""},
        ],
        init="cp /workspace/app/config.json /tmp/init-saw",
    )
    try:
        assert run(api, sb, ["cat", "/workspace/app/config.json"])["stdout"] == '{"key": "v"}\n'
        stat = run(api, sb, ["stat", "-c", "%U %a %s", "/workspace/app/config.json", "/home/kiln/empty"])
        assert stat["stdout"] == "kiln 600 13\nkiln 644 0\n"
        wait_for(lambda: run(api, sb, ["cat", "/tmp/init-saw"])["exit_code"] == 0, what="init")
        assert run(api, sb, ["cat", "/tmp/init-saw"])["stdout"] == '{"key": "v"}\n'  # init ran after the files
    finally:
        api.delete(f"/sandboxes/{sb['id']}")
    for files, message in [
        ([{"content": config}], "file guest_path required"),
        ([{"guest_path": "/a", "content": "not base64!"}], 'file "/a": invalid base64 content'),
        ([{"guest_path": "/a", "content": config, "mode": "rw"}], 'file "/a": invalid mode'),
        ([{"guest_path": "a", "content": config}], "absolute"),
        ([{"guest_path": "/tmp", "content": config}], 'file "/tmp": /tmp is a directory'),  # found by the agent
    ]:
        r = api.post("/sandboxes", json={"name": "bad-files", "files": files})
        assert r.status_code == 400 and message in r.json()["error"], (files, r.text)
        assert "bad-files" not in [s["name"] for s in api.get("/sandboxes").json()]


def test_templates_in_bhatti_shape_keep_every_field(api):
    body = {
        "id": "tpl-web",
        "engine": "",
        "image": "default",
        "cpus": 0.5,
        "memory_mb": 256,
        "disk_size_mb": 700,
        "userdata": "#cloud-config\nhostname: web\n",
        "secrets": [],
        "labels": {"team": "web"},
        "mounts": [{"volume_name": "", "target": "/workspace/data", "readonly": False, "auto_create": True}],
    }
    r = api.post("/templates", json=body)
    assert r.status_code == 201, r.text
    t = r.json()
    assert t["id"] == "tpl-web" and t["name"] == "tpl-web"  # no name: the id is the name
    for key in ("image", "disk_size_mb", "userdata", "labels", "cpus", "memory_mb"):
        assert t[key] == body[key], key
    assert t["mounts"] == body["mounts"] and t["engine"] == "gvisor"
    assert api.get("/templates/tpl-web").json() == t
    sb = make_sandbox(api, name="from-tpl", template_id="tpl-web", labels={"tier": "1"})
    try:
        assert sb["template_id"] == "tpl-web" and sb["disk_size_mb"] == 700 and sb["disk_limit_mb"] == 700
        assert sb["labels"] == {"team": "web", "tier": "1"}
        assert run(api, sb, ["cat", "/etc/kiln/userdata"], user="root")["stdout"] == body["userdata"]
        # the empty volume_name is a workspace volume of the sandbox's own, made at create
        assert run(api, sb, ["sh", "-c", "echo kept > /workspace/data/f && stat -c %U /workspace/data"])["stdout"] == (
            "kiln\n"
        )
        vol = api.get("/volumes/from-tpl-workspace").json()
        assert vol["attachments"] == [{"sandbox_id": sb["id"], "mount": "/workspace/data", "read_only": False}]
    finally:
        api.delete(f"/sandboxes/{sb['id']}")
        api.delete("/volumes/from-tpl-workspace")
    assert api.post("/templates", json={"id": "tpl-web"}).status_code == 409
    for bad, message in [
        ({"id": "bad id"}, "invalid template id"),
        ({"name": "t2", "image": "browser"}, 'image "browser" not found'),
        ({"name": "t2", "engine": "firecracker"}, "gvisor"),
        ({"name": "t2", "mounts": [{"volume_name": "", "target": "/etc"}]}, "/etc"),
        ({"name": "t2", "labels": {"bhatti.sh/x": "1"}}, "reserved"),
    ]:
        r = api.post("/templates", json=bad)
        assert r.status_code in (400, 404) and message in r.json()["error"], (bad, r.text)
    assert [x["id"] for x in api.get("/templates").json()] == ["tpl-web"]
    api.delete("/templates/tpl-web")


def test_disk_size_reports_what_was_asked_and_the_cap_beside_it(api, daemon):
    sb = make_sandbox(api, name="disk-default")
    try:
        assert sb["disk_size_mb"] == 0 and sb["disk_limit_mb"] == 10240  # bhatti: 0 = the default size
        assert api.get(f"/sandboxes/{sb['id']}").json()["disk_limit_mb"] == 10240
    finally:
        api.delete(f"/sandboxes/{sb['id']}")
    r = api.get("/health")
    assert r.headers["x-bhatti-version"] == BHATTI_API_VERSION and r.headers["x-kiln-version"] == __version__


def test_volumes_grow_and_clone_only_while_detached(api):
    assert api.post("/volumes", json={"name": "grow", "size_mb": 64}).status_code == 201
    sb = make_sandbox(api, name="vol-user", volumes=[{"name": "grow", "mount": "/data"}])
    try:
        run(api, sb, ["sh", "-c", "echo precious > /data/f"])
        for path, body in (("resize", {"size_mb": 128}), ("snapshot", {"name": "grow-copy"})):
            r = api.post(f"/volumes/grow/{path}", json=body)
            assert r.status_code == 409 and "attachment" in r.json()["error"], r.text
    finally:
        api.delete(f"/sandboxes/{sb['id']}")
    r = api.post("/volumes/grow/resize", json={"size_mb": 128})
    assert r.status_code == 200 and r.json() == {"status": "resized", "size_mb": 128}, r.text
    assert api.get("/volumes/grow").json()["size_mb"] == 128
    for size in (128, 32, None):
        r = api.post("/volumes/grow/resize", json={"size_mb": size})
        assert r.status_code == 400 and "only grow" in r.json()["error"], r.text
    r = api.post("/volumes/grow/snapshot", json={"name": "grow-copy"})
    assert r.status_code == 201 and r.json()["name"] == "grow-copy" and r.json()["size_mb"] == 128, r.text
    assert api.post("/volumes/grow/snapshot", json={"name": "grow-copy"}).status_code == 409
    assert api.post("/volumes/nope/snapshot", json={"name": "x"}).status_code == 404
    assert api.post("/volumes/grow/snapshot", json={"name": "bad name"}).status_code == 400
    sb = make_sandbox(api, name="vol-user2", volumes=[{"name": "grow-copy", "mount": "/data"}])
    try:
        assert run(api, sb, ["cat", "/data/f"])["stdout"] == "precious\n"
        size_kb = int(run(api, sb, ["df", "-k", "--output=size", "/data"])["stdout"].split()[-1])
        assert 100_000 < size_kb <= 131_072, size_kb  # the grown filesystem, not the 64 MB one
        run(api, sb, ["sh", "-c", "echo changed > /data/f"])
    finally:
        api.delete(f"/sandboxes/{sb['id']}")
    sb = make_sandbox(api, name="vol-user3", volumes=[{"name": "grow", "mount": "/data", "read_only": True}])
    try:
        assert run(api, sb, ["cat", "/data/f"])["stdout"] == "precious\n"  # the clone is a copy
    finally:
        api.delete(f"/sandboxes/{sb['id']}")
    for method, path in (("GET", "backups"), ("POST", "backups"), ("POST", "backups/restore"), ("DELETE", "backups/x")):
        r = api.request(method, f"/volumes/grow/{path}")
        assert r.status_code == 501 and "backup not configured" in r.json()["error"], (method, path, r.text)
    for name in ("grow", "grow-copy"):
        assert api.delete(f"/volumes/{name}").status_code == 200


def test_a_forward_relays_a_host_port_wakes_the_sandbox_and_survives_a_restart(default_image):
    d = Daemon()
    try:
        d.start()
        api = d.client()
        sb = make_sandbox(api, name="fwd")
        chosen = free_port()
        r = api.post("/sandboxes/fwd/forward", json={"guest_port": 3000, "host_port": chosen})
        assert r.status_code == 200, r.text
        assert r.json() == {"guest_port": 3000, "host_port": chosen, "host_addr": f"127.0.0.1:{chosen}"}
        with pytest.raises(httpx.HTTPError):  # nothing listens in the sandbox yet: the connection just ends
            httpx.get(f"http://127.0.0.1:{chosen}/ready", timeout=5)
        start_web_app(api, sb, 3000)
        assert httpx.get(f"http://127.0.0.1:{chosen}/ready", timeout=10).status_code == 200
        auto = api.post("/sandboxes/fwd/forward", json={"guest_port": 3000}).json()
        assert auto["host_port"] not in (0, chosen)
        assert sorted(f["host_port"] for f in api.get("/sandboxes/fwd/forward").json()) == sorted(
            [chosen, auto["host_port"]]
        )
        for body, status, message in [
            ({"guest_port": 0}, 400, "guest_port"),
            ({"guest_port": "3000"}, 400, "guest_port"),
            ({"guest_port": 3000, "host_port": 80}, 400, "host_port"),
            ({"guest_port": 3000, "host_port": chosen}, 409, "not free"),
        ]:
            r = api.post("/sandboxes/fwd/forward", json=body)
            assert r.status_code == status and message in r.json()["error"], (body, r.text)
        assert api.post("/sandboxes/nope/forward", json={"guest_port": 1}).status_code == 404

        assert api.post("/sandboxes/fwd/stop").json()["status"] == "stopped"
        assert httpx.get(f"http://127.0.0.1:{chosen}/ready", timeout=30).status_code == 200  # woke it
        assert api.get("/sandboxes/fwd").json()["status"] == "running"

        d.kill9()
        d.start()
        api = d.client()
        assert httpx.get(f"http://127.0.0.1:{auto['host_port']}/ready", timeout=30).status_code == 200
        assert len(api.get("/sandboxes/fwd/forward").json()) == 2
        assert api.delete("/sandboxes/fwd/forward").json() == {"closed": 2}
        assert api.get("/sandboxes/fwd/forward").json() == []
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{chosen}/ready", timeout=5)
        last = api.post("/sandboxes/fwd/forward", json={"guest_port": 3000}).json()["host_port"]
        assert api.delete("/sandboxes/fwd").status_code == 200  # destroy closes its forwards
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{last}/ready", timeout=5)
        assert d.clean()
    finally:
        d.scrub()


def read_shell(ws, needle: bytes, timeout: float = 15.0) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while needle not in out:
        msg = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        out += msg if isinstance(msg, bytes) else msg.encode()
    return out


def test_a_web_shell_link_opens_a_terminal_without_a_key_until_revoked(daemon, api, sandbox):
    r = api.post(f"/sandboxes/{sandbox['name']}/shell-token")
    assert r.status_code == 200, r.text
    token, url = r.json()["token"], r.json()["url"]
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    assert url == f"{daemon.url}/_shell/{sandbox['id']}#token={token}"
    page = httpx.get(f"{daemon.url}/_shell/{sandbox['id']}")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert page.headers["cache-control"] == "no-store" and page.headers["x-frame-options"] == "DENY"
    nonce = re.search(r"script-src 'self' 'nonce-([^']+)'", page.headers["content-security-policy"]).group(1)
    assert f'nonce="{nonce}"' in page.text and token not in page.text
    other = httpx.get(f"{daemon.url}/_shell/0000000000000000")
    assert other.status_code == 200 and other.text.split("nonce=")[0] == page.text.split("nonce=")[0]

    ws_base = daemon.url.replace("http", "ws") + "/_shell"

    def attempt(sandbox_id: str, first: str) -> dict:
        with ws_connect(f"{ws_base}/{sandbox_id}/ws") as ws:
            ws.send(first)
            return json.loads(ws.recv(timeout=15))

    unauthorized = {"type": "error", "error": "unauthorized"}
    assert attempt(sandbox["id"], json.dumps({"type": "auth", "token": "0" * 64})) == unauthorized
    assert attempt("0000000000000000", json.dumps({"type": "auth", "token": token})) == unauthorized  # no leak
    assert attempt(sandbox["id"], "not json") == unauthorized
    assert attempt(sandbox["id"], json.dumps({"token": token})) == unauthorized  # no "type": "auth"
    time.sleep(1)  # the attempts above count against this address's 10 per second

    with contextlib.ExitStack() as shells:
        opened = []
        for _ in range(5):
            ws = shells.enter_context(ws_connect(f"{ws_base}/{sandbox['id']}/ws"))
            ws.send(json.dumps({"type": "auth", "token": token}))
            assert json.loads(ws.recv(timeout=15)) == {"type": "connected", "sandbox": "shared", "status": "running"}
            opened.append(ws)
        assert attempt(sandbox["id"], json.dumps({"type": "auth", "token": token})) == {
            "type": "error",
            "error": "too many sessions",
        }
        opened[0].send(b"echo web-$((6*7))\n")
        read_shell(opened[0], b"web-42")
        assert api.delete(f"/sandboxes/{sandbox['id']}/shell-token").status_code == 204
        for ws in opened:  # revoking ends every web shell opened with the link
            with pytest.raises(ConnectionClosed):
                for _ in range(1000):
                    ws.recv(timeout=15)
    assert attempt(sandbox["id"], json.dumps({"type": "auth", "token": token})) == unauthorized
    fresh = api.post(f"/sandboxes/{sandbox['id']}/shell-token").json()["token"]
    renewed = api.post(f"/sandboxes/{sandbox['id']}/shell-token").json()["token"]
    assert attempt(sandbox["id"], json.dumps({"type": "auth", "token": fresh})) == unauthorized  # replaced
    assert attempt(sandbox["id"], json.dumps({"type": "auth", "token": renewed}))["type"] == "connected"
    assert api.post("/sandboxes/nope/shell-token").status_code == 404
    assert httpx.post(f"{daemon.url}/sandboxes/{sandbox['id']}/shell-token").status_code == 401

    # more than 10 attempts a second from one address: 429 before any upgrade
    statuses = []
    for _ in range(30):
        with socket.create_connection(("127.0.0.1", daemon.port), source_address=("127.0.0.4", 0)) as s:
            s.sendall(
                f"GET /_shell/{sandbox['id']}/ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            statuses.append(s.recv(64).split(b" ")[1])
    assert statuses[:10] == [b"101"] * 10 and statuses.count(b"429") >= 10, statuses  # (refilled at 10/s)
