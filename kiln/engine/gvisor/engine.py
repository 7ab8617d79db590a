"""The gVisor engine: each sandbox is a runsc container in its own netns, on an overlay of its image.

Per sandbox it keeps a Record (records.py, on disk), an agent client, the freezer state it last
set, the pid whose exit means the sandbox died, and background work (container deletes, snapshot
indexing and repacking) that later calls for the same sandbox wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import secrets
import shutil
import subprocess
import threading
import time
from pathlib import Path

from ...agent.client import AgentClient
from ...agent.protocol import AGENT_PORT
from ...fileio import write_atomic
from ...images.runtime import RuntimeUnavailable, ensure_runtime
from ...netpolicy import NEVER, Denylist, NetPolicy
from ...tasks import all_of
from ..base import (
    DeathCause,
    EngineError,
    ExitListener,
    ForkResult,
    NoSpace,
    SandboxHandle,
    SandboxSpec,
    SnapshotSummary,
    State,
    Status,
    Usage,
)
from ..phases import Phases
from . import bundle, export, fork as forking, recovery
from .cgroups import Cgroups
from .kept import KeptSnapshots
from .network import EgressSettings, Link, Network, find_uplink
from .reaper import ProcessWatcher
from .records import RECORD_FILE, RESOLVED_FILE, Record
from .resolver import Resolver
from .runsc import Runsc, tail
from .snapshots import PageStore, RepackStopped, remove_and_commit, remove_scratch, set_aside
from .volumes import VolumeMounts

log = logging.getLogger("kiln.engine.gvisor")

BOOT_TIMEOUT = 30.0
SNAPSHOT_MARGIN = 32 << 20
MEMORY_SCRATCH = Path("/dev/shm")  # the host's tmpfs: where diff stops write their checkpoint
MEMORY_HEADROOM = 1 << 30  # host memory a diff stop leaves available for everything else
CREATE_MIN_FREE = 64 << 20
REPACK_DELAY = 5.0  # a diff stop's repack waits this long first: a sandbox woken at once needs none


class Repack:
    """A diff snapshot's repack, REPACK_DELAY after its stop; stopped at once by whoever needs the
    sandbox: cancelled while it waits, or told to end (at its next 1 MB write) once its thread runs."""

    def __init__(self, store: PageStore):
        self.stop = threading.Event()
        self.running = False
        self.task = asyncio.get_running_loop().create_task(self.later(store))

    async def later(self, store: PageStore) -> None:
        await asyncio.sleep(REPACK_DELAY)
        self.running = True
        await asyncio.to_thread(store.repack, self.stop)

    def abandon(self) -> None:
        self.stop.set()
        if not self.running:
            self.task.cancel()  # still waiting: it never starts (a running thread cannot be cancelled)


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def first_to_go_out_of_memory(pid: int) -> None:
    """Over its memory limit, a sandbox is killed whole: its own process goes first, never one of
    gVisor's stub processes (which one the kernel would pick is a matter of a few MB of RSS; a
    killed stub leaves the guest process it served dead with exit code 1 and no word of memory).
    Host-wide, too, sandboxes go before the daemon."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/oom_score_adj").write_text("1000")


def host_prefix(data_dir: Path) -> str:
    """6 hex chars derived from the data dir: the namespace of every host-global name we create."""
    return hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:6]


class GVisorEngine:
    name = "gvisor"

    def __init__(
        self,
        data_dir: Path,
        images_dir: Path,
        subnet: str,
        runsc_binary: str = "runsc",
        egress: EgressSettings | None = None,
    ):
        self.data_dir = data_dir
        self.egress = egress or EgressSettings()
        self.images_dir = images_dir
        self.sandboxes_dir = data_dir / "sandboxes"
        self.prefix = host_prefix(data_dir)
        self.network = Network(self.prefix, subnet, marker_dir=data_dir)
        self.resolver: Resolver | None = None
        self.resolved: dict[str, dict[str, float]] = {}  # addresses allowed since the last save_resolved
        self.resolved_flush: dict[str, asyncio.TimerHandle] = {}
        self.behind: dict[str, str] = {}  # host veth -> the sandbox whose DNS the resolver serves there
        self.runsc = Runsc(data_dir / "runsc", runsc_binary)
        self.cgroups = Cgroups(f"kiln-{self.prefix}")
        self.volume_mounts = VolumeMounts(data_dir / "volume-mounts")
        self.records: dict[str, Record] = {}
        self.frozen: dict[str, bool] = {}  # freezer state as last read or set (see is_paused)
        self.agents: dict[str, AgentClient] = {}
        self.processes = ProcessWatcher()
        self.sandbox_pids: dict[str, int] = {}  # sandbox id -> pid whose exit means it died
        self.pending_deletes: dict[str, asyncio.Task] = {}  # container deletes still running
        self.indexing: dict[str, asyncio.Task] = {}  # snapshots being indexed or repacked after their stop
        self.repacks: dict[str, Repack] = {}  # diff snapshots to repack (their tasks are in indexing)
        self.kept = KeptSnapshots(self.data_dir)  # named snapshots
        self.memory_scratch_root = MEMORY_SCRATCH / f"kiln-{self.prefix}"
        self.exit_tasks: set[asyncio.Task] = set()  # exit reports under way (referenced until done)
        self.deletions: set[asyncio.Task] = set()  # scratch images being deleted after their request
        self.slot_lock = asyncio.Lock()
        self.exit_listener: ExitListener | None = None
        self.runtime_dir: Path | None = None  # the agent's Python runtime (kiln/images/runtime.py)

    def set_exit_listener(self, listener: ExitListener) -> None:
        self.exit_listener = listener

    # ------------------------------------------------------------ engine lifecycle

    async def start_engine(self) -> None:
        try:
            self.runtime_dir = await asyncio.to_thread(ensure_runtime, self.images_dir)
        except (OSError, RuntimeUnavailable, subprocess.CalledProcessError) as e:
            raise EngineError(f"cannot prepare the agent's Python runtime in {self.images_dir}: {e}") from e
        self.sandboxes_dir.mkdir(parents=True, exist_ok=True)
        self.sandboxes_dir.chmod(0o700)  # memory snapshots (with the sandboxes' secrets) are root's only
        for d in self.sandboxes_dir.iterdir():
            try:
                rec = Record.load(d)
                self.records[rec.id] = rec
            except (OSError, ValueError, TypeError):
                log.warning("removing half-made sandbox directory %s", d)
                await self.remove_leftovers(d.name, None)
        uplink = await find_uplink(
            self.egress.uplink, str(self.network.subnet), list(self.egress.deny_cidrs), [str(n) for n in NEVER]
        )
        await self.network.install_firewall(uplink, [(self.link(r), self.policy(r)) for r in self.records.values()])
        if uplink is not None:
            denylist = Denylist([ipaddress.IPv4Network(c) for c in uplink.denied])
            self.resolver = Resolver(
                self.network.resolver_ip, self.egress.upstreams(), denylist, self.policy_behind, self.allow_addresses
            )
            for rec in self.records.values():
                if os.path.exists(f"/sys/class/net/{self.link(rec).host_if}"):
                    await self.network.ensure_egress_side(self.link(rec))  # made before egress was on, maybe
                await self.attach_resolver(rec)
        await recovery.remove_strays(self)
        if not await asyncio.to_thread(forking.reflink_supported, self.sandboxes_dir):
            log.warning(
                "%s cannot reflink: a fork copies its source's disk (about 1 s per 0.5 GB written, with the "
                "source paused); put the data directory on XFS (reflink=1) or btrfs for O(1) clones",
                self.sandboxes_dir,
            )
        await self.volume_mounts.release_unused(self.volumes_in_use())
        for rec in self.records.values():
            await self.volume_mounts.ensure(rec.volume_attachments())  # before any restore or boot
            await recovery.recover_interrupted_stop(self, rec.id)
            if (await self.status(rec.id)).state in (State.RUNNING, State.PAUSED):
                await self.watch(rec.id)

    async def close_engine(self) -> None:
        """Finish container deletes, stop watching; remove host-wide objects if no sandbox is left."""
        for task in list(self.pending_deletes.values()):
            await task
        self.pending_deletes.clear()
        for sandbox_id in list(self.indexing):
            await self.index_done(sandbox_id, stop_repack=True)  # (a repack is an optimisation only)
        for task in list(self.deletions):
            await task
        self.processes.close()
        if self.resolver is not None:
            self.resolver.close()
        for sandbox_id in list(self.resolved_flush):
            self.save_resolved(sandbox_id)
        if not self.records:
            await self.network.remove_firewall()
            self.cgroups.remove_parent()

    # ------------------------------------------------------------ helpers

    def dir(self, sandbox_id: str) -> Path:
        return self.sandboxes_dir / sandbox_id

    def link(self, rec: Record) -> Link:
        return self.network.link(rec.id, rec.slot)

    # ------------------------------------------------------------ egress

    def policy(self, rec: Record) -> NetPolicy:
        return NetPolicy.from_json(rec.net_policy, self.egress.default)

    def policy_behind(self, host_if: str) -> NetPolicy | None:
        rec = self.record_behind(host_if)
        return self.policy(rec) if rec is not None else None

    def record_behind(self, host_if: str) -> Record | None:
        """Asked twice per DNS query: a map kept by attach_resolver, not a walk over every record."""
        sandbox_id = self.behind.get(host_if)
        return self.records.get(sandbox_id) if sandbox_id is not None else None

    async def set_net_policy(self, sandbox_id: str, policy: NetPolicy) -> None:
        rec = self.records.get(sandbox_id)
        if rec is None:
            raise EngineError(f"unknown sandbox {sandbox_id}")
        rec.net_policy = policy.to_json()
        write_atomic(self.dir(sandbox_id) / RECORD_FILE, rec.to_json())
        self.network.set_policy(self.link(rec), policy)
        self.resolved.pop(sandbox_id, None)  # resolved under the old policy
        (self.dir(sandbox_id) / RESOLVED_FILE).unlink(missing_ok=True)

    def allow_addresses(self, host_if: str, addresses: list[tuple[str, int]]) -> None:
        """The resolver answered these addresses to a deny-mode sandbox: let it reach them for their
        TTL (before the answer goes out), and remember them so a daemon restart lets them through
        again (written a moment later, off the answer's path)."""
        rec = self.record_behind(host_if)
        if rec is None:
            return
        self.network.allow_addresses(self.link(rec), addresses)
        now = time.time()
        self.resolved.setdefault(rec.id, {}).update({ip: now + seconds for ip, seconds in addresses})
        if rec.id not in self.resolved_flush:
            self.resolved_flush[rec.id] = asyncio.get_running_loop().call_later(0.5, self.save_resolved, rec.id)

    def save_resolved(self, sandbox_id: str) -> None:
        pending = self.resolved_flush.pop(sandbox_id, None)
        if pending is not None:
            pending.cancel()  # (when called before its time: a fork copies the file)
        fresh = self.resolved.pop(sandbox_id, {})
        if sandbox_id not in self.records:
            return
        path = self.dir(sandbox_id) / RESOLVED_FILE
        now = time.time()
        known = {ip: until for ip, until in read_json(path, {}).items() if until > now}
        # no fsync: a host crash may lose the last answers, which the sandbox then resolves again
        write_atomic(path, json.dumps({**known, **fresh}), durable=False)

    async def attach_resolver(self, rec: Record) -> None:
        """Serve DNS to a sandbox whose veth exists, and let through what it resolved before."""
        if self.resolver is None:
            return
        link = self.link(rec)
        if not os.path.exists(f"/sys/class/net/{link.host_if}"):
            return
        await self.resolver.listen(link.host_if)
        self.behind[link.host_if] = rec.id
        now = time.time()
        known = read_json(self.dir(rec.id) / RESOLVED_FILE, {})
        seed = [(ip, int(until - now)) for ip, until in known.items() if until - now >= 1]
        if seed:
            self.network.allow_addresses(link, seed)

    def runtime(self) -> Path:
        if self.runtime_dir is None:
            raise EngineError("the engine is not started")
        return self.runtime_dir

    def image_root(self, rec: Record) -> Path:
        """The image tree under a sandbox. Records older than images by path name one relative to the
        images directory: the configured one, or where images lived before (`data_dir/images`)."""
        if os.path.isabs(rec.image):
            return Path(rec.image)
        for base in (self.images_dir, self.data_dir / "images"):
            if (base / rec.image).is_dir():
                return base / rec.image
        return self.images_dir / rec.image

    def images_in_use(self) -> set[str]:
        return {str(self.image_root(r)) for r in self.records.values()}

    def volumes_in_use(self) -> set[str]:
        return {v["image"] for r in self.records.values() for v in r.volumes}

    def handle(self, sandbox_id: str) -> SandboxHandle | None:
        rec = self.records.get(sandbox_id)
        if rec is None:
            return None
        link = self.link(rec)
        agent = self.agents.get(sandbox_id)
        if agent is None:
            agent = self.agents[sandbox_id] = AgentClient(link.sandbox_ip, AGENT_PORT, rec.token)
        return SandboxHandle(id=rec.id, ip=link.sandbox_ip, agent=agent)

    async def list_ids(self) -> list[str]:
        return list(self.records)

    # ------------------------------------------------------------ lifecycle

    async def create(self, spec: SandboxSpec) -> SandboxHandle:
        image_dir = Path(spec.image.rootfs)
        if not image_dir.is_dir():
            raise EngineError(f"image tree {image_dir} is missing")
        sandbox_dir = self.dir(spec.id)
        async with self.slot_lock:
            used = {r.slot for r in self.records.values()}
            slot = next((s for s in range(self.network.max_slots) if s not in used), None)
            if slot is None:
                raise EngineError(f"no free address left in {self.network.subnet}")
            rec = Record(
                id=spec.id,
                slot=slot,
                token=secrets.token_hex(16),
                image=spec.image.rootfs,
                memory_mb=spec.memory_mb,
                volumes=[{"image": v.image, "mount": v.mount, "read_only": v.read_only} for v in spec.volumes],
                net_policy=spec.net_policy.to_json(),
            )
            self.records[spec.id] = rec
        try:
            sandbox_dir.mkdir(parents=True)
            link = self.link(rec)
            binds = [(str(self.volume_mounts.mountpoint(v.image)), v.mount, v.read_only) for v in spec.volumes]
            bundle.write_bundle(
                spec,
                sandbox_dir,
                link,
                self.cgroups.path_for_runsc(spec.id),
                rec.token,
                binds,
                self.network.resolver_ip,
                self.runtime(),
            )

            async def disk_and_rootfs() -> None:
                await bundle.make_disk(sandbox_dir, spec.disk_mb, self.data_dir / "disk-templates")
                await bundle.mount_rootfs(image_dir, sandbox_dir)

            async def network() -> None:
                await self.network.create(link, spec.net_policy)
                await self.attach_resolver(rec)

            # independent of each other, and mostly forks of mkfs, mount and ip: side by side
            await all_of(self.volume_mounts.ensure(list(spec.volumes)), disk_and_rootfs(), network())
            # engine.json last: a directory without it is a half-made sandbox, removed on start.
            write_atomic(sandbox_dir / RECORD_FILE, rec.to_json())
            return await self.launch(rec)
        except BaseException:
            await self.destroy(spec.id)
            raise

    async def launch(self, rec: Record) -> SandboxHandle:
        sandbox_dir = self.dir(rec.id)
        self.frozen.pop(rec.id, None)
        await self.runsc.run_detached(rec.id, sandbox_dir, sandbox_dir / "console.log")
        return await self.until_ready(rec)

    async def until_ready(self, rec: Record) -> SandboxHandle:
        """Wait for the agent of a just-started sandbox, then watch its processes."""
        handle = self.handle(rec.id)
        if handle is None:
            raise EngineError(f"unknown sandbox {rec.id}")
        polls = 0

        async def alive() -> bool:
            nonlocal polls
            polls += 1
            if polls % 25:
                return True
            return (await self.status(rec.id)).state == State.RUNNING

        loop = asyncio.get_running_loop()
        try:
            await handle.agent.wait_ready(loop.time() + BOOT_TIMEOUT, alive)
        except Exception as e:
            raise EngineError(
                f"sandbox {rec.id} did not come up: {e}; console: {tail(self.dir(rec.id) / 'console.log')}"
            ) from e
        await self.watch(rec.id)
        return handle

    async def prepare_relaunch(self, sandbox_id: str) -> Record:
        """Clear the old container and make the netns, address and root mount ready again."""
        rec = self.records.get(sandbox_id)
        if rec is None:
            raise EngineError(f"unknown sandbox {sandbox_id}")
        self.expect_exit(sandbox_id)
        await self.delete_container(sandbox_id)
        link = self.link(rec)
        if not os.path.exists(link.netns_path):
            await self.network.create(link, self.policy(rec))
            await self.attach_resolver(rec)
        else:
            await self.network.prepare_for_boot(link)
        await self.volume_mounts.ensure(rec.volume_attachments())
        await bundle.mount_rootfs(self.image_root(rec), self.dir(sandbox_id))
        return rec

    async def boot(self, sandbox_id: str) -> SandboxHandle:
        """Boot a sandbox again, fresh, on the disk it had (after a crash, an OOM, a lost snapshot)."""
        handle = await self.launch(await self.prepare_relaunch(sandbox_id))
        # an older memory snapshot no longer matches this sandbox: never restore it
        await self.index_done(sandbox_id, stop_repack=True)
        await asyncio.to_thread(PageStore(self.dir(sandbox_id)).mark_consumed)
        return handle

    async def export_rootfs(self, sandbox_id: str, target: Path) -> None:
        await export.export_rootfs(self, sandbox_id, target)

    # ------------------------------------------------------------ thermal: pause / resume

    def is_paused(self, sandbox_id: str) -> bool:
        """Asked on every request: the freezer state is read once and then kept in step by
        _set_freezer (only this engine freezes its sandboxes); lifecycle changes forget it."""
        frozen = self.frozen.get(sandbox_id)
        if frozen is None:
            try:
                frozen = self.cgroups.freezer_state(sandbox_id).read_text().strip() != "THAWED"
            except OSError:
                return False
            self.frozen[sandbox_id] = frozen
        return frozen

    async def _set_freezer(self, sandbox_id: str, want: str) -> None:
        # The freezer cgroup directly: ~1 ms each way here, against ~20 ms for `runsc pause`/`resume`.
        path = self.cgroups.freezer_state(sandbox_id)
        self.frozen.pop(sandbox_id, None)
        try:
            path.write_text(want)
            for _ in range(4000):
                if path.read_text().strip() == want:
                    self.frozen[sandbox_id] = want == "FROZEN"
                    return
                await asyncio.sleep(0.0005)
        except OSError as e:
            raise EngineError(f"{want.lower()} sandbox {sandbox_id}: {e}") from e
        raise EngineError(f"sandbox {sandbox_id} did not reach {want}")

    async def pause(self, sandbox_id: str) -> None:
        try:
            await self._set_freezer(sandbox_id, "FROZEN")
        except EngineError:
            await self._set_freezer(sandbox_id, "THAWED")
            raise

    async def resume(self, sandbox_id: str) -> None:
        await self._set_freezer(sandbox_id, "THAWED")

    # ------------------------------------------------------------ snapshots: stop / restore

    async def stop(self, sandbox_id: str) -> SnapshotSummary:
        """Checkpoint, keep only new pages on disk, free all memory.

        Whatever fails, the sandbox stays usable: a failed checkpoint leaves it running, and a
        failed write of the snapshot restores it from the image just taken. The previous good
        snapshot is only replaced once the new one is complete.
        """
        rec = self.records.get(sandbox_id)
        if rec is None:
            raise EngineError(f"unknown sandbox {sandbox_id}")
        phases = Phases()
        await self.index_done(sandbox_id)
        store = PageStore(self.dir(sandbox_id))
        # runsc writes the image beside the snapshot: the first (full) one is adopted as it is;
        # of later ones only new pages are kept, and the file is deleted unsynced. (Not tmpfs: the
        # sandbox's writes to tmpfs count against its memory limit and would OOM-kill it.)
        image_dir = self.dir(sandbox_id) / "checkpoint.tmp"
        self.check_room_for_snapshot(sandbox_id)
        await asyncio.to_thread(remove_scratch, image_dir)
        limits = self.memory_scratch(sandbox_id, image_dir) if store.manifest() is not None else None
        if limits is None:
            image_dir.mkdir(parents=True)
        else:
            log.info("sandbox %s: diff checkpoint into memory", sandbox_id)
        if self.is_paused(sandbox_id):
            await self.resume(sandbox_id)  # a checkpoint of a frozen sandbox never finishes
        self.expect_exit(sandbox_id)
        if sandbox_id in self.agents:  # drain our own connections before the checkpoint
            self.agents[sandbox_id].abort()
        try:
            try:
                phases.mark("prepare")
                await self.runsc.checkpoint(sandbox_id, image_dir)
                phases.mark("runsc checkpoint")
            except EngineError:
                if (await self.status(sandbox_id)).state == State.RUNNING:
                    if limits is not None:  # it goes on running: with its own memory limit again
                        self.cgroups.set_memory_limits(sandbox_id, limits)
                    await self.watch(sandbox_id)
                raise
            # runsc delete takes ~150 ms: let it run while the pages are stored
            self.pending_deletes[sandbox_id] = asyncio.get_running_loop().create_task(
                self._delete_container_now(sandbox_id)
            )
            try:
                info = await asyncio.to_thread(store.save, image_dir)
                phases.mark(f"save ({info.kind})")
                log.info("sandbox %s: stopped (%s)", sandbox_id, phases)
                # after the stop: a full snapshot's digests (only the next diff needs them), a diff's
                # pages rewritten as one pack (the next wake links it instead of copying them)
                loop = asyncio.get_running_loop()
                if info.kind == "full":
                    self.indexing[sandbox_id] = loop.create_task(asyncio.to_thread(store.ensure_index))
                else:
                    repack = self.repacks[sandbox_id] = Repack(store)
                    self.indexing[sandbox_id] = repack.task
                return info
            except OSError as e:
                log.error("writing the snapshot of %s failed (%s); restoring it from the image", sandbox_id, e)
                try:
                    await self.prepare_relaunch(sandbox_id)
                    await self.restore_detached(
                        sandbox_id, self.dir(sandbox_id), self.dir(sandbox_id) / "console.log", image_dir
                    )
                    await self.until_ready(rec)
                except EngineError as lost:
                    raise EngineError(
                        f"writing the snapshot failed ({e.strerror or e}) and the sandbox could not be resumed: {lost}"
                    ) from e
                raise EngineError(f"writing the snapshot failed: {e.strerror or e}") from e
        finally:
            self.delete_later(image_dir)

    def memory_scratch(self, sandbox_id: str, image_dir: Path) -> tuple[int, int | None] | None:
        """Let a diff stop checkpoint into memory: image_dir becomes a link to a directory on the
        host's tmpfs, and the sandbox's memory limit is raised by its usage (runsc writes the image
        from inside the sandbox's cgroup, which tmpfs pages are charged to). Only the few new pages
        then reach the disk: a checkpoint to disk costs its fsync ~0.3 s here, as the virtual disk
        flushes the image runsc has just written. Returns the limits to put back if the sandbox
        goes on running, or None (no room in memory: the disk, as a full stop does)."""
        usage = self.cgroups.memory_usage(sandbox_id)
        limits = self.cgroups.memory_limits(sandbox_id)
        if usage is None or limits is None:
            return None
        try:
            st = os.statvfs(MEMORY_SCRATCH)
        except OSError:
            return None
        need = usage + SNAPSHOT_MARGIN
        if st.f_bavail * st.f_frsize < need or available_memory() < need + MEMORY_HEADROOM:
            return None
        target = self.memory_scratch_root / sandbox_id
        memory, memsw = limits
        try:
            remove_scratch(target)
            target.mkdir(parents=True, mode=0o700)
            image_dir.symlink_to(target)
            self.cgroups.set_memory_limits(sandbox_id, (memory + need, None if memsw is None else memsw + need))
        except OSError as e:  # then the disk, as before
            log.warning("sandbox %s: no diff checkpoint into memory: %s", sandbox_id, e)
            with contextlib.suppress(OSError):
                self.cgroups.set_memory_limits(sandbox_id, limits)
            remove_scratch(image_dir)
            remove_scratch(target)
            return None
        return limits

    def delete_later(self, scratch: Path) -> None:
        """A scratch image (hundreds of MB) is deleted after the request that used it has returned."""
        target = set_aside(scratch)
        if target is not None:
            task = asyncio.get_running_loop().create_task(asyncio.to_thread(remove_and_commit, target))
            self.deletions.add(task)
            task.add_done_callback(self.deletions.discard)

    def free_bytes(self) -> int:
        """Disk space left for sandboxes (what an unprivileged writer could still use)."""
        st = os.statvfs(self.sandboxes_dir)
        return st.f_bavail * st.f_frsize

    def check_room_for_snapshot(self, sandbox_id: str) -> None:
        """Refuse a stop up front when the disk cannot hold the sandbox's memory: better than a
        checkpoint that dies half-written."""
        usage = self.cgroups.memory_usage(sandbox_id)
        if usage is None:
            return
        free = self.free_bytes()
        if free < usage + SNAPSHOT_MARGIN:
            raise NoSpace(
                f"not enough disk space for a snapshot: {free >> 20} MB free on the server, the "
                f"sandbox uses {usage >> 20} MB of memory"
            )

    def check_room_for_create(self) -> None:
        """A new sandbox needs a little disk at once (bundle, disk metadata, logs) and room to grow."""
        free = self.free_bytes()
        if free < CREATE_MIN_FREE:
            raise NoSpace(
                f"not enough disk space to create a sandbox: {free >> 20} MB free on the server "
                f"(at least {CREATE_MIN_FREE >> 20} MB needed)"
            )

    async def fork(self, source_id: str, spec: SandboxSpec) -> ForkResult:
        return await forking.fork(self, source_id, spec)

    async def checkpoint_named(self, sandbox_id: str, copy_id: str, owner: str) -> tuple[int, int]:
        self.kept.dir.mkdir(mode=0o700, exist_ok=True)  # memory images: root's only
        return await forking.checkpoint(self, sandbox_id, copy_id, owner)

    async def resume_named(self, copy_id: str, spec: SandboxSpec) -> SandboxHandle:
        return await forking.resume(self, copy_id, spec)

    async def delete_named(self, copy_id: str) -> None:
        await self.kept.delete(copy_id)

    async def prune_named(self, keep: set[str]) -> None:
        for copy_id in await asyncio.to_thread(self.kept.prune, keep):
            log.warning("removed snapshot %s: the store has no record of it (a crash while it was taken)", copy_id)

    async def restore_detached(self, sandbox_id: str, *args, **kwargs) -> None:
        self.frozen.pop(sandbox_id, None)  # a restored container starts thawed
        await self.runsc.restore_detached(sandbox_id, *args, **kwargs)

    async def restore(self, sandbox_id: str) -> SandboxHandle:
        """Bring a stopped sandbox back from its snapshot: same processes, memory and address."""
        store = PageStore(self.dir(sandbox_id))
        if not store.restorable():
            raise EngineError(f"sandbox {sandbox_id} has no snapshot to restore")
        scratch = self.dir(sandbox_id) / "restore.tmp"
        await asyncio.to_thread(remove_scratch, scratch)
        await self.index_done(sandbox_id, stop_repack=True)  # (a repack would replace the packs this reads)
        phases = Phases()
        try:
            rec = await self.prepare_relaunch(sandbox_id)
            phases.mark("relaunch")
            try:
                await asyncio.to_thread(store.assemble, scratch)
            except OSError as e:
                raise EngineError(f"snapshot of {sandbox_id} is unreadable: {e}") from e
            phases.mark("assemble")
            await self.restore_detached(sandbox_id, self.dir(sandbox_id), self.dir(sandbox_id) / "console.log", scratch)
            phases.mark("runsc restore")
            handle = await self.until_ready(rec)
            phases.mark("agent")
            log.info("sandbox %s: restored (%s)", sandbox_id, phases)
        finally:
            self.delete_later(scratch)  # (runsc has read it, or holds it open)
        await asyncio.to_thread(store.mark_consumed)
        return handle

    async def index_done(self, sandbox_id: str, stop_repack: bool = False) -> None:
        """Wait for a background indexing or repack of the sandbox's snapshot (nothing else may write
        its manifest or read its packs meanwhile). With stop_repack (a wake, a fork, a destroy: it
        wants the sandbox now) a repack is abandoned at its next chunk, or never starts. A failure
        only means the next diff indexes it itself, or the next wake copies the pages."""
        repack = self.repacks.pop(sandbox_id, None)
        if repack is not None and stop_repack:
            repack.abandon()
        task = self.indexing.pop(sandbox_id, None)
        if task is None:
            return
        await asyncio.wait({task})  # (awaiting a task cancelled here would raise into the caller)
        error = None if task.cancelled() else task.exception()
        if isinstance(error, OSError):
            log.warning("indexing the snapshot of %s failed (the next stop will): %s", sandbox_id, error)
        elif error is not None and not isinstance(error, RepackStopped):
            raise error

    async def destroy(self, sandbox_id: str) -> None:
        await self.index_done(sandbox_id, stop_repack=True)
        rec = self.records.get(sandbox_id)
        await self.remove_leftovers(sandbox_id, rec)
        self.records.pop(sandbox_id, None)
        await self.volume_mounts.release_unused(self.volumes_in_use())

    async def remove_leftovers(self, sandbox_id: str, rec: Record | None) -> None:
        pid = self.sandbox_pids.get(sandbox_id, 0)
        self.expect_exit(sandbox_id)
        agent = self.agents.pop(sandbox_id, None)
        if agent:
            agent.abort()
        sandbox_dir = self.dir(sandbox_id)

        async def container() -> None:
            await self.delete_container(sandbox_id, pid)
            await bundle.unmount_rootfs(sandbox_dir)

        async def network() -> None:
            if rec is not None:
                if self.resolver is not None:
                    self.resolver.stop(self.link(rec).host_if)
                    self.behind.pop(self.link(rec).host_if, None)
                await self.network.destroy(self.link(rec))
            else:
                await self.network.remove_netns(self.network.netns_name(sandbox_id))

        await all_of(container(), network())  # independent: together
        # (delete_container removed its cgroups) multi-GB snapshots and disks: never on the event loop
        await asyncio.to_thread(shutil.rmtree, sandbox_dir, True)

    async def delete_container(self, sandbox_id: str, pid: int = 0) -> None:
        """End the container; with pid (its sandbox process), killed first: `runsc delete -force`
        of a dead sandbox takes ~30 ms, of a live one ~150 ms (it stops it gently)."""
        pending = self.pending_deletes.pop(sandbox_id, None)
        if pending is not None:
            await pending
        await self._delete_container_now(sandbox_id, pid)

    async def _delete_container_now(self, sandbox_id: str, pid: int = 0) -> None:
        if self.is_paused(sandbox_id):
            await self.resume(sandbox_id)  # runsc delete talks to the sandbox (and a frozen one cannot die)
        if pid:
            await self.processes.kill(pid)
        await self.runsc.delete(sandbox_id)
        self.cgroups.remove(sandbox_id)
        self.frozen.pop(sandbox_id, None)

    async def status(self, sandbox_id: str) -> Status:
        if sandbox_id not in self.records:
            return Status(State.MISSING)
        if self.is_paused(sandbox_id):
            return Status(State.PAUSED)  # runsc state would hang: it asks the frozen sandbox
        if sandbox_id in self.pending_deletes and PageStore(self.dir(sandbox_id)).restorable():
            # checkpointed by a stop, its container still being deleted: `runsc state` of it takes
            # ~100 ms here, on an immediate wake's path
            return Status(State.STOPPED)
        st = await self.runsc.state(sandbox_id)
        s = (st or {}).get("status")
        if s == "running":
            return Status(State.PAUSED if self.is_paused(sandbox_id) else State.RUNNING)
        if s == "paused":
            return Status(State.PAUSED)
        # No live container (or a checkpointed one whose delete was cut short): a snapshot not yet
        # restored means stopped on purpose; otherwise it died.
        if PageStore(self.dir(sandbox_id)).restorable():
            return Status(State.STOPPED)
        if st is None:
            return Status(State.DEAD, DeathCause.EXITED)
        return Status(State.DEAD, DeathCause.OOM if self.cgroups.oom_killed(sandbox_id) else DeathCause.EXITED)

    def usage(self, sandbox_id: str) -> Usage | None:
        cpu, memory = self.cgroups.cpu_seconds(sandbox_id), self.cgroups.memory_usage(sandbox_id)
        if cpu is None or memory is None:
            return None
        used = total = 0
        disk = self.dir(sandbox_id) / "disk"
        if os.path.ismount(disk):  # the loop-mounted ext4 of its own disk
            fs = os.statvfs(disk)
            total, used = fs.f_blocks * fs.f_frsize, (fs.f_blocks - fs.f_bfree) * fs.f_frsize
        return Usage(cpu_seconds=cpu, memory_bytes=memory, disk_used_bytes=used, disk_total_bytes=total)

    # ------------------------------------------------------------ exit watching

    async def watch(self, sandbox_id: str) -> None:
        """Reap the sandbox's processes as they exit, and hear at once when it dies on its own
        (an OOM kills the whole sandbox, agent included)."""
        pid, gofer = self.runsc.pids(sandbox_id)
        if pid:
            first_to_go_out_of_memory(pid)
            self.processes.track(pid, lambda: self._exited(sandbox_id, pid))
        if gofer:
            self.processes.track(gofer)
        self.sandbox_pids[sandbox_id] = pid or 0

    def _exited(self, sandbox_id: str, pid: int) -> None:
        if self.sandbox_pids.get(sandbox_id) != pid:
            return  # an exit we caused (stop, destroy): nothing to report
        del self.sandbox_pids[sandbox_id]
        if sandbox_id in self.agents:
            self.agents[sandbox_id].abort()
        if self.exit_listener is not None:
            task = asyncio.get_running_loop().create_task(self.exit_listener(sandbox_id))
            self.exit_tasks.add(task)
            task.add_done_callback(self.exit_tasks.discard)

    def expect_exit(self, sandbox_id: str) -> None:
        """We are about to end this sandbox's processes: their exit is not a death to report."""
        self.sandbox_pids.pop(sandbox_id, None)

    # ------------------------------------------------------------ host objects (tests' clean-state checks)

    def leftovers(self, keep: frozenset[str] = frozenset()) -> dict[str, list[str]]:
        """Every host object of this engine instance that belongs to no sandbox in `keep`."""

        def stray(name: str) -> bool:
            return not any(i in name for i in keep)

        netns, host_ifs = self.network.leftovers()
        dirs = list(self.sandboxes_dir.iterdir()) if self.sandboxes_dir.is_dir() else []
        mounts = [
            line.split()[1]
            for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1].startswith(str(self.data_dir))
        ]
        kept = [r for r in map(self.record_on_disk, keep) if r is not None]  # works without start_engine
        kept_ifs = {self.link(r).host_if for r in kept}
        kept_slots = {str(r.slot) for r in kept}
        kept_volumes = {str(self.volume_mounts.mountpoint(v["image"])) for r in kept for v in r.volumes}
        return {
            "runsc": [c for c in self.runsc.list_ids() if c not in keep],
            "netns": [n for n in netns if stray(n)],
            "veth": [i for i in host_ifs if i not in kept_ifs],
            "nft": [
                o
                for o in self.network.sandbox_objects()
                if o.rpartition("_")[2] not in kept_slots and not any(f'"{i}"' in o for i in kept_ifs)
            ],
            "cgroups": [c for c in self.cgroups.leftovers() if stray(c)],
            "mounts": [m for m in mounts if stray(m) and m not in kept_volumes],
            "dirs": [d.name for d in dirs if d.name not in keep],
            **self.kept.leftovers(keep),
            "scratch": [str(p) for d in dirs for p in d.glob("*.tmp")]
            + [str(p) for p in self.memory_scratch_root.glob("*") if p.name not in keep],
            "packs": [p for d in dirs for p in PageStore(d).stray_packs()],
        }

    def record_on_disk(self, sandbox_id: str) -> Record | None:
        try:
            return Record.load(self.dir(sandbox_id))
        except (OSError, ValueError, TypeError):
            return None

    def scrub(self) -> None:
        """Force-remove everything `leftovers` reports and the host-wide objects (no daemon running)."""
        left = self.leftovers()
        for cid in left["runsc"]:
            state = self.cgroups.freezer_state(cid)
            if state.exists():
                state.write_text("THAWED")  # runsc delete talks to the sandbox
            subprocess.run(self.runsc.argv("delete", "-force", cid), capture_output=True, timeout=60, check=False)
        for m in sorted(left["mounts"], reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True, check=False)
        for ns in left["netns"]:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, check=False)
        for i in left["veth"]:
            subprocess.run(["ip", "link", "delete", i], capture_output=True, check=False)
        shutil.rmtree(self.kept.dir, ignore_errors=True)
        shutil.rmtree(self.memory_scratch_root, ignore_errors=True)
        shutil.rmtree(self.kept.pages, ignore_errors=True)
        for cg in sorted(self.cgroups.leftovers(), key=len, reverse=True):
            self.cgroups.remove(Path(cg).name)
        self.cgroups.remove_parent()
        subprocess.run(["nft", "delete", "table", "inet", self.network.table], capture_output=True, check=False)
        self.network.remove_routing_guard_now()
        self.network.restore_uplink_forwarding()


def read_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default
