import subprocess
import sys

import pytest

from tests.daemon import IMAGES, running_daemon


@pytest.fixture(scope="session")
def default_image():
    """Build the shared default image once (mmdebstrap, ~30 s the first time)."""
    subprocess.run([sys.executable, "-c",
                    "from pathlib import Path; from kiln.images.default import ensure_default_image;"
                    f"ensure_default_image(Path({str(IMAGES)!r}))"], check=True)
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


@pytest.fixture(scope="module")
def sandbox(api):
    """One sandbox shared by a module's exec tests."""
    sb = make_sandbox(api, name="shared", env={"FOO": "bar", "SHARED": "1"})
    yield sb
    api.delete(f"/sandboxes/{sb['id']}")
