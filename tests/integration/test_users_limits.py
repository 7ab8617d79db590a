"""Users (CLI), quotas, per-user rate limits, and every route tried by another user and by nobody."""

import subprocess
import sys

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from kiln.client import Kiln, RateLimited
from tests.conftest import make_sandbox, run, start_web_app
from tests.daemon import running_daemon


def kiln(daemon, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kiln.cli.main", *args, "--config", str(daemon.config_path)],
        capture_output=True,
        text=True,
    )


def test_user_cli_quotas_rotate_and_delete(daemon):
    token = daemon.create_user("limited", "--max-sandboxes", "1", "--max-memory", "256", "--max-cpus", "1")
    with daemon.client(token) as c:
        r = c.post("/sandboxes", json={"name": "big", "memory_mb": 512})
        assert r.status_code == 400 and r.json() == {"error": "max 256 MB memory per sandbox"}
        assert c.post("/sandboxes", json={"name": "two-cpus", "cpus": 2}).status_code == 400
        first = make_sandbox(c, name="only", memory_mb=256)
        r = c.post("/sandboxes", json={"name": "second", "memory_mb": 256})
        assert r.status_code == 429 and r.json() == {"error": "sandbox limit reached (1/1)"}
        assert [s["name"] for s in c.get("/sandboxes").json()] == ["only"]
    listing = kiln(daemon, "user", "list").stdout
    assert "limited" in listing and "max_sandboxes=1" in listing and "max_memory_mb=256" in listing
    refused = kiln(daemon, "user", "delete", "limited")
    assert refused.returncode == 1 and "1 sandboxes" in refused.stderr
    rotated = kiln(daemon, "user", "rotate-key", "limited")
    assert rotated.returncode == 0
    new_token = rotated.stdout.strip().splitlines()[-1]
    assert new_token != token
    with daemon.client(token) as old:
        assert old.get("/sandboxes").status_code == 401
    with daemon.client(new_token) as c:
        assert c.delete(f"/sandboxes/{first['id']}").status_code == 200
    assert kiln(daemon, "user", "delete", "limited").returncode == 0
    with daemon.client(new_token) as c:
        assert c.get("/sandboxes").status_code == 401
    assert kiln(daemon, "user", "delete", "limited").returncode == 1


def test_rate_class_does_not_depend_on_the_sandbox_name(default_image):
    tight = {"rate_exec": {"burst": 2, "per_minute": 1}, "rate_read": {"burst": 50, "per_minute": 1}}
    with running_daemon({"limits": tight}) as d, d.client() as api:
        make_sandbox(api, name="ws-demo")
        # reads of a sandbox whose name contains "ws" are reads (they were classed as exec: 429 from the 3rd)
        assert [api.get("/sandboxes/ws-demo").status_code for _ in range(6)] == [200] * 6
        assert api.delete("/sandboxes/ws-demo").status_code == 200


def test_rate_limits_per_user_and_class(default_image):
    tight = {
        "rate_create": {"burst": 1, "per_minute": 1},
        "rate_exec": {"burst": 2, "per_minute": 1},
        "rate_read": {"burst": 5, "per_minute": 1},
    }
    with running_daemon({"limits": tight}) as d, d.client() as api:
        sb = make_sandbox(api, name="one")
        r = api.post("/sandboxes", json={"name": "two"})
        assert r.status_code == 429 and r.json() == {"error": "rate limit exceeded"}
        assert "retry-after" not in r.headers
        codes = [api.post(f"/sandboxes/{sb['id']}/exec", json={"cmd": ["true"]}).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        assert api.delete(f"/sandboxes/{sb['id']}").status_code == 200  # a "read" (1 of 5)
        codes = [api.get("/sandboxes").status_code for _ in range(5)]
        assert codes == [200] * 4 + [429]
        with Kiln(d.url, d.admin_token) as sdk, pytest.raises(RateLimited) as e:  # the SDK's exception type
            sdk.sandboxes.list()
        assert e.value.message == "rate limit exceeded"
        assert d.clean(keep=set())  # the refused create made nothing
        other = d.create_user("other")
        with d.client(other) as c:  # buckets are per user
            assert c.get("/sandboxes").status_code == 200


ROUTES = [  # (method, path template, body): every route that names a sandbox or another object
    ("GET", "/sandboxes/{sb}", None),
    ("PATCH", "/sandboxes/{sb}", {"name": "stolen"}),
    ("DELETE", "/sandboxes/{sb}", None),
    ("POST", "/sandboxes/{sb}/start", None),
    ("POST", "/sandboxes/{sb}/stop", None),
    ("POST", "/sandboxes/{sb}/exec", {"cmd": ["id"]}),
    ("GET", "/sandboxes/{sb}/sessions", None),
    ("GET", "/sandboxes/{sb}/files?path=/etc/hostname", None),
    ("HEAD", "/sandboxes/{sb}/files?path=/etc/hostname", None),
    ("PUT", "/sandboxes/{sb}/files?path=/tmp/x", b"x"),
    ("GET", "/sandboxes/{sb}/ports", None),
    ("GET", "/sandboxes/{sb}/proxy/8080/", None),
    ("POST", "/sandboxes/{sb}/proxy/8080/echo", b"x"),
    ("GET", "/sandboxes/{sb}/publish", None),
    ("POST", "/sandboxes/{sb}/publish", {"port": 8081}),
    ("DELETE", "/sandboxes/{sb}/publish/8080", None),
    ("GET", "/templates/{tpl}", None),
    ("DELETE", "/templates/{tpl}", None),
    ("GET", "/volumes/{vol}", None),
    ("DELETE", "/volumes/{vol}", None),
    ("DELETE", "/secrets/{secret}", None),
]


@pytest.fixture(scope="module")
def owned(api):
    """User A's objects: a sandbox (with a published app), a template, a volume, a secret."""
    api.post("/secrets", json={"name": "A_SECRET", "value": "a-value"})
    api.post("/volumes", json={"name": "a-vol", "size_mb": 8})
    tpl = api.post("/templates", json={"name": "a-tpl"}).json()
    sb = make_sandbox(api, name="a-box", volumes=[{"name": "a-vol", "mount": "/v"}])
    start_web_app(api, sb, 8080)
    api.post(f"/sandboxes/{sb['id']}/publish", json={"port": 8080, "alias": "a-box-app"})
    yield {"sb": sb["id"], "sb_name": sb["name"], "tpl": tpl["id"], "vol": "a-vol", "secret": "A_SECRET"}
    api.delete(f"/sandboxes/{sb['id']}")
    api.delete("/volumes/a-vol")
    api.delete(f"/templates/{tpl['id']}")
    api.delete("/secrets/A_SECRET")


def send(client, method, path, body):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
    return client.request(method, path, **kw)


def test_another_user_gets_404_everywhere_and_changes_nothing(daemon, api, owned):
    token_b = daemon.create_user("user-b")
    with daemon.client(token_b) as b:
        for method, template, body in ROUTES:
            for ref in (owned["sb"], owned["sb_name"]) if "{sb}" in template else (None,):
                path = template.format(sb=ref, tpl=owned["tpl"], vol=owned["vol"], secret=owned["secret"])
                r = send(b, method, path, body)
                assert r.status_code == 404, (method, path, r.status_code, r.text)
        assert b.get("/sandboxes").json() == [] and b.get("/templates").json() == []
        assert b.get("/volumes").json() == [] and b.get("/secrets").json() == [] and b.get("/ports").json() == []
        # A's template, volume and secret cannot be used by B either
        assert b.post("/sandboxes", json={"template_id": owned["tpl"]}).status_code == 404
        assert b.post("/sandboxes", json={"volumes": [{"name": "a-vol", "mount": "/v"}]}).status_code == 404
        assert b.post("/sandboxes", json={"secrets": ["A_SECRET"]}).status_code == 400
        assert b.get("/sandboxes").json() == []
        for ws_path in (f"/sandboxes/{owned['sb']}/ws", f"/sandboxes/{owned['sb']}/proxy/8080/ws"):
            with pytest.raises(InvalidStatus) as e:
                ws_connect(
                    f"ws://127.0.0.1:{daemon.port}{ws_path}", additional_headers={"Authorization": f"Bearer {token_b}"}
                )
            assert e.value.response.status_code == 404
    # A's things are all still there and unchanged
    sb = api.get(f"/sandboxes/{owned['sb']}").json()
    assert sb["name"] == "a-box" and sb["status"] == "running"
    assert [p["alias"] for p in api.get(f"/sandboxes/{owned['sb']}/publish").json()] == ["a-box-app"]
    assert api.get(f"/templates/{owned['tpl']}").status_code == 200
    assert api.get("/volumes/a-vol").json()["attachments"][0]["sandbox_id"] == owned["sb"]
    assert [s["name"] for s in api.get("/secrets").json()] == ["A_SECRET"]
    assert run(api, sb, ["test", "-e", "/tmp/x"])["exit_code"] == 1


def test_every_route_needs_a_token(daemon, owned):
    paths = [
        ("GET", "/sandboxes", None),
        ("POST", "/sandboxes", {}),
        ("GET", "/ports", None),
        ("GET", "/templates", None),
        ("POST", "/templates", {"name": "x"}),
        ("GET", "/volumes", None),
        ("POST", "/volumes", {"name": "x", "size_mb": 1}),
        ("GET", "/secrets", None),
        ("POST", "/secrets", {"name": "X", "value": "y"}),
        *ROUTES,
    ]
    with (
        httpx.Client(base_url=daemon.url) as anon,
        httpx.Client(base_url=daemon.url, headers={"Authorization": "Bearer kiln_wrong"}) as wrong,
    ):
        for method, template, body in paths:
            path = template.format(sb=owned["sb"], tpl=owned["tpl"], vol=owned["vol"], secret=owned["secret"])
            r = send(anon, method, path, body)
            assert r.status_code == 401, (method, path, r.status_code)
            if method != "HEAD":
                assert r.json() == {"error": "authorization required"}
            assert send(wrong, method, path, body).status_code == 401
