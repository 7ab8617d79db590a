"""The agent protocol without a sandbox: the guest agent runs as a host process on loopback."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from kiln.agent import AGENT_DIR, protocol as P
from kiln.agent.client import AgentClient, AgentError, AgentRequestError
from tests.daemon import free_port

TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    port = free_port()
    cfg = tmp_path_factory.mktemp("agent") / "config.json"
    cfg.write_text(json.dumps({"token": TOKEN, "port": port, "bind": "127.0.0.1", "env": {"SANDBOX_VAR": "yes"}}))
    proc = subprocess.Popen([sys.executable, str(AGENT_DIR / "guest.py"), str(cfg)])
    client = AgentClient("127.0.0.1", port, TOKEN)
    asyncio.run(_ready(client))
    yield client
    proc.kill()
    proc.wait()


async def _ready(client):
    await client.wait_ready(asyncio.get_running_loop().time() + 10)


async def collect(client, req, stdin=None):
    out, err, exit_ev = b"", b"", None
    async for ev in client.exec(req, stdin):
        if ev.kind == "stdout":
            out += ev.data
        elif ev.kind == "stderr":
            err += ev.data
        elif ev.kind == "exit":
            exit_ev = ev
    return out, err, exit_ev


def run(coro):
    return asyncio.run(coro)


def test_frame_roundtrip_and_limits():
    frame = P.encode(P.STDOUT, b"abc")
    assert P.parse_header(frame[:5]) == (P.STDOUT, 3) and frame[5:] == b"abc"
    with pytest.raises(ValueError):
        P.encode(P.STDOUT, b"x" * (P.MAX_FRAME + 1))
    with pytest.raises(ValueError):
        P.parse_header(P.HEADER.pack(0, P.STDOUT))


def test_exec_output_exit_and_env(agent):
    out, err, ex = run(
        collect(
            agent,
            {"argv": ["sh", "-c", "echo $SANDBOX_VAR $REQ; echo e >&2; exit 3"], "env": {"REQ": "r"}, "user": "root"},
        )
    )
    assert (out, err, ex.exit_code) == (b"yes r\n", b"e\n", 3)


def test_exec_stdin_larger_than_pipe_buffers(agent):
    data = b"z" * (4 * 1024 * 1024)
    out, _, ex = run(collect(agent, {"argv": ["cat"], "user": "root"}, stdin=data))
    assert out == data and ex.exit_code == 0


def test_exec_missing_binary_and_signal(agent):
    _, err, ex = run(collect(agent, {"argv": ["definitely-missing"], "user": "root"}))
    assert ex.exit_code == 127 and b"not found" in err
    _, _, ex = run(collect(agent, {"argv": ["sh", "-c", "kill -KILL $$"], "user": "root"}))
    assert ex.exit_code == 137


def test_a_spawning_thread_has_a_working_directory_of_its_own(tmp_path):
    from kiln.agent.spawn import own_working_directory

    seen = {}

    def thread():
        seen["private"] = own_working_directory() and own_working_directory()  # (the second: kept)
        os.chdir(tmp_path)
        seen["cwd"] = os.getcwd()

    before = os.getcwd()
    t = threading.Thread(target=thread)
    t.start()
    t.join()
    assert seen == {"private": True, "cwd": str(tmp_path)} and os.getcwd() == before


def test_parallel_execs_each_start_in_their_own_cwd(agent, tmp_path):
    dirs = [tmp_path / f"d{i}" for i in range(16)]
    for d in dirs:
        d.mkdir()

    async def all_at_once():
        return await asyncio.gather(*(collect(agent, {"argv": ["pwd"], "user": "root", "cwd": str(d)}) for d in dirs))

    assert [out.decode().strip() for out, _, _ in run(all_at_once())] == [str(d) for d in dirs]


def test_exec_timeout_kills_group(agent, tmp_path):
    start = time.monotonic()
    _, _, ex = run(
        collect(
            agent,
            {"argv": ["sh", "-c", f"sleep 30 & echo $! > {tmp_path}/pid; wait"], "user": "root", "timeout_sec": 1},
        )
    )
    assert ex.exit_code == 124 and ex.timed_out and time.monotonic() - start < 5
    pid = int((tmp_path / "pid").read_text())
    time.sleep(0.2)
    assert not alive(pid)


def alive(pid: int) -> bool:
    """Running, not merely an unreaped zombie (the host agent is not PID 1, so it reaps nobody)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_invalid_requests_are_refused_as_invalid(agent):
    with pytest.raises(AgentRequestError, match="cmd required"):
        run(collect(agent, {"argv": []}))
    with pytest.raises(AgentRequestError, match="unknown user"):
        run(collect(agent, {"argv": ["true"], "user": "no-such-user-x"}))
    with pytest.raises(AgentRequestError, match="no such directory"):
        run(collect(agent, {"argv": ["true"], "user": "root", "cwd": "/no/such"}))


def test_wrong_token_is_refused(agent):
    bad = AgentClient(agent.host, agent.port, "f" * 32)
    with pytest.raises(AgentError, match="auth required"):
        run(bad.activity())


def test_activity_and_tty_session(agent):
    before = run(agent.activity())
    assert before["attached_sessions"] == 0

    async def session():
        conn = await agent.connect(
            P.EXEC_REQ, json.dumps({"argv": ["sh"], "tty": True, "user": "root", "rows": 30, "cols": 77}).encode()
        )
        ftype, info = await conn.read_frame()
        assert ftype == P.SESSION_INFO and json.loads(info)["tty"] is True
        await conn.send(P.STDIN, b"stty size; exit 5\n")
        out = b""
        while True:
            ftype, data = await asyncio.wait_for(conn.read_frame(), 10)
            if ftype == P.STDOUT:
                out += data
            elif ftype == P.EXIT:
                await conn.close()
                return out, json.loads(data)["exit_code"]

    out, code = run(session())
    assert b"30 77" in out and code == 5
    assert run(agent.activity())["last_activity_unix"] >= before["last_activity_unix"]


def test_parse_proc_net_tcp_listen_lines_only():
    from kiln.agent.ports import parse_proc_net_tcp

    table = (
        " sl local_address rem_address st\n"
        " 0: 0100007F:0FA0 00000000:0000 0A 0 0 0\n"
        " 1: 00000000:0BB8 00000000:0000 0A 0 0 0\n"
        " 2: 0281D80A:0400 0181D80A:E178 01 0 0 0\n"
    )
    assert parse_proc_net_tcp(table) == [(4000, True), (3000, False)]
    v6 = (
        " sl local_address remote_address st\n"
        " 0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 0\n"
    )
    assert parse_proc_net_tcp(v6) == [(8080, True)]


def test_ports_lists_listeners_and_forward_relays_both_ways(agent):
    """A loopback-only server that speaks first: its greeting arrives through the tunnel, then an echo."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]

    def serve():
        conn, _ = server.accept()
        with conn:
            conn.sendall(b"hello\n")
            while data := conn.recv(65536):
                conn.sendall(data.upper())

    threading.Thread(target=serve, daemon=True).start()
    listed = {p["port"]: p for p in run(agent.ports())}
    assert listed[port]["loopback_only"] is True
    assert agent.port not in listed  # the agent's own port is left out

    async def talk():
        loop = asyncio.get_running_loop()
        sock = await agent.forward(port)
        with sock:
            greeting = await loop.sock_recv(sock, 100)
            payload = b"x" * 300_000
            await loop.sock_sendall(sock, payload)
            sock.shutdown(socket.SHUT_WR)
            back = b""
            while chunk := await loop.sock_recv(sock, 65536):
                back += chunk
            return greeting, back, payload

    greeting, back, payload = run(talk())
    server.close()
    assert greeting == b"hello\n" and back == payload.upper()


def test_forward_to_a_closed_port_fails_cleanly(agent):
    from tests.daemon import free_port

    with pytest.raises(AgentError, match="connect to port"):
        run(agent.forward(free_port()))
    with pytest.raises(AgentRequestError, match="invalid port"):
        run(agent.forward(70000))


def test_exited_sessions_stay_listed_30_seconds_and_are_bounded(tmp_path):
    from types import SimpleNamespace

    from kiln.agent.server import MAX_EXITED, Agent

    agent = Agent({"token": TOKEN, "secrets_file": str(tmp_path / "none.json")})
    now = time.time()

    def session(exited_at):
        return SimpleNamespace(exited_at=exited_at, running=exited_at is None)

    agent.sessions = {
        "old": session(now - 31),
        "recent": session(now - 5),
        "init": session(now - 999),
        "live": session(None),
    }
    agent.reap_sessions_locked()
    assert set(agent.sessions) == {"recent", "init", "live"}
    agent.sessions = {f"s{i}": session(now - 20 + i * 0.1) for i in range(MAX_EXITED + 10)}
    agent.reap_sessions_locked()
    assert set(agent.sessions) == {f"s{i}" for i in range(10, MAX_EXITED + 10)}  # the newest are kept


def start_agent(cfg, port: int, **config) -> subprocess.Popen:
    cfg.write_text(json.dumps({"token": TOKEN, "port": port, "bind": "127.0.0.1", **config}))
    return subprocess.Popen([sys.executable, str(AGENT_DIR / "guest.py"), str(cfg)])


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Threads:")).split()[1])


def test_a_burst_of_parallel_execs_leaves_one_idle_worker_behind(tmp_path):
    port = free_port()
    proc = start_agent(tmp_path / "a.json", port, worker_idle_sec=0.3)

    async def burst():
        client = AgentClient("127.0.0.1", port, TOKEN)
        await client.wait_ready(asyncio.get_running_loop().time() + 10)
        request = {"argv": ["sleep", "0.5"], "user": "root"}
        results = await asyncio.gather(*(collect(client, request) for _ in range(6)))
        assert [ex.exit_code for _, _, ex in results] == [0] * 6
        during = threads_of(proc.pid)
        client.abort()  # (pooled connections hold a worker each)
        return during

    try:
        assert asyncio.run(burst()) >= 7  # the main thread and a worker per exec
        deadline = time.monotonic() + 10
        while threads_of(proc.pid) > 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert threads_of(proc.pid) == 2  # the main thread and one idle worker
        out, _, ex = run(collect(AgentClient("127.0.0.1", port, TOKEN), {"argv": ["echo", "ok"], "user": "root"}))
        assert (out, ex.exit_code) == (b"ok\n", 0)  # and the one left serves
    finally:
        proc.kill()
        proc.wait()


def listening(port: int) -> None:
    """Wait (blocking: no event loop runs meanwhile) until something accepts on port."""
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port}")


def test_answered_connections_carry_the_next_request_and_a_stale_one_is_replaced(tmp_path):
    """Requests answered in full leave their connection pooled for the next; a stream the host fed
    (stdin) or an ERROR closes it; a pooled connection the agent lost (here: the agent was
    restarted) is replaced by a new one without the caller noticing."""
    port = free_port()
    procs = [start_agent(tmp_path / "a.json", port)]

    async def scenario():
        client = AgentClient("127.0.0.1", port, TOKEN)
        await client.wait_ready(asyncio.get_running_loop().time() + 10)
        assert client.keepalive and len(client.idle) == 1
        first = client.idle[0][0]
        out, _, ex = await collect(client, {"argv": ["echo", "one"], "user": "root"})
        assert (out, ex.exit_code) == (b"one\n", 0)
        assert [c for c, _ in client.idle] == [first]  # the same connection, answered and back
        assert (await client.stat("/"))["is_dir"] and [c for c, _ in client.idle] == [first]
        out, _, _ = await collect(client, {"argv": ["cat"], "user": "root"}, stdin=b"fed")
        assert out == b"fed" and [c for c, _ in client.idle] == [first]  # a connection of its own, closed
        with pytest.raises(AgentRequestError):
            await client.stat("relative")
        assert client.idle == [] and client.open == set()  # the ERROR closed the pooled one

        await client.activity()
        assert len(client.idle) == 1
        # the agent holding the pooled connection dies and a new one takes its port, all before this
        # loop runs again: the pooled connection looks open until the request is sent on it
        procs[0].kill()
        procs[0].wait()
        procs[0] = start_agent(tmp_path / "a.json", port)
        listening(port)
        assert not client.idle[0][0].reader.at_eof()
        out, _, ex = await collect(client, {"argv": ["echo", "two"], "user": "root"})
        assert (out, ex.exit_code) == (b"two\n", 0)
        assert len(client.idle) == 1 and client.idle[0][0] is not first, (client.idle, first)

    try:
        asyncio.run(scenario())
    finally:
        procs[0].kill()
        procs[0].wait()
