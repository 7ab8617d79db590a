"""Which config file the daemon reads, and its default data dir, without the config model: the CLI's
fast path (kiln/cli/fast.py) needs them and must not pay for importing pydantic."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CONFIG_PATHS = [Path("/etc/kiln/config.yaml")]
DEFAULT_DATA_DIR = Path("/var/lib/kiln")
DEFAULT_IMAGES_DIR = Path("/var/cache/kiln/images")  # built-in images, keyed by recipe: one copy per machine


def config_file(path: str | os.PathLike | None = None) -> Path | None:
    """`path`, else $KILN_CONFIG, else /etc/kiln/config.yaml if present, else None (defaults)."""
    path = path or os.environ.get("KILN_CONFIG")
    if path:
        return Path(path)
    return next((p for p in DEFAULT_CONFIG_PATHS if p.exists()), None)
