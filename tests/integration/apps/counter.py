"""The fork tests' source app: state that only survives a fork if memory, files and sockets do.

    python3 counter.py PORT

In memory: a counter (+1 every 20 ms), a random token, 64 MB of random ballast and its SHA-256.
On disk: /root/hits.log, one line per tick, kept open in append mode. On PORT: GET / answers JSON
{counter, token, ballast_ok, pid, lines} (lines: what the file holds now, read back by path).
"""

import hashlib
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

token = os.urandom(8).hex()
ballast = os.urandom(64 << 20)
digest = hashlib.sha256(ballast).hexdigest()
counter = 0
log = open("/root/hits.log", "a", buffering=1)


def tick() -> None:
    global counter
    while True:
        counter += 1
        log.write(f"{counter}\n")
        time.sleep(0.02)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        with open("/root/hits.log") as f:
            lines = f.read().split()
        body = json.dumps(
            {
                "counter": counter,
                "token": token,
                "ballast_ok": hashlib.sha256(ballast).hexdigest() == digest,
                "pid": os.getpid(),
                "lines": len(lines),
                "last_line": int(lines[-1]) if lines else 0,
                "sequential": lines == [str(i) for i in range(int(lines[0]), int(lines[0]) + len(lines))]
                if lines
                else True,
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


threading.Thread(target=tick, daemon=True).start()
open("/tmp/counter-ready", "w").write(token)
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
