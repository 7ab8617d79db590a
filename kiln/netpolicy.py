"""Egress policies: what a sandbox may reach on the internet. A neutral vocabulary (like states.py):
core validates and stores them, the engine enforces them, neither imports the other.

`{"default": "public" | "deny", "allow_hosts": ["example.com", "*.github.com"], "allow_cidrs": ["203.0.113.0/24"]}`

- public: every public address; deny: only the listed hosts (by DNS name, through kiln's resolver)
  and CIDRs. `*.suffix` is any subdomain of suffix, never suffix itself (list both for both).
- Always denied, whatever the policy or DNS says: NEVER below, the host's connected subnets, the
  sandbox subnet and the configured `network.deny_cidrs`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

PUBLIC, DENY = "public", "deny"
NEVER = tuple(
    ipaddress.IPv4Network(c)
    for c in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
)
MAX_ENTRIES = 256  # hosts, and CIDRs, per policy
LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class InvalidPolicy(ValueError):
    """The message completes `invalid net_policy: ...`."""


@dataclass(frozen=True)
class NetPolicy:
    default: str = PUBLIC
    allow_hosts: tuple[str, ...] = ()
    allow_cidrs: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"default": self.default, "allow_hosts": list(self.allow_hosts), "allow_cidrs": list(self.allow_cidrs)}

    @classmethod
    def from_json(cls, data: dict | None, default: str = PUBLIC) -> NetPolicy:
        """A stored policy (trusted: it was checked when it was set)."""
        if not data:
            return cls(default)
        return cls(data.get("default", default), tuple(data.get("allow_hosts", ())), tuple(data.get("allow_cidrs", ())))

    def allows_name(self, name: str) -> bool:
        """Whether a DNS name may be resolved (and its addresses reached) under this policy."""
        if self.default == PUBLIC:
            return True
        name = name.rstrip(".").lower()
        for host in self.allow_hosts:
            if host.startswith("*."):
                if name.endswith(host[1:]) and name != host[2:]:
                    return True
            elif name == host:
                return True
        return False


def parse_policy(raw: object, default: str = PUBLIC) -> NetPolicy:
    """Check a policy from a request; InvalidPolicy says what is wrong. Missing keys take defaults."""
    if not isinstance(raw, dict):
        raise InvalidPolicy("must be an object with default, allow_hosts and allow_cidrs")
    unknown = set(raw) - {"default", "allow_hosts", "allow_cidrs"}
    if unknown:
        raise InvalidPolicy(f"unknown field {sorted(unknown)[0]!r}")
    mode = raw.get("default", default)
    if mode not in (PUBLIC, DENY):
        raise InvalidPolicy(f'default must be "public" or "deny", not {mode!r}')
    hosts = [check_host(h) for h in entries(raw, "allow_hosts")]
    cidrs = [check_cidr(c) for c in entries(raw, "allow_cidrs")]
    return NetPolicy(mode, tuple(dict.fromkeys(hosts)), tuple(dict.fromkeys(cidrs)))


def entries(raw: dict, key: str) -> list:
    value = raw.get(key) or []
    if not isinstance(value, list):
        raise InvalidPolicy(f"{key} must be a list")
    if len(value) > MAX_ENTRIES:
        raise InvalidPolicy(f"{key}: at most {MAX_ENTRIES} entries")
    return value


def check_host(host: object) -> str:
    """An exact hostname or `*.` + hostname, lower-cased and IDNA-normalised."""
    if not isinstance(host, str) or not host:
        raise InvalidPolicy(f"allow_hosts: not a hostname: {host!r}")
    wildcard = host.startswith("*.")
    name = host[2:] if wildcard else host
    try:
        name = name.rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise InvalidPolicy(f"allow_hosts: not a hostname: {host!r}") from None
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(LABEL_RE.match(label) for label in labels):
        raise InvalidPolicy(f"allow_hosts: not a hostname (a wildcard only as a leading *.): {host!r}")
    return f"*.{name}" if wildcard else name


def check_cidr(cidr: object) -> str:
    try:
        net = ipaddress.IPv4Network(cidr, strict=False) if isinstance(cidr, str) else None
    except ValueError:
        net = None
    if net is None:
        raise InvalidPolicy(f"allow_cidrs: not an IPv4 CIDR: {cidr!r}")
    if any(net.subnet_of(never) for never in NEVER):
        raise InvalidPolicy(f"allow_cidrs: {net} is private: private ranges are always denied")
    return str(net)


def always_denied(extra: list[str] | tuple[str, ...] = ()) -> list[ipaddress.IPv4Network]:
    """NEVER plus the given networks (connected subnets, the sandbox subnet, network.deny_cidrs)."""
    return [*NEVER, *(ipaddress.IPv4Network(c, strict=False) for c in extra)]


@dataclass
class Denylist:
    """Addresses no sandbox may reach (for stripping DNS answers)."""

    networks: list[ipaddress.IPv4Network] = field(default_factory=lambda: list(NEVER))

    def denies(self, ip: str) -> bool:
        try:
            addr = ipaddress.IPv4Address(ip)
        except ValueError:
            return True
        return any(addr in net for net in self.networks)
