"""The code interpreter's server inside a `code-interpreter-v1` sandbox: E2B's `/execute` NDJSON contract
and `/contexts` on port 49999, over Jupyter kernels driven with jupyter_client (Python and bash).

Runs on the image's own python3 with the packages the image installed from PyPI (PYTHONPATH); it is
copied into the image at build (kiln/images/recipes.py), never imported by the daemon. One kernel per
context; a context runs one execution at a time; a client that goes away interrupts its execution.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import select
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from jupyter_client.manager import KernelManager

PORT = 49999
KERNELS = {"python": "python3", "bash": "bash"}
FORMATS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
}
HOME = os.environ.get("HOME") or "/home/user"


class Context:
    def __init__(self, language: str, cwd: str):
        self.id = uuid.uuid4().hex
        self.language = language
        self.cwd = cwd
        self.lock = threading.Lock()
        self.manager = KernelManager(kernel_name=KERNELS[language])
        self.manager.start_kernel(cwd=cwd)
        self.client = self.manager.blocking_client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def json(self) -> dict:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}

    def restart(self) -> None:
        with self.lock:
            self.client.stop_channels()
            self.manager.restart_kernel(now=True)
            self.client = self.manager.blocking_client()
            self.client.start_channels()
            self.client.wait_for_ready(timeout=60)

    def shutdown(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)

    def run(self, code: str, env: dict[str, str], emit) -> None:
        """Execute `code`, calling emit(message) for each NDJSON message; False from emit: the client left."""
        with self.lock:
            try:
                self.set_env(env)
                self.execute(code, emit)
            finally:
                self.unset_env(env)

    def set_env(self, env: dict[str, str]) -> None:
        """The execution's own env vars (bash: exported, and unset again after)."""
        if env and self.language == "python":
            keys, values = json.dumps(list(env)), json.dumps(env)  # JSON of strings is a Python literal
            self.silent(
                f"import os as __e2b_os; __e2b_saved = {{k: __e2b_os.environ.get(k) for k in {keys}}}; "
                f"__e2b_os.environ.update({values})"
            )
        elif env:
            self.silent(" ".join(f"export {k}={shell_quote(v)};" for k, v in env.items()))

    def unset_env(self, env: dict[str, str]) -> None:
        if env and self.language == "python":
            self.silent(
                "[__e2b_os.environ.pop(k, None) if v is None else __e2b_os.environ.__setitem__(k, v) "
                "for k, v in __e2b_saved.items()]"
            )
        elif env:
            self.silent("unset " + " ".join(env))

    def execute(self, code: str, emit) -> None:
        msg_id = self.client.execute(code, allow_stdin=False)
        while True:
            try:
                msg = self.client.get_iopub_msg(timeout=1)
            except queue.Empty:
                if not emit(None):  # a probe: is the client still there?
                    self.manager.interrupt_kernel()
                    return
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                ok = emit({"type": content["name"], "text": content["text"], "timestamp": now()})
            elif kind in ("execute_result", "display_data"):
                ok = emit({"type": "result", **formats(content["data"]), "is_main_result": kind == "execute_result"})
            elif kind == "error":
                trace = "\n".join(content.get("traceback") or [])
                ok = emit({"type": "error", "name": content["ename"], "value": content["evalue"], "traceback": trace})
            elif kind == "execute_input":
                ok = emit({"type": "number_of_executions", "execution_count": content.get("execution_count")})
            elif kind == "status" and content["execution_state"] == "idle":
                emit({"type": "end_of_execution"})
                return
            else:
                ok = True
            if not ok:
                self.manager.interrupt_kernel()
                return

    def silent(self, code: str) -> None:
        self.client.execute_interactive(code, silent=True, store_history=False, timeout=30)


def shell_quote(v: str) -> str:
    return "'" + v.replace("'", "'\"'\"'") + "'"


def formats(data: dict) -> dict:
    out: dict = {}
    for mime, value in data.items():
        name = FORMATS.get(mime)
        if name:
            out[name] = value
        else:
            out.setdefault("extra", {})[mime] = value
    return out


def now() -> str:
    return datetime.now(UTC).isoformat()


class Contexts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_id: dict[str, Context] = {}
        self.defaults: dict[str, Context] = {}

    def create(self, language: str, cwd: str) -> Context:
        if language not in KERNELS:
            raise ValueError(f"language must be one of {', '.join(KERNELS)}")
        ctx = Context(language, cwd)
        with self.lock:
            self.by_id[ctx.id] = ctx
        return ctx

    def default(self, language: str) -> Context:
        with self.lock:
            ctx = self.defaults.get(language)
        if ctx is None:
            ctx = self.create(language, HOME)
            with self.lock:
                ctx = self.defaults.setdefault(language, ctx)
        return ctx


CONTEXTS = Contexts()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:
        pass

    def reply(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self) -> dict:
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n) or b"{}") if n else {}

    def do_GET(self) -> None:
        if self.path == "/health":
            return self.reply(200, "OK")
        if self.path == "/contexts":
            return self.reply(200, [c.json() for c in list(CONTEXTS.by_id.values())])
        self.reply(404, {"error": f"no route {self.path}"})

    def do_DELETE(self) -> None:
        parts = self.path.strip("/").split("/")
        if len(parts) == 2 and parts[0] == "contexts":
            ctx = CONTEXTS.by_id.pop(parts[1], None)
            if ctx is None:
                return self.reply(404, {"error": f"context {parts[1]} not found"})
            ctx.shutdown()
            return self.reply(200, {})
        self.reply(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:
        try:
            req = self.body()
        except ValueError:
            return self.reply(400, {"error": "the body must be JSON"})
        parts = self.path.strip("/").split("/")
        if self.path == "/contexts":
            try:
                ctx = CONTEXTS.create(req.get("language") or "python", req.get("cwd") or HOME)
            except ValueError as e:
                return self.reply(400, {"error": str(e)})
            return self.reply(200, ctx.json())
        if len(parts) == 3 and parts[0] == "contexts" and parts[2] == "restart":
            found = CONTEXTS.by_id.get(parts[1])
            if found is None:
                return self.reply(404, {"error": f"context {parts[1]} not found"})
            found.restart()
            return self.reply(200, {})
        if self.path == "/execute":
            return self.execute(req)
        self.reply(404, {"error": f"no route {self.path}"})

    def execute(self, req: dict) -> None:
        language = req.get("language") or "python"
        if req.get("context_id"):
            ctx = CONTEXTS.by_id.get(req["context_id"])
            if ctx is None:
                return self.reply(404, {"error": f"context {req['context_id']} not found"})
        elif language in KERNELS:
            ctx = CONTEXTS.default(language)
        else:
            return self.reply(400, {"error": f"language must be one of {', '.join(KERNELS)}"})
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def emit(message: dict | None) -> bool:
            """Write one message (None: only ask whether the client is still there)."""
            try:
                if message is None:
                    readable, _, _ = select.select([self.connection], [], [], 0)
                    return not readable or self.connection.recv(1, socket.MSG_PEEK) != b""
                data = json.dumps(message).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                return True
            except OSError:
                return False

        ctx.run(str(req.get("code") or ""), {str(k): str(v) for k, v in (req.get("env_vars") or {}).items()}, emit)
        with contextlib.suppress(OSError):
            self.wfile.write(b"0\r\n\r\n")


def main() -> None:
    server = ThreadingHTTPServer(("0.0.0.0", PORT), Handler)
    server.daemon_threads = True
    threading.Thread(target=CONTEXTS.default, args=("python",), daemon=True).start()  # warm, as E2B's does
    while True:
        try:
            server.serve_forever()
        except Exception:  # keep serving whatever one request did
            time.sleep(0.1)


if __name__ == "__main__":
    main()
