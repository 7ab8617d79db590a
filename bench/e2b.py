"""The E2B surface against kiln's own API, in one daemon and one run: `commands.run("true")` through the
unmodified E2B Python SDK (URL mode) beside kiln's exec API on the same sandbox, of `true` and of what
the SDK really runs (`/bin/bash -l -c true`); and create-to-first-command both ways."""

from __future__ import annotations

import time

from e2b import Sandbox

from tests.daemon import Daemon
from tests.integration.e2b_support import sdk_opts


def bench_e2b(n_exec: int, n_create: int) -> dict[str, list[float]]:
    res: dict[str, list[float]] = {k: [] for k in ("sdk_run", "api_true", "api_bash", "sdk_create", "api_create")}
    d = Daemon()
    try:
        d.start()
        opts = sdk_opts(d, d.admin_token, "url")
        with d.client(timeout=300) as api:
            sb = Sandbox.create("base", timeout=3600, **opts)
            for _ in range(10):  # warm both paths up
                sb.commands.run("true")
                api.post(f"/sandboxes/{sb.sandbox_id}/exec", json={"cmd": ["true"]})
            for _ in range(n_exec):
                t = time.perf_counter()
                sb.commands.run("true")
                res["sdk_run"].append(time.perf_counter() - t)
                t = time.perf_counter()
                r = api.post(f"/sandboxes/{sb.sandbox_id}/exec", json={"cmd": ["true"]})
                res["api_true"].append(time.perf_counter() - t)
                assert r.json()["exit_code"] == 0, r.text
                t = time.perf_counter()
                r = api.post(f"/sandboxes/{sb.sandbox_id}/exec", json={"cmd": ["/bin/bash", "-l", "-c", "true"]})
                res["api_bash"].append(time.perf_counter() - t)
                assert r.json()["exit_code"] == 0, r.text
            sb.kill()
            for i in range(n_create):
                t = time.perf_counter()
                sb = Sandbox.create("base", timeout=600, **opts)
                sb.commands.run("true")
                res["sdk_create"].append(time.perf_counter() - t)
                sb.kill()
                t = time.perf_counter()
                row = api.post("/sandboxes", json={"name": f"plain-{i}", "image": "e2b-base"}).json()
                assert api.post(f"/sandboxes/{row['id']}/exec", json={"cmd": ["true"]}).json()["exit_code"] == 0
                res["api_create"].append(time.perf_counter() - t)
                api.delete(f"/sandboxes/{row['id']}")
        return res
    finally:
        d.stop()
        d.scrub()
