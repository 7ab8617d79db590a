"""The gVisor engine's own tests: bookkeeping that the contract's behaviour tests cannot see."""

import asyncio
import threading

from kiln.engine.gvisor import engine as gvisor_engine
from kiln.engine.gvisor.engine import GVisorEngine


def make(tmp_path) -> GVisorEngine:
    return GVisorEngine(tmp_path / "data", tmp_path / "images", "10.254.254.0/24")


def test_exit_reports_are_kept_referenced_until_done(tmp_path):
    engine = make(tmp_path)
    heard = []
    release = asyncio.Event()

    async def listener(sandbox_id: str) -> None:
        await release.wait()
        heard.append(sandbox_id)

    async def go():
        engine.set_exit_listener(listener)
        engine.sandbox_pids["s1"] = 4242
        engine._exited("s1", 4242)  # the sandbox's process died on its own
        assert len(engine.exit_tasks) == 1  # referenced: the loop holds tasks only weakly
        release.set()
        await asyncio.gather(*engine.exit_tasks)
        await asyncio.sleep(0)
        assert engine.exit_tasks == set()
        engine._exited("s1", 4242)  # reported once: a second exit of the same pid is ours
        assert engine.exit_tasks == set()

    asyncio.run(go())
    assert heard == ["s1"]


def test_sandbox_directories_are_removed_off_the_event_loop(tmp_path, monkeypatch):
    engine = make(tmp_path)
    sandbox_dir = engine.dir("0123456789abcdef")
    sandbox_dir.mkdir(parents=True)
    (sandbox_dir / "disk.ext4").write_bytes(b"\0" * 4096)
    threads = []
    real_rmtree = gvisor_engine.shutil.rmtree

    def spy(path, *args, **kwargs):
        threads.append(threading.current_thread())
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(gvisor_engine.shutil, "rmtree", spy)

    async def go():
        await engine.remove_leftovers("0123456789abcdef", None)
        return threading.current_thread()

    loop_thread = asyncio.run(go())
    assert threads and all(t is not loop_thread for t in threads)  # multi-GB trees never block the loop
    assert not sandbox_dir.exists()
