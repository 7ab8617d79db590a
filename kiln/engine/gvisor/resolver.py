"""The sandboxes' DNS resolver, in the daemon: what a sandbox may resolve is what its policy allows.

Every sandbox's resolv.conf names one constant address (the same for all, so a restored or forked
sandbox's file stays right); that address is on every sandbox's host veth, and one UDP socket per
veth (SO_BINDTODEVICE) tells which sandbox asks. For each query:
- a name the policy does not allow (deny mode) is NXDOMAIN at once, never sent upstream: arbitrary
  names cannot carry data out;
- AAAA is an empty answer (no IPv6 egress), so clients move on to A at once;
- anything else goes to the upstream resolvers; A records for addresses no sandbox may reach are
  removed from the answer (DNS rebinding), and in deny mode the remaining addresses are let through
  the sandbox's firewall (with the record's TTL, clamped) *before* the answer is sent.
Parsing and building messages is dnslib's; this module only decides.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from dnslib import QTYPE, RCODE, DNSRecord

from ...netpolicy import DENY, Denylist, NetPolicy

log = logging.getLogger("kiln.resolver")

UPSTREAM_TIMEOUT = 2.0
MIN_TTL, MAX_TTL = 30, 3600
MAX_INFLIGHT = 64  # queries being answered per sandbox; more are dropped (the client retries)

Allow = Callable[[str, list[tuple[str, int]]], None]  # (host_if, [(ip, seconds)]) -> into the set


class SandboxResolver(asyncio.DatagramProtocol):
    def __init__(self, resolver: Resolver, host_if: str):
        self.resolver, self.host_if = resolver, host_if
        self.transport: asyncio.DatagramTransport | None = None
        self.inflight: set[asyncio.Task] = set()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        if len(self.inflight) >= MAX_INFLIGHT:
            return
        task = asyncio.get_running_loop().create_task(self.answer(data, addr))
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)

    async def answer(self, data: bytes, addr) -> None:
        try:
            reply = await self.resolver.resolve(self.host_if, data)
        except Exception:
            log.exception("DNS query from %s failed", self.host_if)
            return
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        for task in self.inflight:
            task.cancel()


class Resolver:
    def __init__(
        self,
        address: str,
        upstreams: list[str],
        denylist: Denylist,
        policy_of: Callable[[str], NetPolicy | None],
        allow: Allow,
    ):
        self.address = address
        self.upstreams = upstreams
        self.denylist = denylist
        self.policy_of = policy_of  # host_if -> the policy of the sandbox behind it
        self.allow = allow
        self.listeners: dict[str, SandboxResolver] = {}

    async def listen(self, host_if: str) -> None:
        """Answer the sandbox behind host_if (its veth must carry the resolver address already)."""
        self.stop(host_if)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, host_if.encode())
            sock.bind((self.address, 53))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_datagram_endpoint(lambda: SandboxResolver(self, host_if), sock=sock)
        self.listeners[host_if] = protocol

    def stop(self, host_if: str) -> None:
        listener = self.listeners.pop(host_if, None)
        if listener is not None:
            listener.close()

    def close(self) -> None:
        for host_if in list(self.listeners):
            self.stop(host_if)

    async def resolve(self, host_if: str, data: bytes) -> bytes | None:
        try:
            query = DNSRecord.parse(data)
        except Exception:  # dnslib raises its own DNSError and others on garbage: not a query
            return None
        if query.header.qr or not query.questions:
            return None
        policy = self.policy_of(host_if)
        question = query.questions[0]
        name = str(question.qname)
        if policy is None or not policy.allows_name(name):
            return nxdomain(query)
        if question.qtype == QTYPE.AAAA:
            return query.reply().pack()  # no IPv6 from sandboxes: an empty answer
        raw = await self.ask_upstream(data)
        if raw is None:
            reply = query.reply()
            reply.header.rcode = RCODE.SERVFAIL
            return reply.pack()
        try:
            answer = DNSRecord.parse(raw)
        except Exception:
            return None
        kept, allowed = [], []
        for rr in answer.rr:
            if rr.rtype == QTYPE.AAAA:
                continue
            if rr.rtype == QTYPE.A:
                ip = str(rr.rdata)
                if self.denylist.denies(ip):
                    continue  # a private address: never handed to a sandbox
                allowed.append((ip, max(MIN_TTL, min(MAX_TTL, rr.ttl))))
            kept.append(rr)
        answer.rr = kept
        answer.header.id = query.header.id
        if policy.default == DENY and allowed:
            self.allow(host_if, allowed)  # through the firewall before the sandbox hears the address
        return answer.pack()

    async def ask_upstream(self, data: bytes) -> bytes | None:
        """The first upstream's answer (a fresh socket, so a random source port, per query)."""
        loop = asyncio.get_running_loop()
        for upstream in self.upstreams:
            query = UpstreamQuery(data, loop.create_future())
            try:
                transport, _ = await loop.create_datagram_endpoint(query.itself, remote_addr=(upstream, 53))
            except OSError as e:
                log.warning("DNS upstream %s: %s", upstream, e)
                continue
            try:
                return await asyncio.wait_for(query.answered, UPSTREAM_TIMEOUT)
            except TimeoutError:
                log.warning("DNS upstream %s: no answer in %.0f s", upstream, UPSTREAM_TIMEOUT)
            finally:
                transport.close()
        return None


class UpstreamQuery(asyncio.DatagramProtocol):
    """Sends one query on a connected UDP socket; the first reply with its id answers it."""

    def __init__(self, query: bytes, answered: asyncio.Future[bytes]):
        self.query, self.answered = query, answered

    def itself(self) -> UpstreamQuery:
        return self  # the protocol factory create_datagram_endpoint wants

    def connection_made(self, transport) -> None:
        transport.sendto(self.query)

    def datagram_received(self, data: bytes, addr) -> None:
        if data[:2] == self.query[:2] and not self.answered.done():  # same query id
            self.answered.set_result(data)


def nxdomain(query: DNSRecord) -> bytes:
    reply = query.reply()
    reply.header.rcode = RCODE.NXDOMAIN
    return reply.pack()
