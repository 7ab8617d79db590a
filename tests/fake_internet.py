"""A fake internet for egress tests and benchmarks: nothing is ever sent beyond it.

A network namespace joined to the host by a veth whose /30 is TEST-NET-2 (198.51.100.0/30, the "ISP
link": a connected subnet, so always denied to sandboxes). Behind it, TEST-NET-3 addresses
(203.0.113.0/24) on the namespace's side, routed from the host via 198.51.100.2, serve HTTP (every
address, port 80) and DNS (203.0.113.53, tests/integration/apps/fake_dns.py). A decoy private address
(10.254.99.1) sits there too, routed from the host, so a refusal proves the firewall, not a missing
route. Everything is removed on exit: processes by PID, the routes with the veth, the namespace.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

APPS = Path(__file__).parent / "integration" / "apps"
HOST_IP, NS_IP = "198.51.100.1", "198.51.100.2"
WEB = ["203.0.113.10", "203.0.113.11", "203.0.113.12", "203.0.113.13"]
DNS_IP = "203.0.113.53"
DECOY = "10.254.99.1"


@dataclass
class FakeInternet:
    netns: str
    uplink: str  # the host end of the ISP link: a daemon's network.uplink
    dns_log: Path  # every name the fake DNS was asked, one per line

    @property
    def daemon_config(self) -> dict:
        return {"network": {"uplink": self.uplink, "dns_upstream": [DNS_IP]}}


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


@contextlib.contextmanager
def fake_internet() -> Iterator[FakeInternet]:
    tag = os.getpid() % 100000
    net = FakeInternet(f"kt-inet-{tag}", f"ktup{tag}", Path(tempfile.mkdtemp(prefix="kiln-inet-")) / "dns.log")
    www = net.dns_log.parent / "www"
    www.mkdir()
    (www / "hello").write_text("fake-internet\n")
    procs: list[subprocess.Popen] = []
    try:
        subprocess.run(["ip", "netns", "add", net.netns], check=True)
        subprocess.run(
            ["ip", "link", "add", net.uplink, "type", "veth", "peer", "name", "eth0", "netns", net.netns], check=True
        )
        host = f"addr add {HOST_IP}/30 dev {net.uplink}\nlink set {net.uplink} up\n"
        host += f"route add 203.0.113.0/24 via {NS_IP} dev {net.uplink}\n"
        host += f"route add {DECOY}/32 via {NS_IP} dev {net.uplink}\n"
        subprocess.run(["ip", "-b", "-"], input=host.encode(), check=True)
        inside = f"addr add {NS_IP}/30 dev eth0\nlink set eth0 up\nlink set lo up\n"
        inside += "".join(f"addr add {ip}/32 dev lo\n" for ip in [*WEB, DNS_IP, DECOY])
        subprocess.run(["ip", "-n", net.netns, "-b", "-"], input=inside.encode(), check=True)
        run_in = ["ip", "netns", "exec", net.netns, sys.executable]
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        procs.append(subprocess.Popen([*run_in, "-m", "http.server", "80", "-d", str(www)], **quiet))  # type: ignore[call-overload]
        env = {**os.environ, "FAKE_DNS_LOG": str(net.dns_log)}
        procs.append(subprocess.Popen([*run_in, str(APPS / "fake_dns.py"), DNS_IP], env=env))
        deadline = time.monotonic() + 20
        while not (port_open(WEB[0], 80) and port_open(DECOY, 80)):
            if time.monotonic() > deadline:
                raise RuntimeError("the fake internet did not come up")
            time.sleep(0.1)
        yield net
    finally:
        for p in procs:
            p.kill()
            p.wait()
        subprocess.run(["ip", "link", "delete", net.uplink], capture_output=True)  # its routes go with it
        subprocess.run(["ip", "netns", "delete", net.netns], capture_output=True)
        subprocess.run(["rm", "-rf", str(net.dns_log.parent)], capture_output=True)
