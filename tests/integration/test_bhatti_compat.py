"""Request shapes bhatti's clients send (issue 16): honoured, or refused with a 400/404/501 that names
the field; never a silent success. Written from bhatti's API contract, not from its code."""

from __future__ import annotations

import re

import pytest

from tests.conftest import make_sandbox


def test_an_empty_name_means_no_name(api):
    # bhatti's CLI always sends "name"; empty means "generate one"
    sb = make_sandbox(api, name="")
    try:
        assert re.fullmatch(r"sandbox-[0-9a-f]{6}", sb["name"]), sb["name"]
    finally:
        api.delete(f"/sandboxes/{sb['id']}")


def test_labels_on_create_and_the_label_filter(api):
    a = make_sandbox(api, name="lab-a", labels={"team": "ci", "tier": "web"})
    b = make_sandbox(api, name="lab-b", labels={"team": "ci"})
    c = make_sandbox(api, name="lab-c")
    try:
        assert a["labels"] == {"team": "ci", "tier": "web"} and "labels" not in c

        def names(*filters):
            r = api.get("/sandboxes", params=[("label", f) for f in filters])
            assert r.status_code == 200, r.text
            return sorted(s["name"] for s in r.json() if s["name"].startswith("lab-"))

        assert names("team=ci") == ["lab-a", "lab-b"]
        assert names("team=ci", "tier=web") == ["lab-a"]  # several filters AND together
        assert names("team=nobody") == []
        assert names() == ["lab-a", "lab-b", "lab-c"]
        assert names("tier=") == []  # an empty value is a value
        for bad in ("team", "=ci", "bhatti.sh/x=1"):
            r = api.get("/sandboxes", params={"label": bad})
            assert r.status_code == 400 and "label" in r.json()["error"], (bad, r.text)
        r = api.post("/sandboxes", json={"name": "lab-bad", "labels": {"bhatti.sh/owner": "x"}})
        assert r.status_code == 400 and "reserved" in r.json()["error"]
        assert "lab-bad" not in [s["name"] for s in api.get("/sandboxes").json()]
    finally:
        for s in (a, b, c):
            api.delete(f"/sandboxes/{s['id']}")


@pytest.mark.parametrize(
    ("field", "value", "status", "message"),
    [
        ("image", "browser", 404, 'image "browser" not found'),
        ("from", "some-sandbox", 501, "from"),
        ("net_policy", {"default": "deny"}, 501, "net_policy"),
        ("mounts", [{"host_path": "/etc", "guest_path": "/mnt"}], 400, "mounts"),
        ("hugepages", True, 400, "hugepages"),
        ("files", [{"guest_path": "/tmp/a", "content": "aGk="}], 501, "files"),
        ("persistent_volumes", [{"name": "v", "mount": "/data"}], 501, "persistent_volumes"),
    ],
)
def test_fields_kiln_does_not_honour_are_refused_by_name(api, field, value, status, message):
    before = [s["id"] for s in api.get("/sandboxes").json()]
    r = api.post("/sandboxes", json={"name": "refused", field: value})
    assert r.status_code == status and message in r.json()["error"], r.text
    assert [s["id"] for s in api.get("/sandboxes").json()] == before  # nothing made


def test_what_bhatti_clients_send_empty_is_accepted(api):
    # the CLI sends every field; empty ones ask for nothing kiln lacks
    sb = make_sandbox(
        api, name="empties", image="", files=[], mounts=[], hugepages=False, persistent_volumes=[], labels={}
    )
    try:
        assert sb["image"] == "default"
        assert make_sandbox(api, name="named-image", image="default")["image"] == "default"
    finally:
        api.delete(f"/sandboxes/{sb['id']}")
        for s in api.get("/sandboxes").json():
            if s["name"] == "named-image":
                api.delete(f"/sandboxes/{s['id']}")
