"""Thermal benchmarks: warm and cold wakes, full and diff stops, against raw runsc on the same bundle.

kiln (through the API):
- warm wake: exec `true` on a warm (frozen) sandbox, minus the p50 of exec `true` on a hot one
- cold wake: exec `true` right after POST /stop (idle 512 MB sandbox, and one holding 256 MB written)
- stop: POST /stop, full (first stop of a sandbox) and diff (later stops), with bytes written
raw (runsc CLI on an engine-prepared bundle): `runsc pause`/`resume`; `runsc checkpoint
--compression=none` to disk (+ `delete`); `runsc restore -detach` until the agent answers.
"""

from __future__ import annotations

import time

from bench.raw import raw_checkpoint, raw_engine, raw_restore
from kiln.engine.base import SandboxSpec
from kiln.engine.gvisor.proc import run
from tests.daemon import Daemon, builtin_image

FILL_256MB = "head -c 268435456 /dev/urandom > /dev/shm/fill"


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def wait_warm(api, sid, timeout=20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sb = {s["id"]: s for s in api.get("/sandboxes").json()}[sid]
        if sb.get("thermal") == "warm":
            return
        time.sleep(0.05)
    raise RuntimeError("sandbox never went warm")


def bench_thermal_api(n: int) -> dict[str, list]:
    d = Daemon({"thermal": {"warm_after": 0.5, "cold_after": 3600, "tick": 0.1}})
    res: dict[str, list] = {
        "hot_exec": [],
        "warm_exec": [],
        "cold_wake": [],
        "cold_wake_256": [],
        "cold_wake_256_settled": [],
        "stop_full": [],
        "stop_diff": [],
        "full_bytes": [],
        "diff_bytes": [],
    }
    try:
        d.start()
        with d.client() as api:

            def exec_true(sid):
                r = api.post(f"/sandboxes/{sid}/exec", json={"cmd": ["true"]})
                assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text

            def stop(sid):
                r = api.post(f"/sandboxes/{sid}/stop")
                assert r.status_code == 200, r.text
                return r.json()["snapshot"]

            idle = api.post("/sandboxes", json={"name": "warm"}).json()["id"]
            for _ in range(30):
                res["hot_exec"].append(timed(lambda: exec_true(idle))[0])
            for _ in range(n):
                wait_warm(api, idle)
                res["warm_exec"].append(timed(lambda: exec_true(idle))[0])

            cold = api.post("/sandboxes", json={"name": "cold", "keep_hot": True}).json()["id"]
            big = api.post("/sandboxes", json={"name": "cold256", "keep_hot": True}).json()["id"]
            api.post(f"/sandboxes/{big}/exec", json={"cmd": ["sh", "-c", FILL_256MB]})
            for i in range(n + 1):
                for sid, key in ((cold, "cold_wake"), (big, "cold_wake_256")):
                    t, snap = timed(lambda: stop(sid))
                    kind = "full" if snap["kind"] == "full" else "diff"
                    if sid == big:
                        res[f"stop_{kind}"].append(t)
                        res[f"{kind}_bytes"].append(snap["bytes_written"])
                    wake = timed(lambda: exec_true(sid))[0]
                    if i:  # the first restore warms the page cache of a fresh snapshot
                        res[key].append(wake)
            packs = d.data_dir / "sandboxes" / big / "snapshot" / "packs"
            for _ in range(3):  # left stopped until its diff is repacked (REPACK_DELAY), as idle sandboxes are
                stop(big)
                deadline = time.monotonic() + 60
                while len(list(packs.glob("*.pack"))) != 1:
                    assert time.monotonic() < deadline, "the diff was not repacked"
                    time.sleep(0.2)
                res["cold_wake_256_settled"].append(timed(lambda: exec_true(big))[0])
            for i in range(n - 1):  # more full stops: first stops of fresh 256 MB sandboxes
                sid = api.post("/sandboxes", json={"name": f"full-{i}", "keep_hot": True}).json()["id"]
                api.post(f"/sandboxes/{sid}/exec", json={"cmd": ["sh", "-c", FILL_256MB]})
                t, snap = timed(lambda: stop(sid))
                res["stop_full"].append(t)
                res["full_bytes"].append(snap["bytes_written"])
                api.delete(f"/sandboxes/{sid}")
    except Exception:
        print(d.log())
        raise
    finally:
        d.scrub()
    return res


async def bench_thermal_raw(n: int) -> dict[str, list]:
    res: dict[str, list] = {
        "pause": [],
        "resume": [],
        "checkpoint_first": [],
        "checkpoint_again": [],
        "restore": [],
        "restore_256": [],
    }
    async with raw_engine() as engine:
        runsc = engine.runsc

        async def make(sid: str, fill: str | None):
            handle = await engine.create(SandboxSpec(id=sid, hostname=sid, image=builtin_image("default")))
            if fill:
                [ev async for ev in handle.agent.exec({"argv": ["sh", "-c", fill]})]
            return handle

        idle = await make("rawidle", None)
        for _ in range(n):
            t = time.perf_counter()
            await run(runsc.argv("pause", "rawidle"))
            res["pause"].append(time.perf_counter() - t)
            t = time.perf_counter()
            await run(runsc.argv("resume", "rawidle"))
            res["resume"].append(time.perf_counter() - t)
        for _ in range(n + 1):
            _, image = await raw_checkpoint(engine, "rawidle")
            res["restore"].append(await raw_restore(engine, "rawidle", idle, image))
        res["restore"] = res["restore"][1:]
        await engine.destroy("rawidle")
        for i in range(n):  # the first checkpoint of a fresh sandbox holding 256 MB: what a full stop does
            sid = f"rawfull{i}"
            handle = await make(sid, FILL_256MB)
            took, image = await raw_checkpoint(engine, sid)
            res["checkpoint_first"].append(took)
            if i == 0:  # then the same sandbox again and again: what a diff stop does
                for _ in range(n + 1):
                    res["restore_256"].append(await raw_restore(engine, sid, handle, image))
                    took, image = await raw_checkpoint(engine, sid)
                    res["checkpoint_again"].append(took)
                res["restore_256"] = res["restore_256"][1:]
            await engine.destroy(sid)
    return res
