"""kiln agent wire protocol, shared by the guest agent and the host client. Standard library only.

Every frame is: 4-byte big-endian length (= 1 + payload length), 1 type byte, payload. The first
frame from the host on a TCP connection is AUTH carrying the sandbox's token; the second is the
request (EXEC_REQ, EXEC_LIST_REQ, ACTIVITY_REQ, FILE_*, PORTS_REQ, ...). Once a request is
answered in full, the connection takes another request without AUTH, unless it carried a stream
the host could have cut short (stdin, a terminal, a forward, a watch, a file write) or an ERROR:
then the agent closes it. Agents that can do this say "keepalive": true in ACTIVITY_RESP (an agent
restored from an older snapshot cannot). JSON payloads are UTF-8. Unknown frame types are
ignored by both sides (forward compatibility).
"""

from __future__ import annotations

import json
import struct

AGENT_PORT = 1024
MAX_FRAME = 1 << 20  # payload bytes
HEADER = struct.Struct(">IB")

# Stream frames
STDIN = 0x01  # host -> guest bytes; an empty payload closes the child's stdin
STDOUT = 0x02
STDERR = 0x03
RESIZE = 0x04  # JSON {"rows","cols"}
EXIT = 0x05  # JSON {"exit_code", "timed_out"?}
ERROR = 0x06  # JSON {"error": message, "kind": "invalid" | "failed"}
KILL = 0x07  # host asks the guest to kill the process group
STARTED = 0x08  # JSON {"pid"}: the command was spawned (sent before any output)
# Requests / responses
EXEC_REQ = 0x10  # JSON, see guest.handle_exec
AUTH = 0x11  # token bytes
EXEC_LIST_REQ = 0x30
EXEC_LIST_RESP = 0x31
EXEC_KILL = 0x32
SESSION_INFO = 0x33
ACTIVITY_REQ = 0x40
ACTIVITY_RESP = 0x41
FILE_READ = 0x50  # JSON {"path","offset","limit","max_bytes"} -> FILE_INFO, STDOUT chunks, EXIT
FILE_INFO = 0x51  # JSON {"size","mode","is_dir","mtime"}
FILE_WRITE = 0x52  # JSON {"path","size","mode"}, then STDIN chunks -> EXIT
FILE_STAT = 0x54  # JSON {"path"} -> FILE_INFO
FILE_LS = 0x56  # JSON {"path"} -> FILE_LS_RESP
FILE_LS_RESP = 0x57
FILE_MKDIR = 0x58  # JSON {"path","user"?}: mkdir -p, new directories owned by the user -> EXIT {"created"}
FILE_MOVE = 0x59  # JSON {"source","destination"} -> EXIT
FILE_REMOVE = 0x5A  # JSON {"path"}: a file, or a directory with everything in it -> EXIT
FILE_ENTRIES = 0x5B  # JSON {"path","depth"}: rich entries (owner, permissions, links) -> FILE_ENTRIES_RESP
FILE_ENTRIES_RESP = 0x5C  # depth 0: the path's own entry only
FILE_REQUESTS = (FILE_READ, FILE_WRITE, FILE_STAT, FILE_LS, FILE_MKDIR, FILE_MOVE, FILE_REMOVE, FILE_ENTRIES)
PORTS_REQ = 0x60  # -> PORTS_RESP JSON [{"port", "loopback_only"}] (the agent's own port left out)
PORTS_RESP = 0x61
FORWARD_REQ = 0x62  # JSON {"port"} -> FORWARD_OK, then the connection is a raw byte relay to that port
FORWARD_OK = 0x63
WATCH_REQ = 0x80  # JSON {"path","recursive"} -> WATCH_OK, then WATCH_EVENT JSON {"name","type"} until the host closes
WATCH_OK = 0x81
WATCH_EVENT = 0x82
SECRETS_SET = 0x70  # JSON {"env": {...}}: secret environment for every exec and session -> EXIT
TOKEN_SET = 0x71  # the token every later connection must bring (a copy's own, not its origin's) -> EXIT

# ERROR kinds: "invalid" is the caller's fault (maps to HTTP 400), "not_found" to 404, "failed" is not.
INVALID = "invalid"
NOT_FOUND = "not_found"
FAILED = "failed"
EXISTS = "exists"  # what a request would make is there already (409)
LIMIT = "limit"  # a per-sandbox limit of the agent (sessions, connections) is reached


def encode(ftype: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_FRAME:
        raise ValueError(f"frame payload too large: {len(payload)}")
    return HEADER.pack(len(payload) + 1, ftype) + payload


def encode_json(ftype: int, obj) -> bytes:
    return encode(ftype, json.dumps(obj, separators=(",", ":")).encode())


def parse_header(header: bytes) -> tuple[int, int]:
    """Return (frame type, payload length) from the 5 header bytes."""
    length, ftype = HEADER.unpack(header)
    if length < 1 or length - 1 > MAX_FRAME:
        raise ValueError(f"bad frame length {length}")
    return ftype, length - 1
