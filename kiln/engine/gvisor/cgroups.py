"""The host cgroups (v1) of the engine's sandboxes: `<controller>/kiln-<prefix>/<sandbox id>`.

runsc makes them from the bundle's cgroupsPath; the engine reads the freezer (pause/resume), the
memory controller (usage, OOM kills) and cpuacct, and removes what an interrupted delete leaves.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


class Cgroups:
    def __init__(self, parent: str, root: Path = CGROUP_ROOT):
        self.parent = parent
        self.root = root

    def path_for_runsc(self, sandbox_id: str) -> str:
        return f"/{self.parent}/{sandbox_id}"

    def controllers(self) -> list[str]:
        try:
            return [c for c in os.listdir(self.root) if (self.root / c / "tasks").exists()]
        except OSError:
            return []

    def dir(self, controller: str, sandbox_id: str) -> Path:
        return self.root / controller / self.parent / sandbox_id

    def freezer_state(self, sandbox_id: str) -> Path:
        return self.dir("freezer", sandbox_id) / "freezer.state"

    def memory_usage(self, sandbox_id: str) -> int | None:
        try:
            return int((self.dir("memory", sandbox_id) / "memory.usage_in_bytes").read_text())
        except (OSError, ValueError):
            return None

    def memory_limits(self, sandbox_id: str) -> tuple[int, int | None] | None:
        """(memory.limit_in_bytes, memory.memsw.limit_in_bytes or None without swap accounting)."""
        d = self.dir("memory", sandbox_id)
        try:
            memsw = d / "memory.memsw.limit_in_bytes"
            return int((d / "memory.limit_in_bytes").read_text()), int(memsw.read_text()) if memsw.exists() else None
        except (OSError, ValueError):
            return None

    def set_memory_limits(self, sandbox_id: str, limits: tuple[int, int | None]) -> None:
        """Set both limits, in the order the kernel accepts (memsw may never be below memory's)."""
        d = self.dir("memory", sandbox_id)
        memory, memsw = limits
        files = [("memory.limit_in_bytes", memory), ("memory.memsw.limit_in_bytes", memsw)]
        current = self.memory_limits(sandbox_id)
        if current is not None and memory > current[0]:
            files.reverse()  # raising: memsw first
        for name, value in files:
            if value is not None:
                (d / name).write_text(str(value))

    def cpu_seconds(self, sandbox_id: str) -> float | None:
        try:
            return int((self.dir("cpuacct", sandbox_id) / "cpuacct.usage").read_text()) / 1e9
        except (OSError, ValueError):
            return None

    def oom_killed(self, sandbox_id: str) -> bool:
        try:
            for line in (self.dir("memory", sandbox_id) / "memory.oom_control").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
        except (OSError, ValueError):
            pass
        return False

    def remove(self, sandbox_id: str) -> None:
        """Remove the sandbox's directories in every controller (children first); busy ones stay."""
        for controller in self.controllers():
            path = self.dir(controller, sandbox_id)
            if path.exists():
                for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(str(p)), reverse=True):
                    _rmdir(sub)
                _rmdir(path)

    def remove_parent(self) -> None:
        for controller in self.controllers():
            _rmdir(self.root / controller / self.parent)

    def leftovers(self) -> list[str]:
        found = []
        for controller in self.controllers():
            parent = self.root / controller / self.parent
            if parent.is_dir():
                found += [str(p) for p in parent.iterdir() if p.is_dir()]
        return found


def _rmdir(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()
