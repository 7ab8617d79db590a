"""The E2B core loop with whichever Python `e2b` SDK runs it (an older pinned release in its own venv):
the environment points it at kiln (E2B_API_KEY, E2B_API_URL, E2B_SANDBOX_URL); each check prints one
JSON line {"check", "ok", "detail"} for the test to read."""

import json
import sys

from e2b import CommandExitException, Sandbox, SandboxQuery


def check(name: str, ok: bool, detail: object = "") -> None:
    print(json.dumps({"check": name, "ok": bool(ok), "detail": str(detail)}), flush=True)


sb = Sandbox.create("base", timeout=120, metadata={"client": "old-python"}, envs={"FROM_CREATE": "yes"})
try:
    r = sb.commands.run("echo $FROM_CREATE; whoami")
    check("run", r.stdout == "yes\nuser\n", r.stdout)
    try:
        sb.commands.run("exit 5")
        check("exit code", False, "no exception")
    except CommandExitException as e:
        check("exit code", e.exit_code == 5, e.exit_code)
    sb.files.write("/home/user/old.txt", "old sdk")
    check("files", sb.files.read("/home/user/old.txt") == "old sdk" and sb.files.exists("/home/user/old.txt"))
    check("list files", [e.name for e in sb.files.list("/home/user")] == ["old.txt"])
    h = sb.commands.run("sleep 60", background=True)
    check("background kill", sb.commands.kill(h.pid) is True)
    listed = Sandbox.list(query=SandboxQuery(metadata={"client": "old-python"})).next_items()
    check("list sandboxes", [s.sandbox_id for s in listed] == [sb.sandbox_id], listed)
finally:
    check("kill", sb.kill() is True)
    check("kill again", Sandbox.kill(sb.sandbox_id) is False)
sys.exit(0)
