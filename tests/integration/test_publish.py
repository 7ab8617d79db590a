"""Publish rules and the public proxy at http://<alias>.localhost:<port>/, with real apps in real sandboxes."""

import concurrent.futures
import re

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from tests.conftest import listed, make_sandbox, start_web_app, wait_for
from tests.daemon import running_daemon

# Short thermal timers: published sandboxes go warm by themselves, and public requests must wake them.
THERMAL = {"warm_after": 1.0, "cold_after": 3600, "tick": 0.3}


@pytest.fixture(scope="module")
def daemon(default_image):
    with running_daemon({"thermal": THERMAL}) as d:
        yield d


@pytest.fixture(scope="module")
def sb(api):
    s = make_sandbox(api, name="My_Site")
    start_web_app(api, s, 3000)
    start_web_app(api, s, 3001)  # listening, never published
    yield s
    api.delete(f"/sandboxes/{s['id']}")


def public(daemon, alias, path="/", method="GET", **kw):
    """A request as a browser sends it to http://<alias>.localhost:<port><path>."""
    headers = {"Host": f"{alias}.localhost:{daemon.port}", **kw.pop("headers", {})}
    return httpx.request(method, daemon.url + path, headers=headers, timeout=60, **kw)


def publish(api, sb, **body):
    return api.post(f"/sandboxes/{sb['id']}/publish", json=body)


def test_publish_auto_alias_and_the_public_url_serves_the_app(api, sb, daemon):
    r = publish(api, sb, port=3000)
    assert r.status_code == 201, r.text
    rule = r.json()
    assert re.fullmatch(r"my-site-[0-9a-f]{6}", rule["alias"]), rule
    assert rule["id"].startswith("pub_") and rule["sandbox_id"] == sb["id"] and rule["port"] == 3000
    assert rule["url"] == f"http://{rule['alias']}.localhost:{daemon.port}"
    seen = public(daemon, rule["alias"], "/hello/there?x=1&y=a%20b").json()
    assert seen["port"] == 3000 and seen["path"] == "/hello/there" and seen["query"] == "x=1&y=a%20b"
    assert seen["headers"]["host"] == "localhost:3000"
    assert seen["headers"]["x-forwarded-host"] == f"{rule['alias']}.localhost:{daemon.port}"
    listed_rules = api.get(f"/sandboxes/{sb['id']}/publish").json()
    assert [(x["alias"], x["port"], x["url"]) for x in listed_rules] == [(rule["alias"], 3000, rule["url"])]
    # Publishing the same port again answers with the existing rule, whatever alias is asked for.
    again = publish(api, sb, port=3000, alias="something-else")
    assert again.status_code == 200 and again.headers["x-bhatti-existing"] == "true"
    assert again.json()["alias"] == rule["alias"] and again.json()["id"] == rule["id"]


def test_an_explicit_alias_a_post_body_and_the_apps_own_auth_header(api, sb, daemon):
    r = publish(api, sb, port=3000)  # existing rule for 3000
    alias = r.json()["alias"]
    seen = public(
        daemon, alias, "/form", method="POST", content=b"a=1&b=2", headers={"Authorization": "Basic dXNlcjpwdw=="}
    ).json()
    assert seen["method"] == "POST" and seen["body_bytes"] == 7
    assert seen["headers"]["authorization"] == "Basic dXNlcjpwdw=="  # the app's own auth passes


def test_publish_validation_errors(api, sb):
    for port in (0, 65536, -5):
        r = publish(api, sb, port=port)
        assert r.status_code == 400 and r.json() == {"error": "port must be 1-65535"}, port
    assert publish(api, sb).status_code == 400  # no port
    for alias in ("Upper", "-lead", "has.dot", "under_score", "a" * 64, ""):
        r = publish(api, sb, port=3000 + 50, alias=alias)
        assert r.status_code == 400, alias
        assert r.json() == {"error": "alias must be lowercase alphanumeric with hyphens, 1-63 chars"}
    for alias in ("www", "mail", "admin", "status", "ns1", "ns2", "api", "app"):
        r = publish(api, sb, port=3050, alias=alias)
        assert r.status_code == 400 and r.json() == {"error": f'alias "{alias}" is reserved'}
    assert publish(api, sb, port=3050, alias="a" * 63).status_code == 201
    assert api.delete(f"/sandboxes/{sb['id']}/publish/3050").status_code == 204
    r = api.post(f"/sandboxes/{sb['id']}/publish", content=b"{not json")
    assert r.status_code == 400
    assert all(x["port"] != 3050 for x in api.get(f"/sandboxes/{sb['id']}/publish").json())


def test_aliases_are_global_and_rules_are_private(api, sb, daemon):
    assert publish(api, sb, port=3001, alias="taken-alias").status_code == 201
    other_token = daemon.create_user("publish-other")
    with daemon.client(other_token) as other:
        theirs = make_sandbox(other, name="theirs")
        try:
            r = other.post(f"/sandboxes/{theirs['id']}/publish", json={"port": 3000, "alias": "taken-alias"})
            assert r.status_code == 409 and r.json() == {"error": 'alias "taken-alias" is already taken'}
            # user B cannot see, publish or unpublish user A's sandbox
            assert other.get(f"/sandboxes/{sb['id']}/publish").status_code == 404
            assert other.post(f"/sandboxes/{sb['id']}/publish", json={"port": 3002}).status_code == 404
            assert other.delete(f"/sandboxes/{sb['id']}/publish/3001").status_code == 404
        finally:
            other.delete(f"/sandboxes/{theirs['id']}")
    assert api.delete(f"/sandboxes/{sb['id']}/publish/3001").status_code == 204


def test_unpublish_errors_and_effect(api, sb, daemon):
    alias = publish(api, sb, port=3001, alias="going-away").json()["alias"]
    assert public(daemon, alias).status_code == 200
    for bad in ("abc", "0", "70000"):
        r = api.delete(f"/sandboxes/{sb['id']}/publish/{bad}")
        assert r.status_code == 400 and r.json() == {"error": "invalid port in path"}
    r = api.delete(f"/sandboxes/{sb['id']}/publish/4321")
    assert r.status_code == 404 and r.json() == {"error": "no publish rule for port 4321 on this sandbox"}
    r = api.delete(f"/sandboxes/{sb['id']}/publish/3001")
    assert r.status_code == 204 and r.content == b""
    r = public(daemon, alias)
    assert r.status_code == 404 and r.json() == {"error": "not found"}


def test_published_hosts_never_reach_the_api_or_other_ports(api, sb, daemon):
    alias = publish(api, sb, port=3000).json()["alias"]
    auth = {"Authorization": f"Bearer {daemon.admin_token}"}
    for path in ("/sandboxes", f"/sandboxes/{sb['id']}/proxy/3001/", "/health", "/ports", "/../sandboxes"):
        r = public(daemon, alias, path, headers=auth)
        seen = r.json()
        assert r.status_code == 200 and seen["port"] == 3000, (path, r.text)  # always the app on 3000
        assert "x-kiln-version" not in r.headers
    r = public(daemon, alias, "/sandboxes", method="POST", json={"name": "sneaky"}, headers=auth)
    assert r.json()["port"] == 3000
    assert all(s["name"] != "sneaky" for s in api.get("/sandboxes").json())
    for host in (
        f"unknown-alias.localhost:{daemon.port}",
        f"a.{alias}.localhost:{daemon.port}",
        f"{alias.upper()}x.localhost",
    ):
        r = httpx.get(daemon.url + "/", headers={"Host": host})
        assert r.status_code == 404 and r.json() == {"error": "not found"}, host
    # the API itself still answers on its own host names
    assert httpx.get(daemon.url + "/health", headers={"Host": "localhost"}).json()["status"] == "ok"


def test_websocket_echo_through_the_public_url(api, sb, daemon):
    alias = publish(api, sb, port=3000).json()["alias"]
    url = f"ws://127.0.0.1:{daemon.port}/ws"
    with ws_connect(url, additional_headers={"Host": f"{alias}.localhost:{daemon.port}"}) as ws:
        ws.send("ping through publish")
        assert ws.recv(timeout=10) == "ping through publish"


def test_requests_wake_warm_and_cold_sandboxes(api, daemon):
    s = make_sandbox(api, name="napper")
    try:
        start_web_app(api, s, 3000)
        alias = publish(api, s, port=3000).json()["alias"]
        wait_for(lambda: listed(api, s).get("thermal") == "warm", what="warm")
        r = public(daemon, alias, "/from-warm")
        assert r.status_code == 200 and r.json()["path"] == "/from-warm"
        assert api.post(f"/sandboxes/{s['id']}/stop").json()["status"] == "stopped"
        r = public(daemon, alias, "/from-cold")
        assert r.status_code == 200 and r.json()["path"] == "/from-cold"
        assert api.get(f"/sandboxes/{s['id']}").json()["status"] == "running"
    finally:
        api.delete(f"/sandboxes/{s['id']}")


def test_app_down_is_502_and_destroy_removes_the_rules(api, daemon):
    s = make_sandbox(api, name="short-lived")
    alias = publish(api, s, port=3999, alias="short-lived-app").json()["alias"]
    r = public(daemon, alias)
    assert r.status_code == 502 and r.json() == {"error": "bad gateway"}
    assert api.delete(f"/sandboxes/{s['id']}").status_code == 200
    assert public(daemon, alias).status_code == 404
    s2 = make_sandbox(api, name="reuser")
    try:  # the alias is free again
        assert publish(api, s2, port=3000, alias="short-lived-app").status_code == 201
    finally:
        api.delete(f"/sandboxes/{s2['id']}")


def test_rate_limits_and_wake_saturation(default_image):
    config = {"publish": {"rate_per_ip": {"burst": 5, "per_minute": 1}, "max_concurrent_wakes": 1}}
    with running_daemon(config) as d, d.client() as api:
        sandboxes = [make_sandbox(api, name=f"busy-{i}") for i in range(3)]
        aliases = []
        for s in sandboxes:
            start_web_app(api, s, 3000)
            aliases.append(publish(api, s, port=3000).json()["alias"])
        for s in sandboxes:
            assert api.post(f"/sandboxes/{s['id']}/stop").json()["status"] == "stopped"
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda a: public(d, a), aliases))
        codes = sorted(r.status_code for r in results)
        assert 200 in codes and 503 in codes, codes  # one wake at a time; the others are told to retry
        busy = next(r for r in results if r.status_code == 503)
        assert busy.headers["retry-after"] == "2" and busy.json() == {"error": "server busy, retry shortly"}
        # 3 of the 5-request burst are spent; the next 2 pass, then 429 with Retry-After: 1
        statuses = [public(d, aliases[0]).status_code for _ in range(3)]
        assert statuses[:2] == [200, 200] and statuses[2] == 429
        limited = public(d, aliases[0])
        assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
        assert limited.json() == {"error": "rate limit exceeded"}
        # an unknown alias is 404 before any rate limit
        assert public(d, "no-such-alias").status_code == 404
