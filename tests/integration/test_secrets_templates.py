"""Secrets (sealed at rest, injected as env) and templates, with real sandboxes."""

import secrets as pysecrets
from pathlib import Path

import pytest

from tests.conftest import make_sandbox, run, wait_for

VALUE = "s3cr3t-" + pysecrets.token_hex(12)  # unique: found anywhere only if it leaked there
MEMORY_SNAPSHOT_PARTS = {"snapshot", "checkpoint.tmp", "restore.tmp"}
DISK_IMAGES = {"disk.ext4"}  # read through its mount (disk/upper) instead: the raw image is 10 GiB sparse


def plaintext_files(root: Path, needle: bytes) -> list[str]:
    """Files under root holding needle, except sandboxes' memory snapshots (which hold their env)."""
    found = []
    for path in root.rglob("*"):
        if not path.is_file() or MEMORY_SNAPSHOT_PARTS & set(path.relative_to(root).parts) or path.name in DISK_IMAGES:
            continue
        try:
            if needle in path.read_bytes():
                found.append(str(path))
        except OSError:
            pass
    return found


def test_secret_round_trip_and_injection(api, daemon):
    r = api.post("/secrets", json={"name": "API_KEY", "value": "first-value"})
    assert r.status_code == 201 and set(r.json()) == {"name", "created_at", "updated_at"}
    r = api.post("/secrets", json={"name": "API_KEY", "value": VALUE})  # upsert
    assert r.status_code == 201 and r.json()["updated_at"] >= r.json()["created_at"]
    listed = api.get("/secrets")
    assert [s["name"] for s in listed.json()] == ["API_KEY"] and VALUE not in listed.text

    sb = make_sandbox(
        api,
        name="with-secret",
        env={"API_KEY": "from-env", "OTHER": "x"},
        secrets=["API_KEY"],
        init="printenv API_KEY > /tmp/init-saw",
    )
    try:
        assert VALUE not in str(sb)
        assert run(api, sb, ["printenv", "API_KEY"])["stdout"] == VALUE + "\n"  # the secret wins over env
        assert run(api, sb, ["printenv", "OTHER"])["stdout"] == "x\n"
        assert run(api, sb, ["printenv", "API_KEY"], env={"API_KEY": "req"})["stdout"] == "req\n"  # request wins
        wait_for(lambda: run(api, sb, ["cat", "/tmp/init-saw"])["stdout"] == VALUE + "\n", what="init saw it")
        for path in ("/sandboxes", f"/sandboxes/{sb['id']}"):
            assert VALUE not in api.get(path).text
        # deleting the secret does not change a sandbox made with it, not even across stop/start
        assert api.delete("/secrets/API_KEY").json() == {"status": "deleted"}
        assert api.delete("/secrets/API_KEY").status_code == 404
        assert api.post(f"/sandboxes/{sb['id']}/stop").json()["status"] == "stopped"
        assert run(api, sb, ["printenv", "API_KEY"])["stdout"] == VALUE + "\n"
        leaks = plaintext_files(daemon.data_dir, VALUE.encode())
        assert leaks == [], leaks  # not in the store, the WAL, agent configs, volumes or the daemon log
    finally:
        api.delete(f"/sandboxes/{sb['id']}")


def test_secrets_come_back_after_the_sandbox_dies_and_boots_on_its_disk(api):
    api.post("/secrets", json={"name": "TOKEN_B", "value": "value-b"})
    sb = make_sandbox(api, name="dies", memory_mb=128, secrets=["TOKEN_B"])
    try:
        hog = "x = []\nwhile True: x.append(bytearray(16 << 20))"
        r = api.post(f"/sandboxes/{sb['id']}/exec", json={"cmd": ["python3", "-c", hog]})
        assert r.status_code == 409, r.text
        assert api.post(f"/sandboxes/{sb['id']}/start").json()["status"] == "running"
        assert run(api, sb, ["printenv", "TOKEN_B"])["stdout"] == "value-b\n"  # a new agent got them again
    finally:
        api.delete(f"/sandboxes/{sb['id']}")
        api.delete("/secrets/TOKEN_B")


def test_secret_errors_change_nothing(api):
    before = len(api.get("/sandboxes").json())
    r = api.post("/sandboxes", json={"name": "nope", "secrets": ["NOT_THERE"]})
    assert r.status_code == 400 and r.json() == {"error": 'secret "NOT_THERE" not found'}
    assert len(api.get("/sandboxes").json()) == before
    for body in ({"name": "", "value": "v"}, {"name": "N", "value": ""}, {}):
        r = api.post("/secrets", json=body)
        assert r.status_code == 400 and r.json() == {"error": "name and value required"}
    r = api.post("/secrets", json={"name": "bad name", "value": "hidden-value-1"})
    assert r.status_code == 400 and "hidden-value-1" not in r.text
    r = api.post("/secrets", json={"name": "BIG", "value": "v" * (64 * 1024 + 1)})
    assert r.status_code == 400 and "vvvv" not in r.text
    assert api.get("/secrets").json() == []


def test_template_round_trip_and_create_from_it(api):
    api.post("/secrets", json={"name": "TPL_SECRET", "value": "from-template"})
    r = api.post(
        "/templates",
        json={
            "name": "small",
            "cpus": 0.5,
            "memory_mb": 256,
            "env": {"A": "1", "B": "b"},
            "init": "touch /tmp/init-ran",
            "secrets": ["TPL_SECRET"],
            "keep_hot": True,
        },
    )
    assert r.status_code == 201, r.text
    t = r.json()
    assert t["name"] == "small" and t["cpus"] == 0.5 and t["memory_mb"] == 256 and t["keep_hot"] is True
    assert api.get(f"/templates/{t['id']}").json() == t == api.get("/templates/small").json()
    assert [x["id"] for x in api.get("/templates").json()] == [t["id"]]
    assert api.post("/templates", json={"name": "small"}).status_code == 409

    plain = make_sandbox(api, template_id=t["id"])
    custom = make_sandbox(api, name="custom", template_id="small", memory_mb=384, env={"A": "2"}, keep_hot=False)
    try:
        assert plain["name"].startswith("small-") and plain["template_id"] == t["id"]
        assert (plain["cpus"], plain["memory_mb"], plain["keep_hot"]) == (0.5, 256, True)
        assert run(api, plain, ["sh", "-c", "echo $A $B $TPL_SECRET"])["stdout"] == "1 b from-template\n"
        wait_for(lambda: run(api, plain, ["test", "-f", "/tmp/init-ran"])["exit_code"] == 0, what="init")
        assert (custom["cpus"], custom["memory_mb"], custom["keep_hot"]) == (0.5, 384, False)
        assert run(api, custom, ["sh", "-c", "echo $A $B $TPL_SECRET"])["stdout"] == "2 b from-template\n"
    finally:
        api.delete(f"/sandboxes/{plain['id']}")
        api.delete(f"/sandboxes/{custom['id']}")
    before = len(api.get("/sandboxes").json())
    r = api.post("/sandboxes", json={"template_id": "no-such-template"})
    assert r.status_code == 404 and r.json() == {"error": "template not found"}
    assert len(api.get("/sandboxes").json()) == before
    assert api.delete(f"/templates/{t['id']}").json() == {"status": "deleted"}
    r = api.get(f"/templates/{t['id']}")
    assert r.status_code == 404 and r.json() == {"error": "not found"}
    r = api.delete("/templates/small")
    assert r.status_code == 404 and r.json() == {"error": 'template "small" not found'}
    api.delete("/secrets/TPL_SECRET")


@pytest.mark.parametrize(
    "body",
    [
        {"name": "bad name"},
        {"name": "t", "cpus": 0},
        {"name": "t", "env": {"1X": "v"}},
        {"name": "t", "volumes": [{"name": "v", "mount": "/etc"}]},
        {"name": "t", "secrets": ["no spaces"]},
    ],
)
def test_template_validation(api, body):
    r = api.post("/templates", json=body)
    assert r.status_code == 400, r.text
    assert api.get("/templates").json() == []
