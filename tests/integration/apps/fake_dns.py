"""A DNS server for the fake internet of the egress tests (run inside the test's namespace).

    python fake_dns.py ADDRESS

Fixed A records; AAAA for allowed.test too (kiln must answer AAAA empty); everything else NXDOMAIN.
Every query it gets is appended to $FAKE_DNS_LOG (a test checks that denied names never arrive).
"""

import os
import socket
import sys

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSRecord

RECORDS = {
    "allowed.test.": ["203.0.113.10"],
    "a.allowed.test.": ["203.0.113.11"],
    "other.test.": ["203.0.113.12"],
    "rebind.test.": ["10.0.0.1"],
    "mixed.test.": ["203.0.113.10", "10.254.99.1"],
}


def answer(data: bytes) -> bytes:
    query = DNSRecord.parse(data)
    reply = query.reply()
    name = str(query.q.qname).lower()
    if os.environ.get("FAKE_DNS_LOG"):
        with open(os.environ["FAKE_DNS_LOG"], "a") as f:
            f.write(name + "\n")
    if name not in RECORDS:
        reply.header.rcode = RCODE.NXDOMAIN
    elif query.q.qtype == QTYPE.A:
        for ip in RECORDS[name]:
            reply.add_answer(RR(name, QTYPE.A, rdata=A(ip), ttl=300))
    elif query.q.qtype == QTYPE.AAAA:
        reply.add_answer(RR(name, QTYPE.AAAA, rdata=AAAA("2001:db8::1"), ttl=300))
    return reply.pack()


def main() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((sys.argv[1], 53))
    while True:
        data, addr = sock.recvfrom(4096)
        try:
            sock.sendto(answer(data), addr)
        except Exception as e:  # a broken query: no answer
            print(f"fake dns: {e}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
