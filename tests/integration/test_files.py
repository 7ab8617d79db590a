"""/sandboxes/:id/files against a real sandbox: round trips, truncation, atomicity, size, paths."""

import hashlib
import os
import secrets
import threading

import pytest

from tests.conftest import make_sandbox


@pytest.fixture(scope="module")
def sb(api):
    s = make_sandbox(api, name="files", keep_hot=True)
    yield s
    api.delete(f"/sandboxes/{s['id']}")


def url(sb):
    return f"/sandboxes/{sb['id']}/files"


def put(api, sb, path, data: bytes, **params):
    r = api.put(url(sb), params={"path": path, **params}, content=data)
    assert r.status_code == 200 and r.json() == {"status": "ok"}, r.text


@pytest.mark.parametrize(
    "data",
    [
        b"hello\nworld\n",
        bytes(range(256)) * 4,
        b"",
        "héllo wörld ✓ 日本語\n".encode(),
    ],
)
def test_round_trip(api, sb, data):
    put(api, sb, "/workspace/rt/file", data)
    r = api.get(url(sb), params={"path": "/workspace/rt/file"})
    assert r.status_code == 200 and r.content == data
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["x-file-size"] == str(len(data)) and r.headers["content-length"] == str(len(data))


def test_mode_owner_and_head(api, sb):
    put(api, sb, "/workspace/deep/new/dir/script.sh", b"#!/bin/sh\necho ran\n", mode="0755")
    h = api.head(url(sb), params={"path": "/workspace/deep/new/dir/script.sh"})
    assert h.status_code == 200
    assert (h.headers["x-file-size"], h.headers["x-file-mode"], h.headers["x-file-isdir"]) == ("19", "0755", "false")
    assert api.head(url(sb), params={"path": "/workspace/deep"}).headers["x-file-isdir"] == "true"
    assert api.head(url(sb), params={"path": "/nope"}).status_code == 404
    out = api.post(
        f"/sandboxes/{sb['id']}/exec",
        json={
            "cmd": [
                "sh",
                "-c",
                "/workspace/deep/new/dir/script.sh; "
                "stat -c '%u %g' /workspace/deep/new/dir/script.sh /workspace/deep/new",
            ]
        },
    ).json()
    assert out["stdout"] == "ran\n1000 1000\n1000 1000\n"


@pytest.mark.parametrize(
    "params, body",
    [
        ({"offset": "3"}, b"line3\nline4\nlast\n"),  # offset alone: from that line on
        ({"limit": "2"}, b"line1\nline2\n"),
        ({"offset": "2", "limit": "2"}, b"line2\nline3\n"),
        ({"max_bytes": "8"}, b"line1\nli"),  # cut mid-line
        ({"offset": "4", "max_bytes": "100"}, b"line4\nlast\n"),  # a last line gets its newline
        ({"offset": "99", "limit": "5"}, b""),  # beyond EOF
    ],
)
def test_truncated_reads(api, sb, params, body):
    content = b"line1\nline2\nline3\nline4\nlast"
    put(api, sb, "/workspace/lines.txt", content)
    r = api.get(url(sb), params={"path": "/workspace/lines.txt", **params})
    assert r.status_code == 200 and r.content == body
    assert r.headers["x-file-size"] == str(len(content)) and "content-length" not in r.headers


def test_errors(api, sb):
    r = api.get(url(sb))
    assert r.status_code == 400 and r.json() == {"error": "path query parameter required"}
    r = api.get(url(sb), params={"path": "/no/such/file"})
    assert r.status_code == 404 and r.json() == {"error": "no such file: /no/such/file"}
    r = api.get(url(sb), params={"path": "/workspace"})
    assert r.status_code == 400 and "directory" in r.json()["error"]
    r = api.get(url(sb), params={"path": "relative"})
    assert r.status_code == 400
    r = api.put(url(sb), params={"path": "/workspace/x"}, content=iter([b"chunked", b"body"]))
    assert r.status_code == 400 and r.json() == {"error": "Content-Length header required for file upload"}
    r = api.put(url(sb), params={"path": "/workspace/x", "mode": "rw"}, content=b"x")
    assert r.status_code == 400


def test_ls_caps_at_10000_with_the_true_total(api, sb):
    out = api.post(
        f"/sandboxes/{sb['id']}/exec",
        json={
            "cmd": [
                "python3",
                "-c",
                "import os\nos.makedirs('/tmp/many')\nfor i in range(10050): open(f'/tmp/many/f{i}', 'w').close()",
            ]
        },
    )
    assert out.json()["exit_code"] == 0
    entries = api.get(url(sb), params={"path": "/tmp/many", "ls": "true"}).json()
    assert len(entries) == 10001
    assert entries[-1] == {
        "name": "... truncated at 10000 entries (10050 total)",
        "size": 0,
        "mode": "",
        "is_dir": False,
        "mtime": 0,
    }
    small = api.get(url(sb), params={"path": "/workspace/deep/new", "ls": "true"}).json()
    assert small[0]["name"] == "dir" and small[0]["is_dir"] is True and small[0]["mode"] == "0755"


def test_concurrent_readers_see_whole_versions_only(daemon, sb):
    versions = [bytes([i]) * (1024 * 1024) for i in range(2)]
    with daemon.client() as w:
        w.put(url(sb), params={"path": "/workspace/atomic"}, content=versions[0])
    bad, stop = [], threading.Event()

    def reader():
        with daemon.client() as c:
            while not stop.is_set():
                data = c.get(url(sb), params={"path": "/workspace/atomic"}).content
                if data not in versions:
                    bad.append(len(data))

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    with daemon.client() as w:
        for i in range(50):
            assert w.put(url(sb), params={"path": "/workspace/atomic"}, content=versions[i % 2]).status_code == 200
    stop.set()
    for t in threads:
        t.join()
    assert bad == []


def rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_200mb_upload_and_download_stream_through_the_daemon(daemon, api, sb, tmp_path):
    size = 200 * 1024 * 1024
    block = os.urandom(1024 * 1024)
    before = rss_kb(daemon.proc.pid)
    peak = [before]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_kb(daemon.proc.pid))
            stop.wait(0.05)

    t = threading.Thread(target=sample)
    t.start()
    try:
        body = (block for _ in range(size // len(block)))
        expected = hashlib.sha256()
        for _ in range(size // len(block)):
            expected.update(block)
        r = api.put(url(sb), params={"path": "/tmp/big"}, content=body, headers={"Content-Length": str(size)})
        assert r.status_code == 200, r.text
        got = 0
        with api.stream("GET", url(sb), params={"path": "/tmp/big"}) as resp:
            assert resp.headers["content-length"] == str(size)
            digest = hashlib.sha256()
            for chunk in resp.iter_bytes():
                digest.update(chunk)
                got += len(chunk)
        assert got == size and digest.hexdigest() == expected.hexdigest()
    finally:
        stop.set()
        t.join()
    out = api.post(f"/sandboxes/{sb['id']}/exec", json={"cmd": ["stat", "-c", "%s", "/tmp/big"]}).json()
    assert out["stdout"] == f"{size}\n"
    assert (peak[0] - before) < 64 * 1024, f"daemon RSS grew by {(peak[0] - before) // 1024} MB"


def test_paths_never_reach_the_host(api, sb):
    marker = f"/tmp/kiln-host-marker-{secrets.token_hex(4)}"
    with open(marker, "w") as f:
        f.write("host-only")
    try:
        for path in (f"/../../..{marker}", f"/tmp/../..{marker}", f"/{'../' * 8}{marker[1:]}", marker):
            r = api.get(url(sb), params={"path": path})
            assert r.status_code == 404 and b"host-only" not in r.content
        # a symlink inside the sandbox pointing "outside" still resolves inside it
        api.post(f"/sandboxes/{sb['id']}/exec", json={"cmd": ["ln", "-sf", f"/../../..{marker}", "/tmp/escape"]})
        assert api.get(url(sb), params={"path": "/tmp/escape"}).status_code == 404
        put(api, sb, "/tmp/escape", b"written through the link")
        put(api, sb, f"/../..{marker}", b"overwrite?")
        assert open(marker).read() == "host-only"
        assert api.get(url(sb), params={"path": marker}).content == b"overwrite?"  # the sandbox's own /tmp
    finally:
        os.unlink(marker)
