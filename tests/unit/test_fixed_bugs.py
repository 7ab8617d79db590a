"""Bugs found while restructuring, each pinned by a test that failed before its fix."""

import os
import resource
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from kiln.core.http_pools import readable_now
from kiln.core.ratelimit import rate_class
from kiln.core.users import write_token
from kiln.images.builder import ImageBuildError, host_mirror

REPO = Path(__file__).resolve().parents[2]


def test_idle_connection_check_works_for_fds_above_1024():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    a, b = socket.socketpair()
    high = socket.socket(fileno=os.dup2(a.fileno(), 1500))  # select.select() raises ValueError here
    try:
        assert readable_now(high) is False
        b.sendall(b"x")
        assert readable_now(high) is True
        b.close()
        high.recv(1)
        assert readable_now(high) is True  # closed by the peer: readable (EOF)
    finally:
        high.close()
        a.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize(
    ("method", "route", "cls"),
    [
        ("POST", "/sandboxes", "create"),
        ("POST", "/sandboxes/{sandbox_id}/exec", "exec"),
        ("PUT", "/sandboxes/{sandbox_id}/files", "exec"),
        ("WEBSOCKET", "/sandboxes/{sandbox_id}/ws", "exec"),
        ("GET", "/sandboxes/{sandbox_id}", "read"),  # whatever the sandbox is called (`ws-demo`, `exec`)
        ("GET", "/sandboxes/{sandbox_id}/files", "read"),
        ("POST", "/sandboxes/{sandbox_id}/stop", "read"),
    ],
)
def test_rate_classes_come_from_the_route_not_the_path(method, route, cls):
    assert rate_class(method, route) == cls


def test_token_files_are_replaced_atomically(tmp_path):
    path = tmp_path / "admin.token"
    write_token(path, "kiln_old")
    first = path.stat().st_ino
    write_token(path, "kiln_new")
    # a new file renamed over the old one (an in-place rewrite keeps the inode and can leave it empty)
    assert path.stat().st_ino != first
    assert path.read_text() == "kiln_new\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["admin.token"]


def test_image_build_uses_only_the_hosts_own_package_sources(tmp_path):
    with pytest.raises(ImageBuildError, match="no Debian package source"):
        host_mirror(tmp_path)  # no fallback to a mirror the host was never configured with
    (tmp_path / "etc/apt/sources.list.d").mkdir(parents=True)
    (tmp_path / "etc/apt/sources.list.d/debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example.test/debian\nSuites: bookworm\n"
    )
    assert host_mirror(tmp_path) == "http://mirror.example.test/debian"


def test_make_unit_installs_no_system_packages(tmp_path):
    # apt-get and runsc shims that record any call; `make unit`'s install step must call neither
    marker = tmp_path / "called"
    for tool in ("apt-get", "runsc", "dpkg"):
        shim = tmp_path / tool
        shim.write_text(f"#!/bin/sh\necho {tool} >> {marker}\nexit 1\n")
        shim.chmod(0o755)
    dry = subprocess.run(["make", "-n", "unit"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    install = next(line for line in dry.splitlines() if "install-deps.sh" in line)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    r = subprocess.run(install.split(), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert not marker.exists(), marker.read_text()


def test_a_forged_port_list_yields_only_valid_ports():
    from kiln.core.ports import listening_ports

    forged = [
        {"port": 80},
        {"port": "80"},
        {"port": 70000},
        {"port": True},
        {"nope": 1},
        "x",
        {"port": 22},
        {"port": 22},
    ]
    assert listening_ports(forged) == [22, 80]
    assert listening_ports({"port": 1}) == [] and listening_ports(None) == []
