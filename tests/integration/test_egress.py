"""Egress under a policy, against a fake internet this test builds (issue 13; tests/fake_internet.py):
the daemon's uplink is the host end of its veth, and nothing is sent anywhere else."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import make_sandbox, run
from tests.daemon import Daemon, running_daemon
from tests.fake_internet import DECOY, DNS_IP, HOST_IP, NS_IP, WEB, fake_internet, port_open

EGRESS = {}  # the daemon config for the fake internet (filled by the fixture)

PROBE = r"""
import socket, sys, time, urllib.request
what, target = sys.argv[1], sys.argv[2]
t = time.monotonic()
try:
    if what == "http":
        print("ok", urllib.request.urlopen(target, timeout=5).read().decode().strip())
    elif what == "resolve":
        print("ok", ",".join(sorted({a[4][0] for a in socket.getaddrinfo(target, 80, socket.AF_INET)})))
    else:
        host, port = target.rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=5).close()
        print("ok")
except Exception as e:
    print("fail", type(e).__name__, f"{(time.monotonic() - t) * 1000:.0f}ms", e)
"""


@pytest.fixture(scope="module")
def internet():
    with fake_internet() as net:
        EGRESS.update(net.daemon_config)
        EGRESS["network"]["deny_cidrs"] = [f"{WEB[3]}/32"]  # one public address this host never lets out to
        yield net.dns_log


@pytest.fixture(scope="module")
def egress_daemon(internet, default_image):
    with running_daemon(EGRESS) as d:
        yield d


@pytest.fixture(scope="module")
def eapi(egress_daemon):
    with egress_daemon.client() as c:
        yield c


def probe(api, sb, what: str, target: str) -> str:
    return run(api, sb, ["python3", "-c", PROBE, what, target], user="root")["stdout"].strip()


def http_ok(api, sb, url: str) -> bool:
    return probe(api, sb, "http", url) == "ok fake-internet"


def test_public_egress_reaches_the_fake_internet_by_name_and_address(eapi, egress_daemon):
    sb = make_sandbox(eapi, name="pub")
    try:
        assert sb["net_policy"] == {"default": "public", "allow_hosts": [], "allow_cidrs": []}
        resolv = run(eapi, sb, ["cat", "/etc/resolv.conf"])["stdout"]
        assert resolv.startswith("nameserver 10.") and DNS_IP not in resolv  # kiln's resolver, never the image's
        assert http_ok(eapi, sb, "http://allowed.test/hello")
        assert http_ok(eapi, sb, f"http://{WEB[2]}/hello")
        assert probe(eapi, sb, "connect", f"{WEB[3]}:80").startswith("fail ConnectionRefusedError")  # deny_cidrs
        assert probe(eapi, sb, "resolve", "other.test") == f"ok {WEB[2]}"
        # private answers are stripped in every mode (DNS rebinding); a name with only those has none
        assert probe(eapi, sb, "resolve", "rebind.test").startswith("fail gaierror")
        assert probe(eapi, sb, "resolve", "mixed.test") == f"ok {WEB[0]}"
    finally:
        eapi.delete(f"/sandboxes/{sb['id']}")


def test_deny_lets_through_only_the_allowed_names_and_cidrs(eapi, egress_daemon, internet):
    policy = {"default": "deny", "allow_hosts": ["allowed.test"]}
    sb = make_sandbox(eapi, name="deny", net_policy=policy)
    try:
        assert sb["net_policy"] == {"default": "deny", "allow_hosts": ["allowed.test"], "allow_cidrs": []}
        assert probe(eapi, sb, "connect", f"{WEB[0]}:80").startswith("fail")  # not resolved yet: not allowed
        assert http_ok(eapi, sb, "http://allowed.test/hello")
        assert probe(eapi, sb, "connect", f"{WEB[0]}:80") == "ok"  # its address, now resolved
        before = internet.read_text() if internet.exists() else ""
        assert probe(eapi, sb, "resolve", "other.test").startswith("fail gaierror")  # NXDOMAIN ...
        assert internet.read_text().count("other.test") == before.count("other.test")  # ... never asked upstream
        refused = probe(eapi, sb, "connect", f"{WEB[2]}:80").split()
        assert refused[:2] == ["fail", "ConnectionRefusedError"], refused  # a reset, not a hang
        assert int(refused[2].removesuffix("ms")) < 100, refused
        assert probe(eapi, sb, "resolve", "a.allowed.test").startswith("fail")  # exact names only

        r = eapi.patch(
            f"/sandboxes/{sb['id']}", json={"net_policy": {"default": "deny", "allow_hosts": ["*.allowed.test"]}}
        )
        assert r.status_code == 200 and r.json()["net_policy"]["allow_hosts"] == ["*.allowed.test"], r.text
        assert probe(eapi, sb, "resolve", "a.allowed.test") == f"ok {WEB[1]}"
        assert http_ok(eapi, sb, "http://a.allowed.test/hello")
        assert probe(eapi, sb, "resolve", "allowed.test").startswith("fail")  # *.x is not x itself
        assert probe(eapi, sb, "connect", f"{WEB[0]}:80").startswith("fail")  # resolved under the old policy

        r = eapi.patch(
            f"/sandboxes/{sb['id']}", json={"net_policy": {"default": "deny", "allow_cidrs": [f"{WEB[2]}/32"]}}
        )
        assert r.status_code == 200, r.text
        assert probe(eapi, sb, "connect", f"{WEB[2]}:80") == "ok"
        assert probe(eapi, sb, "connect", f"{WEB[3]}:80").startswith("fail")  # the neighbour
    finally:
        eapi.delete(f"/sandboxes/{sb['id']}")


def test_private_ranges_and_the_host_are_out_of_reach_whatever_the_policy(eapi, egress_daemon):
    assert port_open(DECOY, 80)  # the host reaches the decoy: only the firewall keeps sandboxes off it
    for cidr in ("10.0.0.0/8", "169.254.169.254/32", "192.168.1.0/24"):
        r = eapi.post("/sandboxes", json={"name": "nope", "net_policy": {"default": "deny", "allow_cidrs": [cidr]}})
        assert r.status_code == 400 and "invalid net_policy" in r.json()["error"] and "private" in r.json()["error"]
    sb = make_sandbox(eapi, name="wide", net_policy={"default": "deny", "allow_cidrs": ["0.0.0.0/0"]})
    try:
        gateway = sb["ip"].rsplit(".", 1)[0] + "." + str(int(sb["ip"].rsplit(".", 1)[1]) - 1)
        resolver = run(eapi, sb, ["cat", "/etc/resolv.conf"])["stdout"].split()[1]
        assert probe(eapi, sb, "connect", f"{WEB[0]}:80") == "ok"  # inside 0.0.0.0/0 ...
        daemon_port = egress_daemon.port
        never = [f"{DECOY}:80", "169.254.169.254:80", f"{HOST_IP}:22", f"{NS_IP}:80"]
        never += [f"{gateway}:{daemon_port}", f"{resolver}:{daemon_port}", f"{resolver}:80"]
        for target in never:
            assert probe(eapi, sb, "connect", target).startswith("fail"), target  # ... but never these
        other = make_sandbox(eapi, name="neighbour")
        assert probe(eapi, sb, "connect", f"{other['ip']}:1024").startswith("fail")  # another sandbox's agent
        eapi.delete(f"/sandboxes/{other['id']}")
        # even put into its allow set by hand
        engine = egress_daemon.engine()
        table, slot = engine.network.table, engine.record_on_disk(sb["id"]).slot
        subprocess.run(
            ["nft", "add", "element", "inet", table, f"dns_{slot}", f"{{ {DECOY} timeout 60s }}"], check=True
        )
        assert probe(eapi, sb, "connect", f"{DECOY}:80").startswith("fail")
    finally:
        eapi.delete(f"/sandboxes/{sb['id']}")


def test_a_policy_change_cuts_new_connections_at_once_and_a_bad_one_changes_nothing(eapi):
    sb = make_sandbox(eapi, name="flip")
    try:
        assert http_ok(eapi, sb, f"http://{WEB[0]}/hello")
        for bad in (
            {"default": "sometimes"},
            {"default": "deny", "allow_hosts": ["*"]},
            {"default": "deny", "allow_hosts": ["a.*.test"]},
            {"default": "deny", "allow_cidrs": ["300.1.2.3/8"]},
            {"default": "deny", "allow": ["x"]},
        ):
            r = eapi.patch(f"/sandboxes/{sb['id']}", json={"net_policy": bad, "name": "renamed"})
            assert r.status_code == 400 and r.json()["error"].startswith("invalid net_policy: "), (bad, r.text)
        got = eapi.get(f"/sandboxes/{sb['id']}").json()
        assert got["name"] == "flip" and got["net_policy"]["default"] == "public"  # nothing changed
        assert http_ok(eapi, sb, f"http://{WEB[0]}/hello")
        r = eapi.patch(f"/sandboxes/{sb['id']}", json={"net_policy": {"default": "deny"}})
        assert r.json()["net_policy"] == {"default": "deny", "allow_hosts": [], "allow_cidrs": []}
        assert eapi.get(f"/sandboxes/{sb['id']}").json()["net_policy"]["default"] == "deny"
        assert probe(eapi, sb, "connect", f"{WEB[0]}:80").startswith("fail")
        assert probe(eapi, sb, "resolve", "allowed.test").startswith("fail")
    finally:
        eapi.delete(f"/sandboxes/{sb['id']}")


def test_templates_carry_a_policy(eapi):
    r = eapi.post(
        "/templates", json={"name": "locked", "net_policy": {"default": "deny", "allow_hosts": ["allowed.test"]}}
    )
    assert r.status_code == 201 and r.json()["net_policy"]["default"] == "deny", r.text
    assert eapi.post("/templates", json={"name": "bad", "net_policy": {"default": "x"}}).status_code == 400
    sb = make_sandbox(eapi, template_id="locked")
    try:
        assert sb["net_policy"]["allow_hosts"] == ["allowed.test"]
        assert http_ok(eapi, sb, "http://allowed.test/hello")
        assert probe(eapi, sb, "connect", f"{WEB[2]}:80").startswith("fail")
    finally:
        eapi.delete(f"/sandboxes/{sb['id']}")
        eapi.delete("/templates/locked")


def test_egress_and_policy_survive_stop_start_and_a_daemon_kill_9(internet, default_image):
    d = Daemon(EGRESS)
    route_table = d.engine().network.route_table
    try:
        d.start()
        api = d.client()
        sb = make_sandbox(api, name="keeps", net_policy={"default": "deny", "allow_hosts": ["allowed.test"]})
        assert http_ok(api, sb, "http://allowed.test/hello")
        assert api.post(f"/sandboxes/{sb['id']}/stop").json()["status"] == "stopped"
        assert http_ok(api, sb, "http://allowed.test/hello")  # woken: the default route is back
        d.kill9()
        d.start()
        api = d.client()
        assert api.get(f"/sandboxes/{sb['id']}").json()["net_policy"]["allow_hosts"] == ["allowed.test"]
        assert probe(api, sb, "connect", f"{WEB[0]}:80") == "ok"  # what it resolved is still let through
        assert probe(api, sb, "connect", f"{WEB[2]}:80").startswith("fail")
        assert http_ok(api, sb, "http://allowed.test/hello")
        assert api.delete(f"/sandboxes/{sb['id']}").status_code == 200
        assert d.clean()  # no netns, veth, nft set, chain or element of it is left
        assert d.engine().leftovers()["nft"] == []
    finally:
        d.scrub()
    # the daemon is gone: its routing guard went with it
    rules = subprocess.run(["ip", "-4", "rule", "show"], capture_output=True, text=True).stdout
    assert f"lookup {route_table}" not in rules
    routes = subprocess.run(["ip", "-j", "route", "show", "table", str(route_table)], capture_output=True, text=True)
    assert json.loads(routes.stdout or "[]") == []


def test_the_cli_and_the_sdk_show_and_change_the_policy(eapi, egress_daemon):
    from kiln.client import Kiln

    env = {**os.environ, "KILN_URL": egress_daemon.url, "KILN_TOKEN": egress_daemon.admin_token}

    def kiln(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kiln.cli.main", *args], env=env, capture_output=True, timeout=120)

    r = kiln("create", "cli-net", "--egress", "deny", "--allow-host", "allowed.test", "--json")
    assert r.returncode == 0, r.stderr
    sb = json.loads(r.stdout)
    try:
        assert sb["net_policy"] == {"default": "deny", "allow_hosts": ["allowed.test"], "allow_cidrs": []}
        shown = kiln("net", "cli-net").stdout.decode()
        assert shown == "egress: deny\n  allow host allowed.test\n"
        r = kiln("net", "cli-net", "--egress", "deny", "--allow-cidr", f"{WEB[2]}/32", "--json")
        assert json.loads(r.stdout) == {"default": "deny", "allow_hosts": [], "allow_cidrs": [f"{WEB[2]}/32"]}
        assert probe(eapi, sb, "connect", f"{WEB[2]}:80") == "ok"
        r = kiln("net", "cli-net", "--egress", "sometimes")
        assert r.returncode == 1 and b"invalid net_policy" in r.stderr
        with Kiln(egress_daemon.url, egress_daemon.admin_token) as k:
            s = k.sandboxes.get("cli-net")
            s.set_net_policy("public")
            assert s.net_policy == {"default": "public", "allow_hosts": [], "allow_cidrs": []}
            made = k.sandboxes.create("sdk-net", net_policy={"default": "deny"})
            assert made.net_policy["default"] == "deny"
            made.destroy()
        assert probe(eapi, sb, "connect", f"{WEB[1]}:80") == "ok"  # public again
    finally:
        eapi.delete(f"/sandboxes/{sb['id']}")
