"""Creates from a snapshot template: with a warm pool (a thaw), without (a resume), beside a plain
create, in the same run; and a burst of 2N creates against a pool of N, which drains and falls back
to resumes. The runtime's floor for a resume beside them: `runsc restore` of a sandbox like the
template's source (default image, one background process) until its agent answers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

from bench.raw import raw_checkpoint, raw_engine, raw_restore
from kiln.engine.base import SandboxSpec
from tests.daemon import Daemon, builtin_image

POOL = 3


def wait_ready(api, template: str, ready: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while api.get(f"/templates/{template}").json()["pool"]["ready"] < ready:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pool of {template} did not refill")
        time.sleep(0.2)


def bench_pools(n: int) -> dict[str, list[float]]:
    res: dict[str, list[float]] = {"pooled": [], "resumed": [], "plain": [], "exec": []}
    res["burst_claimed"], res["burst_failed"], res["burst_wall"] = [], [], []
    d = Daemon({"limits": {"max_sandboxes": 50}})
    try:
        d.start()
        with d.client(timeout=300) as api:
            src = api.post("/sandboxes", json={"name": "pool-src", "init": "sleep 1000 &"}).json()
            for name, pool in (("pooled", POOL), ("plain-snap", 0)):
                body = {"name": name, "from_sandbox": src["id"]} | ({"warm_pool": pool} if pool else {})
                assert api.post("/templates", json=body).status_code == 201
            api.delete(f"/sandboxes/{src['id']}")
            for i in range(n):
                wait_ready(api, "pooled", POOL)
                t = time.perf_counter()
                r = api.post("/sandboxes", json={"template_id": "pooled", "name": f"p{i}"})
                res["pooled"].append(time.perf_counter() - t)
                assert r.status_code == 201 and r.json().get("from_pool"), r.text
                t = time.perf_counter()
                assert api.post(f"/sandboxes/{r.json()['id']}/exec", json={"cmd": ["true"]}).json()["exit_code"] == 0
                res["exec"].append(time.perf_counter() - t)
                api.delete(f"/sandboxes/{r.json()['id']}")
                wait_ready(api, "pooled", POOL)  # the refill is a resume too: never measured beside one
                t = time.perf_counter()
                r = api.post("/sandboxes", json={"template_id": "plain-snap", "name": f"r{i}"})
                res["resumed"].append(time.perf_counter() - t)
                assert r.status_code == 201, r.text
                api.delete(f"/sandboxes/{r.json()['id']}")
                t = time.perf_counter()
                r = api.post("/sandboxes", json={"name": f"c{i}"})
                res["plain"].append(time.perf_counter() - t)
                api.delete(f"/sandboxes/{r.json()['id']}")
            wait_ready(api, "pooled", POOL)

            def create(i):
                return api.post("/sandboxes", json={"template_id": "pooled", "name": f"burst-{i}"})

            t = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(2 * POOL) as ex:
                answers = list(ex.map(create, range(2 * POOL)))
            res["burst_wall"].append(time.perf_counter() - t)
            res["burst_claimed"].append(sum(bool(a.status_code == 201 and a.json().get("from_pool")) for a in answers))
            res["burst_failed"].append(sum(a.status_code != 201 for a in answers))
            for a in answers:
                if a.status_code == 201:
                    api.delete(f"/sandboxes/{a.json()['id']}")
            for name in ("pooled", "plain-snap"):
                api.delete(f"/templates/{name}")
            api.delete("/snapshots/pooled-template")
            api.delete("/snapshots/plain-snap-template")
    finally:
        d.scrub()
    res["raw_restore"] = asyncio.run(raw_restores(n))
    return res


async def raw_restores(n: int) -> list[float]:
    out = []
    async with raw_engine() as engine:
        handle = await engine.create(SandboxSpec(id="rawtpl", hostname="rawtpl", image=builtin_image("default")))
        [ev async for ev in handle.agent.exec({"argv": ["sh", "-c", "sleep 1000 &"]})]
        for _ in range(n + 1):
            _, image = await raw_checkpoint(engine, "rawtpl")
            out.append(await raw_restore(engine, "rawtpl", handle, image))
    return out[1:]  # the first warms the page cache of a fresh image
