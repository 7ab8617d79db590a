"""The agent's own runtime: the host's python3 with its stdlib and shared libraries, and kiln-init
(the agent's PID 1, kiln/agent/init.c, compiled static), mounted read-only into every sandbox at
/opt/kiln/runtime, so any image runs the agent, with or without a python3 or libc of its own.

The interpreter starts through the runtime's own dynamic loader with the runtime's libraries, so
nothing of the image's libc or loader is used. The copy is keyed by the interpreter's content and
kiln-init's source: a host upgrade makes a new runtime and leaves the old one for the sandboxes
whose memory still maps it (and whose bundles name it).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

from ..agent import AGENT_DIR
from ..fileio import write_atomic
from .builder import build_lock

HOST_PYTHON = Path("/usr/bin/python3")
INIT_SOURCE = AGENT_DIR / "init.c"
INIT = "bin/kiln-init"
GUEST_RUNTIME = "/opt/kiln/runtime"
# Not needed by a stdlib-only agent, and large.
SKIP = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "site-packages",
    "dist-packages",
    "config-3.11-x86_64-linux-gnu",
}
READY = ".ready"


class RuntimeUnavailable(Exception):
    pass


def interpreter() -> Path:
    if not HOST_PYTHON.exists():
        raise RuntimeUnavailable(f"{HOST_PYTHON} is missing: kiln's agent runs on the host's python3 (apt: python3)")
    return HOST_PYTHON.resolve()


def runtime_key(python: Path) -> str:
    return hashlib.sha256(python.read_bytes() + INIT_SOURCE.read_bytes()).hexdigest()[:12]


def compile_init(target: Path) -> None:
    """kiln-init, static: it runs in any image (the libc, if any, is the image's)."""
    compiler = shutil.which("gcc")
    if compiler is None:
        raise RuntimeUnavailable("gcc is missing: kiln builds its sandboxes' PID 1 with it (apt: gcc libc6-dev)")
    out = subprocess.run(
        [compiler, "-static", "-Os", "-s", "-Wall", "-o", str(target), str(INIT_SOURCE)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeUnavailable(f"building kiln-init failed (apt: gcc libc6-dev): {out.stderr.strip()[-500:]}")


def stdlib_dir(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-S", "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


def shared_libraries(binaries: list[Path]) -> set[Path]:
    """Every library the binaries load, and the dynamic loader itself, as ldd resolves them."""
    libs: set[Path] = set()
    for b in binaries:
        out = subprocess.run(["ldd", str(b)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            m = re.search(r"(/\S+) \(0x", line)
            if m:
                libs.add(Path(m.group(1)))
    return libs


def loader_name() -> str:
    return "ld-linux-x86-64.so.2" if os.uname().machine == "x86_64" else "ld-linux-aarch64.so.1"


def ensure_runtime(images_dir: Path) -> Path:
    """The runtime directory for the host's current python3, copied once."""
    python = interpreter()
    target = images_dir / f"runtime-{runtime_key(python)}"
    if (target / READY).exists():
        return target
    with build_lock(images_dir, target.name):
        if (target / READY).exists():
            return target
        shutil.rmtree(target, ignore_errors=True)
        stdlib = stdlib_dir(python)
        version = stdlib.name  # python3.11
        lib = target / "lib"
        (target / "bin").mkdir(parents=True)
        shutil.copy2(python, target / "bin" / "python3")
        shutil.copytree(
            stdlib,
            lib / version,
            symlinks=True,
            ignore=lambda d, names: [n for n in names if Path(d) == stdlib and n in SKIP],
        )
        extensions = list((lib / version / "lib-dynload").glob("*.so"))
        for so in shared_libraries([python, *extensions]):
            shutil.copy2(so, lib / so.name)
        compile_init(target / INIT)
        write_atomic(target / READY, version, mode=0o644)
        return target


def agent_python() -> list[str]:
    """The runtime's python as the sandbox runs it: through the runtime's loader and libraries
    (with RUNTIME_ENV in its environment)."""
    lib = f"{GUEST_RUNTIME}/lib"
    return [f"{lib}/{loader_name()}", "--library-path", lib, f"{GUEST_RUNTIME}/bin/python3", "-S", "-B"]


def python_request(script: str, timeout_sec: int) -> dict:
    """An exec request running `script` as root on the runtime's python (any image has it)."""
    return {"argv": [*agent_python(), "-c", script], "user": 0, "env": dict(RUNTIME_ENV), "timeout_sec": timeout_sec}


def agent_argv(guest_agent: str, config: str) -> list[str]:
    """PID 1 of a sandbox: kiln-init, which runs the agent's server (and runs it again if it dies)."""
    return [f"{GUEST_RUNTIME}/{INIT}", *agent_python(), "-u", f"{guest_agent}/guest.py", config]


RUNTIME_ENV = {"PYTHONHOME": GUEST_RUNTIME}  # the agent drops it at start: its children never see it
