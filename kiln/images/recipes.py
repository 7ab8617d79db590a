"""The built-in images: each a recipe of Debian packages and set-up hooks, built once per machine.

A recipe's key is a hash of everything that goes into it, so an image built from one recipe is
found again by any checkout on the same machine (the cache is machine-wide), and a changed recipe
builds a new image instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

KILN = Path(__file__).resolve().parents[1]  # the package: sources of files copied into images

SUITE = "bookworm"
RECIPE_FORMAT = 1  # raise when the way recipes are built changes
# Documentation and translations are dead weight in a sandbox image.
PATH_EXCLUDES = ("/usr/share/man/*", "/usr/share/locale/*", "/usr/share/doc/*", "/usr/share/info/*")
# The unprivileged user that exec and shells run as by default (uid/gid 1000), with /workspace.
KILN_USER = (
    'echo "kiln:x:1000:1000:kiln:/home/kiln:/bin/bash" >> "$1/etc/passwd"',
    'echo "kiln:x:1000:" >> "$1/etc/group"',
    'echo "kiln:*:19000:0:99999:7:::" >> "$1/etc/shadow"',
    'mkdir -p "$1/home/kiln" "$1/workspace" && chown 1000:1000 "$1/home/kiln" "$1/workspace"',
)
SUDO_FOR_KILN = ('echo "kiln ALL=(ALL) NOPASSWD:ALL" > "$1/etc/sudoers.d/kiln" && chmod 0440 "$1/etc/sudoers.d/kiln"',)


KEYED_ALWAYS = ("name", "description", "variant", "packages", "hooks")  # the fields recipes had at first


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    variant: str  # mmdebstrap's: essential (no apt) or apt
    packages: tuple[str, ...]
    hooks: tuple[str, ...] = KILN_USER
    pip: tuple[str, ...] = ()  # PyPI requirements (pinned), installed into PIP_TARGET from the host's sources
    copies: tuple[tuple[str, str], ...] = ()  # (file of the kiln package, where it goes in the image)
    env: tuple[tuple[str, str], ...] = ()  # the image's environment
    start: tuple[str, ...] = ()  # what every boot starts (as the image's user)
    workdir: str = ""

    @property
    def key(self) -> str:
        """12 hex digits of the recipe's content (and of the files it copies): the image's directory is
        `<name>-<key>`."""
        fields = {k: v for k, v in asdict(self).items() if v or k in KEYED_ALWAYS}  # empty extras: keys as before
        if self.copies:
            fields["copied"] = {src: hashlib.sha256((KILN / src).read_bytes()).hexdigest() for src, _ in self.copies}
        blob = json.dumps({"format": RECIPE_FORMAT, "suite": SUITE, "excludes": PATH_EXCLUDES, **fields})
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def dir_name(self) -> str:
        return f"{self.name}-{self.key}"


MINIMAL = Recipe(
    name="minimal",
    description="Debian bookworm with python3: the smallest image, the fastest to build",
    variant="essential",
    packages=("python3", "procps"),
)

DEFAULT = Recipe(
    name="default",
    description="a developer image: git, curl, python3 with pip and venv, node and npm, gcc and make, sudo",
    variant="apt",
    packages=(
        "bash",
        "build-essential",
        "ca-certificates",
        "curl",
        "git",
        "jq",
        "less",
        "locales",
        "nodejs",
        "npm",
        "openssh-client",
        "procps",
        "python3",
        "python3-pip",
        "python3-venv",
        "sudo",
        "unzip",
        "vim-tiny",
        "wget",
        "zip",
    ),
    hooks=KILN_USER + SUDO_FOR_KILN,
)

# E2B's templates run as `user` (uid 1000, /home/user, passwordless sudo): the E2B SDKs' `base` template
# is kiln's developer image with that user instead of `kiln`.
E2B_USER = (
    'echo "user:x:1000:1000:user:/home/user:/bin/bash" >> "$1/etc/passwd"',
    'echo "user:x:1000:" >> "$1/etc/group"',
    'echo "user:*:19000:0:99999:7:::" >> "$1/etc/shadow"',
    'mkdir -p "$1/home/user" && chown 1000:1000 "$1/home/user"',
    'echo "user ALL=(ALL) NOPASSWD:ALL" > "$1/etc/sudoers.d/user" && chmod 0440 "$1/etc/sudoers.d/user"',
    # The SDKs run every command as `bash -l -c`: /etc/profile's `$(id -u)` is two process starts, ~58 ms
    # under gVisor, on each one; bash knows its uid already ($EUID), other shells still ask id.
    'sed -i \'s/"$(id -u)"/"${EUID:-$(id -u)}"/g\' "$1/etc/profile"',
)

E2B_BASE = Recipe(
    name="e2b-base",
    description="the E2B SDKs' `base` template: the developer image, run as `user` in /home/user",
    variant="apt",
    packages=DEFAULT.packages,
    hooks=E2B_USER,
)

PIP_TARGET = "/opt/kiln-pip"  # where a recipe's PyPI packages go (on the image's PYTHONPATH)

# E2B's code interpreter: `base` plus Jupyter kernels (Python, bash), the Python data stack from PyPI,
# and kiln's server for E2B's /execute contract on port 49999 (kiln/e2b/code_interpreter_server.py).
E2B_CODE_INTERPRETER = replace(
    E2B_BASE,
    name="e2b-code-interpreter",
    description="the E2B SDKs' `code-interpreter-v1` template: `base` with Jupyter kernels and numpy, pandas, "
    "matplotlib, serving run_code on port 49999",
    pip=(
        "jupyter_client==8.10.0",
        "ipykernel==7.4.0",
        "bash_kernel==0.10.0",
        "numpy==2.4.6",
        "pandas==3.1.1",
        "matplotlib==3.11.2",
    ),
    copies=(
        ("e2b/code_interpreter_server.py", "/opt/kiln-interpreter/server.py"),
        # the bash kernel's spec, which bash_kernel's own installer would write
        ("e2b/bash_kernel.json", f"{PIP_TARGET}/share/jupyter/kernels/bash/kernel.json"),
    ),
    env=(
        ("PYTHONPATH", PIP_TARGET),
        ("JUPYTER_PATH", f"{PIP_TARGET}/share/jupyter"),
        ("MPLCONFIGDIR", "/tmp/matplotlib"),
    ),
    start=("python3", "/opt/kiln-interpreter/server.py"),
    workdir="/home/user",
)

BUILTIN: dict[str, Recipe] = {r.name: r for r in (MINIMAL, DEFAULT, E2B_BASE, E2B_CODE_INTERPRETER)}
DEFAULT_IMAGE = DEFAULT.name
