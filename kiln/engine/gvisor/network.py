"""Per-sandbox networking: a network namespace joined to the host by a veth pair on its own /30.

Slot N of the configured subnet is the /30 at offset 4*N: host side .1, sandbox side .2. Every
host-global name carries the daemon's prefix, so several daemons never touch each other's
objects. An nftables table (also prefixed) keeps sandboxes from reaching the host or each other:
the host may open connections to a sandbox, a sandbox may not open any to the host.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from .proc import run

NETNS_DIR = "/var/run/netns"


@dataclass(frozen=True)
class Link:
    netns: str  # network namespace name (under /var/run/netns)
    host_if: str  # host side of the veth
    host_ip: str
    sandbox_ip: str

    @property
    def netns_path(self) -> str:
        return os.path.join(NETNS_DIR, self.netns)


class Network:
    def __init__(self, prefix: str, subnet: str):
        self.prefix = prefix
        self.subnet = ipaddress.ip_network(subnet)
        if self.subnet.version != 4 or self.subnet.prefixlen > 29:
            raise ValueError(f"network.subnet must be an IPv4 network of /29 or larger: {subnet}")
        self.table = f"kiln_{prefix}"
        self.if_glob = f"k{prefix}h"

    @property
    def max_slots(self) -> int:
        return self.subnet.num_addresses // 4

    def netns_name(self, sandbox_id: str) -> str:
        return f"kiln-{self.prefix}-{sandbox_id}"

    def link(self, sandbox_id: str, slot: int) -> Link:
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} outside {self.subnet}")
        base = self.subnet.network_address + 4 * slot
        return Link(
            netns=self.netns_name(sandbox_id),
            host_if=f"k{self.prefix}h{slot}",
            host_ip=str(base + 1),
            sandbox_ip=str(base + 2),
        )

    async def install_firewall(self) -> None:
        """Create (or replace) this daemon's nftables table."""
        rules = f"""
table inet {self.table} {{}}
delete table inet {self.table}
table inet {self.table} {{
  chain input {{
    type filter hook input priority -10; policy accept;
    iifname "{self.if_glob}*" ct state established,related accept
    iifname "{self.if_glob}*" drop
  }}
  chain forward {{
    type filter hook forward priority -10; policy accept;
    iifname "{self.if_glob}*" drop
    oifname "{self.if_glob}*" drop
  }}
}}
"""
        await run(["nft", "-f", "-"], input=rules.encode())

    async def remove_firewall(self) -> None:
        await run(["nft", "delete", "table", "inet", self.table], check=False)

    async def create(self, link: Link) -> None:
        await self.destroy(link)  # leftovers of an interrupted create
        await run(["ip", "netns", "add", link.netns])
        await run(["ip", "link", "add", link.host_if, "type", "veth", "peer", "name", "eth0", "netns", link.netns])
        await run(
            ["ip", "-b", "-"],
            input=(f"addr add {link.host_ip}/30 dev {link.host_if}\nlink set {link.host_if} up\n").encode(),
        )
        await run(["ip", "-n", link.netns, "-b", "-"], input=(b"link set lo up\nlink set eth0 up\n"))
        await self.prepare_for_boot(link)

    async def prepare_for_boot(self, link: Link) -> None:
        """Put the sandbox address back on its veth.

        runsc moves the address into its netstack and removes it from the interface, and never
        puts it back: re-add it before every run/restore, never after (a kernel-held address
        answers SYNs with RST).
        """
        await run(["ip", "-n", link.netns, "addr", "replace", f"{link.sandbox_ip}/30", "dev", "eth0"])

    async def destroy(self, link: Link) -> None:
        # Deleting the namespace destroys its veth end and with it the host end.
        await self.remove_netns(link.netns)
        await self.remove_host_if(link.host_if)

    async def remove_netns(self, name: str) -> None:
        if os.path.exists(os.path.join(NETNS_DIR, name)):
            await run(["ip", "netns", "delete", name], check=False)

    async def remove_host_if(self, name: str) -> None:
        if name and os.path.exists(f"/sys/class/net/{name}"):
            await run(["ip", "link", "delete", name], check=False)

    def leftovers(self) -> tuple[list[str], list[str]]:
        """Namespaces and host interfaces carrying this daemon's prefix."""
        ns = [n for n in os.listdir(NETNS_DIR)] if os.path.isdir(NETNS_DIR) else []
        ns = [n for n in ns if n.startswith(self.netns_name(""))]
        ifs = [i for i in os.listdir("/sys/class/net") if i.startswith(self.if_glob)]
        return ns, ifs
