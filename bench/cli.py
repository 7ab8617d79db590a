"""The `kiln` command as agents use it: `kiln exec SANDBOX -- true` beside curl sending the same exec
(both a new process and a new connection per call), and `kiln --version` beside a bare interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.daemon import Daemon

KILN = Path(sys.executable).parent / "kiln"  # the console script a user runs


def timed_runs(argv: list[str], n: int, env: dict | None = None) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, env=env)
        out.append(time.perf_counter() - t)
    return out


def bench_cli(n: int) -> dict[str, list[float]]:
    d = Daemon()
    try:
        d.start()
        with d.client() as api:
            api.post("/sandboxes", json={"name": "cli"}).raise_for_status()
        env = {"PATH": "/usr/bin:/bin", "HOME": str(d.data_dir), "KILN_URL": d.url, "KILN_TOKEN": d.admin_token}
        curl = [
            "curl", "-sf", "-H", f"Authorization: Bearer {d.admin_token}",
            "-d", json.dumps({"cmd": ["true"]}), f"{d.url}/sandboxes/cli/exec",
        ]  # fmt: skip
        timed_runs(curl, 3)  # warm both paths (page cache, the sandbox's agent)
        timed_runs([str(KILN), "exec", "cli", "--", "true"], 3, env)
        res = {"curl": [], "cli": []}  # type: dict[str, list[float]]
        for _ in range(n):  # interleaved, so a slow moment of the machine costs both the same
            res["curl"] += timed_runs(curl, 1)
            res["cli"] += timed_runs([str(KILN), "exec", "cli", "--", "true"], 1, env)
        res["version"] = timed_runs([str(KILN), "--version"], n, env)
        res["python"] = timed_runs([sys.executable, "-c", "pass"], n, env)
        return res
    finally:
        d.scrub()
