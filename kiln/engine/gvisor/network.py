"""Per-sandbox networking: a network namespace joined to the host by a veth pair on its own /30, and
the daemon's firewall, with egress to the internet under each sandbox's policy.

Slot N of the configured subnet is the /30 at offset 4*N: host side .1, sandbox side .2; the last /30
is kept for the resolver's address. Every host-global name carries the daemon's prefix, so several
daemons never touch each other's objects.

The firewall is one nftables table per daemon, made in one transaction at start (with every
sandbox's objects in it) and changed per sandbox afterwards:
- prerouting: from a sandbox veth, no IPv6, and no source address but the sandbox's own (anti-spoofing);
  a mark that makes the routing guard apply (an `ip rule` sends marked packets to a table holding only
  the uplink's routes and `unreachable default`: nothing from a sandbox can be routed anywhere else);
- input: a sandbox reaches the host only for DNS to the resolver address; the rest is refused;
- forward: into a sandbox only replies; out of one: only to the uplink, never to an always-denied
  address (netpolicy.NEVER, the host's connected subnets, the sandbox subnet, network.deny_cidrs),
  then the sandbox's own chain `sbx_<slot>`: its allowed CIDRs (`cidr_<slot>`), the addresses its
  allowed names resolved to (`dns_<slot>`, filled by the resolver with their TTL), then accept
  (public) or deny. Denials are a TCP reset (ICMP admin-prohibited for the rest): never a silent drop.
- postrouting: masquerade to the uplink.
Without an uplink (`network.uplink: none`, or no default route) the same ruleset denies all egress.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ...netpolicy import DENY, NetPolicy
from ..base import EngineError
from .nft import Nft
from .proc import run

log = logging.getLogger("kiln.network")

NETNS_DIR = "/var/run/netns"
GUARD_PRIORITY = 1200  # of the routing guard's ip rule


@dataclass(frozen=True)
class Link:
    netns: str  # network namespace name (under /var/run/netns)
    host_if: str  # host side of the veth
    host_ip: str
    sandbox_ip: str
    slot: int = 0

    @property
    def netns_path(self) -> str:
        return os.path.join(NETNS_DIR, self.netns)


@dataclass(frozen=True)
class Uplink:
    """Where sandboxes' traffic leaves the host, found at start."""

    name: str  # the interface
    routes: tuple[str, ...]  # the main table's routes out of it, for the routing guard's table
    denied: tuple[str, ...]  # always-denied networks: NEVER, connected subnets, the sandbox subnet, config


@dataclass(frozen=True)
class EgressSettings:
    """The network.* config the engine needs for egress."""

    uplink: str = "none"  # an interface, "auto" (the default route's) or "none"
    deny_cidrs: tuple[str, ...] = ()
    dns_upstream: tuple[str, ...] = ()  # empty: the host's own resolvers
    default: str = "public"  # the policy of a sandbox that names none

    def upstreams(self) -> list[str]:
        if self.dns_upstream:
            return list(self.dns_upstream)
        found = []
        with contextlib.suppress(OSError):
            for line in Path("/etc/resolv.conf").read_text().splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver" and "." in parts[1]:
                    found.append(parts[1])
        return found


def sysctl_path(interface: str) -> Path:
    return Path(f"/proc/sys/net/ipv4/conf/{interface}/forwarding")


class Network:
    def __init__(self, prefix: str, subnet: str, marker_dir: Path | None = None):
        self.prefix = prefix
        self.subnet = ipaddress.ip_network(subnet)
        if self.subnet.version != 4 or self.subnet.prefixlen > 29:
            raise ValueError(f"network.subnet must be an IPv4 network of /29 or larger: {subnet}")
        self.table = f"kiln_{prefix}"
        self.if_glob = f"k{prefix}h"
        self.resolver_ip = str(self.subnet.broadcast_address - 1)  # in the last /30, kept out of the slots
        self.route_table = 10_000 + int(prefix, 16) % 1_000_000
        self.mark = self.route_table
        self.uplink: Uplink | None = None
        # set when this daemon turned on forwarding on the uplink, so it is turned off again
        self.flipped_marker = (marker_dir or Path("/nonexistent")) / "uplink-forwarding"
        self._nft: Nft | None = None

    @property
    def nft(self) -> Nft:
        if self._nft is None:
            self._nft = Nft()
        return self._nft

    @property
    def max_slots(self) -> int:
        return self.subnet.num_addresses // 4 - 1

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
            slot=slot,
        )

    # ------------------------------------------------------------ the host-wide part

    async def install_firewall(self, uplink: Uplink | None, sandboxes: list[tuple[Link, NetPolicy]]) -> None:
        """(Re)make this daemon's table with every sandbox's objects, in one transaction; then the
        routing guard and the uplink's forwarding."""
        self.uplink = uplink
        flipped = False
        if uplink is not None:
            flipped = self.enable_uplink_forwarding(uplink.name)
        await self.install_routing_guard()
        glob, t = self.if_glob, self.table
        never = ", ".join(uplink.denied) if uplink else "0.0.0.0/0"
        lines = [
            f"table inet {t} {{}}",
            f"delete table inet {t}",
            f"table inet {t} {{",
            f"  set never {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {never} }}; }}",
            "  set sources { type ifname . ipv4_addr; }",
            "  map sandboxes { type ifname : verdict; }",
            "  chain deny {",
            "    meta l4proto tcp reject with tcp reset",
            "    reject with icmpx admin-prohibited",
            "  }",
            "  chain prerouting {",
            "    type filter hook prerouting priority raw; policy accept;",
            f'    iifname "{glob}*" meta nfproto ipv6 drop',
            f'    iifname "{glob}*" iifname . ip saddr != @sources drop',
            f'    iifname "{glob}*" meta mark set {self.mark}',
            "  }",
            "  chain input {",
            "    type filter hook input priority filter - 10; policy accept;",
            f'    iifname "{glob}*" ct state established,related accept',
            f'    iifname "{glob}*" ip daddr {self.resolver_ip} udp dport 53 accept' if uplink else "",
            f'    iifname "{glob}*" jump deny',
            "  }",
            "  chain egress {",
            f'    oifname != "{uplink.name}" jump deny' if uplink else "    jump deny",
            "    ip daddr @never jump deny",
            "    iifname vmap @sandboxes",
            "    jump deny",
            "  }",
            "  chain forward {",
            "    type filter hook forward priority filter - 10; policy accept;",
            f'    oifname "{glob}*" ct state established,related accept',
            f'    oifname "{glob}*" drop',
            f'    iifname "{glob}*" ct state established,related accept',
            f'    iifname "{glob}*" jump egress',
            # forwarding on the uplink is ours: nothing arriving there is routed on, but replies to
            # masqueraded sandbox flows (any kiln daemon's: several may share the uplink)
            f'    iifname "{uplink.name}" ct status snat accept' if flipped and uplink else "",
            f'    iifname "{uplink.name}" drop' if flipped and uplink else "",
            "  }",
        ]
        if uplink is not None:
            lines += [
                "  chain postrouting {",
                "    type nat hook postrouting priority srcnat; policy accept;",
                f'    iifname "{glob}*" oifname "{uplink.name}" masquerade',
                "  }",
            ]
        lines.append("}")
        for link, policy in sandboxes:
            lines += self.sandbox_commands(link, policy)
        self.nft.run("\n".join(line for line in lines if line) + "\n")

    def enable_uplink_forwarding(self, uplink: str) -> bool:
        """Forward de-NATed replies from the uplink (per interface: the global ip_forward is left alone).
        True when this daemon turned it on (and so installs the guard that keeps it to sandboxes)."""
        path = sysctl_path(uplink)
        if self.flipped_marker.exists():
            return True
        if path.read_text().strip() == "1":
            return False
        self.flipped_marker.parent.mkdir(parents=True, exist_ok=True)
        self.flipped_marker.write_text(uplink)
        path.write_text("1")
        return True

    async def install_routing_guard(self) -> None:
        await self.remove_routing_guard()
        routes = list(self.uplink.routes) if self.uplink else []
        batch = [f"route replace {r} table {self.route_table}" for r in routes]
        if not any(r.startswith("default") for r in routes):
            batch.append(f"route replace unreachable default table {self.route_table}")
        batch.append(f"rule add fwmark {self.mark} lookup {self.route_table} priority {GUARD_PRIORITY}")
        await run(["ip", "-4", "-b", "-"], input=("\n".join(batch) + "\n").encode())

    async def remove_routing_guard(self) -> None:
        await asyncio.to_thread(self.remove_routing_guard_now)

    def remove_routing_guard_now(self) -> None:
        """Its table and every rule pointing at it (one per earlier start that did not clean up);
        synchronous, for a scrub when no daemon runs."""
        subprocess.run(["ip", "-4", "route", "flush", "table", str(self.route_table)], capture_output=True)
        for _ in range(10):
            shown = subprocess.run(["ip", "-4", "rule", "show"], capture_output=True, text=True).stdout
            if f"lookup {self.route_table}" not in shown:
                break
            subprocess.run(["ip", "-4", "rule", "del", "fwmark", str(self.mark)], capture_output=True)

    async def remove_firewall(self) -> None:
        with contextlib.suppress(EngineError):
            self.nft.run(f"delete table inet {self.table}")
        await self.remove_routing_guard()
        self.restore_uplink_forwarding()

    def restore_uplink_forwarding(self) -> None:
        if self.flipped_marker.exists():
            with contextlib.suppress(OSError):
                sysctl_path(self.flipped_marker.read_text().strip()).write_text("0")
            self.flipped_marker.unlink(missing_ok=True)

    # ------------------------------------------------------------ one sandbox's objects

    def names(self, link: Link) -> tuple[str, str, str]:
        return f"sbx_{link.slot}", f"cidr_{link.slot}", f"dns_{link.slot}"

    def sandbox_commands(self, link: Link, policy: NetPolicy) -> list[str]:
        t = self.table
        chain, cidrs, dns = self.names(link)
        return [
            f"add set inet {t} {cidrs} {{ type ipv4_addr; flags interval; auto-merge; }}",
            f"add set inet {t} {dns} {{ type ipv4_addr; flags timeout; }}",
            f"add chain inet {t} {chain}",
            *self.policy_commands(link, policy),
            f'add element inet {t} sources {{ "{link.host_if}" . {link.sandbox_ip} }}',
            f'add element inet {t} sandboxes {{ "{link.host_if}" : jump {chain} }}',
        ]

    def policy_commands(self, link: Link, policy: NetPolicy) -> list[str]:
        t = self.table
        chain, cidrs, dns = self.names(link)
        out = [f"flush chain inet {t} {chain}", f"flush set inet {t} {cidrs}", f"flush set inet {t} {dns}"]
        if policy.allow_cidrs:
            out.append(f"add element inet {t} {cidrs} {{ {', '.join(policy.allow_cidrs)} }}")
        out += [
            f"add rule inet {t} {chain} ip daddr @{cidrs} accept",
            f"add rule inet {t} {chain} ip daddr @{dns} accept",
            f"add rule inet {t} {chain} {'jump deny' if policy.default == DENY else 'accept'}",
        ]
        return out

    def add_sandbox(self, link: Link, policy: NetPolicy) -> None:
        """One nft transaction. The slot's objects exist only if a create failed half-way without its
        clean-up (the table is rebuilt from the records at every start): then they go first."""
        commands = "\n".join(self.sandbox_commands(link, policy)) + "\n"
        try:
            self.nft.run(commands)
        except EngineError:
            self.remove_sandbox(link)
            self.nft.run(commands)

    def set_policy(self, link: Link, policy: NetPolicy) -> None:
        """Applies to new connections at once; the addresses names resolved to are forgotten."""
        self.nft.run("\n".join(self.policy_commands(link, policy)) + "\n")

    def allow_addresses(self, link: Link, addresses: list[tuple[str, int]]) -> None:
        """Let the sandbox reach these addresses for that many seconds (add, delete, add: a known one
        gets its timeout renewed)."""
        _, _, dns = self.names(link)
        t = self.table
        commands = []
        for ip, seconds in addresses:
            element = f"{{ {ip} timeout {seconds}s }}"
            commands += [
                f"add element inet {t} {dns} {element}",
                f"delete element inet {t} {dns} {{ {ip} }}",
                f"add element inet {t} {dns} {element}",
            ]
        if commands:
            self.nft.run("\n".join(commands) + "\n")

    def remove_sandbox(self, link: Link) -> None:
        t = self.table
        chain, cidrs, dns = self.names(link)
        commands = [
            f'delete element inet {t} sandboxes {{ "{link.host_if}" }}',
            f'delete element inet {t} sources {{ "{link.host_if}" . {link.sandbox_ip} }}',
            f"delete chain inet {t} {chain}",
            f"delete set inet {t} {cidrs}",
            f"delete set inet {t} {dns}",
        ]
        try:  # one transaction (each nft run costs ~13 ms here: libnftables reads the ruleset first)
            self.nft.run("\n".join(commands) + "\n")
        except EngineError:  # some are missing (an interrupted create): each on its own
            for command in commands:
                self.nft.run(command, check=False)

    def sandbox_objects(self) -> list[str]:
        """Names of the per-sandbox objects in this daemon's table (for leftover checks)."""
        try:
            listing = json.loads(self.nft.run(f"list table inet {self.table}", as_json=True) or "{}")
        except (EngineError, ValueError):
            return []
        found = []
        for item in listing.get("nftables", []):
            obj = item.get("chain") or item.get("set") or item.get("map")
            if obj and obj.get("name", "").split("_")[0] in ("sbx", "cidr", "dns"):
                found.append(obj["name"])
            elif obj and obj.get("name") in ("sources", "sandboxes"):
                found += [f"{obj['name']}:{json.dumps(e)}" for e in obj.get("elem", [])]
        return sorted(found)

    # ------------------------------------------------------------ namespaces and veths

    async def create(self, link: Link, policy: NetPolicy) -> None:
        await self.remove_netns(link.netns)  # leftovers of an interrupted create (nft ones: add_sandbox)
        await self.remove_host_if(link.host_if)
        # one `ip` run on the host side and one inside the namespace (each run is a fork and exec)
        host = [
            f"netns add {link.netns}",
            f"link add {link.host_if} type veth peer name eth0 netns {link.netns}",
            f"addr add {link.host_ip}/30 dev {link.host_if}",
            f"link set {link.host_if} up",
        ]
        if self.uplink is not None:  # the resolver's address, the same on every veth
            host.insert(3, f"addr add {self.resolver_ip}/32 dev {link.host_if} noprefixroute")
        await run(["ip", "-b", "-"], input=("\n".join(host) + "\n").encode())
        if self.uplink is not None:
            sysctl_path(link.host_if).write_text("1")
        self.add_sandbox(link, policy)
        await self.prepare_for_boot(link, first="link set lo up\nlink set eth0 up\n")

    async def ensure_egress_side(self, link: Link) -> None:
        """The host side of a veth as egress needs it (for one made before egress was configured)."""
        if self.uplink is None:
            return
        await run(["ip", "addr", "replace", f"{self.resolver_ip}/32", "dev", link.host_if, "noprefixroute"])
        sysctl_path(link.host_if).write_text("1")

    async def prepare_for_boot(self, link: Link, first: str = "") -> None:
        """Put the sandbox's address (and, with egress, its default route) back on its veth.

        runsc moves them into its netstack and removes them from the interface, and never puts them
        back: re-add them before every run/restore, never after (a kernel-held address answers SYNs
        with RST).
        """
        batch = first + f"addr replace {link.sandbox_ip}/30 dev eth0\n"
        if self.uplink is not None:
            batch += f"route replace default via {link.host_ip} dev eth0\n"
        await run(["ip", "-n", link.netns, "-b", "-"], input=batch.encode())

    async def destroy(self, link: Link) -> None:
        self.remove_sandbox(link)
        # one ip run: the host end first (which takes its peer along at once; a namespace's own
        # devices go asynchronously after it is deleted), then the namespace
        batch = f"link delete {link.host_if}\n" if os.path.exists(f"/sys/class/net/{link.host_if}") else ""
        if os.path.exists(os.path.join(NETNS_DIR, link.netns)):
            batch += f"netns delete {link.netns}\n"
        if batch:
            await run(["ip", "-force", "-b", "-"], input=batch.encode(), check=False)

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


async def find_uplink(configured: str, subnet: str, deny_cidrs: list[str], never: list[str]) -> Uplink | None:
    """The uplink: `configured`, or with "auto" the interface of the default route; None for "none"
    or when there is no default route (no egress)."""
    if configured == "none":
        return None
    name = configured
    if configured == "auto":
        routes = json.loads(await run(["ip", "-4", "-j", "route", "show", "default"]) or "[]")
        name = next((r["dev"] for r in routes if r.get("dev")), "")
        if not name:
            log.warning("no default route: sandboxes get no egress")
            return None
    if not os.path.exists(f"/sys/class/net/{name}"):
        raise EngineError(f"network.uplink: no interface {name!r} on this host")
    out = []
    for r in json.loads(await run(["ip", "-4", "-j", "route", "show", "table", "main", "dev", name]) or "[]"):
        spec = r["dst"] + (f" via {r['gateway']}" if r.get("gateway") else "") + f" dev {name}"
        out.append(spec)
    connected = []
    for iface in json.loads(await run(["ip", "-4", "-j", "addr", "show"]) or "[]"):
        for a in iface.get("addr_info", []):
            if a.get("family") == "inet" and a.get("local"):
                connected.append(str(ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network))
    denied = [*never, *connected, subnet, *deny_cidrs]
    return Uplink(name, tuple(out), tuple(dict.fromkeys(denied)))
