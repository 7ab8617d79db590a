"""Thermal benchmarks: warm and cold wakes, full and diff stops, against raw runsc on the same bundle.

kiln (through the API):
- warm wake: exec `true` on a warm (frozen) sandbox, minus the p50 of exec `true` on a hot one
- cold wake: exec `true` right after POST /stop (idle 512 MB sandbox, and one holding 256 MB written)
- stop: POST /stop, full (first stop of a sandbox) and diff (later stops), with bytes written
raw (runsc CLI on an engine-prepared bundle): `runsc pause`/`resume`; `runsc checkpoint
--compression=none` to disk (+ `delete`); `runsc restore -detach` until the agent answers.

Each kiln measurement is followed at once by its raw twin (the raw side runs on an event loop of its
own): stop and checkpoint times drift ~1.5x within minutes here, and measuring all of kiln's first
and then all of raw's compared two different machines. Every stop and checkpoint starts settled
(`settle`): what the step before left in the page cache is written back first, so neither side's
figure carries the other's writes (a raw checkpoint leaves ~280 MB unwritten; kiln's diff stops
took up to 3x longer right after one).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time

from bench.raw import raw_checkpoint, raw_engine, raw_restore
from kiln.engine.base import SandboxSpec
from kiln.engine.gvisor.proc import run
from tests.daemon import Daemon, builtin_image

FILL_256MB = "head -c 268435456 /dev/urandom > /dev/shm/fill"
SETTLE = 0.3  # seconds of quiet after the writeback


def settle() -> None:
    """Write back what earlier steps left in the page cache, then let the machine be quiet a moment."""
    os.sync()
    time.sleep(SETTLE)


class RawSide:
    """runsc driven directly, on its own event loop in a thread: `call` runs one raw step and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.res: dict[str, list] = {
            "pause": [],
            "resume": [],
            "checkpoint_first": [],
            "checkpoint_again": [],
            "restore": [],
            "restore_256": [],
        }
        self.images: dict = {}
        self.handles: dict = {}

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    @contextlib.contextmanager
    def running(self):
        self.thread.start()
        engine_cm = raw_engine()
        self.engine = self.call(engine_cm.__aenter__())
        try:
            yield self
        finally:
            self.call(engine_cm.__aexit__(None, None, None))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()

    async def make(self, sid: str, fill: str | None = None) -> None:
        handle = await self.engine.create(SandboxSpec(id=sid, hostname=sid, image=builtin_image("default")))
        if fill:
            [ev async for ev in handle.agent.exec({"argv": ["sh", "-c", fill]})]
        self.handles[sid] = handle

    async def pause_resume(self, sid: str) -> None:
        for step in ("pause", "resume"):
            t = time.perf_counter()
            await run(self.engine.runsc.argv(step, sid))
            self.res[step].append(time.perf_counter() - t)

    async def checkpoint(self, sid: str, key: str | None) -> None:
        await asyncio.to_thread(settle)
        took, self.images[sid] = await raw_checkpoint(self.engine, sid)
        if key:
            self.res[key].append(took)

    async def restore(self, sid: str, key: str | None) -> None:
        took = await raw_restore(self.engine, sid, self.handles[sid], self.images[sid])
        if key:
            self.res[key].append(took)

    async def first_checkpoint_of_fresh(self, sid: str) -> None:
        """What a full stop does: the first checkpoint of a fresh sandbox holding 256 MB."""
        await self.make(sid, FILL_256MB)
        await self.checkpoint(sid, "checkpoint_first")
        await self.engine.destroy(sid)


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


def bench_thermal(n: int) -> tuple[dict[str, list], dict[str, list]]:
    """(kiln's figures, raw's), each raw step right after its kiln twin."""
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
        "folded": [],
    }
    raw = RawSide()
    try:
        d.start()
        with d.client() as api, raw.running():

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
            raw.call(raw.make("rawidle"))
            for _ in range(n):
                wait_warm(api, idle)
                res["warm_exec"].append(timed(lambda: exec_true(idle))[0])
                raw.call(raw.pause_resume("rawidle"))

            cold = api.post("/sandboxes", json={"name": "cold", "keep_hot": True}).json()["id"]
            big = api.post("/sandboxes", json={"name": "cold256", "keep_hot": True}).json()["id"]
            api.post(f"/sandboxes/{big}/exec", json={"cmd": ["sh", "-c", FILL_256MB]})
            raw.call(raw.make("rawbig", FILL_256MB))
            packs = d.data_dir / "sandboxes" / big / "snapshot" / "packs"
            twins = {cold: ("rawidle", None, "restore"), big: ("rawbig", "checkpoint", "restore_256")}
            for i in range(n + 1):
                for sid, key in ((cold, "cold_wake"), (big, "cold_wake_256")):
                    settle()
                    t, snap = timed(lambda: stop(sid))
                    kind = "full" if snap["kind"] == "full" else "diff"
                    if sid == big:
                        res[f"stop_{kind}"].append(t)
                        res[f"{kind}_bytes"].append(snap["bytes_written"])
                        if kind == "diff":  # folded into its base at the stop: one pack, linked by the wake
                            res["folded"].append(len(list(packs.glob("*.pack"))) == 1)
                    wake = timed(lambda: exec_true(sid))[0]
                    if i:  # the first restore warms the page cache of a fresh snapshot
                        res[key].append(wake)
                    # the raw twins: a checkpoint (the first one full, later ones after a restore), a restore
                    raw_sid, checkpoint_key, restore_key = twins[sid]
                    raw.call(
                        raw.checkpoint(raw_sid, checkpoint_key and f"{checkpoint_key}_{'again' if i else 'first'}")
                    )
                    raw.call(raw.restore(raw_sid, restore_key if i else None))
            for _ in range(3):  # left stopped until its diff is one pack (folded, or repacked after REPACK_DELAY)
                settle()
                stop(big)
                deadline = time.monotonic() + 60
                while len(list(packs.glob("*.pack"))) != 1:
                    assert time.monotonic() < deadline, "the diff was not repacked"
                    time.sleep(0.2)
                res["cold_wake_256_settled"].append(timed(lambda: exec_true(big))[0])
            for i in range(n - 1):  # more full stops: first stops of fresh 256 MB sandboxes
                sid = api.post("/sandboxes", json={"name": f"full-{i}", "keep_hot": True}).json()["id"]
                api.post(f"/sandboxes/{sid}/exec", json={"cmd": ["sh", "-c", FILL_256MB]})
                settle()
                t, snap = timed(lambda: stop(sid))
                res["stop_full"].append(t)
                res["full_bytes"].append(snap["bytes_written"])
                api.delete(f"/sandboxes/{sid}")
                raw.call(raw.first_checkpoint_of_fresh(f"rawfull{i}"))
    except Exception:
        print(d.log())
        raise
    finally:
        d.scrub()
    return res, raw.res
