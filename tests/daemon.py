"""A real kiln daemon for tests: its own port, data dir, subnet and host-name prefix.

Every host object the daemon may leave behind carries its prefix, so `leftovers()` can prove a
clean state and `scrub()` can remove what a failed test left, without touching anything else.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from kiln.config import load_config
from kiln.config_paths import DEFAULT_IMAGES_DIR
from kiln.engine import make_engine
from kiln.engine.base import Engine, ImageSpec
from kiln.images.builder import image_dir
from kiln.images.recipes import BUILTIN

REPO = Path(__file__).resolve().parents[1]
# the Python that runs kiln itself (daemon, CLI): this one, unless a test process of another venv (an
# older E2B SDK's, which cannot hold kiln's dependencies) names kiln's
KILN_PYTHON = os.environ.get("KILN_PYTHON") or sys.executable
IMAGES = DEFAULT_IMAGES_DIR  # the machine-wide cache of built-in images, as a daemon uses by default
_subnets = itertools.count((os.getpid() % 50) * 4)


def builtin_image(name: str = "minimal") -> ImageSpec:
    """The engine's spec of a built-in image (engine tests and benchmarks talk to the engine directly)."""
    return ImageSpec(rootfs=str(image_dir(IMAGES, BUILTIN[name]) / "rootfs"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_daemon(extra_config: dict | None = None):
    """A started daemon; on exit its sandboxes are destroyed and everything it made is removed."""
    d = Daemon(extra_config)
    try:
        d.start()
        yield d
        d.destroy_all([d.admin_token])
    finally:
        d.scrub()


class Daemon:
    def __init__(self, extra_config: dict | None = None, parent_dir: Path | None = None):
        self.data_dir = Path(tempfile.mkdtemp(prefix="kiln-test-", dir=parent_dir))
        self.port = free_port()
        self.subnet = f"10.{200 + next(_subnets) % 50}.{os.getpid() % 250}.0/24"
        unlimited = {"burst": 1_000_000, "per_minute": 1_000_000}
        self.config = {
            "listen": f"127.0.0.1:{self.port}",
            "data_dir": str(self.data_dir),
            # no egress unless a test builds its own fake internet: tests never reach the real one
            "network": {"subnet": self.subnet, "uplink": "none"},
            # tests and benchmarks drive the API far faster than a user would
            "limits": {
                "rate_create": unlimited,
                "rate_exec": unlimited,
                "rate_read": unlimited,
                "max_disk_mb_per_user": 100_000_000,
            },
        }
        for k, v in (extra_config or {}).items():
            if isinstance(v, dict) and isinstance(self.config.get(k), dict):
                self.config[k] = {**self.config[k], **v}
            else:
                self.config[k] = v
        self.config_path = self.data_dir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.log_path = self.data_dir / "daemon.log"
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------ process

    def start(self, timeout: float = 120.0) -> Daemon:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [KILN_PYTHON, "-m", "kiln.cli.main", "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"daemon did not come up:\n{self.log()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)  # by PID, never by name
        self.proc.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    # ------------------------------------------------------------ clients

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    def client(self, token: str | None = None, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token or self.admin_token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def create_user(self, name: str, *flags: str) -> str:
        out = subprocess.run(
            [KILN_PYTHON, "-m", "kiln.cli.main", "user", "create", name, *flags, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip().splitlines()[-1]

    # ------------------------------------------------------------ host state (through the engine's own view)

    def engine(self) -> Engine:
        """An engine object for this daemon's config: it inspects and scrubs, it never starts."""
        return make_engine(load_config(self.config_path))

    def leftovers(self, keep: set[str] | frozenset[str] = frozenset()) -> dict[str, list[str]]:
        """Host objects the engine reports as its own that belong to no sandbox in `keep`."""
        return self.engine().leftovers(frozenset(keep))

    def clean(self, keep: set[str] | frozenset[str] = frozenset()) -> bool:
        return not any(self.leftovers(keep).values())

    def scrub(self) -> None:
        """Remove whatever this daemon left on the host (used after failures and at teardown)."""
        self.stop()
        self.engine().scrub()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def destroy_all(self, tokens: list[str]) -> None:
        for token in tokens:
            with self.client(token) as c:
                listed = c.get("/sandboxes")
                for sb in listed.json() if listed.status_code == 200 else []:  # else scrub() cleans up
                    c.delete(f"/sandboxes/{sb['id']}")
