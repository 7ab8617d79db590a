"""What the E2B tests share: a daemon serving both of the SDKs' modes, and the SDKs' options for it."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import tempfile

from tests.daemon import KILN_PYTHON, Daemon, free_port

DOMAIN = "e2b.localhost"
FIRST_SETUP: list[str] = []  # where the first `kiln e2b setup` of this test process left its files


@contextlib.contextmanager
def e2b_daemon(**e2b_config):
    """A daemon whose TLS listener serves the certificate `kiln e2b setup` made for DOMAIN; the
    process's SSL_CERT_FILE is the CA bundle setup tells clients to use while it runs."""
    d = Daemon({"e2b": {"tls_listen": f"127.0.0.1:{free_port()}", **e2b_config}})
    old = os.environ.get("SSL_CERT_FILE")
    try:
        if FIRST_SETUP:  # the SDK's TLS stack keeps the first trust store it loads: one CA per test process
            shutil.copytree(FIRST_SETUP[0], d.data_dir / "e2b-tls")
        else:
            argv = [KILN_PYTHON, "-m", "kiln.cli.main", "e2b", "setup", "--domain", DOMAIN]
            out = subprocess.run([*argv, "--config", str(d.config_path)], capture_output=True, text=True, check=True)
            assert all(
                f"{v}=" in out.stdout for v in ("E2B_DOMAIN", "E2B_API_KEY", "SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS")
            )
            kept = tempfile.mkdtemp(prefix="kiln-e2b-tls-")
            atexit.register(shutil.rmtree, kept, True)
            FIRST_SETUP.append(kept + "/tls")
            shutil.copytree(d.data_dir / "e2b-tls", FIRST_SETUP[0])
        os.environ["SSL_CERT_FILE"] = str(d.data_dir / "e2b-tls" / "bundle.pem")
        d.start()
        yield d
        d.destroy_all([d.admin_token])
    finally:
        d.scrub()
        if old is None:
            os.environ.pop("SSL_CERT_FILE", None)
        else:
            os.environ["SSL_CERT_FILE"] = old


def tls_port(daemon) -> str:
    return daemon.config["e2b"]["tls_listen"].rpartition(":")[2]


def sdk_opts(daemon, key: str, mode: str) -> dict:
    """The SDK's options for this daemon, with an `e2b_` key (some SDK versions insist on the prefix)."""
    key = "e2b_" + key.removeprefix("kiln_")
    if mode == "domain":
        return {"api_key": key, "domain": f"{DOMAIN}:{tls_port(daemon)}"}
    return {"api_key": key, "api_url": f"{daemon.url}/e2b", "sandbox_url": f"{daemon.url}/e2b/sandbox"}


def sdk_env(daemon, mode: str) -> dict[str, str]:
    """The same, as the environment variables an SDK in another process reads."""
    opts = sdk_opts(daemon, daemon.admin_token, mode)
    names = {
        "api_key": "E2B_API_KEY",
        "domain": "E2B_DOMAIN",
        "api_url": "E2B_API_URL",
        "sandbox_url": "E2B_SANDBOX_URL",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2B_")}
    return {**env, **{names[k]: v for k, v in opts.items()}}
