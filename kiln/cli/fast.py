"""The hot verbs of `kiln` on the standard library alone: `exec`, `list`, `inspect`, `file read` and
`file write` (main.py answers `--version` before importing even this). Agents call these in loops,
and Typer, Rich and httpx cost ~0.5 s of imports before the first byte. main.py tries this first;
anything it does not parse (help, another verb, an odd flag) goes to the Typer app, which prints the
proper help or error. The Typer commands of these verbs call the same functions, so both ways behave
alike.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import sys
from collections.abc import Iterator
from typing import IO, Any
from urllib.parse import quote, urlencode, urlsplit

from .settings import client_settings

NDJSON = "application/x-ndjson"
EXEC_DEFAULT_TIMEOUT = 300
CHUNK = 1 << 20
PROGRESS_ABOVE = 8 * 1024 * 1024  # a larger upload to a terminal gets the Typer command's progress bar


class Failed(Exception):
    """An API error or an unreachable daemon: printed as `kiln: <message>`, exit status 1."""


class Api:
    """One HTTP/1.1 connection to the daemon (http.client: no import cost worth measuring)."""

    def __init__(self, url: str, token: str):
        parts = urlsplit(url)
        self.url = url
        self.base = parts.path.rstrip("/")
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self.conn = cls(parts.hostname or "127.0.0.1", parts.port, timeout=None, blocksize=CHUNK)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def send(
        self, method: str, path: str, params: dict | None = None, body: Any = None, headers: dict | None = None
    ) -> http.client.HTTPResponse:
        target = self.base + path + (f"?{urlencode(params)}" if params else "")
        try:
            self.conn.request(method, target, body=body, headers={**self.headers, **(headers or {})})
            r = self.conn.getresponse()
        except OSError as e:
            raise Failed(f"cannot reach kiln at {self.url}: {e}") from e
        if r.status >= 400:
            raw = r.read()
            try:
                message = json.loads(raw)["error"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode(errors="replace").strip() or r.reason
            raise Failed(message)
        return r

    def json(self, method: str, path: str, body: Any = None, **kw) -> Any:
        data = None if body is None else json.dumps(body)
        r = self.send(method, path, body=data, headers={"Content-Type": "application/json"}, **kw)
        raw = r.read()
        return json.loads(raw) if raw else None


def sandbox_path(sandbox: str, rest: str = "") -> str:
    return f"/sandboxes/{quote(sandbox, safe='')}{rest}"


# ---------------------------------------------------------------- the verbs


def exec_command(
    api: Api,
    sandbox: str,
    cmd: list[str],
    timeout: int | None = None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    user: str | None = None,
    as_json: bool = False,
    detach: bool = False,
) -> int:
    """Run a command; returns its exit code. Output streams when stdout is a terminal."""
    body: dict[str, Any] = {"cmd": cmd}
    for key, value in (("timeout_sec", timeout), ("env", env), ("cwd", cwd), ("user", user)):
        if value:
            body[key] = value
    if detach:
        body["detach"] = True
        started = api.json("POST", sandbox_path(sandbox, "/exec"), body)
        print(json.dumps(started, indent=2) if as_json else f"{started['pid']}\t{started['output_file']}")
        return 0
    stream = not as_json and (sys.stdout.isatty() or os.environ.get("KILN_FORCE_STREAM") == "1")
    if not stream:
        result = api.json("POST", sandbox_path(sandbox, "/exec"), body)
        if as_json:
            print(json.dumps(result, indent=2))
        else:
            sys.stdout.write(result["stdout"])
            sys.stderr.write(result["stderr"])
        return int(result["exit_code"])
    r = api.send("POST", sandbox_path(sandbox, "/exec"), body=json.dumps(body), headers={"Accept": NDJSON})
    for event in ndjson(r):
        kind = event.get("type")
        if kind in ("stdout", "stderr"):
            out = sys.stdout if kind == "stdout" else sys.stderr
            out.write(event["data"])
            out.flush()
        elif kind == "exit":
            return int(event["exit_code"])
        elif kind == "error":
            raise Failed(event.get("data") or "exec failed")
    raise Failed("the exec stream ended without an exit status")


def ndjson(r: http.client.HTTPResponse) -> Iterator[dict]:
    while line := r.readline():
        if line.strip():
            yield json.loads(line)


def list_sandboxes(api: Api, as_json: bool) -> None:
    rows = api.json("GET", "/sandboxes")
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows, ["name", "id", "status", "thermal", "cpus", "memory_mb", "ip"])


def inspect_sandbox(api: Api, sandbox: str) -> None:
    print(json.dumps(api.json("GET", sandbox_path(sandbox)), indent=2))


def read_file(api: Api, sandbox: str, path: str) -> None:
    r = api.send("GET", sandbox_path(sandbox, "/files"), params={"path": path})
    while chunk := r.read(CHUNK):
        sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()


def write_file(api: Api, sandbox: str, path: str, source: IO[bytes], size: int, mode: str | None, as_json: bool):
    """Stream `size` bytes of source into the sandbox's file (atomically, on the agent's side)."""
    params = {"path": path} | ({"mode": mode} if mode else {})
    headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
    r = api.send("PUT", sandbox_path(sandbox, "/files"), params=params, body=source, headers=headers)
    result = json.loads(r.read() or b"{}")
    if as_json:
        print(json.dumps(result, indent=2))


def print_table(rows: list[dict], columns: list[str]) -> None:
    cells = [[c.upper() for c in columns]] + [
        ["" if r.get(c) is None else str(r.get(c)) for c in columns] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def fail(message: str) -> int:
    red = sys.stderr.isatty()
    sys.stderr.write(f"{chr(27)}[31mkiln: {message}{chr(27)}[0m\n" if red else f"kiln: {message}\n")
    return 1


# ---------------------------------------------------------------- parsing the fast cases


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln", add_help=False, exit_on_error=False, allow_abbrev=False)
    p.add_argument("--url")
    p.add_argument("--token")
    verbs = p.add_subparsers(dest="verb")
    for name in ("list", "ls"):
        verbs.add_parser(name, add_help=False).add_argument("--json", action="store_true")
    ins = verbs.add_parser("inspect", add_help=False)
    ins.add_argument("sandbox")
    ins.add_argument("--json", action="store_true")
    ex = verbs.add_parser("exec", add_help=False)
    ex.add_argument("sandbox")
    ex.add_argument("--timeout", type=int)
    ex.add_argument("--env", "-e", action="append", default=[])
    ex.add_argument("--cwd")
    ex.add_argument("--user")
    ex.add_argument("--json", action="store_true")
    ex.add_argument("--detach", action="store_true")
    files = verbs.add_parser("file", add_help=False).add_subparsers(dest="file_verb")
    rd = files.add_parser("read", add_help=False)
    rd.add_argument("sandbox")
    rd.add_argument("path")
    wr = files.add_parser("write", add_help=False)
    wr.add_argument("sandbox")
    wr.add_argument("path")
    wr.add_argument("--from", dest="source")
    wr.add_argument("--mode")
    wr.add_argument("--json", action="store_true")
    return p


def env_pairs(pairs: list[str]) -> dict[str, str] | None:
    if any("=" not in p for p in pairs):
        raise Failed(f"--env must be KEY=VALUE: {next(p for p in pairs if '=' not in p)!r}")
    return dict(p.split("=", 1) for p in pairs) or None


def main(argv: list[str]) -> int | None:
    """Run argv if it is a fast case and return the exit status; None: not one, use the Typer app."""
    if not argv or argv[0] not in ("list", "ls", "inspect", "exec", "file", "--url", "--token"):
        return None
    if any(a in ("--help", "-h") for a in argv):
        return None
    cmd: list[str] = []
    if "exec" in argv and "--" in argv:  # everything after -- is the command, never options
        cut = argv.index("--")
        argv, cmd = argv[:cut], argv[cut + 1 :]
    try:
        args, rest = parser().parse_known_args(argv)
    except (argparse.ArgumentError, SystemExit):
        return None
    if args.verb is None or (args.verb == "file" and args.file_verb is None):
        return None
    if rest and not (args.verb == "exec" and not cmd):
        return None
    if args.verb == "exec":
        cmd = cmd or rest
        if not cmd:
            return None
    try:
        return run(args, cmd)
    except Failed as e:
        return fail(str(e))
    except KeyboardInterrupt:
        return 130


def run(args: argparse.Namespace, cmd: list[str]) -> int | None:
    source = None
    if args.verb == "file" and args.file_verb == "write" and args.source:
        try:
            source = open(args.source, "rb")  # noqa: SIM115 (closed by the process exit)
        except OSError as e:
            raise Failed(f"{args.source}: {e.strerror}") from e
        if os.fstat(source.fileno()).st_size > PROGRESS_ABOVE and not args.json and sys.stderr.isatty():
            return None  # the Typer command shows a progress bar
    api = Api(*client_settings(args.url, args.token))
    if args.verb in ("list", "ls"):
        list_sandboxes(api, args.json)
    elif args.verb == "inspect":
        inspect_sandbox(api, args.sandbox)
    elif args.verb == "exec":
        return exec_command(
            api, args.sandbox, cmd, args.timeout, env_pairs(args.env), args.cwd, args.user, args.json, args.detach
        )
    elif args.file_verb == "read":
        read_file(api, args.sandbox, args.path)
    else:
        if source is None:
            data = sys.stdin.buffer.read()
            write_file(api, args.sandbox, args.path, io.BytesIO(data), len(data), args.mode, args.json)
        else:
            write_file(api, args.sandbox, args.path, source, os.fstat(source.fileno()).st_size, args.mode, args.json)
    return 0
