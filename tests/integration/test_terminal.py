"""GET /sandboxes/:id/ws with a real WebSocket client against a real sandbox."""

import asyncio
import json
import re
import time

import pytest
import websockets

from tests.conftest import make_sandbox


@pytest.fixture(scope="module")
def sb(api):
    s = make_sandbox(api, name="term", keep_hot=True, init="echo init-said-hello")
    yield s
    api.delete(f"/sandboxes/{s['id']}")


def ws_url(daemon, sb, **params):
    q = "&".join(f"{k}={v}" for k, v in params.items())
    return f"ws://127.0.0.1:{daemon.port}/sandboxes/{sb['id']}/ws" + (f"?{q}" if q else "")


async def connect(daemon, sb, token=None, **params):
    headers = {"Authorization": f"Bearer {token or daemon.admin_token}"}
    ws = await websockets.connect(ws_url(daemon, sb, **params), additional_headers=headers)
    first = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert first["type"] == "session", first
    return ws, first["session_id"]


async def read_until(ws, needle: bytes, timeout=10.0) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while needle not in out:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{needle!r} not seen in {out[-500:]!r}")
        msg = await asyncio.wait_for(ws.recv(), left)
        out += msg if isinstance(msg, bytes) else msg.encode()
    return out


def sessions(api, sb):
    return {s["session_id"]: s for s in api.get(f"/sandboxes/{sb['id']}/sessions").json()}


def test_shell_echo_resize_reattach_new_and_kick(daemon, api, sb):
    async def scenario():
        ws, sid = await connect(daemon, sb, new="true")
        await ws.send(b"echo hi-$((40+2))\n")
        await read_until(ws, b"hi-42")
        await ws.send(json.dumps({"type": "resize", "rows": 40, "cols": 100}))
        await ws.send("stty size\n")  # a text frame that is not a resize is keystrokes
        await read_until(ws, b"40 100", timeout=30)
        await ws.send(b"echo pid=$$\n")
        out = await read_until(ws, b"pid=")
        while not re.search(rb"pid=(\d+)\r?\n", out):  # the typed line echoes "pid=$$": wait for digits
            out += await asyncio.wait_for(ws.recv(), 10)
        pid = re.search(rb"pid=(\d+)\r?\n", out).group(1)
        await ws.close()

        info = sessions(api, sb)[sid]
        assert info["running"] is True and info["attached"] is False and info["tty"] is True

        # reconnect without naming it: the newest detached shell, with its scrollback first
        ws2, sid2 = await connect(daemon, sb)
        assert sid2 == sid
        await read_until(ws2, b"hi-42")
        await ws2.send(b"echo again=$$\n")
        await read_until(ws2, b"again=" + pid)

        # ?new=true is another shell
        ws3, sid3 = await connect(daemon, sb, new="true")
        assert sid3 != sid
        listed = sessions(api, sb)
        assert listed[sid]["attached"] and listed[sid3]["attached"]
        assert listed[sid3]["running"]

        # a second client attaching to a session kicks the first
        ws4, sid4 = await connect(daemon, sb, session=sid)
        assert sid4 == sid
        with pytest.raises(websockets.ConnectionClosed):
            for _ in range(100):
                await asyncio.wait_for(ws2.recv(), 10)
        await ws4.send(b"echo still=$$\n")
        await read_until(ws4, b"still=" + pid)
        for w in (ws3, ws4):
            await w.close()

    asyncio.run(scenario())


def test_a_shell_that_exits_stays_listed_with_its_exit_code(daemon, api, sb):
    async def scenario():
        ws, sid = await connect(daemon, sb, new="true")
        await ws.send(b"exit 7\n")
        with pytest.raises(websockets.ConnectionClosed):
            for _ in range(1000):
                await asyncio.wait_for(ws.recv(), 10)
        return sid

    sid = asyncio.run(scenario())
    info = sessions(api, sb)[sid]  # bhatti keeps exited sessions listed for 30 s
    assert info["running"] is False and info["exit_code"] == 7 and info["attached"] is False


def test_init_output_is_in_the_init_session(daemon, api, sb):
    async def scenario():
        for _ in range(50):
            if "init" in sessions(api, sb):
                break
            await asyncio.sleep(0.1)
        ws, sid = await connect(daemon, sb, session="init")
        assert sid == "init"
        await read_until(ws, b"init-said-hello")
        await ws.close()

    asyncio.run(scenario())


def test_ws_auth(daemon, api, sb):
    async def scenario():
        with pytest.raises(websockets.InvalidStatus) as e:
            await websockets.connect(ws_url(daemon, sb))
        assert e.value.response.status_code == 401
        with pytest.raises(websockets.InvalidStatus) as e:
            await websockets.connect(ws_url(daemon, sb, token="kiln_wrong"))
        assert e.value.response.status_code == 401
        ws = await websockets.connect(ws_url(daemon, sb, token=daemon.admin_token))
        assert json.loads(await ws.recv())["type"] == "session"
        await ws.close()
        token_b = daemon.create_user("terminal-b")
        with pytest.raises(websockets.InvalidStatus) as e:
            await websockets.connect(ws_url(daemon, sb, token=token_b))
        assert e.value.response.status_code == 404

    asyncio.run(scenario())
