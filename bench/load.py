"""Load: many concurrent clients mixing exec, file writes and reads, listings and proxied requests
on a set of sandboxes that the thermal manager keeps pausing and stopping (short timers, and each
sandbox left alone for part of every cycle), while the daemon's memory and open files are watched.

Used by `make bench` (figures in REPORT.md) and by tests/integration/test_load.py (zero failures,
flat RSS and file descriptors).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.conftest import WEB_APP
from tests.daemon import Daemon

THERMAL = {"warm_after": 2.0, "cold_after": 4.0, "tick": 0.5}
UNLIMITED = {"burst": 1_000_000, "per_minute": 1_000_000}
CYCLE = 24.0  # seconds; each sandbox is left alone for a third of every cycle (8 s), so it pauses and cools
OPS = [("exec", 30), ("write", 15), ("read", 15), ("list", 15), ("proxy", 25)]


@dataclass
class LoadResult:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    rss_before: int = 0
    rss_after: int = 0
    fds_before: int = 0
    fds_after: int = 0
    pauses: int = 0  # hot -> warm during the run
    wakes: int = 0  # restores from disk (cold -> hot) during the run


def daemon_usage(pid: int) -> tuple[int, int]:
    rss = (
        next(
            int(line.split()[1])
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("VmRSS:")
        )
        * 1024
    )
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def new_daemon() -> Daemon:
    return Daemon(
        {
            "thermal": THERMAL,
            "publish": {"rate_per_ip": UNLIMITED, "rate_per_alias": UNLIMITED, "rate_global": UNLIMITED},
        }
    )


async def run_load(d: Daemon, clients: int = 50, duration: float = 60.0, n_sandboxes: int = 10) -> LoadResult:
    res = LoadResult(latencies={op: [] for op, _ in OPS})
    res.rss_before, res.fds_before = daemon_usage(d.proc.pid)  # idle: no sandboxes, no clients
    headers = {"Authorization": f"Bearer {d.admin_token}"}
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    async with httpx.AsyncClient(base_url=d.url, headers=headers, timeout=120, limits=limits) as api:
        ids = []
        for i in range(n_sandboxes):
            r = await api.post("/sandboxes", json={"name": f"load-{i}", "memory_mb": 256})
            r.raise_for_status()
            sid = r.json()["id"]
            ids.append(sid)
            await api.put(f"/sandboxes/{sid}/files", params={"path": "/tmp/web_app.py"}, content=WEB_APP.read_bytes())
            await api.post(
                f"/sandboxes/{sid}/exec",
                json={"cmd": ["sh", "-c", "nohup python3 /tmp/web_app.py 8080 >/dev/null 2>&1 &"]},
            )
            await api.put(f"/sandboxes/{sid}/files", params={"path": "/workspace/data.bin"}, content=os.urandom(4096))
        for sid in ids:  # every app answers before the clock starts
            for _ in range(100):
                if (await api.get(f"/sandboxes/{sid}/proxy/8080/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
        ops, weights = zip(*OPS, strict=False)
        start = time.monotonic()
        deadline = start + duration

        def active() -> list[str]:
            phase = int((time.monotonic() - start) / (CYCLE / 3))
            return [sid for i, sid in enumerate(ids) if (i + phase) % 3 != 0] or ids

        async def client(n: int) -> None:
            rng = random.Random(n)
            while time.monotonic() < deadline:
                op = rng.choices(ops, weights)[0]
                sid = rng.choice(active())
                t = time.monotonic()
                try:
                    if op == "exec":
                        r = await api.post(f"/sandboxes/{sid}/exec", json={"cmd": ["sh", "-c", f"echo {n}"]})
                        ok = r.status_code == 200 and r.json()["stdout"] == f"{n}\n"
                    elif op == "write":
                        r = await api.put(
                            f"/sandboxes/{sid}/files",
                            params={"path": f"/workspace/c{n}.txt"},
                            content=f"client {n}".encode(),
                        )
                        ok = r.status_code == 200
                    elif op == "read":
                        r = await api.get(f"/sandboxes/{sid}/files", params={"path": "/workspace/data.bin"})
                        ok = r.status_code == 200 and len(r.content) == 4096
                    elif op == "list":
                        r = await api.get("/sandboxes")
                        ok = r.status_code == 200 and len(r.json()) == n_sandboxes
                    else:
                        r = await api.get(f"/sandboxes/{sid}/proxy/8080/q", params={"n": n})
                        ok = r.status_code == 200 and r.json()["query"] == f"n={n}"
                except httpx.HTTPError as e:
                    r, ok = None, False
                    res.failures.append(f"{op} {sid}: {e!r}")
                    continue
                res.latencies[op].append(time.monotonic() - t)
                if not ok:
                    res.failures.append(f"{op} {sid}: {r.status_code} {r.text[:200]}")

        await asyncio.gather(*(client(n) for n in range(clients)))
        log = d.log_path.read_text(errors="replace")
        res.pauses, res.wakes = log.count("is warm (paused)"), log.count("restored from its snapshot")
        for sid in ids:
            await api.delete(f"/sandboxes/{sid}")
    await asyncio.sleep(3)  # idle again: every connection closed
    res.rss_after, res.fds_after = daemon_usage(d.proc.pid)
    return res


def bench_load(duration: float = 60.0, clients: int = 50) -> LoadResult:
    d = new_daemon()
    try:
        d.start()
        asyncio.run(run_load(d, clients, 20))  # to working size first (see tests/integration/test_load.py)
        return asyncio.run(run_load(d, clients, duration))
    finally:
        d.scrub()
