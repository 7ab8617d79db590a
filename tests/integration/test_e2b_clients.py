"""The other E2B SDKs, unmodified, against a real daemon: an older Python release (which creates
through E2B's v1 API) and the JS SDK from npm under Debian's node. scripts/install-deps.sh --test
(run by `make test`) installs them into .cache; their versions are in e2b_clients/versions.env."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon import REPO
from tests.integration.e2b_support import e2b_daemon, sdk_env

CLIENTS = Path(__file__).parent / "e2b_clients"
VERSIONS = dict(
    line.split("=", 1) for line in (CLIENTS / "versions.env").read_text().splitlines() if "=" in line and line[0] != "#"
)


@pytest.fixture(scope="module")
def daemon(default_image):
    with e2b_daemon() as d:
        yield d


def run_client(daemon, argv: list[str], cwd: Path, mode: str = "url") -> dict[str, dict]:
    p = subprocess.run(argv, cwd=cwd, env=sdk_env(daemon, mode), capture_output=True, text=True, timeout=300)
    checks = {c["check"]: c for c in map(json.loads, filter(None, p.stdout.splitlines()))}
    assert p.returncode == 0, p.stdout + p.stderr
    return checks


def installed(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: scripts/install-deps.sh --test installs it (make test runs it)")
    return path


@pytest.mark.parametrize("mode", ["url", "domain"])
def test_an_older_python_sdk_runs_the_core_loop_through_the_v1_api(daemon, mode):
    python = installed(REPO / ".cache" / f"e2b-py-{VERSIONS['E2B_PY_OLD']}" / "bin" / "python")
    checks = run_client(daemon, [str(python), str(CLIENTS / "core_loop.py")], REPO, mode)
    expected = {"run", "exit code", "files", "list files", "background kill", "list sandboxes", "kill", "kill again"}
    assert set(checks) == expected and all(c["ok"] for c in checks.values()), checks
    assert "(POST /sandboxes)" in daemon.log()  # this release's create is v1's


def test_every_e2b_test_passes_with_the_older_python_sdk():
    """tests/integration/test_e2b.py as a whole (both modes), in the older SDK's venv; kiln itself (daemon,
    CLI) runs on this Python, whose dependencies that SDK's cannot share a venv with."""
    python = installed(REPO / ".cache" / f"e2b-py-{VERSIONS['E2B_PY_OLD']}" / "bin" / "python")
    env = {
        **os.environ,
        "KILN_PYTHON": sys.executable,
        "PYTHONPATH": str(REPO),
        "KILN_E2B_SDK_VERSION": VERSIONS["E2B_PY_OLD"],
    }
    argv = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/integration/test_e2b.py"]
    p = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    assert " passed" in p.stdout and "failed" not in p.stdout and "skipped" not in p.stdout


def test_the_js_sdk_runs_the_core_loop(daemon):
    js = installed(REPO / ".cache" / f"e2b-js-{VERSIONS['E2B_JS']}" / "node_modules" / "e2b")
    here = js.parents[1]
    shutil.copy(CLIENTS / "core_loop.mjs", here / "core_loop.mjs")  # node resolves `e2b` from the script's place
    checks = run_client(daemon, ["node", "core_loop.mjs"], here)
    expected = {"run", "exit code", "files", "list files", "background kill", "killed"}
    assert set(checks) == expected and all(c["ok"] for c in checks.values()), checks
