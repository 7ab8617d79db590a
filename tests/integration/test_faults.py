"""kill -9 of the daemon in the middle of creates, stops (snapshot writes) and destroys, 20 times:
after each restart every sandbox is fully there and usable, or fully gone, and nothing is orphaned."""

import random
import threading
import time

import httpx

from tests.daemon import Daemon


def owned_objects(d: Daemon, ids: set[str]) -> dict[str, list[str]]:
    """Host objects that belong to no sandbox the API knows, scratch files and unreferenced page packs
    (as the engine reports them): must be empty."""
    return {k: v for k, v in d.leftovers(keep=ids).items() if v}


def test_kill9_during_creates_stops_and_destroys_twenty_times(default_image):
    rng = random.Random(20261129)
    d = Daemon()
    try:
        d.start()
        with d.client() as api:
            keeper = api.post("/sandboxes", json={"name": "keeper", "memory_mb": 256}).json()
            marker = "echo $RANDOM > /dev/shm/mark; cat /dev/shm/mark"
            expected = {
                keeper["id"]: api.post(f"/sandboxes/{keeper['id']}/exec", json={"cmd": ["sh", "-c", marker]}).json()[
                    "stdout"
                ]
            }
        for i in range(20):
            op = ("create", "stop", "destroy")[i % 3]
            with d.client() as api:
                if op == "destroy":
                    victim = api.post("/sandboxes", json={"name": f"doomed-{i}", "memory_mb": 256}).json()
                    target = ("DELETE", f"/sandboxes/{victim['id']}", None)
                elif op == "stop":
                    api.post(f"/sandboxes/{keeper['id']}/exec", json={"cmd": ["true"]})  # hot again
                    target = ("POST", f"/sandboxes/{keeper['id']}/stop", None)
                else:
                    target = ("POST", "/sandboxes", {"name": f"born-{i}", "memory_mb": 256})

            def fire():
                try:
                    with httpx.Client(
                        base_url=d.url, timeout=30, headers={"Authorization": f"Bearer {d.admin_token}"}
                    ) as c:
                        c.request(target[0], target[1], json=target[2])
                except httpx.HTTPError:
                    pass  # the daemon died under it: that is the point

            t = threading.Thread(target=fire)
            t.start()
            time.sleep(rng.uniform(0.02, 0.5))
            d.kill9()
            t.join()
            d.start()
            with d.client() as api:
                listed = api.get("/sandboxes").json()
                ids = {s["id"] for s in listed}
                for sb in listed:  # every sandbox still listed is whole: it answers (waking if cold)
                    r = api.post(f"/sandboxes/{sb['id']}/exec", json={"cmd": ["cat", "/dev/shm/mark"]})
                    if r.status_code != 200:
                        print(d.log()[-8000:])
                    assert r.status_code == 200, (i, op, sb, r.text)
                    if sb["id"] in expected:  # memory survived: restored from a whole snapshot or never stopped
                        assert r.json()["stdout"] == expected[sb["id"]], (i, op, sb)
                assert keeper["id"] in ids, (i, op)
                strays = owned_objects(d, ids)
                if strays:
                    print(d.log())
                assert strays == {}, (i, op, strays)
        with d.client() as api:
            for sb in api.get("/sandboxes").json():
                api.delete(f"/sandboxes/{sb['id']}")
        assert owned_objects(d, set()) == {}
    finally:
        d.scrub()
