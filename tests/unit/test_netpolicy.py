"""Egress policies (kiln/netpolicy.py) and the resolver's decisions (engine/gvisor/resolver.py), without
a sandbox: the resolver asks a real UDP server on loopback standing in for the upstream."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import ClassVar

import pytest
from dnslib import QTYPE, RCODE, RR, A, DNSRecord

from kiln.engine.gvisor.resolver import MIN_TTL, Resolver
from kiln.netpolicy import DENY, Denylist, InvalidPolicy, NetPolicy, always_denied, parse_policy


def test_policies_are_checked_and_normalised():
    p = parse_policy(
        {
            "default": "deny",
            "allow_hosts": ["Example.COM.", "*.GitHub.com", "example.com"],
            "allow_cidrs": ["203.0.113.7/24"],
        }
    )
    assert p == NetPolicy(DENY, ("example.com", "*.github.com"), ("203.0.113.0/24",))
    assert parse_policy({}) == NetPolicy("public") and parse_policy({}, "deny").default == "deny"
    assert parse_policy({"allow_hosts": ["bücher.example"]}).allow_hosts == ("xn--bcher-kva.example",)
    for bad, why in [
        ([], "object"),
        ({"default": "open"}, "default"),
        ({"allow_hosts": "example.com"}, "list"),
        ({"allow_hosts": ["*"]}, "hostname"),
        ({"allow_hosts": ["a.*.com"]}, "hostname"),
        ({"allow_hosts": ["localhost"]}, "hostname"),  # one label: not a public name
        ({"allow_hosts": ["-a.com"]}, "hostname"),
        ({"allow_cidrs": ["10.0.0.0/8"]}, "private"),
        ({"allow_cidrs": ["192.168.4.0/24"]}, "private"),
        ({"allow_cidrs": ["2001:db8::/32"]}, "IPv4"),
        ({"allow_cidrs": ["nope"]}, "IPv4"),
        ({"allow_hosts": [f"h{i}.example" for i in range(300)]}, "at most"),
        ({"allowed": []}, "unknown field"),
    ]:
        with pytest.raises(InvalidPolicy, match=why):
            parse_policy(bad)
    assert parse_policy({"allow_cidrs": ["0.0.0.0/0"]}).allow_cidrs == (
        "0.0.0.0/0",
    )  # partly private: its private part stays denied


def test_names_match_exactly_or_as_strict_subdomains():
    p = NetPolicy(DENY, ("allowed.test", "*.github.com"))
    assert p.allows_name("allowed.test.") and p.allows_name("ALLOWED.test")
    assert not p.allows_name("a.allowed.test") and not p.allows_name("notallowed.test")
    assert p.allows_name("api.github.com") and p.allows_name("a.b.github.com")
    assert not p.allows_name("github.com") and not p.allows_name("evilgithub.com")
    assert NetPolicy().allows_name("anything.at.all")


def test_the_denylist_covers_private_ranges_and_extras():
    d = Denylist(always_denied(["198.51.100.0/30"]))
    for ip in (
        "10.1.2.3",
        "127.0.0.1",
        "169.254.169.254",
        "192.168.0.1",
        "172.16.5.5",
        "100.64.0.1",
        "198.51.100.1",
        "0.1.2.3",
        "not-an-ip",
    ):
        assert d.denies(ip), ip
    assert not d.denies("203.0.113.10") and not d.denies("198.51.100.5")


class Upstream:
    """A UDP DNS server on loopback: fixed answers, and a record of what it was asked."""

    ADDRESS = "127.0.0.77"
    RECORDS: ClassVar[dict[str, list[str]]] = {
        "allowed.test.": ["203.0.113.10", "10.0.0.1"],
        "other.test.": ["203.0.113.12"],
    }

    def __init__(self):
        self.asked: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((self.ADDRESS, 53))
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                data, addr = self.sock.recvfrom(4096)
            except OSError:
                return
            q = DNSRecord.parse(data)
            name = str(q.q.qname)
            self.asked.append(name)
            reply = q.reply()
            for ip in self.RECORDS.get(name, []):
                reply.add_answer(RR(name, QTYPE.A, rdata=A(ip), ttl=5))
            if name not in self.RECORDS:
                reply.header.rcode = RCODE.NXDOMAIN
            self.sock.sendto(reply.pack(), addr)

    def close(self):
        self.sock.close()


@pytest.fixture
def upstream():
    u = Upstream()
    yield u
    u.close()


def ask(resolver: Resolver, name: str, qtype: str = "A") -> DNSRecord:
    reply = asyncio.run(resolver.resolve("veth0", DNSRecord.question(name, qtype).pack()))
    assert reply is not None
    return DNSRecord.parse(reply)


def test_the_resolver_answers_by_policy_strips_private_answers_and_allows_before_replying(upstream):
    allowed: list[tuple[str, list]] = []
    policies = {"veth0": NetPolicy(DENY, ("allowed.test",))}
    resolver = Resolver(
        "10.77.255.254", [Upstream.ADDRESS], Denylist(), policies.get, lambda i, a: allowed.append((i, a))
    )

    r = ask(resolver, "allowed.test")
    assert [str(rr.rdata) for rr in r.rr] == ["203.0.113.10"]  # 10.0.0.1 removed (rebinding)
    assert allowed == [("veth0", [("203.0.113.10", MIN_TTL)])]  # TTL 5 clamped up

    r = ask(resolver, "other.test")
    assert r.header.rcode == RCODE.NXDOMAIN and "other.test." not in upstream.asked  # never asked upstream
    r = ask(resolver, "allowed.test", "AAAA")
    assert r.header.rcode == RCODE.NOERROR and r.rr == []  # no IPv6
    assert asyncio.run(resolver.resolve("veth0", b"\x00garbage")) is None
    policies["veth0"] = NetPolicy()  # public: everything is asked, nothing needs letting through
    allowed.clear()
    assert [str(rr.rdata) for rr in ask(resolver, "other.test").rr] == ["203.0.113.12"]
    assert allowed == []
    assert ask(resolver, "missing.test").header.rcode == RCODE.NXDOMAIN  # upstream's own answer
    assert (
        asyncio.run(
            Resolver("10.0.0.1", [], Denylist(), {}.get, lambda *a: None).resolve("x", DNSRecord.question("a.b").pack())
        )
        is not None
    )
