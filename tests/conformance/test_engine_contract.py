"""What every engine must do (kiln/engine/base.py), checked by behaviour; a test of a capability
the engine lacks is skipped and says so."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest

from kiln.core.diagnosis import Diagnosis
from kiln.core.runtime import Runtimes
from kiln.core.secrets import SecretBox, SecretService
from kiln.core.waking import Waker
from kiln.engine.base import Capabilities, Pausable, Snapshottable, State
from kiln.states import Reason, Status
from kiln.store.db import SandboxRow, Store, User, now


def needs(engine, capability: type) -> None:
    if not isinstance(engine.engine, capability):
        pytest.skip(f"the {engine.engine.name} engine cannot {capability.__name__.lower()}")


def test_exec_round_trip(engine):
    h = engine.create()
    assert engine.exec(h, "sh", "-c", "echo hello; exit 3") == (3, "hello\n")
    assert engine.loop.run(engine.engine.status(h.id)).state == State.RUNNING


def test_exec_after_resume_and_three_pause_cycles(engine):
    needs(engine, Pausable)
    h = engine.create()
    for _ in range(3):
        engine.loop.run(engine.engine.pause(h.id))
        assert engine.engine.is_paused(h.id)
        assert engine.loop.run(engine.engine.status(h.id)).state == State.PAUSED
        engine.loop.run(engine.engine.resume(h.id))
        assert not engine.engine.is_paused(h.id)
        assert engine.exec(h, "echo", "awake") == (0, "awake\n")


# /tmp/n is replaced by rename, never truncated in place: a `cat` between the truncate and the write
# would read nothing
COUNTER = (
    "echo $$ > /tmp/pid; i=0; while :; do i=$((i+1)); echo $i > /tmp/n.new; mv /tmp/n.new /tmp/n; sleep 0.05; done"
)


def counted(engine, h) -> int:
    """The counter's value; it is written within moments of starting (a busy host: give it 10 s)."""
    for _ in range(100):
        code, out = engine.exec(h, "cat", "/tmp/n")[:2]
        if code == 0 and out.strip():
            return int(out)
        engine.loop.run(asyncio.sleep(0.1))
    raise AssertionError("the counter never wrote /tmp/n")


def test_memory_survives_three_stop_start_cycles(engine):
    needs(engine, Snapshottable)
    h = engine.create(memory_mb=256)
    engine.exec(h, "sh", "-c", f"echo in-ram > /dev/shm/marker; nohup sh -c '{COUNTER}' >/dev/null 2>&1 &")
    for _ in range(3):
        before = counted(engine, h)
        summary = engine.loop.run(engine.engine.stop(h.id))
        assert summary.kind in ("full", "diff") and summary.bytes_total > 0
        assert engine.loop.run(engine.engine.status(h.id)).state == State.STOPPED
        h = engine.loop.run(engine.engine.restore(h.id))
        assert engine.exec(h, "cat", "/dev/shm/marker") == (0, "in-ram\n")
        # the same counting process goes on (tmpfs kept, pid alive): not a reboot
        assert engine.exec(h, "sh", "-c", "kill -0 $(cat /tmp/pid)")[0] == 0
        engine.loop.run(asyncio.sleep(0.3))
        assert counted(engine, h) > before


def test_wake_storm_restores_once(engine):
    needs(engine, Snapshottable)
    h = engine.create()
    engine.exec(h, "sh", "-c", "echo storm > /dev/shm/m")
    engine.loop.run(engine.engine.stop(h.id))

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "state.db")
        store.create_user(User("u", "u", 10, 4, 4096, now()), "key")
        store.insert_sandbox(
            SandboxRow(
                id=h.id,
                owner_id="u",
                name="storm",
                status=Status.CREATING,
                cpus=1,
                memory_mb=512,
                image="default",
                created_at=now(),
            )
        )
        store.mark_running(h.id, h.ip)
        store.mark_stopped(h.id, Reason.NONE)
        real = engine.engine
        restores = 0
        original = real.restore

        async def counting_restore(sandbox_id):
            nonlocal restores
            restores += 1
            return await original(sandbox_id)

        runtimes = Runtimes()
        waker = Waker(
            store,
            real,
            Capabilities.of(real),
            runtimes,
            Diagnosis(store, real, runtimes),
            SecretService(store, SecretBox(Path(tmp) / "secret.key")),
        )
        real.restore = counting_restore  # counts, and still restores for real
        try:

            async def storm():
                row = store.sandbox_by_id(h.id)
                return await asyncio.gather(*(waker.ensure_hot(row) for _ in range(12)))

            handles = engine.loop.run(storm())
        finally:
            del real.restore
        assert restores == 1
        assert {x.ip for x in handles} == {h.ip}
        assert engine.exec(handles[0], "cat", "/dev/shm/m") == (0, "storm\n")
        store.close()


def test_destroy_leaves_nothing_the_engine_reports(engine):
    h = engine.create()
    others = frozenset(i for i in engine.made if i != h.id)
    assert any(engine.engine.leftovers(others).values())  # the check below is not vacuous
    engine.loop.run(engine.engine.destroy(h.id))
    engine.made.remove(h.id)
    assert engine.loop.run(engine.engine.status(h.id)).state == State.MISSING
    assert engine.engine.handle(h.id) is None
    assert not any(engine.engine.leftovers(others).values())
    engine.loop.run(engine.engine.destroy(h.id))  # idempotent
