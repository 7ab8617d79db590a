"""The `kiln` CLI, run as a real process, in a real terminal (a pty) where it matters."""

import contextlib
import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest
from websockets.sync.client import connect as ws_connect

from tests.conftest import start_web_app, wait_for


@pytest.fixture(scope="module")
def env(daemon, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")  # no ~/.kiln of the machine's
    return {
        **os.environ,
        "HOME": str(home),
        "KILN_URL": daemon.url,
        "KILN_TOKEN": daemon.admin_token,
        "KILN_CONFIG": str(daemon.config_path),
    }


def kiln(env, *args, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kiln.cli.main", *args], env=env, input=stdin, capture_output=True, timeout=120
    )


class Terminal:
    """A process on a pseudo-terminal, read and typed into like a person would."""

    def __init__(self, env, *args):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: becomes `kiln ...` with the pty as its terminal
            os.execve(sys.executable, [sys.executable, "-m", "kiln.cli.main", *args], env)
        self.out = b""

    def read_until(self, marker: bytes, timeout: float = 30) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.out:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {marker!r} in terminal output: {self.out[-2000:]!r}")
            if select.select([self.fd], [], [], left)[0]:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"terminal closed before {marker!r}: {self.out[-2000:]!r}")
                self.out += chunk
        return self.out

    def type(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self.fd], [], [], 0.1)[0]:  # keep draining, or the child may block writing
                with contextlib.suppress(OSError):
                    self.out += os.read(self.fd, 65536)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)
        raise AssertionError(f"kiln did not exit: {self.out[-2000:]!r}")


@pytest.fixture(scope="module")
def dev(env, api):
    r = kiln(env, "create", "dev", "--json")
    assert r.returncode == 0, r.stderr
    sb = json.loads(r.stdout)
    yield sb
    api.delete(f"/sandboxes/{sb['id']}")


def test_exec_exits_with_the_commands_code_in_a_terminal_and_in_a_pipe(env, dev):
    term = Terminal(env, "exec", "dev", "--", "sh", "-c", "echo streamed; exit 3")
    term.read_until(b"streamed")
    assert term.wait() == 3
    r = kiln(env, "exec", "dev", "--", "sh", "-c", "echo piped; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"piped\n", b"err\n")
    assert kiln(env, "exec", "dev", "--", "true").returncode == 0


def test_shell_runs_commands_detaches_and_reattaches_to_the_same_shell(env, dev):
    first = Terminal(env, "shell", "dev", "--new")
    first.read_until(b"$ ")  # the prompt: attached, and the local terminal is in raw mode
    first.type(b"export MARK=kept-$((6*7)); echo hi\r")
    first.read_until(b"\rhi\r\n")  # the output, not the echo of the typed line
    first.type(b"\x1c")  # Ctrl+\ detaches
    assert first.wait() == 0
    assert b"[detached]" in first.out
    again = Terminal(env, "shell", "dev")
    again.read_until(b"hi\r\n")  # the scrollback of the same shell
    time.sleep(0.5)
    again.type(b"echo mark=$MARK\r")
    again.read_until(b"mark=kept-42")  # the same shell, still running
    again.type(b"exit\r")
    assert again.wait() == 0


def test_json_output_parses(env, dev, api):
    listed = json.loads(kiln(env, "list", "--json").stdout)
    assert dev["id"] in [s["id"] for s in listed]
    assert json.loads(kiln(env, "inspect", "dev", "--json").stdout)["id"] == dev["id"]
    result = json.loads(kiln(env, "exec", "dev", "--json", "--", "echo", "x").stdout)
    assert result["exit_code"] == 0 and result["stdout"] == "x\n"
    start_web_app(api, dev, 8080)
    ports = json.loads(kiln(env, "ports", "dev", "--json").stdout)
    assert 8080 in [p["container_port"] for p in ports]
    rule = json.loads(kiln(env, "publish", "dev", "-p", "8080", "--json").stdout)
    assert rule["port"] == 8080 and rule["url"].startswith("http://")
    assert json.loads(kiln(env, "unpublish", "dev", "-p", "8080", "--json").stdout) == {"status": "unpublished"}
    assert kiln(env, "file", "write", "dev", "/workspace/cli.txt", stdin=b"from stdin").returncode == 0
    assert kiln(env, "file", "read", "dev", "/workspace/cli.txt").stdout == b"from stdin"
    names = [e["name"] for e in json.loads(kiln(env, "file", "ls", "dev", "/workspace", "--json").stdout)]
    assert "cli.txt" in names
    url = env["KILN_URL"].replace("http", "ws") + f"/sandboxes/{dev['id']}/ws?new=true&token={env['KILN_TOKEN']}"
    with ws_connect(url) as ws:  # a shell session that stays (detached) after this
        assert json.loads(ws.recv(timeout=30))["type"] == "session"
    sessions = json.loads(kiln(env, "ps", "dev", "--json").stdout)
    assert sessions and all(s["argv"] for s in sessions)
    shown = kiln(env, "ps", "dev").stdout.decode()
    for s in sessions:
        assert s["argv"] in shown  # the COMMAND column is filled in
    secret = kiln(env, "secret", "set", "CLI_SECRET", "--json", stdin=b"v\n")
    assert json.loads(secret.stdout)["name"] == "CLI_SECRET"
    assert [s["name"] for s in json.loads(kiln(env, "secret", "list", "--json").stdout)] == ["CLI_SECRET"]
    assert kiln(env, "secret", "delete", "CLI_SECRET").returncode == 0
    assert json.loads(kiln(env, "volume", "create", "cli-vol", "--size", "8", "--json").stdout)["size_mb"] == 8
    assert kiln(env, "volume", "delete", "cli-vol").returncode == 0


def test_errors_are_clear_and_exit_nonzero(env):
    r = kiln(env, "inspect", "no-such-sandbox")
    assert r.returncode == 1 and b'sandbox "no-such-sandbox" not found' in r.stderr
    r = kiln({**env, "KILN_TOKEN": "kiln_wrong"}, "list")
    assert r.returncode == 1 and b"invalid api key" in r.stderr
    r = kiln(env, "create", "bad name!")
    assert r.returncode == 1 and b"invalid sandbox name" in r.stderr


def test_the_hot_verbs_never_import_typer_rich_or_httpx(env, dev):
    heavy = ("typer", "rich", "httpx", "pydantic", "kiln.client")
    for args in (
        ["exec", "dev", "--", "true"],
        ["exec", "dev", "--json", "--", "echo", "x"],
        ["list"],
        ["inspect", "dev"],
        ["file", "read", "dev", "/etc/hostname"],
    ):
        r = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "kiln.cli.main", *args], env=env, capture_output=True, timeout=60
        )
        assert r.returncode == 0, (args, r.stderr[-2000:])
        imported = {line.split("|")[-1].strip() for line in r.stderr.decode().splitlines() if "import time:" in line}
        assert "kiln.cli.fast" in imported, args
        assert not [m for m in imported if m.split(".")[0] in heavy or m.startswith("kiln.client")], args
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "kiln.cli.main", "--version"], env=env, capture_output=True
    )
    assert r.stdout.decode().startswith("kiln ") and b"kiln.cli.fast" not in r.stderr
    # what the fast path does not parse goes to the full CLI, with its help and errors
    assert b"--timeout" in kiln(env, "exec", "--help").stdout
    r = kiln(env, "exec", "dev", "--bogus", "--", "true")
    assert r.returncode == 2 and b"No such option" in r.stderr


def test_create_takes_name_as_an_option_and_exec_detaches(env, api):
    r = kiln(env, "create", "--name", "named-opt", "--json")
    assert r.returncode == 0, r.stderr
    sb = json.loads(r.stdout)
    try:
        assert sb["name"] == "named-opt"
        r = kiln(env, "exec", "named-opt", "--detach", "--", "sh", "-c", "echo bg-ran")
        assert r.returncode == 0, r.stderr
        pid, log = r.stdout.decode().split()
        assert int(pid) > 1 and log.startswith("/tmp/kiln-exec-")
        wait_for(lambda: kiln(env, "file", "read", "named-opt", log).stdout == b"bg-ran\n", what="the detached output")
        assert kiln(env, "create", "a", "--name", "b").returncode == 1
    finally:
        api.delete(f"/sandboxes/{sb['id']}")


def test_image_commands(env, api, tmp_path):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM minimal\nENV WHO=cli\nRUN echo built-by-$WHO > /who.txt\n")
    r = kiln(env, "image", "build", "-t", "cli-img", str(ctx))
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "[1/3] FROM minimal" in out and "[3/3] RUN echo" in out and "built cli-img" in out, out
    again = kiln(env, "image", "build", "-t", "cli-img-2", str(ctx)).stdout.decode()
    assert "[3/3] RUN echo built-by-$WHO > /who.txt  (cached)" in again and "3/3 steps from the cache" in again
    listing = kiln(env, "image", "list").stdout.decode()
    assert "cli-img" in listing and "default" in listing and "builtin" in listing
    assert kiln(env, "create", "cli-img-box", "--image", "cli-img").returncode == 0
    try:
        assert kiln(env, "exec", "cli-img-box", "--", "cat", "/who.txt").stdout == b"built-by-cli\n"
        saved = kiln(env, "image", "save", "cli-img-box", "cli-saved")
        assert saved.returncode == 0 and saved.stdout.startswith(b"cli-saved\t"), saved.stderr
    finally:
        kiln(env, "destroy", "-y", "cli-img-box")
    (ctx / "Dockerfile").write_text("FROM minimal\nRUN exit 4\n")
    failed = kiln(env, "image", "build", "-t", "cli-broken", str(ctx))
    assert failed.returncode == 1 and b"exit code 4" in failed.stderr
    missing = kiln(env, "image", "import", "x", str(tmp_path / "nope.tar"))
    assert missing.returncode == 1 and b"no such file" in missing.stderr
    for name in ("cli-img", "cli-img-2", "cli-saved"):
        assert kiln(env, "image", "delete", name).returncode == 0
