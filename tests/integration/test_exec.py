"""POST /sandboxes/:id/exec against a real sandbox: codes, streams, identity, timeouts."""

import json
import time

import pytest


def run(api, sandbox, **body):
    r = api.post(f"/sandboxes/{sandbox['id']}/exec", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def processes(api, sandbox) -> str:
    return run(api, sandbox, cmd=["ps", "-eo", "pid,pgid,args"], user="root")["stdout"]


@pytest.mark.parametrize(
    "cmd, code",
    [
        (["true"], 0),
        (["false"], 1),
        (["sh", "-c", "exit 42"], 42),
        (["sh", "-c", "kill -9 $$"], 137),
        (["sh", "-c", "kill -TERM $$"], 143),
    ],
)
def test_exit_codes(api, sandbox, cmd, code):
    assert run(api, sandbox, cmd=cmd)["exit_code"] == code


def test_missing_binary_is_127_with_a_message(api, sandbox):
    out = run(api, sandbox, cmd=["no-such-binary", "x"])
    assert out["exit_code"] == 127
    assert "no-such-binary" in out["stderr"] and "not found" in out["stderr"]


def test_stdout_and_stderr_are_separate(api, sandbox):
    out = run(api, sandbox, cmd=["sh", "-c", "echo out; echo err >&2; echo out2"])
    assert out == {"exit_code": 0, "stdout": "out\nout2\n", "stderr": "err\n"}


def test_env_from_create_and_request(api, sandbox):
    out = run(
        api, sandbox, cmd=["sh", "-c", 'echo "$FOO $SHARED $EXTRA $HOME $PATH"'], env={"EXTRA": "x", "SHARED": "2"}
    )
    foo, shared, extra, home, path = out["stdout"].split()
    assert (foo, shared, extra, home) == ("bar", "2", "x", "/home/kiln")
    assert "/usr/bin" in path


def test_stdin_is_passed(api, sandbox):
    assert run(api, sandbox, cmd=["cat"], stdin="line1\nline2\n")["stdout"] == "line1\nline2\n"
    big = "x" * (900 * 1024)  # JSON bodies are capped at 1 MiB
    assert len(run(api, sandbox, cmd=["cat"], stdin=big)["stdout"]) == len(big)
    # no stdin: the command reads EOF at once instead of hanging
    assert run(api, sandbox, cmd=["cat"], timeout_sec=5)["exit_code"] == 0


def test_cwd_and_user(api, sandbox):
    assert run(api, sandbox, cmd=["pwd"])["stdout"] == "/\n"
    assert run(api, sandbox, cmd=["pwd"], cwd="/tmp")["stdout"] == "/tmp\n"
    assert run(api, sandbox, cmd=["id", "-u"])["stdout"] == "1000\n"
    assert run(api, sandbox, cmd=["id", "-u"], user="root")["stdout"] == "0\n"
    assert run(api, sandbox, cmd=["id", "-u"], user="0")["stdout"] == "0\n"
    assert run(api, sandbox, cmd=["id", "-un"], user=1000)["stdout"] == "kiln\n"
    # uid 1000 cannot write where only root can
    assert run(api, sandbox, cmd=["touch", "/etc/x"])["exit_code"] != 0


def test_ndjson_streams_lines_before_the_command_ends(daemon, api, sandbox):
    body = {"cmd": ["sh", "-c", "echo a; sleep 2; echo b >&2; echo c"]}
    lines, times = [], []
    with api.stream(
        "POST", f"/sandboxes/{sandbox['id']}/exec", json=body, headers={"Accept": "application/x-ndjson"}
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/x-ndjson"
        for raw in r.iter_lines():
            lines.append(json.loads(raw))
            times.append(time.monotonic())
    assert lines[0] == {"type": "stdout", "data": "a\n"}
    assert {"type": "stderr", "data": "b\n"} in lines and {"type": "stdout", "data": "c\n"} in lines
    assert lines[-1] == {"type": "exit", "exit_code": 0}
    # the first line was delivered while the command was still sleeping
    assert times[-1] - times[0] > 1.5


def test_buffered_timeout_kills_the_process_group(api, sandbox):
    start = time.monotonic()
    out = run(api, sandbox, cmd=["sh", "-c", "sleep 100 & sleep 100; echo never"], timeout_sec=1)
    assert out["exit_code"] == 124 and out["timed_out"] is True
    assert time.monotonic() - start < 10
    assert "sleep 100" not in processes(api, sandbox)


def test_stream_timeout_ends_with_timed_out_exit(api, sandbox):
    body = {"cmd": ["sleep", "100"], "timeout_sec": 1}
    with api.stream(
        "POST", f"/sandboxes/{sandbox['id']}/exec", json=body, headers={"Accept": "application/x-ndjson"}
    ) as r:
        lines = [json.loads(x) for x in r.iter_lines()]
    assert lines[-1] == {"type": "exit", "exit_code": 124, "timed_out": True}
    assert "sleep 100" not in processes(api, sandbox)


def test_client_disconnect_kills_a_streaming_command(api, sandbox):
    body = {"cmd": ["sh", "-c", "echo started; sleep 300"]}
    with api.stream(
        "POST", f"/sandboxes/{sandbox['id']}/exec", json=body, headers={"Accept": "application/x-ndjson"}
    ) as r:
        lines = r.iter_lines()  # keep a reference: a collected iterator closes the response
        first = next(lines)
        assert json.loads(first) == {"type": "stdout", "data": "started\n"}
        assert "sleep 300" in processes(api, sandbox)
    for _ in range(50):
        if "sleep 300" not in processes(api, sandbox):
            break
        time.sleep(0.1)
    assert "sleep 300" not in processes(api, sandbox)


def test_buffered_output_is_capped_at_10mb(api, sandbox):
    out = run(api, sandbox, cmd=["sh", "-c", "head -c 11000000 /dev/zero | tr '\\0' x"])
    assert out["exit_code"] == 0
    assert len(out["stdout"]) == 10 * 1024 * 1024
    assert out["stderr"].endswith("[output truncated at 10MB]")


def test_large_output_streams_completely(api, sandbox):
    total = 0
    with api.stream(
        "POST",
        f"/sandboxes/{sandbox['id']}/exec",
        json={"cmd": ["sh", "-c", "head -c 20000000 /dev/zero | tr '\\0' y"]},
        headers={"Accept": "application/x-ndjson"},
    ) as r:
        for raw in r.iter_lines():
            ev = json.loads(raw)
            if ev["type"] == "stdout":
                total += len(ev["data"])
            last = ev
    assert total == 20000000 and last == {"type": "exit", "exit_code": 0}


def test_unicode_output_survives_chunking(api, sandbox):
    text = "héllo wörld ✓ 日本語\n" * 5000
    out = run(api, sandbox, cmd=["cat"], stdin=text)
    assert out["stdout"] == text


def test_timeout_out_of_range_falls_back_to_default(api, sandbox):
    assert run(api, sandbox, cmd=["true"], timeout_sec=10**9)["exit_code"] == 0
    assert run(api, sandbox, cmd=["true"], timeout_sec=-5)["exit_code"] == 0
