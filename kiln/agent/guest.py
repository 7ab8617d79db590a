"""kiln guest agent: its server inside every sandbox. Standard library only; it runs on kiln's own
Python runtime mounted into every sandbox (kiln/images/runtime.py), so any image runs it.

    kiln-init python3 guest.py CONFIG_JSON

CONFIG_JSON holds {"token", "env", "init"} and optionally "port" and "bind" (tests run it on the host).
PID 1 is kiln-init (init.c): it starts this server, reaps orphans, and starts the server again if it
ever dies. Sandboxes whose bundle was written before kiln-init run this module as PID 1 itself, which
then does the same by forking. The rest of the agent: wire.py (framing), spawn.py (starting
processes), oneshot.py (one-shot exec), sessions.py (PTY sessions), files.py, watch.py (inotify),
ports.py, protocol.py.
"""

from __future__ import annotations

import os
import sys
import time


def serve(config_path: str, started: int) -> None:
    """The server: everything the agent imports is imported here (a Python PID 1 forks first, and
    stays a bare interpreter)."""
    import json

    try:  # imported as kiln.agent.guest on the host (tests), run as a plain script in the sandbox
        from .server import Agent
    except ImportError:  # pragma: no cover
        from server import Agent  # type: ignore[no-redef,import-not-found]

    with open(config_path) as f:
        agent = Agent(json.load(f))
    agent.started = started  # how many servers this sandbox has had (more than 1: the server crashed)
    agent.serve()


def reap_forever(server_pid: int, start_server) -> None:
    """PID 1 duty: reap every orphan; restart the server if it dies."""
    while True:
        try:
            pid, _ = os.wait()
        except ChildProcessError:
            time.sleep(0.5)
            continue
        except InterruptedError:
            continue
        if pid == server_pid:
            time.sleep(0.2)
            print("kiln-agent: the server died; starting it again", file=sys.stderr, flush=True)
            while True:
                try:
                    server_pid = start_server()
                    break
                except OSError:  # no pid free (a fork bomb): PID 1 must not die, wait and retry
                    time.sleep(0.5)


AGENT_LOG = "/run/kiln-agent/agent.log"


def detach_from_host_console() -> None:
    """PID 1's stdio is a file on the host (runsc's console log): once the agent is up, nothing in the
    sandbox may reach it (root could write gigabytes there through /proc/1/fd/2). stdin and stdout
    become /dev/null; the agent's own few messages go to a log on the sandbox's own tmpfs."""
    os.makedirs(os.path.dirname(AGENT_LOG), mode=0o700, exist_ok=True)
    null = os.open(os.devnull, os.O_RDWR)
    log = os.open(AGENT_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    for fd, target in ((0, null), (1, null), (2, log)):
        os.dup2(target, fd)
    os.close(null)
    os.close(log)


def main() -> None:
    # set only so the runtime's python finds its stdlib (kiln/images/runtime.py): no child inherits it
    os.environ.pop("PYTHONHOME", None)
    config_path = sys.argv[1]
    started = 0

    def start_server() -> int:
        nonlocal started
        started += 1
        pid = os.fork()
        if pid == 0:
            try:
                serve(config_path, started)
            finally:
                os._exit(1)
        return pid

    if os.getpid() == 1:  # a bundle from before kiln-init
        detach_from_host_console()
        reap_forever(start_server(), start_server)
    else:  # started by kiln-init (or directly, by tests on the host)
        serve(config_path, int(os.environ.pop("KILN_AGENT_STARTS", "1")))


if __name__ == "__main__":
    main()
