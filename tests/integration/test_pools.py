"""Warm pools: a snapshot template keeps sandboxes resumed and frozen; creates claim them (a thaw),
the pool refills in the background, falls back to resumes when empty, survives a daemon restart,
and goes with its template."""

import concurrent.futures

import pytest

from tests.conftest import listed, make_sandbox, run, wait_for
from tests.daemon import running_daemon

SERVER = "cd /tmp && echo served > index.html && nohup python3 -m http.server 8300 >/dev/null 2>&1 &"


def pool(api, template) -> dict:
    return api.get(f"/templates/{template}").json()["pool"]


def user_sandboxes(api) -> list[dict]:
    return api.get("/sandboxes").json()


@pytest.fixture(scope="module")
def pooled(daemon):
    """A template from a sandbox serving HTTP, with a warm pool of 2."""
    with daemon.client() as api:
        src = make_sandbox(api, name="pool-src", init=SERVER)
        wait_for(
            lambda: 8300 in {p["container_port"] for p in api.get(f"/sandboxes/{src['id']}/ports").json()},
            what="the init's server",
        )
        t = api.post("/templates", json={"name": "pooled", "from_sandbox": src["id"], "warm_pool": 2})
        assert t.status_code == 201, t.text
        assert t.json()["warm_pool"] == 2 and t.json()["pool"]["size"] == 2
        api.delete(f"/sandboxes/{src['id']}")
        wait_for(lambda: pool(api, "pooled")["ready"] == 2, timeout=60, what="a full pool")
        yield "pooled"
        api.delete("/templates/pooled")
        api.delete("/snapshots/pooled-template")


def test_a_create_claims_a_frozen_member_which_serves_at_once_and_the_pool_refills(api, pooled):
    before = {s["id"] for s in user_sandboxes(api)}  # members are never listed
    r = api.post("/sandboxes", json={"template_id": pooled, "name": "from-pool", "env": {"MODE": "claimed"}})
    assert r.status_code == 201, r.text
    sb = r.json()
    assert sb["from_pool"] is True and sb["name"] == "from-pool" and sb["status"] == "running"
    try:
        assert run(api, sb, ["sh", "-c", "echo $MODE"])["stdout"] == "claimed\n"  # env for new processes
        page = api.get(f"/sandboxes/{sb['id']}/proxy/8300/index.html")
        assert page.status_code == 200 and page.text == "served\n"  # the server was already listening
        assert {s["id"] for s in user_sandboxes(api)} == before | {sb["id"]}
        assert listed(api, sb)["thermal"] == "hot"
        wait_for(lambda: pool(api, pooled)["ready"] == 2, timeout=60, what="the pool to refill")
    finally:
        api.delete(f"/sandboxes/{sb['id']}")


def test_a_burst_drains_the_pool_and_falls_back_to_resumes(api, pooled):
    wait_for(lambda: pool(api, pooled)["ready"] == 2, timeout=60, what="a full pool")

    def create(i):
        return api.post("/sandboxes", json={"template_id": pooled, "name": f"burst-{i}"})

    with concurrent.futures.ThreadPoolExecutor(5) as ex:
        answers = list(ex.map(create, range(5)))
    try:
        assert [a.status_code for a in answers] == [201] * 5, [a.text for a in answers]
        claimed = sum(bool(a.json().get("from_pool")) for a in answers)
        assert 2 <= claimed < 5, [a.json().get("from_pool") for a in answers]  # drained, then resumes
        for a in answers:
            assert run(api, a.json(), ["cat", "/tmp/index.html"])["stdout"] == "served\n"
    finally:
        for a in answers:
            if a.status_code == 201:
                api.delete(f"/sandboxes/{a.json()['id']}")


def test_a_pool_is_refused_without_a_snapshot_and_beyond_the_limit(api):
    r = api.post("/templates", json={"name": "no-snap", "warm_pool": 1})
    assert r.status_code == 400 and "warm_pool" in r.json()["error"]
    r = api.post("/templates", json={"name": "too-big", "snapshot": "x", "warm_pool": 99})
    assert r.status_code == 400 and "warm_pool must be between 0 and 5" in r.json()["error"]


def test_pools_survive_a_restart_do_not_count_against_quotas_and_go_with_their_template(default_image):
    with running_daemon({"limits": {"max_sandboxes": 2}}) as d:
        with d.client() as api:
            src = make_sandbox(api, name="src")
            t = api.post("/templates", json={"name": "p", "from_sandbox": src["id"], "warm_pool": 2})
            assert t.status_code == 201, t.text
            api.delete(f"/sandboxes/{src['id']}")
            wait_for(lambda: pool(api, "p")["ready"] == 2, timeout=60, what="a full pool")
        d.kill9()
        d.start()
        with d.client() as api:
            assert pool(api, "p")["ready"] == 2  # the same members, still frozen
            a = api.post("/sandboxes", json={"template_id": "p", "name": "a"})
            b = api.post("/sandboxes", json={"template_id": "p", "name": "b"})
            assert (a.status_code, b.status_code) == (201, 201), (a.text, b.text)
            assert a.json()["from_pool"] and b.json()["from_pool"]
            third = api.post("/sandboxes", json={"template_id": "p", "name": "c"})
            assert third.status_code == 429  # two of the user's own: the members never counted
            for s in (a, b):
                api.delete(f"/sandboxes/{s.json()['id']}")
            wait_for(lambda: pool(api, "p")["ready"] == 2, timeout=60, what="the pool to refill")
            assert api.delete("/templates/p").status_code == 200
            assert api.delete("/snapshots/p-template").status_code == 200
        assert d.clean()  # the members went with their template
