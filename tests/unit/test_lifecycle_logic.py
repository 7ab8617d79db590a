"""Core's lifecycle decisions against an in-memory engine: how often the engine is asked, and what
core does when the engine fails it."""

import asyncio

import pytest

from kiln.config import Config
from kiln.core.events import SandboxEvents
from kiln.core.images import ImageService
from kiln.core.lifecycle import SandboxService
from kiln.core.runtime import Runtimes
from kiln.core.secrets import SecretBox, SecretService
from kiln.core.templates import TemplateService
from kiln.core.volumes import VolumeService
from kiln.engine.base import Capabilities, State
from kiln.states import IllegalTransition, Reason, Status
from kiln.store.db import SandboxRow, Store, User, now
from tests.unit.fake_engine import FakeEngine


@pytest.fixture
def world(tmp_path):
    store = Store(tmp_path / "state.db")
    store.create_user(User("u1", "alice", 10, 4, 4096, now()), "key")
    engine = FakeEngine()
    config = Config(data_dir=tmp_path)
    secrets = SecretService(store, SecretBox(tmp_path / "secret.key"))
    runtimes = Runtimes()
    images = ImageService(store, engine, config, runtimes)
    service = SandboxService(
        store,
        engine,
        config,
        secrets,
        VolumeService(store, tmp_path, 1024),
        TemplateService(store, images),
        runtimes,
        SandboxEvents(),
        images,
    )
    yield store, engine, service
    store.close()


def add_row(store, engine, sandbox_id: str, state: State) -> SandboxRow:
    store.insert_sandbox(
        SandboxRow(
            id=sandbox_id,
            owner_id="u1",
            name=sandbox_id,
            status=Status.CREATING,
            cpus=1,
            memory_mb=512,
            image="default",
            created_at=now(),
        )
    )
    store.mark_running(sandbox_id, "10.0.0.2")
    if state == State.STOPPED:
        store.mark_stopped(sandbox_id, Reason.NONE)
    engine.states[sandbox_id] = state
    return store.sandbox_by_id(sandbox_id)


def test_capabilities_are_resolved_once(world):
    _, _, service = world
    assert service.caps == Capabilities(pause=True, snapshot=True, fork=False)  # the fake cannot fork


def test_a_wake_storm_asks_the_engine_once(world):
    store, engine, service = world
    row = add_row(store, engine, "cold1", State.STOPPED)

    async def storm():
        return await asyncio.gather(*(service.waker.ensure_hot(row) for _ in range(12)))

    handles = asyncio.run(storm())
    assert {h.id for h in handles} == {"cold1"}
    assert engine.calls["restore"] == 1
    # the eleven that queued behind the restore found the sandbox hot without asking the engine again
    assert engine.calls["status"] == 1
    assert store.sandbox_by_id("cold1").status == Status.RUNNING


def test_reconcile_survives_an_engine_error_and_marks_the_sandbox(world):
    store, engine, service = world
    add_row(store, engine, "fine", State.RUNNING)
    add_row(store, engine, "broken", State.RUNNING)
    engine.fail_status.add("broken")
    asyncio.run(service.reconcile())  # must not raise: one sandbox must not keep the daemon from starting
    assert store.sandbox_by_id("broken").status == Status.UNKNOWN
    assert store.sandbox_by_id("broken").reason == Reason.LOST
    assert store.sandbox_by_id("fine").status == Status.RUNNING


def test_the_store_refuses_transitions_the_table_does_not_allow(world):
    store, engine, _ = world
    add_row(store, engine, "s1", State.RUNNING)
    with pytest.raises(IllegalTransition):
        store.delete_sandbox("s1")  # a live row is only deleted after mark_destroying
    store.mark_destroying("s1")
    with pytest.raises(IllegalTransition):
        store.mark_running("s1", "10.0.0.2")  # nothing comes back from destroying
    store.delete_sandbox("s1")
    assert store.sandbox_by_id("s1") is None


def test_stop_on_an_engine_without_snapshots_is_409(world, tmp_path):
    store, engine, service = world
    add_row(store, engine, "s2", State.RUNNING)

    class NoSnapshots(FakeEngine):
        stop = None  # type: ignore[assignment]
        restore = None  # type: ignore[assignment]

    plain = NoSnapshots()
    plain.states = engine.states
    limited = SandboxService(
        store,
        plain,
        service.config,
        service.secrets,
        service.volumes,
        service.templates,
        Runtimes(),
        SandboxEvents(),
        service.images,
    )
    assert limited.caps.snapshot is False
    user = store.user_by_name("alice")
    with pytest.raises(Exception) as e:
        asyncio.run(limited.stop(user, "s2"))
    assert e.value.status == 409 and "cannot snapshot" in e.value.message


class ForgedAgent:
    """An agent that answers ACTIVITY with whatever the sandbox's root chose to send."""

    def __init__(self, reply):
        self.reply = reply

    async def activity(self, timeout: float = 5.0):
        return self.reply


def test_one_forged_activity_reply_never_stops_the_thermal_loop(world, monkeypatch):
    from kiln.config import ThermalConfig
    from kiln.core.thermal import ThermalPolicy
    from kiln.engine.base import SandboxHandle

    store, engine, service = world
    add_row(store, engine, "idle", State.RUNNING)
    add_row(store, engine, "forger", State.RUNNING)  # newest: the loop meets it first
    agents = {
        "forger": ForgedAgent({"last_activity_unix": "not a number"}),
        "idle": ForgedAgent({"last_activity_unix": 0, "attached_sessions": 0}),
    }
    monkeypatch.setattr(engine, "handle", lambda i: SandboxHandle(i, "10.0.0.2", agents[i]))
    policy = ThermalPolicy(ThermalConfig(warm_after=1.0, cold_after=3600, tick=1), service)
    for rt_id in ("forger", "idle"):
        service.runtimes[rt_id].last_activity -= 10
    asyncio.run(policy.tick())
    assert engine.states["idle"] == State.PAUSED  # the other tenant's sandbox still goes warm
    assert engine.states["forger"] == State.RUNNING
    assert service.runtimes["forger"].agent_failures == 1  # counted as an agent that did not answer


def test_an_engine_that_cannot_fork_answers_501(world):
    from kiln.core.errors import NotImplementedYet
    from kiln.core.forks import ForkService
    from kiln.core.lifecycle import CreateRequest

    store, _, service = world
    user = store.user_by_name("alice")
    with pytest.raises(NotImplementedYet, match="cannot fork"):
        asyncio.run(ForkService(service).fork(user, "anything", CreateRequest()))


def test_a_sandbox_that_names_no_policy_gets_network_egress_default(world):
    from kiln.config import Config

    _, _, service = world
    assert service.net_policy(None).default == "public"
    service.config = Config.model_validate({"network": {"egress_default": "deny"}})
    assert service.net_policy(None).default == "deny"
    assert service.net_policy({"allow_hosts": ["example.com"]}).default == "deny"  # the default fills a missing key
