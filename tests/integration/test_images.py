"""Images through the API against real sandboxes: the default developer image, imports of a
busybox-only root filesystem, a `docker save` tarball and an OCI archive (with a whiteout), saving
a running sandbox as an image, and the refusals (unknown, corrupt, too large, in use, escaping)."""

import asyncio
import json
import secrets
import socket
from pathlib import Path

import pytest
import websockets

from kiln.images.builder import image_dir, remove_tree
from kiln.images.recipes import BUILTIN
from tests.conftest import make_sandbox, run, wait_for
from tests.daemon import Daemon, running_daemon
from tests.image_archives import busybox_rootfs, escaping_rootfs, two_layer_image


def import_image(api, name: str, archive: Path, **kw):
    with open(archive, "rb") as f:
        return api.post("/images/import", params={"name": name}, content=f.read(), **kw)


def user_images_dir(daemon) -> Path:
    return daemon.data_dir / "user-images"


def image_names(api) -> set[str]:
    return {i["name"] for i in api.get("/images").json()}


def sandbox_count(api) -> int:
    return len(api.get("/sandboxes").json())


def test_the_default_image_is_a_developer_image(api):
    sb = make_sandbox(api, name="devbox")
    try:
        assert api.get(f"/sandboxes/{sb['id']}").json()["image"] == "default"
        script = "\n".join(
            [
                "set -e",
                "cd /workspace",
                "id -u",
                "git --version && git init -q repo && cd repo && git config user.email a@b && git config user.name a",
                "echo hi > f && git add f && git commit -qm first && git log --oneline | wc -l",
                "cd /workspace && mkdir -p app && cd app && npm init -y >/dev/null && node -e 'console.log(1+1)'",
                "test -f package.json",
                "cd /workspace && python3 -m venv venv && ./venv/bin/python -c 'import sys; print(sys.prefix)'",
                "./venv/bin/pip --version >/dev/null",
                "printf '#include <stdio.h>\\nint main(void){puts(\"compiled\");return 0;}\\n' > hello.c",
                "printf 'hello: hello.c\\n\\tgcc -o hello hello.c\\n' > Makefile && make -s && ./hello",
                "curl --version >/dev/null && wget --version >/dev/null && jq --version >/dev/null",
                "unzip -v >/dev/null && zip -v >/dev/null && ssh -V 2>/dev/null; less --version >/dev/null",
                "test -f /etc/sudoers.d/kiln && command -v sudo >/dev/null",  # (gVisor sets no_new_privs: see docs)
                "echo done",
            ]
        )
        r = run(api, sb, ["bash", "-c", script], timeout_sec=120)
        assert r["exit_code"] == 0, r
        lines = r["stdout"].split()
        assert lines[0] == "1000" and "compiled" in lines and "2" in lines and lines[-1] == "done", r["stdout"]
    finally:
        api.delete(f"/sandboxes/{sb['id']}")


def test_images_list_the_built_in_ones_which_are_read_only(api):
    listed = {i["name"]: i for i in api.get("/images").json()}
    assert listed["default"]["status"] == "ready" and listed["default"]["owner"] == "global"
    assert listed["minimal"]["source"] == "builtin" and listed["minimal"]["size_mb"] > 50
    assert api.delete("/images/default").status_code == 403
    assert api.get("/images/minimal").json()["name"] == "minimal"
    r = api.post("/images/import", params={"name": "minimal"}, content=b"x")
    assert r.status_code == 409 and "built-in" in r.json()["error"]
    assert api.post("/images/pull", json={"ref": "alpine"}).status_code == 501


def test_a_busybox_image_without_python_runs_exec_files_terminal_and_ports(api, daemon, tmp_path):
    archive = busybox_rootfs(tmp_path / "busybox.tar", {"www/index.html": b"from busybox\n"})
    r = import_image(api, "bb", archive)
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "bb" and r.json()["source"] == "import"
    sb = make_sandbox(api, name="bb-box", image="bb")
    try:
        r = run(api, sb, ["sh", "-c", "test ! -e /usr/bin/python3 && ls /usr 2>&1; echo $((6*7))"])
        assert r["exit_code"] == 0 and "42" in r["stdout"], r
        assert run(api, sb, ["id", "-u"])["stdout"].strip() == "1000"  # kiln's default user, unnamed here
        w = api.put(f"/sandboxes/{sb['id']}/files", params={"path": "/tmp/note.txt"}, content=b"written")
        assert w.status_code == 200, w.text
        assert api.get(f"/sandboxes/{sb['id']}/files", params={"path": "/tmp/note.txt"}).content == b"written"
        assert run(api, sb, ["cat", "/tmp/note.txt"])["stdout"] == "written"

        async def shell() -> bytes:
            url = f"ws://127.0.0.1:{daemon.port}/sandboxes/{sb['id']}/ws"
            headers = {"Authorization": f"Bearer {daemon.admin_token}"}
            async with websockets.connect(url, additional_headers=headers) as ws:
                first = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert first["type"] == "session"
                await ws.send(b"echo shell-$((40+2))\n")
                out = b""
                while b"shell-42" not in out:
                    msg = await asyncio.wait_for(ws.recv(), 10)
                    out += msg if isinstance(msg, bytes) else msg.encode()
                return out

        assert b"shell-42" in asyncio.run(shell())
        run(api, sb, ["sh", "-c", "httpd -p 8000 -h /www"])  # busybox httpd daemonizes itself
        wait_for(
            lambda: 8000 in {p["container_port"] for p in api.get(f"/sandboxes/{sb['id']}/ports").json()},
            what="busybox httpd in /ports",
        )
        page = api.get(f"/sandboxes/{sb['id']}/proxy/8000/index.html")
        assert page.status_code == 200 and page.text == "from busybox\n"
        assert api.delete("/images/bb").status_code == 409  # a sandbox uses it
    finally:
        api.delete(f"/sandboxes/{sb['id']}")
    assert api.delete("/images/bb").status_code == 200
    assert "bb" not in image_names(api) and api.get("/images/bb").status_code == 404


@pytest.mark.parametrize("kind", ["docker", "oci"])
def test_docker_save_and_oci_archives_apply_whiteouts_env_and_workdir(api, tmp_path, kind):
    docker, oci = two_layer_image(tmp_path)
    name = f"layers-{kind}"
    r = import_image(api, name, docker if kind == "docker" else oci)
    assert r.status_code == 201, r.text
    config = r.json()["config"]
    assert config["env"] == {"FOO": "bar"} and config["workdir"] == "/srv"
    sb = make_sandbox(api, image=name, env={"MINE": "1"})
    try:
        r = run(api, sb, ["sh", "-c", "pwd; echo $FOO $MINE; cat /etc/kept; test -e /etc/gone || echo gone-is-gone"])
        assert r["exit_code"] == 0, r
        assert r["stdout"].split("\n")[:4] == ["/srv", "bar 1", "kept", "gone-is-gone"], r["stdout"]
        # the sandbox's own env wins over the image's
        assert run(api, sb, ["sh", "-c", "echo $FOO"], env={"FOO": "mine"})["stdout"].strip() == "mine"
    finally:
        api.delete(f"/sandboxes/{sb['id']}")
    assert api.delete(f"/images/{name}").status_code == 200


def test_save_image_keeps_the_sandboxes_writes_and_it_keeps_running(api):
    src = make_sandbox(api, name="to-save", keep_hot=True)
    try:
        prep = "mkdir -p /opt && echo saved > /opt/marker && rm /etc/issue && (sleep 600 & echo $! > /tmp/pid)"
        assert run(api, src, ["sh", "-c", prep], user="root")["exit_code"] == 0
        pid = run(api, src, ["cat", "/tmp/pid"])["stdout"].strip()
        r = api.post(f"/sandboxes/{src['id']}/save-image", json={"name": "saved"})
        assert r.status_code == 201, r.text
        assert r.json()["source"] == "save"
        # the source kept running: same process, still writing
        assert run(api, src, ["kill", "-0", pid], user="root")["exit_code"] == 0
        assert api.get(f"/sandboxes/{src['id']}").json()["status"] == "running"
        assert api.post(f"/sandboxes/{src['id']}/save-image", json={"name": "saved"}).status_code == 409
        copy = make_sandbox(api, image="saved")
        try:
            r = run(api, copy, ["sh", "-c", "cat /opt/marker; test -e /etc/issue || echo issue-deleted; git --version"])
            assert r["stdout"].split("\n")[:2] == ["saved", "issue-deleted"] and "git version" in r["stdout"], r
        finally:
            api.delete(f"/sandboxes/{copy['id']}")
    finally:
        api.delete(f"/sandboxes/{src['id']}")
    assert api.delete("/images/saved").status_code == 200


def test_unknown_images_are_404_and_create_nothing(api):
    before = sandbox_count(api)
    r = api.post("/sandboxes", json={"name": "ghost", "image": "no-such-image"})
    assert r.status_code == 404 and r.json()["error"] == 'image "no-such-image" not found'
    assert sandbox_count(api) == before
    r = api.post("/templates", json={"name": "ghost-t", "image": "no-such-image"})
    assert r.status_code == 404 and "no-such-image" in r.json()["error"]
    assert all(t["name"] != "ghost-t" for t in api.get("/templates").json())
    assert api.post("/sandboxes/nope/save-image", json={"name": "x"}).status_code == 404


def test_bad_archives_are_refused_and_leave_nothing(api, daemon, tmp_path):
    before = set(user_images_dir(daemon).iterdir())
    good = busybox_rootfs(tmp_path / "good.tar").read_bytes()
    cases = {
        "garbage": b"this is not a tar archive at all" * 100,
        "truncated": good[: len(good) // 2],
    }
    for name, body in cases.items():
        r = api.post("/images/import", params={"name": name}, content=body)
        assert r.status_code == 400, (name, r.text)
        assert "invalid image archive" in r.json()["error"]
    assert api.post("/images/import", params={"name": "empty"}, content=b"").status_code == 400
    assert api.post("/images/import", params={"name": "../x"}, content=good).status_code == 400
    assert not image_names(api) & {"garbage", "truncated", "empty"}
    assert set(user_images_dir(daemon).iterdir()) == before


def test_an_escaping_archive_never_writes_outside_its_tree(api, daemon, tmp_path):
    marker = f"kiln-escape-{secrets.token_hex(4)}"
    r = import_image(api, "escape", escaping_rootfs(tmp_path / "escape.tar", marker))
    assert r.status_code in (201, 400), r.text
    assert not list(Path("/tmp").glob(f"{marker}*")) and not list(Path("/etc").glob(f"{marker}*"))
    assert not list(Path("/").glob(f"{marker}*"))
    if r.status_code == 201:
        sb = make_sandbox(api, image="escape")
        try:
            assert run(api, sb, ["sh", "-c", "echo inside"])["stdout"] == "inside\n"
        finally:
            api.delete(f"/sandboxes/{sb['id']}")
        assert api.delete("/images/escape").status_code == 200


def test_limits_on_archive_size_image_count_and_concurrency(tmp_path):
    archive = busybox_rootfs(tmp_path / "bb.tar")
    with running_daemon({"limits": {"max_import_bytes": 1 << 20, "max_images": 1}}) as d, d.client() as api:
        big = api.post("/images/import", params={"name": "big"}, content=archive.read_bytes())
        assert big.status_code == 413, big.text
        streamed = api.post("/images/import", params={"name": "big"}, content=iter([archive.read_bytes()]))
        assert streamed.status_code == 413, streamed.text  # chunked: refused once past the cap
        assert archive.stat().st_size > 1 << 20  # busybox alone is ~2 MB: more than this cap
    with running_daemon({"limits": {"max_image_storage_mb": 1}}) as d, d.client() as api:
        r = import_image(api, "over", archive)  # busybox unpacks to ~2 MB: over a 1 MB storage quota
        assert r.status_code == 429 and "image storage quota exceeded" in r.json()["error"], r.text
        assert api.get("/images/over").status_code == 404 and not list((d.data_dir / "user-images").iterdir())
    with running_daemon({"limits": {"max_images": 1}}) as d, d.client() as api:
        assert import_image(api, "one", archive).status_code == 201
        r = import_image(api, "two", archive)
        assert r.status_code == 429 and "image limit reached (1/1)" in r.json()["error"]
        # another user sees built-ins, not the first user's image
        with d.client(d.create_user("other")) as c:
            names = {i["name"] for i in c.get("/images").json()}
            assert "one" not in names and {"default", "minimal"} <= names
            assert c.post("/sandboxes", json={"image": "one"}).status_code == 404


def builder_pids(images_dir: Path) -> list[int]:
    """Processes building into images_dir (found by their command line, to check; never to kill)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(images_dir) in cmdline:
                pids.append(int(proc.name))
    return pids


@pytest.mark.parametrize("stop", ["sigterm", "kill9"])
def test_a_daemon_without_its_images_answers_at_once_and_builds_them_in_the_background(tmp_path, stop):
    images_dir = tmp_path / "fresh-images"
    d = Daemon({"images_dir": str(images_dir)})
    try:
        d.start()
        with d.client() as api:
            assert api.get("/health").status_code == 200
            listed = {i["name"]: i for i in api.get("/images").json()}
            assert listed["default"]["status"] == "building" and listed["minimal"]["status"] == "building"
            wait_for(lambda: api.get("/images/minimal").json().get("progress"), what="build progress")
            r = api.post("/sandboxes", json={"name": "too-early"})
            assert r.status_code == 503 and r.headers["retry-after"] == "10", r.text
            assert "still being built" in r.json()["error"]
            assert api.get("/sandboxes").json() == []
        assert builder_pids(images_dir)
        d.kill9() if stop == "kill9" else d.stop()
        wait_for(lambda: not builder_pids(images_dir), timeout=30, what="the builds to stop with the daemon")
    finally:
        d.scrub()
        for r in BUILTIN.values():
            remove_tree(image_dir(images_dir, r))


def test_a_templates_start_command_runs_at_every_boot(api):
    body = {"name": "starter", "image": "minimal", "start": "cd /tmp && exec python3 -m http.server 8100"}
    t = api.post("/templates", json=body)
    assert t.status_code == 201, t.text
    assert t.json()["start"] == ["/bin/sh", "-c", body["start"]]
    sb = make_sandbox(api, template_id="starter")
    try:
        listening = lambda: 8100 in {p["container_port"] for p in api.get(f"/sandboxes/{sb['id']}/ports").json()}  # noqa: E731
        wait_for(listening, what="the template's start command")
        assert api.get(f"/sandboxes/{sb['id']}").json()["image"] == "minimal"
        assert api.post(f"/sandboxes/{sb['id']}/stop").status_code == 200
        assert api.post(f"/sandboxes/{sb['id']}/start").status_code == 200  # restored: it never stopped
        wait_for(listening, what="the server after a restore")
        starts = [s for s in api.get(f"/sandboxes/{sb['id']}/sessions").json() if s["session_id"] == "start"]
        assert len(starts) == 1 and starts[0]["running"]
    finally:
        api.delete(f"/sandboxes/{sb['id']}")
        api.delete("/templates/starter")
    r = api.post("/templates", json={"name": "bad", "snapshot": "x", "start": "true"})
    assert r.status_code == 400 and "start" in r.json()["error"]


def test_a_stalled_upload_is_cut_off_and_holds_up_only_its_own_user(tmp_path):
    archive = busybox_rootfs(tmp_path / "bb.tar").read_bytes()
    with running_daemon({"server": {"body_idle_timeout": 2}, "limits": {"max_image_jobs": 1}}) as d:
        other = d.create_user("other")
        with socket.create_connection(("127.0.0.1", d.port), timeout=30) as s:
            head = (
                f"POST /images/import?name=slow HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {d.admin_token}\r\n"
                f"Content-Length: {len(archive)}\r\n\r\n"
            ).encode()
            s.sendall(head + archive[:1000])  # then nothing more
            with d.client(other) as c:  # meanwhile another user's import is not held up
                assert c.post("/images/import", params={"name": "fast"}, content=archive).status_code == 201
            reply = ""
            while "}" not in reply:
                data = s.recv(65536)
                if not data:
                    break
                reply += data.decode(errors="replace")
        assert reply.startswith("HTTP/1.1 408") and "upload abandoned" in reply, reply
        with d.client() as api:
            assert api.get("/images/slow").status_code == 404
            assert [p.name for p in (d.data_dir / "user-images").iterdir()] == [
                i["id"] for i in d.client(other).get("/images").json() if i["name"] == "fast"
            ]
