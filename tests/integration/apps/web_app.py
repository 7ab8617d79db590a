"""A small web app the proxy tests run inside sandboxes (standard library only, like the image).

    python3 web_app.py PORT [BIND]

Any path answers JSON describing the request it received (method, path, query, headers, body
size), except:
  /sse     server-sent events: `first`, then `second` only once /tmp/sse-go exists, then the end
  /big?n=  n bytes of a repeating pattern
  /echo    the request body back
  /ws      a WebSocket echo server (text and binary, ping/pong, close)
"""

import base64
import hashlib
import json
import os
import struct
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def handle_any(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            return self.websocket()
        if url.path == "/sse":
            return self.sse()
        if url.path == "/big":
            n = int(parse_qs(url.query).get("n", ["0"])[0])
            return self.reply(200, (b"0123456789abcdef" * (n // 16 + 1))[:n], "application/octet-stream")
        if url.path == "/stream":  # n bytes with a Content-Length, written 64 KiB at a time
            return self.stream(int(parse_qs(url.query).get("n", ["0"])[0]))
        if url.path == "/cookie":  # a cookie for the whole publish domain (a tenant tossing cookies)
            body = b"{}"
            self.send_response(200)
            self.send_header("Set-Cookie", f"toss=1; Domain={parse_qs(url.query)['domain'][0]}; Path=/")
            self.send_header("Set-Cookie", "own=1; Path=/")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        data = self.body()
        if url.path == "/echo":
            return self.reply(200, data, "application/octet-stream")
        info = {
            "method": self.command,
            "path": url.path,
            "query": url.query,
            "body_bytes": len(data),
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "port": self.server.server_port,
        }
        self.reply(200, json.dumps(info).encode())

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = handle_any

    def stream(self, n: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        chunk, sent = b"x" * 65536, 0
        try:
            while sent < n:
                self.wfile.write(chunk[: n - sent])
                sent += min(len(chunk), n - sent)
        except OSError:
            pass
        finally:
            with open(f"/tmp/stream_sent_{self.server.server_port}", "w") as f:
                f.write(str(sent))

    def sse(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(b"data: first\n\n")
        self.wfile.flush()
        deadline = time.time() + 30
        while not os.path.exists("/tmp/sse-go") and time.time() < deadline:
            time.sleep(0.05)
        self.wfile.write(b"data: second\n\n")
        self.wfile.flush()
        self.close_connection = True

    # ---------------------------------------------------------------- WebSocket echo

    def websocket(self) -> None:
        key = self.headers["Sec-WebSocket-Key"].encode()
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        offered = [p.strip() for p in self.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        if offered:
            self.send_header("Sec-WebSocket-Protocol", offered[0])
        self.end_headers()
        self.wfile.flush()
        while True:
            frame = self.read_frame()
            if frame is None:
                return
            opcode, payload = frame
            if opcode == 8:  # the TCP connection stays open after the close, as in many real apps
                self.send_frame(8, payload[:2])
                return
            if opcode == 9:
                self.send_frame(10, payload)
            elif opcode == 1 and payload.startswith(b"big:"):  # the app sends a huge message
                self.send_frame(2, b"b" * int(payload[4:]))
            elif opcode in (1, 2):
                self.send_frame(opcode, payload)

    def read_frame(self):
        head = self.rfile.read(2)
        if len(head) < 2:
            return None
        opcode, n = head[0] & 0x0F, head[1] & 0x7F
        if n == 126:
            n = struct.unpack(">H", self.rfile.read(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", self.rfile.read(8))[0]
        mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
        data = self.rfile.read(n)
        return opcode, bytes(b ^ mask[i % 4] for i, b in enumerate(data))

    def send_frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            head = struct.pack(">BB", 0x80 | opcode, n)
        elif n < 65536:
            head = struct.pack(">BBH", 0x80 | opcode, 126, n)
        else:
            head = struct.pack(">BBQ", 0x80 | opcode, 127, n)
        self.wfile.write(head + payload)
        self.wfile.flush()


if __name__ == "__main__":
    port = int(sys.argv[1])
    bind = sys.argv[2] if len(sys.argv) > 2 else "0.0.0.0"
    ThreadingHTTPServer((bind, port), Handler).serve_forever()
