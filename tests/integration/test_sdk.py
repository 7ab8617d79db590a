"""The Python SDK, sync and async, against a real daemon and real sandboxes."""

import asyncio

import pytest

from kiln.client import AsyncKiln, Conflict, InvalidArgument, Kiln, NotFound, Sandbox, Timeout, Unauthorized
from tests.conftest import start_web_app


@pytest.fixture(scope="module")
def kiln(daemon):
    with Kiln(daemon.url, daemon.admin_token) as k:
        yield k


def test_sync_sdk_end_to_end(kiln, api, daemon):
    sb = kiln.sandboxes.create("sdk-sync", env={"GREETING": "hello"})
    assert isinstance(sb, Sandbox) and sb.status == "running" and sb.name == "sdk-sync"
    try:
        seen = []
        result = sb.commands.run("echo $GREETING; echo oops >&2; exit 3", on_stdout=seen.append)
        assert (result.exit_code, result.stdout, result.stderr) == (3, "hello\n", "oops\n")
        assert "".join(seen) == "hello\n"
        assert sb.commands.run(["printf", "%s", "a b"]).stdout == "a b"
        assert sb.commands.run("pwd", cwd="/tmp", env={"X": "1"}).stdout == "/tmp\n"
        assert sb.commands.run("sleep 5", timeout=1).timed_out is True

        sb.files.write("/workspace/sdk/hello.txt", "hi there")
        assert sb.files.read("/workspace/sdk/hello.txt") == b"hi there"
        assert sb.files.stat("/workspace/sdk/hello.txt")["size"] == 8
        assert [e["name"] for e in sb.files.list("/workspace/sdk")] == ["hello.txt"]

        with sb.pty(rows=30, cols=100) as term:
            term.send("echo pty-$((40+2)); stty size\n")
            out = term.read_until("pty-42", timeout=20)
            assert b"pty-42" in out
            term.read_until("30 100", timeout=20)
            with pytest.raises(Timeout):
                term.read_until("never-printed", timeout=0.5)

        start_web_app(api, sb.info, 8080)
        assert 8080 in [p["container_port"] for p in sb.ports()]
        rule = sb.publish(8080)
        assert rule["url"].startswith(f"http://{rule['alias']}.localhost:{daemon.port}")
        assert [r["port"] for r in sb.published()] == [8080]
        sb.unpublish(8080)

        assert sb.stop().status == "stopped"
        assert sb.commands.run("echo back").stdout == "back\n"  # any call wakes it
        assert sb.refresh().status == "running"
        assert Sandbox.connect("sdk-sync", kiln).id == sb.id
    finally:
        sb.destroy()
    with pytest.raises(NotFound):
        Sandbox.connect("sdk-sync", kiln)


def test_sync_sdk_errors(kiln, daemon):
    with pytest.raises(InvalidArgument) as e:
        kiln.sandboxes.create("bad name!")
    assert "invalid sandbox name" in e.value.message and e.value.status == 400
    with Kiln(daemon.url, "kiln_wrong") as bad, pytest.raises(Unauthorized):
        bad.sandboxes.list()
    kiln.volumes.create("sdk-vol", 8)
    sb = kiln.sandboxes.create("sdk-err", volumes=[{"name": "sdk-vol", "mount": "/v"}])
    try:
        with pytest.raises(Conflict):
            kiln.volumes.delete("sdk-vol")
    finally:
        sb.destroy()
    kiln.volumes.delete("sdk-vol")


def test_async_sdk_end_to_end(daemon):
    async def go():
        async with AsyncKiln(daemon.url, daemon.admin_token) as kiln:
            sb = await kiln.sandboxes.create("sdk-async")
            try:
                chunks = []
                r = await sb.commands.run(["sh", "-c", "for i in 1 2 3; do echo $i; done"], on_stdout=chunks.append)
                assert r.exit_code == 0 and r.stdout == "1\n2\n3\n" and "".join(chunks) == r.stdout
                await sb.files.write("/tmp/a", b"\x00\x01")
                assert await sb.files.read("/tmp/a") == b"\x00\x01"
                async with sb.pty() as term:
                    await term.send(b"echo async-$((2*21))\n")
                    assert b"async-42" in await term.read_until("async-42", timeout=20)
                rule = await sb.publish(8080, alias="sdk-async-app")
                assert rule["url"] == f"http://sdk-async-app.localhost:{daemon.port}"
                await sb.unpublish(8080)
                assert await sb.published() == []
                assert (await sb.stop()).status == "stopped"
                assert (await sb.start()).status == "running"
                assert [s.id for s in await kiln.sandboxes.list()] == [sb.id]
            finally:
                await sb.destroy()
            with pytest.raises(NotFound):
                await kiln.sandboxes.get("sdk-async")

    asyncio.run(go())


def test_images_through_the_sdk(kiln, tmp_path):
    from kiln.client import BuildFailed
    from tests.image_archives import busybox_rootfs

    assert {"default", "minimal"} <= {i["name"] for i in kiln.images.list()}
    imported = kiln.images.import_archive("sdk-bb", busybox_rootfs(tmp_path / "bb.tar"))
    assert imported["name"] == "sdk-bb" and kiln.images.get("sdk-bb")["source"] == "import"
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "Dockerfile").write_text("FROM sdk-bb\nCOPY note.txt /note.txt\nRUN cat /note.txt\n")
    (tmp_path / "ctx" / "note.txt").write_text("from the sdk\n")
    events = []
    built = kiln.images.build("sdk-built", tmp_path / "ctx", on_event=events.append)
    assert built["name"] == "sdk-built" and [e["type"] for e in events][-1] == "done"
    assert any(e["type"] == "stdout" and "from the sdk" in e["data"] for e in events)
    sb = kiln.sandboxes.create(image="sdk-built")
    try:
        assert sb.commands.run(["cat", "/note.txt"]).stdout == "from the sdk\n"
        saved = sb.save_image("sdk-saved")
        assert saved["source"] == "save"
    finally:
        sb.destroy()
    (tmp_path / "ctx" / "Dockerfile").write_text("FROM sdk-bb\nRUN exit 7\n")
    with pytest.raises(BuildFailed) as failed:
        kiln.images.build("sdk-broken", tmp_path / "ctx")
    assert failed.value.exit_code == 7
    with pytest.raises(NotFound):
        kiln.images.get("sdk-broken")
    for name in ("sdk-saved", "sdk-built", "sdk-bb"):
        kiln.images.delete(name)
