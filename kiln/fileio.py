"""Atomic file writes: the one way kiln replaces a file that must never be seen half-written
(keys, configs, records, manifests). A crash leaves either the old file or the new one."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes | str, mode: int = 0o600, durable: bool = True) -> None:
    """Write to a temporary file beside `path` (created with `mode`), fsync it, rename it over `path`.
    durable=False skips the fsync, for files whose last version may be lost in a host crash (never
    half-written, still: the rename is atomic)."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(path.name + ".tmp")  # one writer per file; a crash leaves only this behind
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def key_file(path: Path, make) -> bytes:
    """A key made once (by `make()`) and kept in `path`, root-only and durable: the key of every later start."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(make())
            f.flush()
            os.fsync(f.fileno())
    return path.read_bytes()
