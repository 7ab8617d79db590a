"""Auth, ownership and bad input: clear JSON errors with the right status, and nothing created."""

import httpx
import pytest

from tests.conftest import make_sandbox


@pytest.fixture(scope="module")
def owned(api):
    sb = make_sandbox(api, name="owned-by-admin")
    yield sb
    api.delete(f"/sandboxes/{sb['id']}")


def test_no_token_and_bad_token_are_401(daemon):
    r = httpx.get(daemon.url + "/sandboxes")
    assert r.status_code == 401 and r.json() == {"error": "authorization required"}
    assert r.headers["content-type"] == "application/json"
    r = httpx.get(daemon.url + "/sandboxes", headers={"Authorization": "Bearer kiln_wrong"})
    assert r.status_code == 401 and r.json() == {"error": "invalid api key"}
    r = httpx.get(daemon.url + "/sandboxes", headers={"Authorization": "Basic abc"})
    assert r.status_code == 401
    r = httpx.get(daemon.url + f"/sandboxes?token={daemon.admin_token}")
    assert r.status_code == 401


def test_other_users_sandbox_is_404_everywhere(daemon, owned):
    token_b = daemon.create_user("bob")
    with daemon.client(token_b) as b:
        for ref in (owned["id"], owned["name"]):
            assert b.get(f"/sandboxes/{ref}").status_code == 404
            r = b.post(f"/sandboxes/{ref}/exec", json={"cmd": ["true"]})
            assert r.status_code == 404 and r.json() == {"error": f'sandbox "{ref}" not found'}
            assert b.delete(f"/sandboxes/{ref}").status_code == 404
            assert b.post(f"/sandboxes/{ref}/start").status_code == 404
        assert b.get("/sandboxes").json() == []
        # bob may use the same name for his own sandbox
        mine = b.post("/sandboxes", json={"name": owned["name"]})
        assert mine.status_code == 201 and mine.json()["id"] != owned["id"]
        b.delete(f"/sandboxes/{mine.json()['id']}")


@pytest.mark.parametrize(
    "body, message",
    [
        (b"{not json", "invalid json"),
        (b'{"cpus": "lots"}', "cpus"),
        (b'{"memory_mb": "big"}', "memory_mb"),
        (b'{"memory_mb": 1.5}', "memory_mb"),
        (b'{"env": ["A=1"]}', "env"),
        (b'{"env": {"A": 1}}', "env"),
        (b'{"name": 5}', "name"),
        (b'{"keep_hot": "yes"}', "keep_hot"),
        (b'{"name": "-bad"}', "invalid sandbox name"),
        (b'{"name": "has space"}', "invalid sandbox name"),
        (b'{"name": "' + b"a" * 64 + b'"}', "invalid sandbox name"),
        (b'{"cpus": 64}', "max 4 CPUs per sandbox"),
        (b'{"cpus": 0}', "cpus must be greater than 0"),
        (b'{"cpus": 0.005}', "cpus must be at least 0.01"),  # a CFS quota of 500 us: the cgroup refuses it
        (b'{"cpus": 1e-6}', "cpus must be at least 0.01"),  # a quota of 0: no CPU limit at all
        (b'{"cpus": NaN}', "cpus must be greater than 0"),
        (b'{"memory_mb": 999999}', "max 4096 MB memory per sandbox"),
        (b'{"memory_mb": 1}', "memory_mb must be at least"),
        (b'{"env": {"1BAD": "x"}}', "invalid env var name"),
        (b"[]", "invalid request"),
    ],
)
def test_bad_create_is_400_and_creates_nothing(daemon, api, body, message):
    before = api.get("/sandboxes").json()
    r = api.post("/sandboxes", content=body)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]
    assert api.get("/sandboxes").json() == before
    assert daemon.clean(keep={s["id"] for s in before})


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({}, 400, "cmd required"),
        ({"cmd": []}, 400, "cmd required"),
        ({"cmd": "echo hi"}, 400, "cmd"),
        ({"cmd": ["true"], "user": "nobody-here"}, 400, "unknown user"),
        ({"cmd": ["true"], "cwd": "relative"}, 400, "cwd must be an absolute path"),
        ({"cmd": ["true"], "cwd": "/no/such/dir"}, 400, "no such directory"),
        ({"cmd": ["true"], "env": {"A=B": "x"}}, 400, "invalid env var name"),
    ],
)
def test_bad_exec_is_400(api, owned, body, status, message):
    r = api.post(f"/sandboxes/{owned['id']}/exec", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_routing_errors(daemon, api):
    assert api.get("/sandboxes/").json() == {"error": "missing sandbox id"}
    r = api.get("/nothing-here")
    assert r.status_code == 404 and r.json() == {"error": "not found"}
    r = api.put("/sandboxes")
    assert r.status_code == 405 and r.json() == {"error": "method not allowed"}
    r = api.get("/sandboxes/does-not-exist")
    assert r.status_code == 404 and r.json() == {"error": 'sandbox "does-not-exist" not found'}
    r = api.post("/sandboxes", content=b"x" * (1024 * 1024 + 10))
    assert r.status_code == 413 and "too large" in r.json()["error"]
    assert "X-Kiln-Version" in httpx.get(daemon.url + "/health").headers


@pytest.mark.parametrize(
    "path",
    [
        "/health/../sandboxes",
        "/health/%2e%2e/sandboxes",
        "//sandboxes",
        "/./sandboxes",
        "/static/../sandboxes",
        "/health/..%2fsandboxes",
        "/static/%2e%2e/kiln/app.py",
        "/nothing-here",
    ],
)
def test_path_tricks_never_skip_auth(daemon, path):
    """Raw request lines (clients would clean the path): 401 without a key, 404 with one, never data."""
    import socket

    def raw(token=None):
        with socket.create_connection(("127.0.0.1", daemon.port)) as s:
            auth = f"Authorization: Bearer {token}\r\n" if token else ""
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    status, body = raw()
    assert status == 401 and body == b'{"error":"authorization required"}'
    status, body = raw(daemon.admin_token)
    assert status == 404 and b"[" not in body
