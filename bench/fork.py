"""Fork and named-snapshot benchmarks: a 512 MB source with 64 MB and 256 MB of memory written, forked
(how long the source is paused, when the fork answers), beside the raw runsc steps a fork is made of
(pause, checkpoint --leave-running, resume) on a raw container holding the same; and a sandbox made by
resuming a named snapshot beside a plain create, in the same run."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.raw import raw_engine
from kiln.engine.base import SandboxSpec
from kiln.proc import run
from tests.daemon import Daemon, builtin_image

FILL = "head -c {mb}000000 /dev/urandom > /dev/shm/ballast"


def fork_source(api, mb: int, n: int, prefix: str, answers: list[float], paused: list[float]) -> dict:
    """A 512 MB source holding `mb` MB, forked n times: how long each POST took and the source was
    paused. Returns the source (still there, for what the caller does with it next)."""
    src = api.post("/sandboxes", json={"name": f"{prefix}src{mb}", "memory_mb": 512}).json()
    api.post(f"/sandboxes/{src['id']}/exec", json={"cmd": ["sh", "-c", FILL.format(mb=mb)]})
    for i in range(n):
        t = time.perf_counter()
        r = api.post("/sandboxes", json={"from": src["id"], "name": f"{prefix}f{mb}-{i}"})
        answers.append(time.perf_counter() - t)
        assert r.status_code == 201, r.text
        paused.append(r.json()["fork"]["paused_ms"] / 1000)
        api.delete(f"/sandboxes/{r.json()['id']}")
    return src


def bench_fork_api(n: int) -> dict[str, list[float]]:
    res: dict[str, list[float]] = {k: [] for k in ("fork64", "paused64", "fork256", "paused256", "create", "resume")}
    d = Daemon()
    try:
        d.start()
        with d.client(timeout=300) as api:
            for mb in (64, 256):
                src = fork_source(api, mb, n, "", res[f"fork{mb}"], res[f"paused{mb}"])
                if mb == 64:
                    assert api.post(f"/sandboxes/{src['id']}/checkpoint", json={"name": "snap"}).status_code == 201
                api.delete(f"/sandboxes/{src['id']}")
            for i in range(n):  # interleaved, so a slow moment of the machine costs both the same
                t = time.perf_counter()
                made = api.post("/sandboxes", json={"name": f"plain-{i}"}).json()
                res["create"].append(time.perf_counter() - t)
                api.delete(f"/sandboxes/{made['id']}")
                t = time.perf_counter()
                again = api.post("/snapshots/snap/resume", json={"name": f"resumed-{i}"}).json()
                res["resume"].append(time.perf_counter() - t)
                api.delete(f"/sandboxes/{again['id']}")
            api.delete("/snapshots/snap")
    finally:
        d.scrub()
    return res


async def bench_fork_raw(n: int) -> dict[str, list[float]]:
    """The source-side steps of a fork, raw: runsc pause, checkpoint --leave-running, resume."""
    res: dict[str, list[float]] = {"window64": [], "window256": []}
    async with raw_engine() as engine:
        for mb in (64, 256):
            sid = f"rawsrc{mb}"
            handle = await engine.create(
                SandboxSpec(id=sid, hostname=sid, image=builtin_image("default"), memory_mb=512)
            )
            [ev async for ev in handle.agent.exec({"argv": ["sh", "-c", FILL.format(mb=mb)]})]
            for _ in range(n):
                image = engine.dir(sid) / "raw-image"
                shutil.rmtree(image, ignore_errors=True)
                t = time.perf_counter()
                await run(engine.runsc.argv("pause", sid))
                await run(engine.runsc.argv("checkpoint", f"--image-path={image}", "--compression=none",
                                            "--leave-running", sid), timeout=600)  # fmt: skip
                await run(engine.runsc.argv("resume", sid))
                res[f"window{mb}"].append(time.perf_counter() - t)
                shutil.rmtree(image, ignore_errors=True)
            await engine.destroy(sid)
    return res


def bench_fork_xfs(n: int) -> dict[str, list[float]]:
    """The source's pause with the data dir on XFS with reflink (a loop-mounted 20 GB sparse image):
    the disk clone is O(1), so what is left is the memory checkpoint."""
    res: dict[str, list[float]] = {"xfs64": [], "xfs256": []}
    mnt = Path(tempfile.mkdtemp(prefix="kiln-bench-xfs-"))
    image = mnt.with_suffix(".img")
    subprocess.run(["truncate", "-s", "20G", str(image)], check=True)
    subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    d = Daemon(parent_dir=mnt)
    try:
        d.start()
        with d.client(timeout=300) as api:
            for mb in (64, 256):
                src = fork_source(api, mb, n, "x", [], res[f"xfs{mb}"])
                api.delete(f"/sandboxes/{src['id']}")
        assert "cannot reflink" not in d.log_path.read_text(), "the XFS data dir did not reflink"
    finally:
        d.scrub()
        subprocess.run(["umount", str(mnt)], check=False)
        image.unlink(missing_ok=True)
        mnt.rmdir()
    return res


def bench_fork(n: int) -> dict[str, list[float]]:
    return {**bench_fork_api(n), **asyncio.run(bench_fork_raw(n)), **bench_fork_xfs(n)}
