import subprocess
import time
from pathlib import Path

import pytest

from tests.daemon import IMAGES, KILN_PYTHON, running_daemon


@pytest.fixture(scope="session")
def default_image():
    """The built-in images and the agent's runtime in the machine-wide cache (`make test` builds them
    first, with progress; this only checks, or builds them when a test is run on its own)."""
    script = (
        "from pathlib import Path; from kiln.images.builder import ensure_built;"
        "from kiln.images.recipes import BUILTIN; from kiln.images.runtime import ensure_runtime;"
        f"d = Path({str(IMAGES)!r}); ensure_runtime(d); [ensure_built(r, d) for r in BUILTIN.values()]"
    )
    subprocess.run([KILN_PYTHON, "-c", script], check=True)
    return IMAGES


@pytest.fixture(scope="module")
def daemon(default_image):
    """A real daemon shared by a test module; everything it made is removed afterwards."""
    with running_daemon() as d:
        yield d


@pytest.fixture(scope="module")
def api(daemon):
    with daemon.client() as c:
        yield c


def make_sandbox(api, **body):
    r = api.post("/sandboxes", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def run(api, sb, cmd, **kw):
    """Exec in a sandbox; the request itself must succeed."""
    r = api.post(f"/sandboxes/{sb['id']}/exec", json={"cmd": cmd, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def listed(api, sb) -> dict:
    """The sandbox as GET /sandboxes shows it (with `thermal`)."""
    return {s["id"]: s for s in api.get("/sandboxes").json()}[sb["id"]]


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


WEB_APP = Path(__file__).parent / "integration" / "apps" / "web_app.py"


def start_web_app(api, sb, port: int, bind: str = "0.0.0.0") -> None:
    """Run tests/integration/apps/web_app.py in the sandbox on `port` and wait until it answers."""
    r = api.put(f"/sandboxes/{sb['id']}/files", params={"path": "/tmp/web_app.py"}, content=WEB_APP.read_bytes())
    assert r.status_code == 200, r.text
    run(api, sb, ["sh", "-c", f"nohup python3 /tmp/web_app.py {port} {bind} >/tmp/web_app_{port}.log 2>&1 &"])
    probe = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/ready', timeout=1)"
    wait_for(lambda: run(api, sb, ["python3", "-c", probe])["exit_code"] == 0, what=f"web app on port {port}")


@pytest.fixture(scope="module")
def sandbox(api):
    """One sandbox shared by a module's exec tests."""
    sb = make_sandbox(api, name="shared", env={"FOO": "bar", "SHARED": "1"})
    yield sb
    api.delete(f"/sandboxes/{sb['id']}")
