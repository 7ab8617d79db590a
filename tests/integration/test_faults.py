"""kill -9 of the daemon in the middle of creates, stops (snapshot writes) and destroys, 20 times:
after each restart every sandbox is fully there and usable, or fully gone, and nothing is orphaned."""
import random
import threading
import time

import httpx

from kiln.engine.gvisor.snapshots import PageStore
from tests.daemon import Daemon


def stray_packs(d: Daemon, ids: set[str]) -> list[str]:
    """Page packs no snapshot references (a save cut short must not leave any behind)."""
    stray = []
    for i in ids:
        store = PageStore(d.data_dir / "sandboxes" / i)
        m = store.manifest()
        if not store.packs.exists():
            continue
        if m is None:
            live = set()
        elif m["index"] is None:  # a full snapshot not indexed yet is exactly its own pack
            live = {m["generation"]}
        else:
            live = {pack for _, pack, _ in store.records(m)}
        stray += [str(p) for p in store.packs.glob("*.pack") if int(p.stem) not in live]
    return stray


def owned_objects(d: Daemon, ids: set[str]) -> dict[str, list[str]]:
    """Host objects that belong to no sandbox the API knows: must be empty."""
    left = d.leftovers()
    strays = {
        "runsc": [c for c in left["runsc"] if c not in ids],
        "dirs": [x for x in left["dirs"] if x not in ids],
        "cgroups": [c for c in left["cgroups"] if c.rsplit("/", 1)[1] not in ids],
        "netns": [n for n in left["netns"] if n.rsplit("-", 1)[1] not in ids],
        "mounts": [m for m in left["mounts"] if not any(f"/sandboxes/{i}/" in m + "/" for i in ids)],
    }
    tmp = [str(p) for i in ids for p in (d.data_dir / "sandboxes" / i).glob("*.tmp")]
    return {k: v for k, v in {**strays, "scratch": tmp, "packs": stray_packs(d, ids)}.items() if v}


def test_kill9_during_creates_stops_and_destroys_twenty_times(default_image):
    rng = random.Random(20261129)
    d = Daemon()
    try:
        d.start()
        with d.client() as api:
            keeper = api.post("/sandboxes", json={"name": "keeper", "memory_mb": 256}).json()
            marker = "echo $RANDOM > /dev/shm/mark; cat /dev/shm/mark"
            expected = {keeper["id"]: api.post(f"/sandboxes/{keeper['id']}/exec",
                                               json={"cmd": ["sh", "-c", marker]}).json()["stdout"]}
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
                    with httpx.Client(base_url=d.url, timeout=30,
                                      headers={"Authorization": f"Bearer {d.admin_token}"}) as c:
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
