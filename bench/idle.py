"""What idle sandboxes cost: the daemon's CPU and the sandboxes' own (from their cgroups) while N of
them sit idle hot, warm and cold, beside the daemon with none; and host memory per idle sandbox.

Hot: created with keep_hot (so the thermal policy leaves them be), measured after the port scans
of unused sandboxes have backed off (`ports.scan_max_interval`). Warm: keep_hot off, paused by the
thermal policy. Cold: stopped to disk. Host memory per sandbox is the drop of MemAvailable over N
creates; its breakdown: the sandbox's memory cgroup (the guest's memory and gVisor's own, page
cache included), the gofer's RSS (outside the cgroup) and the agent's RSS inside the guest.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from bench.raw import raw_engine
from kiln.config import PortsConfig
from kiln.engine.base import SandboxSpec
from kiln.images.runtime import python_request
from tests.daemon import Daemon, builtin_image

TICKS = os.sysconf("SC_CLK_TCK")
AGENT_RSS = (
    "import os\n"
    "for p in os.listdir('/proc'):\n"
    "    if p.isdigit() and int(p) != os.getpid():\n"
    "        try:\n"
    "            cmd = open(f'/proc/{p}/cmdline', 'rb').read()\n"
    "            rss = [l for l in open(f'/proc/{p}/status') if l.startswith('VmRSS')][0].split()[1]\n"
    "        except (OSError, IndexError):\n"
    "            continue\n"
    "        if b'kiln' in cmd and b'guest' in cmd:\n"
    "            print(p, rss)\n"
)


BARE_RSS = "print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])"
AGENT_CPU = (
    "print(sum(sum(int(f) for f in open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[11:13]) for p in (1, 2)))"
)


def process_cpu(pid: int) -> float:
    """CPU seconds of a process and of the children it has reaped (ip, nft, runsc calls)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / TICKS


def meminfo(key: str = "MemAvailable") -> int:
    """A /proc/meminfo figure, in bytes."""
    for line in open("/proc/meminfo"):
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/meminfo")


def rss_of(pid: int | None) -> int:
    if not pid:
        return 0
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def daemon_cpu_with_hot(n: int, window: float, config: dict) -> float:
    """The daemon's CPU % with n idle hot sandboxes under config (for the "before" column)."""
    d = Daemon({"limits": {"max_sandboxes": n + 5}, **config})
    try:
        d.start()
        with d.client(timeout=300) as api:
            for i in range(n):
                r = api.post("/sandboxes", json={"name": f"idle-{i}", "memory_mb": 512, "keep_hot": True})
                assert r.status_code == 201, r.text
            time.sleep(10)
            start = process_cpu(d.proc.pid)
            time.sleep(window)
            return 100 * (process_cpu(d.proc.pid) - start) / window
    finally:
        d.scrub()


def bench_idle(n: int, window: float) -> dict:
    res: dict = {"n": n, "window": window}
    # before: every hot sandbox's agent asked for its ports every 2 s, used or not
    res["hot_fixed_scans"] = daemon_cpu_with_hot(n, window, {"ports": {"scan_max_interval": 2.0}})
    d = Daemon({"limits": {"max_sandboxes": n + 5}, "thermal": {"warm_after": 5.0}})
    try:
        d.start()
        engine = d.engine()

        def cpu(ids: list[str]) -> tuple[float, float]:
            """(daemon, sandboxes) CPU as % of one core over the window."""
            guests = [engine.cgroups.cpu_seconds(i) or 0.0 for i in ids]  # type: ignore[attr-defined]
            start = process_cpu(d.proc.pid)
            time.sleep(window)
            daemon = process_cpu(d.proc.pid) - start
            guests_after = [engine.cgroups.cpu_seconds(i) or 0.0 for i in ids]  # type: ignore[attr-defined]
            return 100 * daemon / window, 100 * (sum(guests_after) - sum(guests)) / window

        with d.client(timeout=300) as api:
            res["none"] = cpu([])
            before = meminfo()
            ids = []
            for i in range(n):
                r = api.post("/sandboxes", json={"name": f"idle-{i}", "memory_mb": 512, "keep_hot": True})
                assert r.status_code == 201, r.text
                ids.append(r.json()["id"])
            time.sleep(5)
            res["host_per_hot"] = (before - meminfo()) / n
            cgroup = [engine.cgroups.memory_usage(i) or 0 for i in ids]  # type: ignore[attr-defined]
            gofer = [rss_of(engine.runsc.pids(i)[1]) for i in ids]  # type: ignore[attr-defined]
            res["cgroup_per_hot"] = sum(cgroup) / n
            res["gofer_per_hot"] = sum(gofer) / n
            out = api.post(
                f"/sandboxes/{ids[0]}/exec", json={"cmd": ["python3", "-c", AGENT_RSS], "user": "root"}
            ).json()
            res["agent_rss"] = [int(line.split()[1]) * 1024 for line in out["stdout"].split("\n") if line]
            bare = python_request(BARE_RSS, 30)  # the agent's own interpreter, doing nothing
            out = api.post(
                f"/sandboxes/{ids[0]}/exec", json={"cmd": bare["argv"], "env": bare["env"], "user": "root"}
            ).json()
            res["bare_rss"] = int(out["stdout"]) * 1024

            def agent_ticks() -> int:  # the agents' own processes (PID 1 and its server), inside the guests
                total = 0
                for sid in ids:
                    r = api.post(f"/sandboxes/{sid}/exec", json={"cmd": ["python3", "-c", AGENT_CPU], "user": "root"})
                    total += int(r.json()["stdout"])
                return total

            # read before the settling time, not just before the window: these execs are uses, and a use
            # sets a sandbox's port scans back to every scan_interval
            ticks, since = agent_ticks(), time.monotonic()
            # the scans of sandboxes nobody uses back off to their slowest before the window
            settle, interval = 0.0, PortsConfig().scan_interval
            while interval < PortsConfig().scan_max_interval:
                interval *= 2
                settle += min(interval, PortsConfig().scan_max_interval)
            time.sleep(settle)
            res["hot"] = cpu(ids)
            elapsed = time.monotonic() - since
            res["agents_inside"] = 100 * (agent_ticks() - ticks) / 100 / elapsed  # guest ticks are 1/100 s
            for sid in ids:
                assert api.patch(f"/sandboxes/{sid}", json={"keep_hot": False}).status_code == 200
            deadline = time.monotonic() + 120
            while any(s["thermal"] != "warm" for s in api.get("/sandboxes").json()):
                assert time.monotonic() < deadline, "the sandboxes did not go warm"
                time.sleep(1)
            res["warm"] = cpu(ids)
            before = meminfo()
            for sid in ids:
                assert api.post(f"/sandboxes/{sid}/stop").json()["status"] == "stopped"
            time.sleep(5)
            res["host_per_cold_freed"] = (meminfo() - before) / n
            res["cold"] = cpu(ids)
            for sid in ids:
                api.delete(f"/sandboxes/{sid}")
    finally:
        d.scrub()
    res["raw_agent"], res["raw_sleep"] = asyncio.run(raw_idle(window))
    return res


async def raw_idle(window: float) -> tuple[float, float]:
    """CPU % of one idle sandbox started by runsc itself: with kiln's agent, and with only `sleep` as
    its process (gVisor's own idle cost on this machine)."""
    async with raw_engine() as engine:

        async def measure(sid: str) -> float:
            await asyncio.sleep(3)
            before = engine.cgroups.cpu_seconds(sid) or 0.0
            await asyncio.sleep(window)
            return 100 * ((engine.cgroups.cpu_seconds(sid) or 0.0) - before) / window

        sid = "rawidle"
        await engine.create(SandboxSpec(id=sid, hostname=sid, image=builtin_image("default")))
        with_agent = await measure(sid)
        engine.expect_exit(sid)
        await engine.runsc.delete(sid)
        config = engine.dir(sid) / "config.json"
        spec = json.loads(config.read_text())
        spec["process"]["args"] = ["/bin/sleep", "100000"]
        config.write_text(json.dumps(spec))
        await engine.network.prepare_for_boot(engine.link(engine.records[sid]))
        await engine.runsc.run_detached(sid, engine.dir(sid), engine.dir(sid) / "console.log")
        await engine.watch(sid)
        return with_agent, await measure(sid)


def idle_report(res: dict) -> list[str]:
    mb = 1 << 20
    n = res["n"]
    agent = res["agent_rss"]
    rows = [
        "## Idle cost and density",
        "",
        f"{n} idle 512 MB sandboxes (default image), CPU averaged over {res['window']:.0f} s each, as % of one core:",
        "the daemon (with the processes it ran and reaped) and the sandboxes (sum of their cgroups' CPU).",
        "",
        "| state | daemon CPU % | sandboxes' CPU % | target |",
        "|---|---|---|---|",
        f"| no sandboxes | {res['none'][0]:.2f} | | |",
        f"| {n} hot, before (every agent asked for its ports every 2 s) | {res['hot_fixed_scans']:.2f} | | |",
    ]
    for state, target in (
        ("hot", "daemon <= 1 %, sandboxes <= 2 %"),
        ("warm", "daemon as with none"),
        ("cold", "daemon as with none"),
    ):
        rows.append(f"| {n} {state} | {res[state][0]:.2f} | {res[state][1]:.2f} | {target} |")
    per = res["hot"][1] / n
    rows += [
        "",
        f"Per idle hot sandbox: {per:.2f} % of a core, of which the agent's own two processes (measured inside",
        f"the guests, settling time included) {res['agents_inside'] / n:.3f} %. The rest is gVisor's own: one idle",
        f"sandbox started by runsc itself costs {res['raw_agent']:.2f} % with the agent and {res['raw_sleep']:.2f} %",
        f"with only `sleep` in it (kiln/raw-sleep {per / max(res['raw_sleep'], 1e-9):.2f}x; with {n} on 2 cores each",
        "gets less): systrap's idle wake-ups, reported upstream; this machine's runsc is from 2024.",
        "",
        "| memory per idle sandbox | MB |",
        "|---|---|",
        f"| host memory per hot sandbox (MemAvailable drop over {n} creates) | {res['host_per_hot'] / mb:.1f} |",
        f"| its memory cgroup (guest memory, gVisor, page cache) | {res['cgroup_per_hot'] / mb:.1f} |",
        f"| its gofer's RSS (outside the cgroup) | {res['gofer_per_hot'] / mb:.1f} |",
        f"| the agent's RSS inside (PID 1 + its server) | {' + '.join(f'{a / mb:.1f}' for a in agent)} |",
        f"| (the agent's Python doing nothing, in the same sandbox, for comparison) | {res['bare_rss'] / mb:.1f} |",
        f"| freed per sandbox by a stop (it is then a file on disk) | {res['host_per_cold_freed'] / mb:.1f} |",
        "",
        f"So this machine's {meminfo('MemTotal') / (1 << 30):.0f} GiB hold about "
        f"{meminfo('MemTotal') / max(res['host_per_hot'], 1):.0f} idle hot sandboxes; warm ones cost the same "
        "memory (frozen, not freed); cold ones cost disk only.",
        "",
    ]
    return rows
