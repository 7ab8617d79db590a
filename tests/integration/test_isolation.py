"""From inside a sandbox, the host, its services and files, and other sandboxes are out of reach."""

import os
import secrets
import socket
import threading
import time

import pytest

from tests.conftest import make_sandbox, run

PROBE = """
import socket, sys
s = socket.socket()
s.settimeout(2)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("open")
except OSError as e:
    print("blocked", type(e).__name__)
"""


def probe(api, sb, host, port) -> str:
    return run(api, sb, ["python3", "-c", PROBE, host, str(port)], user="root")["stdout"].strip()


@pytest.fixture(scope="module")
def pair(api):
    a = make_sandbox(api, name="iso-a")
    b = make_sandbox(api, name="iso-b")
    out = run(api, b, ["sh", "-c", "nohup python3 -m http.server 8000 >/dev/null 2>&1 &"])
    assert out["exit_code"] == 0
    yield a, b
    api.delete(f"/sandboxes/{a['id']}")
    api.delete(f"/sandboxes/{b['id']}")


@pytest.fixture
def host_listener():
    """A host service on every address, as a daemon with `listen: 0.0.0.0:...` would be."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 0))
    srv.listen(8)
    stop = threading.Event()

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
                c.close()
            except OSError:
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    srv.close()


def gateway(sb) -> str:
    a, b, c, d = sb["ip"].split(".")
    return f"{a}.{b}.{c}.{int(d) - 1}"


def test_host_services_are_unreachable(daemon, api, pair, host_listener):
    a, _ = pair
    # the host itself reaches its service on the sandbox-facing address...
    with socket.create_connection((gateway(a), host_listener), timeout=2):
        pass
    # ...the sandbox does not, nor the daemon's API port
    assert probe(api, a, gateway(a), host_listener).startswith("blocked")
    assert probe(api, a, gateway(a), daemon.port).startswith("blocked")
    assert probe(api, a, "127.0.0.1", daemon.port).startswith("blocked")


def test_other_sandboxes_are_unreachable(api, pair):
    a, b = pair
    for _ in range(50):  # the server in b may still be starting
        try:
            with socket.create_connection((b["ip"], 8000), timeout=1):
                break
        except OSError:
            import time

            time.sleep(0.1)
    else:
        pytest.fail("the server in sandbox b never came up")
    assert probe(api, a, b["ip"], 8000).startswith("blocked")
    assert probe(api, a, b["ip"], 1024).startswith("blocked")  # b's agent


def test_host_processes_are_invisible(daemon, api, pair):
    a, _ = pair
    ps = run(api, a, ["ps", "-eo", "pid,args"], user="root")["stdout"]
    commands = [line.split(None, 1)[1] for line in ps.splitlines()[1:]]
    # only the agent (PID 1 and its server) and ps itself: no daemon, no runsc, no host process
    assert all("guest.py" in c or c.startswith("ps ") for c in commands), commands
    assert ps.splitlines()[1].split()[0] == "1"


def test_pid1_is_kiln_init_and_reaps_orphans(api, pair):
    a, _ = pair
    assert run(api, a, ["cat", "/proc/1/comm"], user="root")["stdout"].strip() == "kiln-init"
    # the subshell exits at once: its sleep is an orphan, PID 1's to reap once it ends
    assert run(api, a, ["sh", "-c", "(sleep 0.3 &) ; exit 0"])["exit_code"] == 0
    time.sleep(1)
    ps = run(api, a, ["ps", "-eo", "stat,ppid,args"], user="root")["stdout"].splitlines()[1:]
    assert not [line for line in ps if line.split()[0].startswith("Z")], ps


def test_host_files_are_invisible(daemon, api, pair, tmp_path):
    a, _ = pair
    marker = f"/tmp/kiln-host-marker-{secrets.token_hex(4)}"
    with open(marker, "w") as f:
        f.write("host secret")
    try:
        for path in (marker, str(daemon.data_dir / "admin.token"), str(daemon.data_dir / "state.db")):
            out = run(api, a, ["cat", path], user="root")
            assert out["exit_code"] != 0 and "host secret" not in out["stdout"]
        # writing "there" from inside never reaches the host
        run(api, a, ["sh", "-c", f"echo pwned > {marker}"], user="root")
        assert open(marker).read() == "host secret"
        out = run(api, a, ["sh", "-c", "ls / ; cat /proc/1/cmdline"], user="root")
        assert "guest.py" in out["stdout"]
    finally:
        os.unlink(marker)
