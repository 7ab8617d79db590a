"""Volumes: size-capped ext4 filesystems mounted into real sandboxes, outliving them."""

import pytest

from tests.conftest import make_sandbox, run


@pytest.fixture(autouse=True)
def no_volumes_left(api, daemon):
    yield
    for s in api.get("/sandboxes").json():
        api.delete(f"/sandboxes/{s['id']}")
    for v in api.get("/volumes").json():
        assert api.delete(f"/volumes/{v['name']}").status_code == 200
    assert daemon.clean()  # every mount went with its last user


def test_volume_crud_and_validation(api):
    r = api.post("/volumes", json={"name": "data", "size_mb": 32})
    assert r.status_code == 201, r.text
    v = r.json()
    assert (v["name"], v["size_mb"], v["status"], v["attachments"]) == ("data", 32, "ready", [])
    assert api.get("/volumes/data").json() == v and [x["id"] for x in api.get("/volumes").json()] == [v["id"]]
    r = api.post("/volumes", json={"name": "data", "size_mb": 32})
    assert r.status_code == 409 and r.json() == {"error": 'volume "data" already exists'}
    for body in ({"name": "x", "size_mb": 0}, {"name": "", "size_mb": 5}, {"name": "x", "size_mb": -1}):
        r = api.post("/volumes", json=body)
        assert r.status_code == 400 and r.json() == {"error": "name and size_mb (> 0) required"}
    assert api.post("/volumes", json={"name": "bad name", "size_mb": 5}).status_code == 400
    assert api.post("/volumes", json={"name": "default-size"}).json()["size_mb"] == 1024
    assert api.get("/volumes/missing").status_code == 404
    assert api.delete("/volumes/missing").status_code == 404
    assert sorted(x["name"] for x in api.get("/volumes").json()) == ["data", "default-size"]


def test_size_cap_read_only_and_data_across_sandboxes(api):
    api.post("/volumes", json={"name": "shared", "size_mb": 32})
    writer = make_sandbox(api, name="writer", volumes=[{"name": "shared", "mount": "/data"}])
    run(api, writer, ["sh", "-c", "echo kept > /data/note && id -u > /data/owner && stat -c %u /data > /data/dir"])
    full = run(api, writer, ["dd", "if=/dev/zero", "of=/data/big", "bs=1M", "count=64"])
    assert full["exit_code"] != 0 and "No space left on device" in full["stderr"]
    run(api, writer, ["rm", "-f", "/data/big"])
    attached = api.get("/volumes/shared").json()["attachments"]
    assert attached == [{"sandbox_id": writer["id"], "mount": "/data", "read_only": False}]
    # one writer at a time: a second attach, even read-only, waits for it to go
    r = api.post(
        "/sandboxes", json={"name": "reader", "volumes": [{"name": "shared", "mount": "/data", "read_only": True}]}
    )
    assert r.status_code == 409 and "read-write attachment" in r.json()["error"]
    r = api.delete("/volumes/shared")
    assert r.status_code == 409 and r.json() == {"error": 'volume "shared" has 1 active attachment(s)'}
    api.delete(f"/sandboxes/{writer['id']}")
    readers = [
        make_sandbox(api, name=f"reader-{i}", volumes=[{"name": "shared", "mount": "/mnt/in", "read_only": True}])
        for i in range(2)
    ]
    for reader in readers:
        assert (
            run(api, reader, ["cat", "/mnt/in/note", "/mnt/in/owner", "/mnt/in/dir"])["stdout"] == "kept\n1000\n1000\n"
        )
        denied = run(api, reader, ["sh", "-c", "echo x > /mnt/in/new"], user="root")
        assert denied["exit_code"] != 0 and "Read-only file system" in denied["stderr"]
    r = api.post("/sandboxes", json={"name": "rw-now", "volumes": [{"name": "shared", "mount": "/data"}]})
    assert r.status_code == 409 and "already attached" in r.json()["error"]


def test_new_volumes_outlive_the_sandbox_and_survive_stop_start_and_restart(api, daemon):
    sb = make_sandbox(api, name="maker", new_volumes=[{"name": "scratch", "size_mb": 16, "mount": "/scratch"}])
    run(api, sb, ["sh", "-c", "echo one > /scratch/f"])
    assert api.post(f"/sandboxes/{sb['id']}/stop").json()["status"] == "stopped"
    r = api.delete("/volumes/scratch")
    assert r.status_code == 409  # a cold sandbox still uses it
    run(api, sb, ["sh", "-c", "cat /scratch/f && echo two >> /scratch/f"])
    daemon.stop()
    daemon.start()
    assert run(api, sb, ["cat", "/scratch/f"])["stdout"] == "one\ntwo\n"
    api.delete(f"/sandboxes/{sb['id']}")
    assert api.get("/volumes/scratch").json()["attachments"] == []
    again = make_sandbox(api, name="again", volumes=[{"name": "scratch", "mount": "/s"}])
    assert run(api, again, ["cat", "/s/f"])["stdout"] == "one\ntwo\n"
    r = api.post("/sandboxes", json={"name": "dup", "new_volumes": [{"name": "scratch", "size_mb": 8, "mount": "/x"}]})
    assert r.status_code == 409 and r.json() == {"error": 'volume "scratch" already exists'}


@pytest.mark.parametrize(
    "volumes, status",
    [
        ([{"name": "missing", "mount": "/data"}], 404),
        ([{"name": "v", "mount": "relative"}], 400),
        ([{"name": "v", "mount": "/etc"}], 400),
        ([{"name": "v", "mount": "/data/../etc"}], 400),
        ([{"name": "v", "mount": "/opt/kiln/agent"}], 400),
        ([{"name": "v", "mount": "/a"}, {"name": "v", "mount": "/a"}], 400),
    ],
)
def test_bad_attachments_change_nothing(api, volumes, status):
    api.post("/volumes", json={"name": "v", "size_mb": 8})
    r = api.post("/sandboxes", json={"name": "bad", "volumes": volumes})
    assert r.status_code == status, r.text
    assert api.get("/sandboxes").json() == []
    assert api.get("/volumes/v").json()["attachments"] == []


def test_volume_storage_quota(daemon):
    token = daemon.create_user("small-quota", "--max-volume-storage", "40")
    with daemon.client(token) as c:
        assert c.post("/volumes", json={"name": "a", "size_mb": 30}).status_code == 201
        r = c.post("/volumes", json={"name": "b", "size_mb": 20})
        assert r.status_code == 429 and r.json() == {"error": "volume storage quota exceeded (30MB used, 40MB max)"}
        r = c.post("/sandboxes", json={"name": "s", "new_volumes": [{"name": "c", "size_mb": 11, "mount": "/c"}]})
        assert r.status_code == 429
        assert [v["name"] for v in c.get("/volumes").json()] == ["a"] and c.get("/sandboxes").json() == []
        assert c.delete("/volumes/a").status_code == 200
