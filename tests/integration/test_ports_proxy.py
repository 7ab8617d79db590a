"""Ports, host_port relays and the authenticated reverse proxy, against real servers in real sandboxes."""

import json
import socket
import threading

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from tests.conftest import make_sandbox, run, start_web_app, wait_for
from tests.daemon import running_daemon

SCAN = 0.5


@pytest.fixture(scope="module")
def daemon(default_image):
    with running_daemon({"ports": {"scan_interval": SCAN}}) as d:
        yield d


@pytest.fixture(scope="module")
def sb(api):
    s = make_sandbox(api, name="web", keep_hot=True)
    start_web_app(api, s, 8080)
    start_web_app(api, s, 8081, bind="127.0.0.1")  # loopback only: reached through the agent
    run(
        api,
        s,
        [
            "sh",
            "-c",
            "mkdir -p /tmp/www && echo hello > /tmp/www/hello.txt && cd /tmp/www && "
            "nohup python3 -m http.server 3000 >/dev/null 2>&1 &",
        ],
    )
    wait_for(lambda: 3000 in ports_of(api, s), what="http.server on 3000")
    yield s
    api.delete(f"/sandboxes/{s['id']}")


def ports_of(api, sb) -> dict[int, dict]:
    r = api.get(f"/sandboxes/{sb['id']}/ports")
    assert r.status_code == 200, r.text
    return {p["container_port"]: p for p in r.json()}


def proxy(api, sb, port, path="/", **kw):
    return api.get(f"/sandboxes/{sb['id']}/proxy/{port}{path}", **kw)


def test_http_server_is_listed_and_reachable_by_proxy_and_host_port(api, sb):
    ports = ports_of(api, sb)
    assert {8080, 8081, 3000} <= set(ports) and 1024 not in ports  # the agent's own port is left out
    entry = ports[3000]
    assert entry["proxy_url"] == f"/sandboxes/{sb['id']}/proxy/3000/"
    assert isinstance(entry["host_port"], int) and entry["host_port"] > 0
    listing = proxy(api, sb, 3000, "/")
    assert listing.status_code == 200 and "hello.txt" in listing.text
    assert proxy(api, sb, 3000, "").text == listing.text  # `/proxy/3000` is `/` too
    assert proxy(api, sb, 3000, "/hello.txt").text == "hello\n"
    direct = httpx.get(f"http://127.0.0.1:{entry['host_port']}/")
    assert direct.status_code == 200 and "hello.txt" in direct.text
    everywhere = {(p["sandbox_id"], p["container_port"]): p for p in api.get("/ports").json()}
    assert everywhere[(sb["id"], 3000)]["host_port"] == entry["host_port"]
    alias = api.post(f"/sandboxes/{sb['id']}/publish", json={"port": 3000}).json()["alias"]
    published = httpx.get(daemon_url(api) + "/hello.txt", headers={"Host": f"{alias}.localhost"})
    assert published.status_code == 200 and published.text == "hello\n"
    assert "hello.txt" in httpx.get(daemon_url(api) + "/", headers={"Host": f"{alias}.localhost"}).text


def daemon_url(api) -> str:
    return str(api.base_url).rstrip("/")


def test_proxy_by_name_keeps_path_and_query_and_rewrites_headers(api, sb, daemon):
    r = api.get(
        f"/sandboxes/{sb['name']}/proxy/8080/some/deep/path",
        params={"a": "1", "b": "two words"},
        headers={"X-Custom": "kept", "X-Forwarded-For": "203.0.113.9"},
    )
    assert r.status_code == 200, r.text
    seen = r.json()
    assert seen["path"] == "/some/deep/path" and seen["query"] == "a=1&b=two+words"
    h = seen["headers"]
    assert h["host"] == "localhost:8080" and h["x-custom"] == "kept"
    assert h["x-forwarded-for"] == "203.0.113.9, 127.0.0.1" and h["x-forwarded-proto"] == "http"
    assert h["x-forwarded-host"] == f"127.0.0.1:{daemon.port}"
    assert "connection" not in h or h["connection"].lower() != "upgrade"


def test_the_app_never_sees_the_callers_credentials(api, sb, daemon):
    r = api.get(f"/sandboxes/{sb['id']}/proxy/8080/x", params={"token": daemon.admin_token, "keep": "1"})
    seen = r.json()
    assert "authorization" not in seen["headers"]
    assert seen["query"] == "keep=1"
    assert daemon.admin_token not in r.text


def test_loopback_only_service_is_reached_through_the_agent(api, sb):
    assert ports_of(api, sb)[8081]["host_port"] > 0
    r = proxy(api, sb, 8081, "/x?q=1")
    assert r.status_code == 200 and r.json()["port"] == 8081 and r.json()["query"] == "q=1"
    host_port = ports_of(api, sb)[8081]["host_port"]
    assert httpx.get(f"http://127.0.0.1:{host_port}/y").json()["path"] == "/y"


def test_request_and_response_bodies_stream_both_ways(api, sb):
    body = bytes(range(256)) * 8192  # 2 MiB: larger than the API's JSON cap, fine for a proxy
    r = api.post(
        f"/sandboxes/{sb['id']}/proxy/8080/echo", content=body, headers={"Content-Type": "application/octet-stream"}
    )
    assert r.status_code == 200 and r.content == body

    def chunks():
        for i in range(4):
            yield bytes([i]) * 100_000

    r = api.put(f"/sandboxes/{sb['id']}/proxy/8080/echo", content=chunks())  # chunked upload
    assert r.status_code == 200 and r.content == b"".join(chunks())
    big = proxy(api, sb, 8080, "/big", params={"n": 10_000_000})
    assert big.status_code == 200 and len(big.content) == 10_000_000
    assert big.content[:32] == b"0123456789abcdef" * 2


def test_sse_first_event_arrives_before_the_stream_ends(api, sb):
    run(api, sb, ["rm", "-f", "/tmp/sse-go"])
    with api.stream("GET", f"/sandboxes/{sb['id']}/proxy/8080/sse", timeout=20) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
        lines = r.iter_lines()
        assert next(lines) == "data: first"
        # The app sends the second event only once this file exists: the first came through alone.
        run(api, sb, ["touch", "/tmp/sse-go"])
        rest = [line for line in lines if line]
    assert rest == ["data: second"]


def test_websocket_echo_through_the_proxy(api, sb, daemon):
    url = f"ws://127.0.0.1:{daemon.port}/sandboxes/{sb['id']}/proxy/8080/ws"
    with ws_connect(
        url, additional_headers={"Authorization": f"Bearer {daemon.admin_token}"}, subprotocols=["chat"]
    ) as ws:
        assert ws.subprotocol == "chat"
        ws.send("hello")
        assert ws.recv(timeout=10) == "hello"
        ws.send(b"\x00\x01binary")
        assert ws.recv(timeout=10) == b"\x00\x01binary"
        big = "x" * 200_000
        ws.send(big)
        assert ws.recv(timeout=10) == big


def test_websocket_proxy_needs_the_header_token(daemon, sb):
    from websockets.exceptions import InvalidStatus

    url = f"ws://127.0.0.1:{daemon.port}/sandboxes/{sb['id']}/proxy/8080/ws"
    with pytest.raises(InvalidStatus) as e:
        ws_connect(url + f"?token={daemon.admin_token}")
    assert e.value.response.status_code == 401


def test_proxy_errors(api, sb, daemon):
    for bad in ("abc", "0", "65536", "-1"):
        r = proxy(api, sb, bad, "/")
        assert r.status_code == 400 and r.json() == {"error": "invalid port"}, bad
    r = api.get("/sandboxes/nope/proxy/abc/")
    assert r.status_code == 400  # the port is checked before the sandbox is looked up
    r = api.get("/sandboxes/nope/proxy/8080/")
    assert r.status_code == 404 and r.json() == {"error": 'sandbox "nope" not found'}
    r = proxy(api, sb, 4999, "/")
    assert r.status_code == 502 and r.json()["error"].startswith("bad gateway")
    r = httpx.get(f"{daemon.url}/sandboxes/{sb['id']}/proxy/8080/")
    assert r.status_code == 401 and r.json() == {"error": "authorization required"}
    other = daemon.create_user("proxy-other")
    with daemon.client(other) as c:
        assert c.get(f"/sandboxes/{sb['id']}/proxy/8080/").status_code == 404
        assert c.get(f"/sandboxes/{sb['id']}/ports").status_code == 404
        assert all(p["sandbox_id"] != sb["id"] for p in c.get("/ports").json())


def test_host_port_is_released_when_the_port_closes(api, sb):
    start_web_app(api, sb, 3100)
    host_port = wait_for(lambda: ports_of(api, sb).get(3100, {}).get("host_port"), what="port 3100 listed")
    assert httpx.get(f"http://127.0.0.1:{host_port}/").json()["port"] == 3100
    run(api, sb, ["pkill", "-f", "web_app.py 3100"], user="root")
    wait_for(
        lambda: 3100 not in {p["container_port"] for p in api.get("/ports").json() if p["sandbox_id"] == sb["id"]},
        what="port 3100 dropped by the scan",
    )
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{host_port}/")


def test_ports_and_proxy_wake_a_stopped_sandbox_and_destroy_releases_host_ports(api):
    s = make_sandbox(api, name="sleepy")
    try:
        start_web_app(api, s, 8080)
        host_port = wait_for(lambda: ports_of(api, s).get(8080, {}).get("host_port"), what="port listed")
        r = api.post(f"/sandboxes/{s['id']}/stop")
        assert r.status_code == 200 and r.json()["status"] == "stopped"
        # /ports reports the last scan and wakes nothing
        listed = [p for p in api.get("/ports").json() if p["sandbox_id"] == s["id"]]
        assert [p["container_port"] for p in listed] == [8080]
        assert api.get(f"/sandboxes/{s['id']}").json()["status"] == "stopped"
        # a connection to the host port wakes it
        assert httpx.get(f"http://127.0.0.1:{host_port}/a", timeout=30).json()["path"] == "/a"
        assert api.get(f"/sandboxes/{s['id']}").json()["status"] == "running"
        assert api.post(f"/sandboxes/{s['id']}/stop").json()["status"] == "stopped"
        assert proxy(api, s, 8080, "/b").json()["path"] == "/b"  # so does the proxy
        assert api.get(f"/sandboxes/{s['id']}").json()["status"] == "running"
    finally:
        api.delete(f"/sandboxes/{s['id']}")
    assert all(p["sandbox_id"] != s["id"] for p in api.get("/ports").json())
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", host_port)) != 0


def test_open_websocket_keeps_the_sandbox_hot_and_stop_cuts_it(default_image):
    with running_daemon({"thermal": {"warm_after": 1.0, "cold_after": 3600, "tick": 0.3}}) as d, d.client() as api:
        s = make_sandbox(api, name="held")
        start_web_app(api, s, 8080)
        url = f"ws://127.0.0.1:{d.port}/sandboxes/{s['id']}/proxy/8080/ws"
        with ws_connect(url, additional_headers={"Authorization": f"Bearer {d.admin_token}"}) as ws:
            seen = set()
            stop = threading.Event()

            def watch():
                while not stop.is_set():
                    seen.add({x["id"]: x for x in api_get(d, "/sandboxes")}[s["id"]]["thermal"])
                    stop.wait(0.2)

            t = threading.Thread(target=watch)
            t.start()
            for _i in range(6):  # 3 s of warm_after periods with the socket open but quiet
                stop.wait(0.5)
            ws.send("still here")
            assert ws.recv(timeout=10) == "still here"
            stop.set()
            t.join()
            assert seen == {"hot"}, seen
            r = api.post(f"/sandboxes/{s['id']}/stop")
            assert r.status_code == 200 and r.json()["status"] == "stopped"
            from websockets.exceptions import ConnectionClosed

            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)


def api_get(d, path):
    with d.client() as c:  # one client per thread
        return json.loads(c.get(path).text)


def test_ports_and_host_ports_survive_a_daemon_restart(default_image):
    with running_daemon({"ports": {"scan_interval": SCAN}}) as d:
        with d.client() as api:
            s = make_sandbox(api, name="kept")
            start_web_app(api, s, 8080)
            host_port = wait_for(lambda: ports_of(api, s).get(8080, {}).get("host_port"), what="port listed")
            assert api.post(f"/sandboxes/{s['id']}/stop").json()["status"] == "stopped"
        d.stop()
        d.start()
        with d.client() as api:
            listed = [p for p in api.get("/ports").json() if p["sandbox_id"] == s["id"]]
            assert [(p["container_port"], p["host_port"]) for p in listed] == [(8080, host_port)]
            assert api.get(f"/sandboxes/{s['id']}").json()["status"] == "stopped"  # listing woke nothing
            assert httpx.get(f"http://127.0.0.1:{host_port}/again", timeout=30).json()["path"] == "/again"
