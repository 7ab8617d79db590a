"""Egress benchmarks against the fake internet of the tests (tests/fake_internet.py; nothing leaves it).

- TCP connect from inside a sandbox to 203.0.113.10:80, with the public policy and with a deny policy
  whose allow set holds 10,000 addresses (plus the target), beside the same connect from a bare
  network namespace (no gVisor, no kiln, no policy) joined straight to the fake internet;
- a DNS query for an allowed name through kiln's resolver (public, and deny: it lets the answer's
  address through the firewall before replying), beside the same query sent straight to the upstream.
Every sample is taken inside the sandbox (or the bare namespace) by a Python loop; medians of N each.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys

from tests.daemon import Daemon
from tests.fake_internet import DNS_IP, WEB, fake_internet

PROBE = r"""
import json, socket, struct, sys, time
mode, target, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = []
if mode == "connect":
    for _ in range(n):
        t = time.perf_counter()
        socket.create_connection((target, 80), timeout=5).close()
        out.append(time.perf_counter() - t)
else:  # one A query for allowed.test, a fresh socket each time, as a stub resolver does
    q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x07allowed\x04test\x00" + struct.pack(">HH", 1, 1)
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(5)
        t = time.perf_counter()
        s.sendto(q, (target, 53))
        s.recv(4096)
        out.append(time.perf_counter() - t)
        s.close()
print(json.dumps(out))
"""


def sample(api, sid: str, mode: str, target: str, n: int) -> list[float]:
    r = api.post(f"/sandboxes/{sid}/exec", json={"cmd": ["python3", "-c", PROBE, mode, target, str(n)]}, timeout=300)
    r.raise_for_status()
    assert r.json()["exit_code"] == 0, r.json()["stderr"]
    return json.loads(r.json()["stdout"])


def bare_namespace_connects(fake_ns: str, n: int) -> list[float]:
    """The same connects from a plain namespace on its own veth into the fake internet."""
    ns, host_end = f"{fake_ns}-bare", "bare0"
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "-n", fake_ns, "link", "add", host_end, "type", "veth", "peer", "name", "eth0",
                        "netns", ns], check=True)  # fmt: skip
        subprocess.run(["ip", "-n", fake_ns, "-b", "-"], input=f"addr add 198.51.100.5/30 dev {host_end}\n"
                       f"link set {host_end} up\n".encode(), check=True)  # fmt: skip
        subprocess.run(["ip", "-n", ns, "-b", "-"], input=b"addr add 198.51.100.6/30 dev eth0\nlink set eth0 up\n"
                       b"link set lo up\nroute add default via 198.51.100.5\n", check=True)  # fmt: skip
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", PROBE, "connect", WEB[0], str(n)],
                             capture_output=True, check=True, timeout=300)  # fmt: skip
        return json.loads(out.stdout)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)  # its veth goes with it


def fill_allow_set(d: Daemon, sid: str, n: int = 10_000) -> None:
    engine = d.engine()
    slot = engine.record_on_disk(sid).slot  # type: ignore[attr-defined]
    start = int(ipaddress.IPv4Address("100.128.0.1"))  # public space, never the target
    elements = ", ".join(f"{ipaddress.IPv4Address(start + i)} timeout 3600s" for i in range(n))
    nft = f"add element inet {engine.network.table} dns_{slot} {{ {elements} }}\n"  # type: ignore[attr-defined]
    subprocess.run(["nft", "-f", "-"], input=nft.encode(), check=True)


def bench_egress(n: int) -> dict[str, list[float]]:
    with fake_internet() as net:
        d = Daemon(net.daemon_config)
        try:
            d.start()
            with d.client() as api:
                public = api.post("/sandboxes", json={"name": "eg-public"}).json()
                policy = {"default": "deny", "allow_hosts": ["allowed.test"]}
                deny = api.post("/sandboxes", json={"name": "eg-deny", "net_policy": policy}).json()
                small = api.post("/sandboxes", json={"name": "eg-deny-small", "net_policy": policy}).json()
                resolver = api.post(f"/sandboxes/{public['id']}/exec", json={"cmd": ["cat", "/etc/resolv.conf"]})
                resolver_ip = resolver.json()["stdout"].split()[1]
                sample(api, deny["id"], "dns", resolver_ip, 1)  # allowed.test's address into its set
                fill_allow_set(d, deny["id"])
                measures = {
                    "bare": lambda k: bare_namespace_connects(net.netns, k),
                    "public": lambda k: sample(api, public["id"], "connect", WEB[0], k),
                    "deny10k": lambda k: sample(api, deny["id"], "connect", WEB[0], k),
                    "dns_upstream": lambda k: sample(api, public["id"], "dns", DNS_IP, k),
                    "dns_kiln": lambda k: sample(api, public["id"], "dns", resolver_ip, k),
                    "dns_kiln_deny": lambda k: sample(api, small["id"], "dns", resolver_ip, k),
                    "dns_kiln_deny10k": lambda k: sample(api, deny["id"], "dns", resolver_ip, k),
                }
                res: dict[str, list[float]] = {k: [] for k in measures}
                rounds = 5
                for _ in range(rounds):  # alternating, so a slow moment of the machine costs each the same
                    for key, measure in measures.items():
                        res[key] += measure(n // rounds)
        finally:
            d.scrub()
    return res
