"""With `e2b.public_ports: false`, a sandbox's ports answer only requests bearing that sandbox's own
envd token: another user's key, or the token of another user's sandbox, reaches nothing."""

from __future__ import annotations

import httpx
import pytest
from e2b import Sandbox

from tests.conftest import wait_for
from tests.integration.e2b_support import DOMAIN, e2b_daemon, sdk_opts
from tests.integration.test_e2b import https_get


@pytest.fixture(scope="module")
def daemon(default_image):
    with e2b_daemon(public_ports=False) as d:
        yield d


def envd_token(daemon, key: str, sandbox_id: str) -> str:
    r = httpx.get(f"{daemon.url}/e2b/sandboxes/{sandbox_id}", headers={"X-API-Key": key})
    assert r.status_code == 200, r.text
    return r.json()["envdAccessToken"]


def test_ports_need_the_sandbox_own_token(daemon):
    key_b = daemon.create_user("e2b-private-b")
    a = Sandbox.create("base", timeout=300, **sdk_opts(daemon, daemon.admin_token, "domain"))
    b = Sandbox.create("base", timeout=300, **sdk_opts(daemon, key_b, "domain"))
    try:
        a.commands.run("cd /tmp && echo private > index.html && python3 -m http.server 8000", background=True)
        token_a, token_b = envd_token(daemon, daemon.admin_token, a.sandbox_id), envd_token(daemon, key_b, b.sandbox_id)
        host = f"8000-{a.sandbox_id}.{DOMAIN}"
        wait_for(
            lambda: https_get(daemon, host, "/index.html", **{"X-Access-Token": token_a}).text == "private\n",
            what="A's server with A's token",
        )
        assert https_get(daemon, host, "/index.html").status_code == 401
        assert https_get(daemon, host, "/index.html", **{"X-Access-Token": token_b}).status_code == 401
        assert https_get(daemon, host, "/index.html", **{"E2B-Traffic-Access-Token": token_a}).status_code == 200
        # URL mode: the same, by headers
        url_headers = {"E2b-Sandbox-Id": a.sandbox_id, "E2b-Sandbox-Port": "8000"}
        assert httpx.get(f"{daemon.url}/e2b/sandbox/index.html", headers=url_headers).status_code == 401
        with_b = httpx.get(f"{daemon.url}/e2b/sandbox/index.html", headers={**url_headers, "X-Access-Token": token_b})
        assert with_b.status_code == 401
        # and B's token opens no envd of A's either
        envd = httpx.post(
            f"{daemon.url}/e2b/sandbox/process.Process/List",
            json={},
            headers={"E2b-Sandbox-Id": a.sandbox_id, "X-Access-Token": token_b, "Connect-Protocol-Version": "1"},
        )
        assert envd.status_code == 401
    finally:
        a.kill()
        b.kill()
