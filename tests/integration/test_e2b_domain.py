"""E2B's domain mode: `kiln e2b setup` makes a CA and a *.e2b.localhost certificate, the daemon serves
api.<domain> and <port>-<id>.<domain> on its TLS listener, and the unmodified Python SDK talks to it
with E2B_DOMAIN and SSL_CERT_FILE only (it resolves *.localhost to loopback itself: no DNS set-up)."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys

import httpx
import pytest
from e2b import Sandbox

from tests.conftest import wait_for
from tests.daemon import Daemon, free_port

DOMAIN = "e2b.localhost"


@pytest.fixture(scope="module")
def tls_daemon(default_image):
    d = Daemon({"e2b": {"tls_listen": f"127.0.0.1:{free_port()}"}})
    try:
        out = subprocess.run(
            [sys.executable, "-m", "kiln.cli.main", "e2b", "setup", "--domain", DOMAIN, "--config", str(d.config_path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert f"E2B_DOMAIN={DOMAIN}:" in out and "SSL_CERT_FILE=" in out and "NODE_EXTRA_CA_CERTS=" in out
        d.start()
        yield d
        d.destroy_all([d.admin_token])
    finally:
        d.scrub()


@pytest.fixture(scope="module")
def domain_opts(tls_daemon):
    port = tls_daemon.config["e2b"]["tls_listen"].rpartition(":")[2]
    ca = tls_daemon.data_dir / "e2b-tls" / "bundle.pem"
    old = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = str(ca)
    yield {"api_key": "e2b_" + tls_daemon.admin_token.removeprefix("kiln_"), "domain": f"{DOMAIN}:{port}"}
    if old is None:
        os.environ.pop("SSL_CERT_FILE", None)
    else:
        os.environ["SSL_CERT_FILE"] = old


def https_get(tls_daemon, host: str, path: str = "/") -> httpx.Response:
    """A request to <host> on the TLS listener, by address (glibc does not resolve *.localhost here),
    with the host's name for SNI and the certificate check."""
    port = tls_daemon.config["e2b"]["tls_listen"].rpartition(":")[2]
    ctx = ssl.create_default_context(cafile=str(tls_daemon.data_dir / "e2b-tls" / "ca.pem"))
    with httpx.Client(verify=ctx) as c:
        return c.get(
            f"https://127.0.0.1:{port}{path}",
            headers={"Host": f"{host}:{port}"},
            extensions={"sni_hostname": host},
        )


def test_the_sdk_works_in_domain_mode_over_tls(tls_daemon, domain_opts):
    sb = Sandbox.create("base", timeout=300, metadata={"mode": "domain"}, **domain_opts)
    try:
        assert sb.commands.run("echo over tls").stdout == "over tls\n"
        sb.files.write("/home/user/t.txt", "tls file")
        assert sb.files.read("/home/user/t.txt") == "tls file"
        assert [e.name for e in sb.files.list("/home/user")] == ["t.txt"]
        assert [s.sandbox_id for s in Sandbox.list(**domain_opts).next_items()] == [sb.sandbox_id]

        # get_host(port): a server in the sandbox, at <port>-<id>.<domain>, public as E2B's are
        sb.commands.run("cd /tmp && echo served > index.html && python3 -m http.server 8000", background=True)
        host = sb.get_host(8000)
        assert host == f"8000-{sb.sandbox_id}.{domain_opts['domain']}"
        wait_for(
            lambda: https_get(tls_daemon, host.rsplit(":", 1)[0], "/index.html").text == "served\n",
            what="the sandbox's web server through its E2B host",
        )
        # envd's own host needs the sandbox's token; the wrong one is refused
        envd = f"49983-{sb.sandbox_id}.{DOMAIN}"
        assert https_get(tls_daemon, envd, "/health").status_code == 204
        assert https_get(tls_daemon, envd, "/files?path=/home/user/t.txt").status_code == 401
        assert https_get(tls_daemon, f"8000-{'0' * 16}.{DOMAIN}").status_code == 502
    finally:
        assert sb.kill() is True


def test_the_certificate_is_for_the_wildcard_and_trusted_only_through_kiln_ca(tls_daemon):
    port = int(tls_daemon.config["e2b"]["tls_listen"].rpartition(":")[2])
    system_roots = ssl.create_default_context(cafile="/etc/ssl/certs/ca-certificates.crt")
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"), httpx.Client(verify=system_roots) as c:
        c.get(
            f"https://127.0.0.1:{port}/",
            headers={"Host": f"api.{DOMAIN}"},
            extensions={"sni_hostname": f"api.{DOMAIN}"},
        )
    r = https_get(tls_daemon, f"api.{DOMAIN}", "/v2/sandboxes")
    assert r.status_code == 401 and r.json() == {"code": 401, "message": "X-API-Key required"}
