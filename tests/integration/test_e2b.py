"""The unmodified E2B Python SDK (`e2b`, pinned in pyproject) against a real daemon and real sandboxes,
loopback only, in both of its modes:

- URL mode: E2B_API_URL / E2B_SANDBOX_URL on kiln's main listener (plain http);
- domain mode: `kiln e2b setup` made a CA and a *.e2b.localhost certificate, the daemon serves
  api.<domain> and <port>-<id>.<domain> on its TLS listener, and the SDK is given E2B_DOMAIN and
  SSL_CERT_FILE only (it resolves *.localhost to loopback itself: no DNS set-up).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import ssl
import threading
import time

import httpx
import pytest
from e2b import AsyncSandbox, CommandExitException, NotFoundException, Sandbox, SandboxQuery, TimeoutException
from e2b.exceptions import AuthenticationException, SandboxException

from tests.conftest import wait_for
from tests.daemon import REPO
from tests.integration.e2b_support import DOMAIN, e2b_daemon, sdk_opts, tls_port


@pytest.fixture(scope="module")
def daemon(default_image):
    with e2b_daemon() as d:
        yield d


@pytest.fixture(scope="module", params=["url", "domain"])
def mode(request):
    return request.param


@pytest.fixture(scope="module")
def opts(daemon, mode):
    return sdk_opts(daemon, daemon.admin_token, mode)


@pytest.fixture(scope="module")
def sbx(opts):
    sb = Sandbox.create("base", timeout=600, metadata={"suite": "e2b"}, envs={"GREETING": "hello"}, **opts)
    yield sb
    sb.kill()


def https_get(daemon, host: str, path: str = "/", **headers) -> httpx.Response:
    """A request to <host> on the TLS listener, by address (glibc does not resolve *.localhost here),
    with the host's name for SNI and the certificate check."""
    ctx = ssl.create_default_context(cafile=str(daemon.data_dir / "e2b-tls" / "ca.pem"))
    with httpx.Client(verify=ctx) as c:
        return c.get(
            f"https://127.0.0.1:{tls_port(daemon)}{path}",
            headers={"Host": f"{host}:{tls_port(daemon)}", **headers},
            extensions={"sni_hostname": host},
        )


def test_the_sdk_is_the_pinned_one():
    """pyproject's pin, or the older release test_e2b_clients.py runs this module under."""
    pins = [ln for ln in (REPO / "pyproject.toml").read_text().splitlines() if '"e2b==' in ln]
    expected = os.environ.get("KILN_E2B_SDK_VERSION") or pins[0].split("==")[1].split('"')[0]
    assert importlib.metadata.version("e2b") == expected


def test_create_returns_a_running_sandbox_with_its_metadata_and_envs(sbx, opts, api):
    info = sbx.get_info()
    assert info.template_id == "base" and info.metadata == {"suite": "e2b"} and info.state.value == "running"
    assert info.envd_version == "0.5.7"
    # the same sandbox is a kiln sandbox of the key's user
    assert api.get(f"/sandboxes/{sbx.sandbox_id}").json()["status"] == "running"
    assert sbx.commands.run("echo $GREETING").stdout == "hello\n"


def test_commands_run_output_env_cwd_user_and_exit_codes(sbx):
    r = sbx.commands.run("echo out; echo err >&2; whoami; pwd")
    assert (r.stdout, r.stderr, r.exit_code) == ("out\nuser\n/home/user\n", "err\n", 0)
    assert sbx.commands.run("echo $A-$B", envs={"A": "1", "B": "two"}).stdout == "1-two\n"
    assert sbx.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sbx.commands.run("whoami", user="root").stdout == "root\n"
    seen: list[str] = []
    sbx.commands.run("for i in 1 2 3; do echo line$i; done", on_stdout=seen.append)
    assert "".join(seen) == "line1\nline2\nline3\n"
    with pytest.raises(CommandExitException) as e:
        sbx.commands.run("echo bad >&2; exit 7")
    assert e.value.exit_code == 7 and e.value.stderr == "bad\n"


def test_a_command_past_its_timeout_is_killed(sbx):
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 30; touch /tmp/should-not-exist", timeout=2)
    wait_for(lambda: not any("sleep 30" in " ".join(p.args) for p in sbx.commands.list()), what="killed")
    assert not sbx.files.exists("/tmp/should-not-exist")


def test_background_commands_stdin_list_connect_and_kill(sbx, opts):
    h = sbx.commands.run("cat", background=True, stdin=True)
    assert h.pid in [p.pid for p in sbx.commands.list()]
    sbx.commands.send_stdin(h.pid, "piped line\n")
    sbx.commands.close_stdin(h.pid)
    assert h.wait().stdout == "piped line\n"
    assert h.pid not in [p.pid for p in sbx.commands.list()]

    # a second client connects to a running process and sees its live output
    ticker = sbx.commands.run("for i in $(seq 1 300); do echo tick$i; sleep 0.1; done", background=True)
    other = Sandbox.connect(sbx.sandbox_id, **opts)
    time.sleep(0.6)  # tick1 is past when the second client connects
    seen: list[str] = []
    ended: list[Exception] = []
    joined = other.commands.connect(ticker.pid)

    def follow():
        try:
            joined.wait(on_stdout=seen.append)
        except CommandExitException as e:
            ended.append(e)

    follower = threading.Thread(target=follow)
    follower.start()
    wait_for(lambda: any("tick" in s for s in seen), what="live output through the second client")
    assert not seen[0].startswith("tick1\n")  # live output only, no replay of what came before
    assert other.commands.kill(ticker.pid) is True
    follower.join(30)
    assert ended and ended[0].exit_code == -1  # killed by a signal, as Go reports it
    assert other.commands.kill(ticker.pid) is False  # gone: not found
    ticker.disconnect()


def test_files_write_read_list_stat_mkdir_rename_remove(sbx):
    sbx.files.write("/home/user/docs/a.txt", "alpha")
    sbx.files.write_files(
        [{"path": "/home/user/docs/b.txt", "data": "beta"}, {"path": "/home/user/docs/sub/c.bin", "data": b"\x00\x01"}]
    )
    big = bytes(range(256)) * 8192  # 2 MiB
    sbx.files.write("/home/user/big.bin", big)
    assert sbx.files.read("/home/user/big.bin", format="bytes") == big
    assert sbx.files.read("/home/user/docs/a.txt") == "alpha"
    assert b"".join(sbx.files.read("/home/user/docs/b.txt", format="stream")) == b"beta"
    assert sorted(e.name for e in sbx.files.list("/home/user/docs")) == ["a.txt", "b.txt", "sub"]
    assert "c.bin" in [e.name for e in sbx.files.list("/home/user/docs", depth=2)]
    info = sbx.files.get_info("/home/user/docs/a.txt")
    assert (info.size, info.type.value, info.owner, info.permissions) == (5, "file", "user", "-rw-r--r--")
    assert sbx.files.exists("/home/user/docs/a.txt") and not sbx.files.exists("/home/user/nope")
    assert sbx.files.make_dir("/home/user/made/deep") is True
    assert sbx.files.make_dir("/home/user/made/deep") is False
    assert sbx.commands.run("stat -c %U /home/user/made/deep").stdout == "user\n"
    moved = sbx.files.rename("/home/user/docs/a.txt", "/home/user/made/a.txt")
    assert moved.path == "/home/user/made/a.txt" and sbx.files.read("/home/user/made/a.txt") == "alpha"
    sbx.files.remove("/home/user/docs")
    assert not sbx.files.exists("/home/user/docs/b.txt")
    sbx.files.write("relative.txt", "rel")  # relative paths are the user's home's
    assert sbx.commands.run("cat /home/user/relative.txt").stdout == "rel"
    with pytest.raises(Exception) as e:
        sbx.files.read("/home/user/missing.txt")
    assert "not" in str(e.value).lower()


def test_a_wrong_envd_token_is_unauthenticated(sbx, daemon):
    r = httpx.post(
        f"{daemon.url}/e2b/sandbox/filesystem.Filesystem/Stat",
        json={"path": "/"},
        headers={"E2b-Sandbox-Id": sbx.sandbox_id, "X-Access-Token": "wrong", "Connect-Protocol-Version": "1"},
    )
    assert r.status_code == 401
    health = httpx.get(f"{daemon.url}/e2b/sandbox/health", headers={"E2b-Sandbox-Id": sbx.sandbox_id})
    assert health.status_code == 204


def test_list_filters_by_metadata_and_pages(opts):
    made = [Sandbox.create("base", timeout=120, metadata={"batch": "paged", "n": str(i)}, **opts) for i in range(3)]
    try:
        paginator = Sandbox.list(query=SandboxQuery(metadata={"batch": "paged"}), limit=2, **opts)
        first = paginator.next_items()
        assert len(first) == 2 and paginator.has_next
        rest = paginator.next_items()
        assert not paginator.has_next
        assert sorted(s.sandbox_id for s in first + rest) == sorted(s.sandbox_id for s in made)
        assert [
            s.metadata["n"] for s in Sandbox.list(query=SandboxQuery(metadata={"n": "1"}), **opts).next_items()
        ] == ["1"]
    finally:
        for sb in made:
            sb.kill()


def test_set_timeout_and_an_expired_lease_kills_the_sandbox(opts, api):
    sb = Sandbox.create("base", timeout=300, **opts)
    sb.set_timeout(2)
    wait_for(lambda: api.get(f"/sandboxes/{sb.sandbox_id}").status_code == 404, timeout=30, what="lease expiry")
    with pytest.raises(NotFoundException):
        Sandbox.connect(sb.sandbox_id, **opts)
    assert Sandbox.kill(sb.sandbox_id, **opts) is False


def test_a_lease_that_asked_for_pause_pauses_at_its_end(opts):
    sb = Sandbox.create("base", timeout=2, lifecycle={"on_timeout": "pause"}, **opts)
    try:
        sb.commands.run("echo kept > /dev/shm/lease")
        wait_for(lambda: Sandbox.get_info(sb.sandbox_id, **opts).state.value == "paused", timeout=60, what="paused")
        resumed = Sandbox.connect(sb.sandbox_id, timeout=120, **opts)
        assert resumed.commands.run("cat /dev/shm/lease").stdout == "kept\n"
    finally:
        sb.kill()


def test_pause_then_connect_resumes_with_memory_intact(opts):
    sb = Sandbox.create("base", timeout=300, **opts)
    try:
        sb.commands.run("echo 'sleep 1000' > /tmp/s.sh; nohup bash /tmp/s.sh >/dev/null 2>&1 &")
        sb.commands.run('python3 -c \'import os; open("/dev/shm/mem", "w").write("in memory")\'')
        assert sb.pause() is True
        assert Sandbox.get_info(sb.sandbox_id, **opts).state.value == "paused"
        assert sb.pause() is False  # already paused: 409
        resumed = Sandbox.connect(sb.sandbox_id, timeout=300, **opts)
        assert resumed.get_info().state.value == "running"
        assert resumed.commands.run("cat /dev/shm/mem").stdout == "in memory"
        assert "sleep 1000" in resumed.commands.run("ps -eo args").stdout
    finally:
        assert sb.kill() is True
        assert sb.kill() is False


def test_metrics_report_the_sandbox_own_usage(sbx):
    sbx.commands.run("head -c 20000000 /dev/urandom > /home/user/blob")
    m = sbx.get_metrics()
    assert m and m[-1].mem_used > 0 and m[-1].mem_total == 512 << 20
    assert m[-1].disk_used > 20_000_000 and m[-1].disk_total > m[-1].disk_used


def test_async_sdk_runs_commands_and_files(opts):
    async def main():
        sb = await AsyncSandbox.create("base", timeout=120, **opts)
        try:
            r = await sb.commands.run("echo async")
            await sb.files.write("/home/user/x.txt", "async file")
            return r.stdout, await sb.files.read("/home/user/x.txt")
        finally:
            await sb.kill()

    assert asyncio.run(main()) == ("async\n", "async file")


def test_bad_requests_are_clear_errors_that_change_nothing(opts, daemon, api):
    before = len(api.get("/sandboxes").json())
    with pytest.raises(SandboxException) as e:
        Sandbox.create("no-such-template", **opts)
    assert "not found" in str(e.value)
    with pytest.raises(AuthenticationException):
        Sandbox.create("base", **{**opts, "api_key": "e2b_" + "0" * 64})
    r = httpx.post(
        f"{daemon.url}/e2b/sandboxes",
        json={"templateID": "base", "network": {"allowOut": ["1.2.3.4"]}, "surprise": 1},
        headers={"X-API-Key": daemon.admin_token},
    )
    assert r.status_code == 400 and r.json()["code"] == 400
    assert "network" in r.json()["message"] and "surprise" in r.json()["message"]
    with pytest.raises(SandboxException, match="timeout must be between 0 and 86400"):
        Sandbox.create("base", timeout=10**9, **opts)
    assert len(api.get("/sandboxes").json()) == before


def test_another_users_key_cannot_see_or_touch_the_sandbox(sbx, daemon, mode):
    other = sdk_opts(daemon, daemon.create_user(f"e2b-other-{mode}"), mode)
    assert sbx.sandbox_id not in [s.sandbox_id for s in Sandbox.list(**other).next_items()]
    with pytest.raises(NotFoundException):
        Sandbox.connect(sbx.sandbox_id, **other)
    assert Sandbox.kill(sbx.sandbox_id, **other) is False
    assert sbx.is_running()
    # the envd of A's sandbox needs A's sandbox token, which B never gets
    r = httpx.post(
        f"{daemon.url}/e2b/sandbox/process.Process/List",
        json={},
        headers={"E2b-Sandbox-Id": sbx.sandbox_id, "Connect-Protocol-Version": "1"},
    )
    assert r.status_code == 401


def test_pty_create_resize_input_and_kill(sbx):
    from e2b import PtySize

    out = bytearray()
    handle = sbx.pty.create(PtySize(rows=24, cols=80), timeout=0)
    collected: list[Exception] = []

    def follow():
        try:
            handle.wait(on_pty=out.extend)
        except CommandExitException as e:
            collected.append(e)

    follower = threading.Thread(target=follow)
    follower.start()
    sbx.pty.send_stdin(handle.pid, b"echo pty-$((40+2)); whoami\n")
    wait_for(lambda: b"pty-42" in out and b"user" in out, what="the PTY's output")
    sbx.pty.resize(handle.pid, PtySize(rows=33, cols=111))
    sbx.pty.send_stdin(handle.pid, b"stty size\n")
    wait_for(lambda: b"33 111" in out, what="the resized PTY")
    assert handle.pid in [p.pid for p in sbx.commands.list()]
    assert sbx.pty.kill(handle.pid) is True
    follower.join(30)
    assert not follower.is_alive()
    wait_for(lambda: handle.pid not in [p.pid for p in sbx.commands.list()], what="the PTY gone")


def test_watch_dir_sees_files_made_by_a_command(sbx, opts):
    sbx.files.make_dir("/home/user/watched")
    watcher = sbx.files.watch_dir("/home/user/watched")
    try:
        sbx.commands.run("echo x > /home/user/watched/new.txt && rm /home/user/watched/new.txt")

        def seen():
            events.extend(watcher.get_new_events())
            return {(e.name, e.type.value) for e in events} >= {("new.txt", "create"), ("new.txt", "remove")}

        events: list = []
        wait_for(seen, what="create and remove events")
    finally:
        watcher.stop()

    async def watch_async():
        sb = await AsyncSandbox.connect(sbx.sandbox_id, **opts)
        got: list = []
        handle = await sb.files.watch_dir("/home/user/watched", on_event=got.append, recursive=True)
        try:
            await sb.commands.run("mkdir -p /home/user/watched/sub && touch /home/user/watched/sub/deep.txt")
            for _ in range(100):
                if any(e.name == "sub/deep.txt" for e in got):
                    return True
                await asyncio.sleep(0.1)
            return [(e.name, e.type) for e in got]
        finally:
            await handle.stop()

    assert asyncio.run(watch_async()) is True


def test_code_interpreter_runs_code_keeps_state_and_reports_errors(opts):
    from e2b_code_interpreter import Sandbox as CodeInterpreter

    sb = CodeInterpreter.create(timeout=300, **opts)
    try:
        seen: list[str] = []
        ex = sb.run_code("x = 6 * 7\nprint('hello from python')\nx", on_stdout=lambda m: seen.append(m.line))
        assert ex.logs.stdout == ["hello from python\n"] and seen == ["hello from python\n"]
        assert ex.text == "42" and ex.error is None
        assert sb.run_code("x + 1").text == "43"  # state kept between calls
        err = sb.run_code("1 / 0")
        assert (
            err.error is not None
            and err.error.name == "ZeroDivisionError"
            and "ZeroDivisionError" in err.error.traceback
        )
        assert sb.run_code("import pandas as pd; int(pd.DataFrame({'a': [1, 2, 3]})['a'].sum())").text == "6"
        png = sb.run_code("import matplotlib.pyplot as plt; plt.plot([1, 2, 3]); plt.show()")
        assert png.results and png.results[0].png
        bash = sb.run_code("echo from-bash $((2+3))", language="bash")
        assert bash.logs.stdout == ["from-bash 5\n"]
        ctx = sb.create_code_context(language="python", cwd="/tmp")
        assert sb.run_code("import os; os.getcwd()", context=ctx).text == "'/tmp'"
        assert sb.run_code("'x' in dir()", context=ctx).text == "False"  # a context of its own
        assert sb.run_code("import os; os.environ['ONLY_HERE']", envs={"ONLY_HERE": "yes"}).text == "'yes'"
    finally:
        sb.kill()


def test_get_host_reaches_a_server_in_the_sandbox(daemon):
    """get_host() names <port>-<id>.<domain>, whatever the mode: a domain-mode host."""
    opts = sdk_opts(daemon, daemon.admin_token, "domain")
    sb = Sandbox.create("base", timeout=300, metadata={"mode": "get-host"}, **opts)
    try:
        assert sb.commands.run("echo over tls").stdout == "over tls\n"
        sb.files.write("/home/user/t.txt", "tls file")
        assert sb.files.read("/home/user/t.txt") == "tls file"
        assert [e.name for e in sb.files.list("/home/user")] == ["t.txt"]
        listed = Sandbox.list(query=SandboxQuery(metadata={"mode": "get-host"}), **opts).next_items()
        assert [s.sandbox_id for s in listed] == [sb.sandbox_id]

        # get_host(port): a server in the sandbox, at <port>-<id>.<domain>, public as E2B's are
        sb.commands.run("cd /tmp && echo served > index.html && python3 -m http.server 8000", background=True)
        host = sb.get_host(8000)
        assert host == f"8000-{sb.sandbox_id}.{opts['domain']}"
        wait_for(
            lambda: https_get(daemon, host.rsplit(":", 1)[0], "/index.html").text == "served\n",
            what="the sandbox's web server through its E2B host",
        )
        # envd's own host needs the sandbox's token; the wrong one is refused
        envd = f"49983-{sb.sandbox_id}.{DOMAIN}"
        assert https_get(daemon, envd, "/health").status_code == 204
        assert https_get(daemon, envd, "/files?path=/home/user/t.txt").status_code == 401
        assert https_get(daemon, f"8000-{'0' * 16}.{DOMAIN}").status_code == 502
    finally:
        assert sb.kill() is True


def test_the_certificate_is_for_the_wildcard_and_trusted_only_through_kiln_ca(daemon):
    port = int(daemon.config["e2b"]["tls_listen"].rpartition(":")[2])
    system_roots = ssl.create_default_context(cafile="/etc/ssl/certs/ca-certificates.crt")
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"), httpx.Client(verify=system_roots) as c:
        c.get(
            f"https://127.0.0.1:{port}/",
            headers={"Host": f"api.{DOMAIN}"},
            extensions={"sni_hostname": f"api.{DOMAIN}"},
        )
    r = https_get(daemon, f"api.{DOMAIN}", "/v2/sandboxes")
    assert r.status_code == 401 and r.json() == {"code": 401, "message": "X-API-Key required"}


def test_gzip_uploads_and_downloads_and_signed_file_urls(sbx, daemon, mode):
    text = "compressible " * 10_000
    sbx.files.write("/home/user/gz.txt", text, gzip=True)
    assert sbx.files.read("/home/user/gz.txt", gzip=True) == text
    assert sbx.commands.run("wc -c < /home/user/gz.txt").stdout.strip() == str(len(text))
    if mode != "domain":
        return  # signed URLs carry no headers: only a host names the sandbox
    url = sbx.download_url("/home/user/gz.txt", use_signature_expiration=60)
    parsed = httpx.URL(url)
    got = https_get(daemon, parsed.host, f"{parsed.path}?{parsed.query.decode()}")
    assert got.status_code == 200 and got.text == text
    tampered = https_get(daemon, parsed.host, f"{parsed.path}?{parsed.query.decode().replace('gz.txt', 'big.bin')}")
    assert tampered.status_code == 401
    expired = sbx.download_url("/home/user/gz.txt", use_signature_expiration=-10)
    parsed = httpx.URL(expired)
    assert https_get(daemon, parsed.host, f"{parsed.path}?{parsed.query.decode()}").status_code == 401
