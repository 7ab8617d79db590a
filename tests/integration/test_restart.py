"""A daemon killed with SIGKILL comes back with every sandbox listed, usable, and no orphans."""

from tests.conftest import make_sandbox
from tests.daemon import Daemon


def test_kill_9_with_three_sandboxes_then_restart(default_image):
    d = Daemon()
    try:
        d.start()
        with d.client() as api:
            made = [make_sandbox(api, name=f"survivor-{i}", env={"N": str(i)}) for i in range(3)]
            for sb in made:
                api.post(f"/sandboxes/{sb['id']}/exec", json={"cmd": ["sh", "-c", "echo on-disk > /home/kiln/m"]})
        before = d.leftovers()
        d.kill9()

        d.start()
        with d.client() as api:
            listed = {s["id"]: s for s in api.get("/sandboxes").json()}
            assert set(listed) == {sb["id"] for sb in made}
            for i, sb in enumerate(made):
                assert listed[sb["id"]]["status"] == "running"
                out = api.post(
                    f"/sandboxes/{sb['id']}/exec", json={"cmd": ["sh", "-c", "echo $N; cat /home/kiln/m"]}
                ).json()
                assert out == {"exit_code": 0, "stdout": f"{i}\non-disk\n", "stderr": ""}
            # the same containers were adopted: nothing new, nothing orphaned
            after = d.leftovers()
            assert after == before and any(after.values())
            assert d.clean(keep={sb["id"] for sb in made})
            for sb in made:
                assert api.delete(f"/sandboxes/{sb['id']}").status_code == 200
        assert d.clean()
    finally:
        d.scrub()


def test_half_made_sandbox_is_cleaned_up_on_start(default_image):
    """A crash between reserving a sandbox and booting it leaves nothing after the restart."""
    import sqlite3

    d = Daemon()
    try:
        d.start()
        with d.client() as api:
            ok = make_sandbox(api, name="complete")
        d.kill9()
        db = sqlite3.connect(d.data_dir / "state.db")
        owner = db.execute("SELECT owner_id FROM sandboxes").fetchone()[0]
        db.execute(
            "INSERT INTO sandboxes (id, owner_id, name, status, cpus, memory_mb, image, created_at)"
            " VALUES ('0123456789abcdef', ?, 'half', 'creating', 1, 512, 'default', '2026-01-01T00:00:00Z')",
            (owner,),
        )
        db.commit()
        db.close()
        (d.data_dir / "sandboxes" / "fedcba9876543210").mkdir()  # engine dir without a record
        d.start()
        with d.client() as api:
            assert [s["name"] for s in api.get("/sandboxes").json()] == ["complete"]
            assert api.post(f"/sandboxes/{ok['id']}/exec", json={"cmd": ["true"]}).json()["exit_code"] == 0
            assert d.clean(keep={ok["id"]})
            api.delete(f"/sandboxes/{ok['id']}")
    finally:
        d.scrub()
